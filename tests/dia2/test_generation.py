"""Whole-utterance generation on the tiny random checkpoint: determinism, lengths, trace agreement, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from dia2 import Dia2, GenerationConfig, PromptClip, ScriptError, VoicePrompt
from dia2.audio_io import synthetic_speechlike
from dia2.cli import main as dia2_main
from dia2.errors import PromptError
from dia2.text import WordTiming
from dia2.trace import teacher_forced_trace

TEXT = "[S1] Hello there, how are you?"


def test_same_seed_same_tokens_and_different_seed_differs(tiny_runtime: Dia2) -> None:
    a = tiny_runtime.generate(TEXT, config=GenerationConfig(seed=3))
    b = tiny_runtime.generate(TEXT, config=GenerationConfig(seed=3))
    c = tiny_runtime.generate(TEXT, config=GenerationConfig(seed=4))
    assert torch.equal(a.codes, b.codes)
    assert np.array_equal(a.audio, b.audio)
    assert not torch.equal(a.codes, c.codes) if a.codes.shape == c.codes.shape else True


def test_output_length_follows_the_end_step(tiny_runtime: Dia2) -> None:
    result = tiny_runtime.generate(TEXT, config=GenerationConfig(seed=1))
    frames = result.codes.shape[1]
    # Without a prompt, frame f is complete after step f + 17: the last step emits the last frame.
    assert frames == result.steps - 17
    assert result.audio.shape == (frames * 1920,)
    assert result.audio.dtype == np.float32 and np.abs(result.audio).max() <= 1.0
    assert [w for w, _ in result.words] == ["Hello", "there,", "how", "are", "you?"]
    starts = [t for _, t in result.words]
    assert starts == sorted(starts) and starts[0] > 0
    assert result.codes.min() >= 0 and result.codes.max() < 2048


def test_trace_logits_equal_the_logits_seen_inside_generation(tiny_runtime: Dia2) -> None:
    result = tiny_runtime.generate(TEXT, config=GenerationConfig(seed=2), record=True)
    records = result.records
    tokens = torch.stack([r.tokens for r in records], dim=2)  # [2, C, steps]
    trace = teacher_forced_trace(tiny_runtime.model, tokens)
    steps = tokens.shape[2] - 1
    assert trace["action_logits"].shape == (2, steps, 2)
    assert trace["cb0_logits"].shape == (2, steps, 2050)
    assert trace["depformer_logits"].shape == (2, steps, 31, 2048)
    assert all(v.dtype == torch.float32 for v in trace.values())
    compared = 0
    for t in range(steps):
        torch.testing.assert_close(trace["action_logits"][:, t], records[t].action_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(trace["cb0_logits"][:, t], records[t].cb0_logits, rtol=0, atol=1e-5)
        if records[t].stage_logits is not None:
            torch.testing.assert_close(trace["depformer_logits"][:, t], records[t].stage_logits, rtol=0, atol=1e-5)
            compared += 1
    assert compared > 10


def test_trace_cli_writes_the_specified_tensors(tiny_model_dir: Path, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2048, (2, 34, 6), generator=gen)
    tokens[:, 0:2] = torch.randint(0, 400, (2, 2, 6), generator=gen)
    save_file({"tokens": tokens}, str(tmp_path / "in.safetensors"))
    rc = dia2_main(["trace", "--model", str(tiny_model_dir), "--tokens", str(tmp_path / "in.safetensors"),
                    "--out", str(tmp_path / "trace.safetensors"), "--device", "cpu"])
    assert rc == 0
    out = load_file(str(tmp_path / "trace.safetensors"))
    assert out["action_logits"].shape == (2, 5, 2)
    assert out["cb0_logits"].shape == (2, 5, 2050)
    assert out["depformer_logits"].shape == (2, 5, 31, 2048)


def test_generate_cli_writes_a_wav(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.wav"
    rc = dia2_main(["generate", "--model", str(tiny_model_dir), "--text", "[S1] Good morning.", "--out", str(out),
                    "--seed", "5", "--device", "cpu"])
    assert rc == 0
    data, rate = sf.read(str(out))
    assert rate == 24000 and data.ndim == 1 and len(data) % 1920 == 0 and len(data) > 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["words"][0]["word"] == "Good"


def test_prompt_frames_are_never_emitted(tiny_runtime: Dia2) -> None:
    audio = synthetic_speechlike(2.0)
    words = (WordTiming("Hello", 0.1, 0.5), WordTiming("my", 0.6, 0.8), WordTiming("friend.", 0.9, 1.6))
    prompt = VoicePrompt(s1=PromptClip(audio, words))
    engine = tiny_runtime.engine(tiny_runtime.rules())
    engine.check_invariants = True
    try:
        result = tiny_runtime.generate("[S1] Fine, thanks.", prompt=prompt, config=GenerationConfig(seed=1))
    finally:
        engine.check_invariants = False
    p = result.prompt_frames
    assert p == 25  # ceil(48000 / 1920)
    # Frames p…p+17 are complete only after the continuation zone: 18 steps, then one frame per step.
    assert result.codes.shape[1] == result.steps - 17
    assert result.audio.shape == (result.codes.shape[1] * 1920,)
    assert [w for w, _ in result.words] == ["Fine,", "thanks."]


def test_bad_input_gives_clear_errors(tiny_runtime: Dia2, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ScriptError, match="empty"):
        tiny_runtime.generate("   ")
    with pytest.raises(ScriptError, match=r"\[S3\]"):
        tiny_runtime.generate("[S3] who is this")
    long_text = "[S1] " + " ".join(["word"] * 400)
    with pytest.raises(ScriptError, match="text too long"):
        tiny_runtime.generate(long_text)
    with pytest.raises(PromptError, match="no words"):
        tiny_runtime.generate("[S1] Hi.", prompt=VoicePrompt(s1=PromptClip(synthetic_speechlike(1.0), ())))

    wav8k = tmp_path / "p8k.wav"
    sf.write(str(wav8k), np.zeros(8000, dtype=np.float32), 8000)
    words = tmp_path / "w.json"
    words.write_text(json.dumps([{"word": "hi", "start": 0.1, "end": 0.4}]))
    rc = dia2_main(["generate", "--model", str(tiny_runtime.files.root), "--text", "[S1] Hi.", "--out",
                    str(tmp_path / "o.wav"), "--prompt", str(wav8k), "--prompt-words", str(words)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "8000 Hz" in err and "Traceback" not in err

    rc = dia2_main(["generate", "--model", str(tmp_path / "missing"), "--text", "[S1] Hi.", "--out", str(tmp_path / "o.wav")])
    assert rc == 2
    assert "model folder not found" in capsys.readouterr().err


def test_generate_cli_accepts_random_tiny_and_runs_on_one_cpu_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--model random-tiny`` as ``callbridge serve`` takes it: written once into the cache folder
    (never the working directory). Generation on the main thread with the default two OpenMP
    threads was ~20x slower than the service's worker thread on a busy CPU; the CLI uses one."""
    import torch

    monkeypatch.setenv("DIA2_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    try:
        rc = dia2_main(["generate", "--model", "random-tiny", "--text", "[S1] Hi.", "--out", "a.wav", "--device", "cpu"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    assert (tmp_path / "cache" / "random-tiny" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "cache"]
    assert "writing a tiny random checkpoint" in capsys.readouterr().err
