"""Voice folders: audio checks, word timings, Whisper, build, registry, rebuild, list/show/remove.

Everything runs on the tiny random Dia2 and, for the Whisper path, a tiny random Whisper
checkpoint written by the test: no network, no files outside tmp_path.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from safetensors.torch import load_file

from callbridge.voices import MANIFEST_FILE, SNAPSHOT_FILE, VoiceError, VoiceRegistry
from callbridge.voices import build as voice_build
from callbridge.voices.build import (
    PROMPT_FILE,
    S2_FILE,
    S2_WORDS_FILE,
    WORDS_FILE,
    VoiceBuildError,
    VoiceManifest,
    VoiceRequest,
    build_voice,
    check_prompt_audio,
    load_whisper,
    prepare_prompt_audio,
    prepare_voice,
    read_source_audio,
    rebuild_all,
    tidy_words,
    transcribe_with,
)
from callbridge.voices.cli import main_voice
from dia2 import Dia2
from dia2.audio_io import synthetic_speechlike
from dia2.random_checkpoint import write_random_checkpoint
from dia2.text import WordTiming

RATE = 24000
WORDS = [
    {"word": "Hello", "start": 0.1, "end": 0.5},
    {"word": "there.", "start": 0.6, "end": 1.2},
    {"word": "How", "start": 1.4, "end": 1.6},
    {"word": "are", "start": 1.7, "end": 2.0},
    {"word": "you?", "start": 2.1, "end": 2.8},
]
S2_WORDS = [{"word": "Hi", "start": 0.1, "end": 0.4}, {"word": "there.", "start": 0.5, "end": 0.9}]


def speech(seconds: float = 3.5, seed: int = 1, f0: float = 140.0) -> np.ndarray:
    return synthetic_speechlike(seconds, seed=seed, f0_hz=f0)


def write_audio(path: Path, samples: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> Path:
    sf.write(str(path), samples, rate, subtype=subtype)
    return path


def write_words(path: Path, words: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(words))
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main_voice(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True)
def own_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads an empty config of its own (built-in defaults), not config/callbridge.toml."""
    config = tmp_path / "callbridge.toml"
    config.write_text("# defaults only\n")
    monkeypatch.setenv("CALLBRIDGE_CONFIG", str(config))


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """A 3.5 s S1 recording (44.1 kHz stereo) and a 1 s S2 clip (FLAC), with word files."""
    s1 = speech()
    s1_44k = soxr.resample(s1, RATE, 44100)
    return {
        "audio": write_audio(tmp_path / "me.wav", np.stack([s1_44k, s1_44k], axis=1), 44100),
        "words": write_words(tmp_path / "me.json", WORDS),
        "s2": write_audio(tmp_path / "other.flac", speech(1.0, seed=2, f0=210.0)),
        "s2_words": write_words(tmp_path / "other.json", S2_WORDS),
    }


def request(inputs: dict[str, Path], name: str = "amy", *, with_s2: bool = True) -> VoiceRequest:
    return VoiceRequest(
        name=name,
        audio=inputs["audio"],
        words=inputs["words"],
        s2_audio=inputs["s2"] if with_s2 else None,
        s2_words=inputs["s2_words"] if with_s2 else None,
    )


# ---------------------------------------------------------------------------- audio checks


def test_clean_speech_passes_and_comes_out_24k_mono_at_one_level() -> None:
    pcm, found = check_prompt_audio(speech(3.5), RATE)
    assert found == []
    assert pcm.dtype == np.float32 and pcm.ndim == 1 and pcm.size == pytest.approx(3.5 * RATE, abs=RATE * 0.05)
    assert float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) == pytest.approx(0.1, rel=0.05)
    assert float(np.abs(pcm).max()) <= 0.95


def test_stereo_is_mixed_to_mono_not_refused() -> None:
    left = speech(3.5)
    pcm, found = check_prompt_audio(np.stack([left, 0.5 * left], axis=1), RATE)
    assert pcm.ndim == 1 and found == []
    assert pcm.size == pytest.approx(3.5 * RATE, abs=RATE * 0.05)


def test_8khz_phone_audio_is_resampled_to_24k() -> None:
    pcm8k = soxr.resample(speech(3.5), RATE, 8000)
    pcm, found = check_prompt_audio(pcm8k, 8000)
    assert found == []
    assert pcm.size == pytest.approx(3.5 * RATE, abs=RATE * 0.05)


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        (np.zeros(4 * RATE, dtype=np.float32), "is silent"),
        (speech(1.5), "too short: 1.5 s"),
        (speech(31.0), "too long: 31.0 s"),
    ],
    ids=["silent", "too-short", "too-long"],
)
def test_unusable_audio_is_refused_with_the_reason(samples: np.ndarray, expected: str) -> None:
    with pytest.raises(VoiceBuildError, match=expected) as info:
        check_prompt_audio(samples, RATE)
    if "too" in expected:
        assert "3-30 s" in str(info.value)


def test_short_speech_padded_with_silence_is_still_too_short() -> None:
    """Length is measured after trimming: 2 s of speech in a 6 s file does not pass."""
    padded = np.concatenate([np.zeros(2 * RATE, np.float32), speech(2.0), np.zeros(2 * RATE, np.float32)])
    with pytest.raises(VoiceBuildError, match=r"too short: 2\.\d s of sound after trimming silence \(6\.0 s"):
        check_prompt_audio(padded, RATE)


def test_clipping_is_a_warning_naming_the_share() -> None:
    # Decision: clipped audio still builds (the clone copies the distortion); the user is told.
    clipped = np.clip(6.0 * speech(3.5), -1.0, 1.0)
    pcm, found = check_prompt_audio(clipped, RATE)
    assert pcm.size > 0
    assert len(found) == 1 and "clipped" in found[0] and "% of samples" in found[0]


def test_two_voices_at_different_pitch_give_a_speaker_warning() -> None:
    gap = np.zeros(int(0.6 * RATE), dtype=np.float32)
    two = np.concatenate([speech(1.6, f0=110.0), gap, speech(1.6, seed=2, f0=230.0)])
    _, found = check_prompt_audio(two, RATE)
    assert len(found) == 1 and "more than one speaker" in found[0]


def test_silence_is_trimmed_and_word_timings_follow(tmp_path: Path) -> None:
    padded = np.concatenate([np.zeros(RATE, np.float32), speech(3.5), np.zeros(RATE // 2, np.float32)])
    audio = write_audio(tmp_path / "padded.wav", padded)
    shifted = [{**w, "start": w["start"] + 1.0, "end": w["end"] + 1.0} for w in WORDS]
    voice = prepare_voice(VoiceRequest("amy", audio, words=write_words(tmp_path / "w.json", shifted)))
    info = voice.s1.info
    assert info.trimmed_start_s == pytest.approx(0.9, abs=0.03)  # 1 s of silence less the 0.1 s margin
    assert info.duration_s == pytest.approx(3.7, abs=0.05)
    assert [w.word for w in voice.s1.words] == [w["word"] for w in WORDS]
    assert voice.s1.words[0].start_s == pytest.approx(0.1 + 1.0 - info.trimmed_start_s, abs=1e-6)


def test_corrupt_and_missing_files_are_refused_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(256)))
    with pytest.raises(VoiceBuildError, match=r"bad\.wav: cannot read audio .*WAV"):
        read_source_audio(bad)
    with pytest.raises(VoiceBuildError, match="audio file not found"):
        read_source_audio(tmp_path / "nope.wav")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p.write_bytes(b"\x00garbage" * 50), "cannot read audio"),
        (lambda p: write_audio(p, np.zeros(4 * RATE, np.float32)), "is silent"),
        (lambda p: write_audio(p, speech(1.0)), "too short"),
    ],
    ids=["corrupt", "silent", "too-short"],
)
def test_cli_refuses_bad_audio_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, expected: str
) -> None:
    audio = tmp_path / "in.wav"
    make(audio)
    rc, _, err = run_cli(["build", "amy", "--audio", str(audio), "--words", str(write_words(tmp_path / "w.json", WORDS)),
                          "--model", "/nonexistent-never-loaded", "--voices-dir", str(tmp_path / "voices")], capsys)
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0]
    assert "Traceback" not in err
    assert not (tmp_path / "voices" / "amy").exists()


# ---------------------------------------------------------------------------- words


def test_words_file_problems_name_the_file_and_item(tmp_path: Path) -> None:
    audio = write_audio(tmp_path / "a.wav", speech(3.5))
    cases = {
        "not json": (tmp_path / "x.json", "{", "not valid JSON"),
        "no end": (tmp_path / "y.json", json.dumps([{"word": "Hi", "start": 0.1}]), "item 0 must have"),
        "backwards": (tmp_path / "z.json", json.dumps([{"word": "Hi", "start": 0.5, "end": 0.2}]), "starts after it ends"),
        "milliseconds": (tmp_path / "m.json", json.dumps([{"word": "Hi", "start": 100, "end": 500}]), "ends at 500 s"),
    }
    for path, text, expected in cases.values():
        path.write_text(text)
        with pytest.raises(VoiceBuildError, match=expected):
            prepare_voice(VoiceRequest("amy", audio, words=path))


def test_more_words_than_the_clip_can_hold_is_a_warning(tmp_path: Path) -> None:
    audio = write_audio(tmp_path / "a.wav", speech(3.5))
    crowded = [{"word": f"w{i}", "start": 0.1 * i, "end": 0.1 * i + 0.05} for i in range(30)]
    voice = prepare_voice(VoiceRequest("amy", audio, words=write_words(tmp_path / "w.json", crowded)))
    assert any("30 words for 3.5 s" in w for w in voice.warnings)


def test_speaker_marks_in_a_transcript_warn_and_are_not_spoken() -> None:
    words = [WordTiming(w, i * 0.3, i * 0.3 + 0.2) for i, w in enumerate(
        ["[S1]", "Hello", "there.", "-", "Hi!", ">>", "[S2]", "Fine", "...", "thanks."])]
    kept, found = tidy_words(words, what="S1 prompt", hint="")
    assert [w.word for w in kept] == ["Hello", "there.", "Hi!", "Fine", "thanks."]
    assert len(found) == 1 and "more than one speaker" in found[0]
    for mark in ("-", ">>", "[S2]"):
        assert mark in found[0]
    kept, found = tidy_words([WordTiming("well-known", 0.0, 0.4), WordTiming("words.", 0.5, 0.9)], what="S1", hint="")
    assert found == [] and [w.word for w in kept] == ["well-known", "words."]


# ---------------------------------------------------------------------------- whisper


class FakeWhisper:
    """Stands in for a loaded Whisper model: returns a fixed result and records the call."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result
        self.calls: list[tuple[np.ndarray, dict[str, Any]]] = []

    def transcribe(self, audio: np.ndarray, **kwargs: Any) -> dict[str, Any]:
        self.calls.append((audio, kwargs))
        return self.result


def test_transcribe_collects_words_from_all_segments_on_16k_audio() -> None:
    fake = FakeWhisper({"segments": [
        {"words": [{"word": " Hello", "start": 0.1, "end": 0.4, "probability": 0.9},
                   {"word": "  ", "start": 0.4, "end": 0.5, "probability": 0.9}]},
        {},
        {"words": [{"word": " world.", "start": 0.05, "end": 0.02, "probability": 0.7},  # out of order
                   {"word": "late", "start": 9.0, "end": 9.5, "probability": 0.8}]},  # past the clip
    ]})
    pcm = speech(3.0)
    t = transcribe_with(fake, pcm, language="en", model_name="fake")
    assert [(w.word, w.start_s, w.end_s) for w in t.words] == [
        ("Hello", 0.1, 0.4), ("world.", 0.1, 0.1), ("late", 3.0, 3.0)]
    assert t.mean_probability == pytest.approx(0.8)  # of the kept words
    audio, kwargs = fake.calls[0]
    assert audio.dtype == np.float32 and audio.size == pytest.approx(3.0 * 16000, abs=2)
    assert kwargs["word_timestamps"] is True and kwargs["fp16"] is False and kwargs["language"] == "en"


def test_whisper_hearing_no_words_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeWhisper({"segments": [{"words": [{"word": " ", "start": 0.0, "end": 0.1}]}, {"words": []}]})
    monkeypatch.setattr(voice_build, "load_whisper", lambda name: fake)
    audio = write_audio(tmp_path / "a.wav", speech(3.5))
    with pytest.raises(VoiceBuildError, match=r"no words in the S1 prompt: whisper \(base\.en\) heard none") as info:
        prepare_voice(VoiceRequest("amy", audio))
    assert "--words words.json" in str(info.value)


def test_missing_whisper_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "whisper", None)  # makes `import whisper` fail
    with pytest.raises(VoiceBuildError, match=r'pip install "callbridge\[voice\]"'):
        load_whisper("base.en")


def test_s2_clip_without_words_and_no_whisper_names_s2_words(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The S1 words came from --words; the S2 clip had none and Whisper could not run: the error
    named only --words, which the user had already given."""
    monkeypatch.setitem(sys.modules, "whisper", None)
    rc, _, err = run_cli(["build", "amy", "--audio", str(inputs["audio"]), "--words", str(inputs["words"]),
                          "--s2-audio", str(inputs["s2"]), "--model", "/nonexistent-never-loaded",
                          "--voices-dir", str(tmp_path / "voices")], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err
    assert "the S2 clip has no word timings" in errors[0] and "pass --s2-words words.json" in errors[0]


def test_named_whisper_model_offline_names_the_flag_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: Any, **kwargs: Any) -> Any:
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(VoiceBuildError) as info:
        load_whisper("tiny.en")
    message = str(info.value)
    assert "--whisper-model tiny.en" in message and str(tmp_path / "cache" / "whisper" / "tiny.en.pt") in message
    assert "--words" in message and "\n" not in message
    with pytest.raises(VoiceBuildError, match="neither a Whisper model name"):
        load_whisper(str(tmp_path / "missing.pt"))


@pytest.fixture(scope="module")
def random_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Whisper checkpoint in openai-whisper's file format (~3.5 M params).

    Its text context is 64, not the real 448: whisper decodes up to half the context per
    30 s window, and a random model always runs to that limit, so 448 costs 224 decoder
    steps per window where 64 costs 32. Nothing else in the path depends on it."""
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51865, n_text_ctx=64, n_text_state=64, n_text_head=2, n_text_layer=1)
    torch.manual_seed(0)
    model = Whisper(dims)
    path = tmp_path_factory.mktemp("whisper") / "random-tiny-whisper.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


def test_build_through_real_whisper_with_a_random_checkpoint(
    tmp_path: Path, tiny_model_dir: Path, random_whisper: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real openai-whisper path runs end to end (load by path, transcribe with word
    timestamps). A random model's words are garbage, so the expected outcome is read from
    whisper's own raw result of that very call: its words end up in words.json, or, if it
    heard none, the build stops with the no-words message."""
    import whisper

    raw_results: list[dict[str, Any]] = []
    real_load = whisper.load_model

    def load_and_record(name: str, *args: Any, **kwargs: Any) -> Any:
        model = real_load(name, *args, **kwargs)
        real_transcribe = model.transcribe

        def transcribe(*a: Any, **kw: Any) -> dict[str, Any]:
            raw_results.append(real_transcribe(*a, **kw))
            return raw_results[-1]

        model.transcribe = transcribe  # shadows the method on this instance only
        return model

    monkeypatch.setattr(whisper, "load_model", load_and_record)
    audio = write_audio(tmp_path / "a.wav", speech(3.5))
    voices = tmp_path / "voices"
    rc, _, err = run_cli(["build", "amy", "--audio", str(audio), "--whisper-model", str(random_whisper),
                          "--model", str(tiny_model_dir), "--voices-dir", str(voices)], capsys)
    assert "transcribing with whisper" in err and len(raw_results) == 1
    heard = [w["word"].strip() for seg in raw_results[0]["segments"] for w in seg.get("words", [])]
    expected = [w for w in heard if any(c.isalnum() for c in w)]
    if expected:
        assert rc == 0, err
        stored = json.loads((voices / "amy" / WORDS_FILE).read_text(encoding="utf-8"))
        assert [w["word"] for w in stored] == expected
        assert all(0.0 <= w["start"] <= w["end"] <= 3.6 for w in stored)
        manifest = VoiceManifest.read(voices / "amy")
        assert manifest.whisper_model == str(random_whisper) and manifest.prompt.words_source == "whisper"
        assert manifest.transcript == " ".join(expected)
    else:
        assert rc == 2 and "error: no words in the S1 prompt: whisper" in err
        assert not (voices / "amy").exists()


# ---------------------------------------------------------------------------- build, registry, rebuild


def test_cli_build_writes_a_complete_voice_the_registry_loads(
    inputs: dict[str, Path], tmp_path: Path, tiny_model_dir: Path, tiny_runtime: Dia2,
    capsys: pytest.CaptureFixture[str],
) -> None:
    voices = tmp_path / "voices"
    rc, out, err = run_cli(["build", "amy", "--audio", str(inputs["audio"]), "--words", str(inputs["words"]),
                            "--s2-audio", str(inputs["s2"]), "--s2-words", str(inputs["s2_words"]),
                            "--model", str(tiny_model_dir), "--voices-dir", str(voices)], capsys)
    assert rc == 0, err
    folder = voices / "amy"
    for name in (PROMPT_FILE, WORDS_FILE, S2_FILE, S2_WORDS_FILE, SNAPSHOT_FILE, MANIFEST_FILE):
        assert (folder / name).is_file(), name
    assert not [p for p in voices.iterdir() if p.name.startswith(".")]  # no staging left behind
    for stage in ("read", "after trimming silence", "word timings", "snapshot: building", "wrote"):
        assert stage in err
    assert "no --s2-audio" not in err

    pcm, rate = sf.read(str(folder / PROMPT_FILE))
    assert rate == RATE and pcm.ndim == 1 and pcm.size == pytest.approx(3.5 * RATE, abs=0.05 * RATE)
    assert json.loads((folder / WORDS_FILE).read_text()) == WORDS
    manifest = VoiceManifest.read(folder)
    assert manifest.layout == "s1_s2" and manifest.s2 is not None and manifest.s2.transcript == "Hi there."
    assert manifest.transcript == "Hello there. How are you?"
    assert manifest.prompt.source_channels == 2 and manifest.prompt.source_sample_rate == 44100
    assert manifest.whisper_model is None and manifest.prompt.words_source == "file"
    assert manifest.model.source == str(tiny_model_dir.resolve())
    assert manifest.s1_frames + manifest.s2_frames == manifest.prompt_frames > 0

    registry = VoiceRegistry.load(tiny_runtime, voices, "amy", allow_demo=False, say=lambda _m: None)
    voice = registry.get("amy")
    assert voice.folder == folder and voice.snapshot.layout == "s1_s2"
    assert voice.snapshot.prompt_frames == manifest.prompt_frames


def test_manifest_round_trips(inputs: dict[str, Path], tmp_path: Path, tiny_runtime: Dia2) -> None:
    folder = build_voice(request(inputs), tiny_runtime, tmp_path / "voices", model_source="tiny")
    raw = json.loads((folder / MANIFEST_FILE).read_text())
    manifest = VoiceManifest.from_dict(raw)
    assert manifest.to_dict() == raw
    manifest.write(tmp_path)
    assert VoiceManifest.read(tmp_path) == manifest
    for key in ("model", "prompt", "transcript", "whisper_model", "built_at", "layout", "s2", "prompt_frames"):
        assert key in raw
    with pytest.raises(VoiceBuildError, match="voice format 99"):
        VoiceManifest.from_dict({**raw, "format_version": 99})


def test_s1_only_voice_warns_about_the_missing_s2_clip(inputs: dict[str, Path], tmp_path: Path) -> None:
    said: list[str] = []
    voice = prepare_voice(request(inputs, with_s2=False), said.append)
    assert voice.layout == "s1_only" and voice.s2 is None
    assert any(line.startswith("warning: no --s2-audio") for line in said)
    with pytest.raises(VoiceBuildError, match="s1_only places nothing after"):
        prepare_voice(VoiceRequest("amy", inputs["audio"], words=inputs["words"], s2_audio=inputs["s2"],
                                   s2_words=inputs["s2_words"], layout="s1_only"))


def test_rebuilding_for_the_same_model_reproduces_the_snapshot(
    inputs: dict[str, Path], tmp_path: Path, tiny_runtime: Dia2
) -> None:
    """The snapshot is built from the files as written, so the stored folder is enough."""
    voices = tmp_path / "voices"
    folder = build_voice(request(inputs), tiny_runtime, voices, model_source="tiny")
    before = load_file(str(folder / SNAPSHOT_FILE))
    report = rebuild_all(tiny_runtime, voices, model_source="tiny")
    assert report.rebuilt == ["amy"] and not report.failed
    after = load_file(str(folder / SNAPSHOT_FILE))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_other_model_is_refused_with_how_to_rebuild_and_rebuild_all_fixes_it(
    inputs: dict[str, Path], tmp_path: Path, tiny_model_dir: Path, tiny_runtime: Dia2,
    capsys: pytest.CaptureFixture[str],
) -> None:
    voices = tmp_path / "voices"
    folder = build_voice(request(inputs), tiny_runtime, voices, model_source=str(tiny_model_dir))
    words_before = (folder / WORDS_FILE).read_text()
    other_dir = write_random_checkpoint(tmp_path / "other-model", "tiny", seed=1)
    other = Dia2.load(other_dir, device="cpu", progress=False)
    with pytest.raises(VoiceError, match="another model") as info:
        VoiceRegistry.load(other, voices, "amy", allow_demo=False)
    assert "callbridge voice build --rebuild-all" in str(info.value)

    rc, out, err = run_cli(["show", "amy", "--model", str(other_dir), "--voices-dir", str(voices)], capsys)
    assert rc == 0 and "DOES NOT MATCH" in out and "--rebuild-all" in out

    rc, _, err = run_cli(["build", "--rebuild-all", "--model", str(other_dir), "--voices-dir", str(voices)], capsys)
    assert rc == 0, err
    assert "amy: rebuilt" in err and "transcribing" not in err
    assert (folder / WORDS_FILE).read_text() == words_before  # no re-transcription
    registry = VoiceRegistry.load(other, voices, "amy", allow_demo=False, say=lambda _m: None)
    assert registry.get("amy").snapshot.layout == "s1_s2"
    assert VoiceManifest.read(folder).model.source == str(other_dir.resolve())
    rc, out, _ = run_cli(["show", "amy", "--model", str(other_dir), "--voices-dir", str(voices)], capsys)
    assert "model:       matches" in out
    with pytest.raises(VoiceError, match="another model"):
        VoiceRegistry.load(tiny_runtime, voices, "amy", allow_demo=False)


def test_rebuild_all_reports_a_broken_voice_and_rebuilds_the_rest(
    inputs: dict[str, Path], tmp_path: Path, tiny_model_dir: Path, tiny_runtime: Dia2,
    capsys: pytest.CaptureFixture[str],
) -> None:
    voices = tmp_path / "voices"
    build_voice(request(inputs, "amy"), tiny_runtime, voices, model_source="tiny")
    broken = build_voice(request(inputs, "bob", with_s2=False), tiny_runtime, voices, model_source="tiny")
    (broken / WORDS_FILE).write_text("[")
    rc, _, err = run_cli(["build", "--rebuild-all", "--model", str(tiny_model_dir), "--voices-dir", str(voices)],
                         capsys)
    assert rc == 2
    assert "amy: rebuilt" in err and "bob: FAILED" in err and "not valid JSON" in err
    assert "error: 1 voice(s) failed to rebuild: bob" in err


def test_building_again_replaces_the_voice(inputs: dict[str, Path], tmp_path: Path, tiny_runtime: Dia2) -> None:
    voices = tmp_path / "voices"
    build_voice(request(inputs), tiny_runtime, voices, model_source="tiny")
    fewer = write_words(tmp_path / "fewer.json", WORDS[:3])
    said: list[str] = []
    folder = build_voice(VoiceRequest("amy", inputs["audio"], words=fewer), tiny_runtime, voices,
                         model_source="tiny", say=said.append)
    assert any("replaced the earlier voice" in line for line in said)
    manifest = VoiceManifest.read(folder)
    assert manifest.transcript == "Hello there. How" and manifest.s2 is None and not (folder / S2_FILE).exists()
    assert sorted(p.name for p in voices.iterdir()) == ["amy"]


# ---------------------------------------------------------------------------- list, show, remove


def test_show_list_and_remove(
    inputs: dict[str, Path], tmp_path: Path, tiny_model_dir: Path, tiny_runtime: Dia2,
    capsys: pytest.CaptureFixture[str],
) -> None:
    voices = tmp_path / "voices"
    build_voice(request(inputs, "amy"), tiny_runtime, voices, model_source=str(tiny_model_dir))
    build_voice(request(inputs, "bob", with_s2=False), tiny_runtime, voices, model_source=str(tiny_model_dir))
    (voices / "notes").mkdir()  # not a voice folder: listed never, removed never

    rc, out, _ = run_cli(["show", "amy", "--model", str(tiny_model_dir), "--voices-dir", str(voices)], capsys)
    assert rc == 0
    assert "transcript:  Hello there. How are you?" in out
    assert "duration:    3.50 s" in out
    assert "S2 clip:     1.00 s" in out and "model:       matches" in out
    rc, out, _ = run_cli(["show", "amy", "--json", "--voices-dir", str(voices)], capsys)
    assert json.loads(out) == json.loads((voices / "amy" / MANIFEST_FILE).read_text())

    rc, out, _ = run_cli(["list", "--voices-dir", str(voices)], capsys)
    lines = out.splitlines()
    assert rc == 0 and [line.split("\t")[0] for line in lines] == ["amy", "bob"]
    assert "3.5 s + S2 1.0 s" in lines[0] and "s1_only" in lines[1] and "Hello there." in lines[1]

    rc, out, _ = run_cli(["remove", "bob", "--voices-dir", str(voices)], capsys)
    assert rc == 0 and "removed voice 'bob'" in out and not (voices / "bob").exists()
    for name, expected in (("bob", "no voice 'bob'"), ("../amy", "invalid voice name"), ("a/b", "path separators"),
                           ("notes", "not a voice folder")):
        rc, _, err = run_cli(["remove", name, "--voices-dir", str(voices)], capsys)
        assert rc == 2 and err.startswith("error: ") and expected in err, (name, err)
    assert (voices / "amy").is_dir() and (voices / "notes").is_dir()


def test_cli_usage_errors_return_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["build", "amy", "--voices-dir", str(tmp_path)], capsys)
    assert rc == 2 and "error: voice build needs NAME and --audio FILE" in err
    rc, _, err = run_cli(["build", "amy", "--rebuild-all", "--voices-dir", str(tmp_path)], capsys)
    assert rc == 2 and "drop NAME" in err
    rc, _, err = run_cli(["frobnicate"], capsys)
    assert rc == 2 and "invalid choice" in err
    rc, _, err = run_cli(["show", "nobody", "--voices-dir", str(tmp_path)], capsys)
    assert rc == 2 and "error: no voice 'nobody'" in err


def test_level_is_raised_to_target_but_a_peak_is_never_pushed_past_095() -> None:
    """A quiet clip with one loud burst: the RMS target would push the burst past full scale,
    so the gain stops at the peak limit instead (normalising must not clip)."""
    quiet = speech(3.5) * 0.25
    quiet[40000:40100] *= 10.0  # a loud, not flat-topped, burst
    prepared = prepare_prompt_audio(quiet, RATE)
    assert prepared.warnings == ()
    assert float(np.abs(prepared.pcm24k).max()) == pytest.approx(0.95, abs=1e-3)
    assert float(np.sqrt(np.mean(prepared.pcm24k.astype(np.float64) ** 2))) < 0.1
