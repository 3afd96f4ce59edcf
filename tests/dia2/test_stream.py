"""Voice snapshots and streaming turns on the tiny random checkpoint (CPU float32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dia2 import Dia2, GenerationConfig, PromptClip, VoicePrompt
from dia2.audio_io import synthetic_speechlike
from dia2.errors import PromptError, SnapshotError, StreamError
from dia2.snapshot import VoiceSnapshot, build_snapshot, load_snapshot
from dia2.state_machine import needs_text
from dia2.stream import StreamRunner
from dia2.text import WordTiming

S1_WORDS = (WordTiming("Hello", 0.1, 0.5), WordTiming("my", 0.6, 0.8), WordTiming("friend.", 0.9, 1.6))
S2_WORDS = (WordTiming("Hi", 0.1, 0.4), WordTiming("there.", 0.5, 0.9))
TURNS = ["[S1] Fine, thanks.", "[S1] How can I help you today?", "[S1] Goodbye now."]


def voice(with_s2: bool = True) -> VoicePrompt:
    s2 = PromptClip(synthetic_speechlike(1.0, seed=2), S2_WORDS) if with_s2 else None
    return VoicePrompt(s1=PromptClip(synthetic_speechlike(2.0, seed=1), S1_WORDS), s2=s2)


@pytest.fixture(scope="module")
def snapshot(tiny_runtime: Dia2) -> VoiceSnapshot:
    return build_snapshot(tiny_runtime, voice(with_s2=True))


def stream_codes(runner: StreamRunner, snapshot: VoiceSnapshot | None, text: str, cfg: GenerationConfig) -> torch.Tensor:
    stream = runner.start(snapshot, cfg, text=text, close=True)
    frames = list(runner.iter_frames(stream))
    return torch.stack([f.codes for f in frames], dim=1)


def test_restore_equals_live_warm_up_over_turns_and_a_save_load(
    tiny_runtime: Dia2, snapshot: VoiceSnapshot, tmp_path: Path
) -> None:
    assert snapshot.layout == "s1_s2" and snapshot.opens_with_s1
    runner = StreamRunner(tiny_runtime, max_streams=1)
    loaded = load_snapshot(snapshot.save(tmp_path / "voice.safetensors"), tiny_runtime)
    for i, text in enumerate(TURNS):
        cfg = GenerationConfig(seed=10 + i)
        live = tiny_runtime.generate(text, prompt=voice(with_s2=True), config=cfg)
        assert torch.equal(stream_codes(runner, snapshot, text, cfg), live.codes), f"turn {i}"
        assert torch.equal(stream_codes(runner, loaded, text, cfg), live.codes), f"turn {i} after load"


def test_s1_only_layout_continues_s1_without_a_second_tag(tiny_runtime: Dia2) -> None:
    snap = build_snapshot(tiny_runtime, voice(with_s2=False))
    assert snap.layout == "s1_only" and not snap.opens_with_s1
    runner = StreamRunner(tiny_runtime, max_streams=1)
    cfg = GenerationConfig(seed=5)
    live = tiny_runtime.generate(TURNS[0], prompt=voice(with_s2=False), config=cfg, open_with_s1=False)
    assert torch.equal(stream_codes(runner, snap, TURNS[0], cfg), live.codes)
    stream = runner.start(snap, cfg, text="[S1] Fine, thanks.", close=True)
    first_word = runner.engine.slots[stream.slot].text.entries[0]
    assert first_word.tokens[0] != tiny_runtime.token_ids.speaker1  # no second [S1]
    stream.cancel()


def test_continuation_zone_feeds_the_prompts_own_codes(tiny_runtime: Dia2, snapshot: VoiceSnapshot) -> None:
    runner = StreamRunner(tiny_runtime, max_streams=1)
    runner.engine.check_invariants = True
    stream = runner.start(snapshot, GenerationConfig(seed=1), text=TURNS[1], close=True)
    slot = runner.engine.slots[stream.slot]
    slot.record = []
    p = snapshot.prompt_frames
    prompt_columns = snapshot.prompt.audio.clone()  # [K, P + 18] delayed prompt
    delays = tiny_runtime.config.data.delay_pattern
    first_frames = []
    while not stream.done:
        runner.step()
        first_frames.extend(stream.pop_frames())
        buf = runner.engine.buffers.audio[stream.slot] if not stream.done else None
        if buf is not None:
            for c, d in enumerate(delays):  # prompt frames never overwritten
                assert torch.equal(buf[c, d : d + p], prompt_columns[c, d : d + p])
    fed = {r.step: r.tokens for r in slot.record}
    for t in range(p, p + 18):
        for c, d in enumerate(delays):
            if t - d < p:  # column t of codebook c holds a prompt frame
                assert fed[t][0, 2 + c] == prompt_columns[c, t], (t, c)
    # The depformer is skipped while its outputs would only be prompt frames.
    assert all(r.stage_logits is None for r in slot.record if r.step < p + 17)
    assert all(r.stage_logits is not None for r in slot.record if r.step >= p + 17)
    # Nothing before the prompt's end is emitted: the first frame is aligned frame P, after 18 steps.
    assert stream.stats.steps_to_first_frame == 18
    assert first_frames[0].index == 0


def test_words_pushed_just_in_time_equal_the_whole_text(tiny_runtime: Dia2, snapshot: VoiceSnapshot) -> None:
    text = "[S1] Sure, I can move your appointment to Tuesday at ten."
    cfg = GenerationConfig(seed=7)
    runner = StreamRunner(tiny_runtime, max_streams=1)
    whole = stream_codes(runner, snapshot, text, cfg)

    words = text.split()
    stream = runner.start(snapshot, cfg)
    rules = runner.engine.rules
    frames = []
    while not stream.done:
        state = runner.engine.slots[stream.slot]
        while words and needs_text(rules, state.text):
            stream.push_text(words.pop(0) + " ")
        if not words and not stream.text_closed:
            stream.close_text()
        runner.step()
        frames.extend(stream.pop_frames())
    assert stream.stats.held_steps == 0
    assert torch.equal(torch.stack([f.codes for f in frames], dim=1), whole)


def test_a_starved_stream_holds_then_resumes(tiny_runtime: Dia2, snapshot: VoiceSnapshot) -> None:
    runner = StreamRunner(tiny_runtime, max_streams=1)
    # Three words: "One" can start (its look-ahead needs the two after it); "moment" cannot yet.
    stream = runner.start(snapshot, GenerationConfig(seed=3), text="[S1] One moment please, ")
    for _ in range(40):
        runner.step()
    assert not stream.done and stream.stats.held_steps > 0
    early = [w for f in stream.pop_frames() for w in f.words]
    assert early == ["One"]
    held = stream.stats.held_steps
    stream.push_text("I am checking.")
    stream.close_text()
    frames = list(runner.iter_frames(stream))
    words = [w for f in frames for w in f.words]
    assert words == ["moment", "please,", "I", "am", "checking."]
    assert stream.status.value == "done" and stream.stats.held_steps == held


def test_batched_streams_match_each_stream_alone(tiny_runtime: Dia2, snapshot: VoiceSnapshot) -> None:
    greedy = GenerationConfig().greedy()
    alone = [stream_codes(StreamRunner(tiny_runtime, 1), snapshot, t, greedy) for t in TURNS]
    runner = StreamRunner(tiny_runtime, max_streams=3)
    streams = [runner.start(snapshot, greedy, text=t, close=True) for t in TURNS]
    frames: dict[int, list] = {s.id: [] for s in streams}
    while not all(s.done for s in streams):
        runner.step()
        for s in streams:
            frames[s.id].extend(s.pop_frames())
    for s, ref in zip(streams, alone):
        assert torch.equal(torch.stack([f.codes for f in frames[s.id]], dim=1), ref)


def test_streams_join_and_leave_between_steps(tiny_runtime: Dia2, snapshot: VoiceSnapshot) -> None:
    cfg = GenerationConfig(seed=2)
    ref = stream_codes(StreamRunner(tiny_runtime, 1), snapshot, TURNS[2], cfg)
    runner = StreamRunner(tiny_runtime, max_streams=2)
    early = runner.start(snapshot, GenerationConfig(seed=9), text=TURNS[1], close=True)
    for _ in range(7):
        runner.step()
    late = runner.start(snapshot, cfg, text=TURNS[2], close=True)
    codes = []
    for _ in range(5):
        runner.step()
        codes.extend(f.codes for f in late.pop_frames())
    early.cancel()  # leaves mid-turn; its slot is free at once
    assert runner.engine.free_slots() == [early.slot]
    codes.extend(f.codes for f in runner.iter_frames(late))
    assert torch.equal(torch.stack(codes, dim=1), ref)


def test_a_long_turn_plays_as_parts_without_gaps(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dia2.random_checkpoint import write_random_checkpoint

    folder = write_random_checkpoint(tmp_path / "short", "tiny", seed=0, config_overrides={"runtime": {"max_context_steps": 140}})
    runtime = Dia2.load(folder, device="cpu", progress=False)
    snap = build_snapshot(runtime, voice(with_s2=True))
    runner = StreamRunner(runtime, max_streams=1)
    sentences = ["Thanks for waiting.", "Your order left the warehouse today.", "It should arrive on Friday.",
                 "Is there anything else?", "Have a good evening."]
    stream = runner.start(snap, GenerationConfig(seed=4), text="[S1] " + " ".join(sentences), close=True)
    frames = list(runner.iter_frames(stream))
    assert stream.stats.parts >= 2
    assert [f.index for f in frames] == list(range(len(frames)))  # contiguous, nothing dropped
    words = [w for f in frames for w in f.words]
    assert words == " ".join(sentences).split()
    pcm = np.concatenate([f.pcm24k for f in frames])
    assert pcm.shape == (len(frames) * 1920,)

    # A word that not even an empty part can hold is refused, not split into parts forever.
    stream = runner.start(snap, GenerationConfig(seed=4))
    with pytest.raises(StreamError, match="cannot fit the model context"):
        stream.push_text("[S1] " + "x" * 600 + " ")
    stream.cancel()


def test_snapshot_errors(tiny_runtime: Dia2, snapshot: VoiceSnapshot, tmp_path: Path) -> None:
    from dia2.random_checkpoint import write_random_checkpoint

    path = snapshot.save(tmp_path / "v.safetensors")
    other = Dia2.load(write_random_checkpoint(tmp_path / "other", "tiny", seed=1), device="cpu", progress=False)
    with pytest.raises(SnapshotError, match="made for another model"):
        load_snapshot(path, other)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(SnapshotError, match="corrupt or truncated"):
        load_snapshot(tmp_path / "cut.safetensors", tiny_runtime)
    with pytest.raises(SnapshotError, match="not found"):
        load_snapshot(tmp_path / "none.safetensors", tiny_runtime)

    silent = VoicePrompt(s1=PromptClip(np.zeros(48000, np.float32), S1_WORDS))
    with pytest.raises(PromptError, match="no speech"):
        build_snapshot(tiny_runtime, silent)
    too_long = VoicePrompt(s1=PromptClip(synthetic_speechlike(30.0), S1_WORDS))
    with pytest.raises(PromptError, match="at most"):
        build_snapshot(tiny_runtime, too_long)


def test_stream_lifecycle_errors(tiny_runtime: Dia2, snapshot: VoiceSnapshot) -> None:
    runner = StreamRunner(tiny_runtime, max_streams=1)
    stream = runner.start(snapshot, GenerationConfig(), text="[S1] Hi there.", close=True)
    with pytest.raises(StreamError, match="already closed"):
        stream.push_text("more")
    with pytest.raises(StreamError, match="slots are busy"):
        runner.start(snapshot)
    stream.cancel()
    with pytest.raises(StreamError, match="cancelled"):
        stream.push_text("more")
    again = runner.start(snapshot, GenerationConfig(), text="[S1] Ok.", close=True)
    assert len(runner.run_to_end(again)) > 0
