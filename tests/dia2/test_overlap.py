"""Overlapped steps: step t+1 is launched before step t's host work (dia2/engine.py prepare,
launch, wait, commit; StreamRunner(overlap=True)). On the CPU a launch computes at once, so
these tests check the order's bookkeeping: every stream's frames, PCM and words must be those
of the plain order, through joins, leaves, slot reuse, streamed text, parts and faults."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from dia2 import Dia2, GenerationConfig
from dia2.errors import StreamError
from dia2.graphs import DeviceStep
from dia2.snapshot import VoiceSnapshot, build_snapshot
from dia2.state_machine import action_decides, needs_text, new_text_state, push_entries
from dia2.stream import Stream, StreamRunner

from .test_stream import TURNS, voice

STREAMED = ["[S1]", "Sure,", "I", "can", "move", "your", "appointment", "to", "Tuesday", "at", "ten."]


@pytest.fixture(scope="module")
def snapshot(tiny_runtime: Dia2) -> VoiceSnapshot:
    return build_snapshot(tiny_runtime, voice(with_s2=True))


@dataclass
class Heard:
    """What one stream produced."""

    codes: list[torch.Tensor] = field(default_factory=list)
    pcm: list[np.ndarray] = field(default_factory=list)
    words: list[str] = field(default_factory=list)
    status: str = ""
    parts: int = 0

    def take(self, stream: Stream) -> None:
        for f in stream.pop_frames():
            self.codes.append(f.codes)
            self.pcm.append(f.pcm24k)
            self.words.extend(f.words)
        self.status = stream.status.value
        self.parts = stream.stats.parts


Schedule = dict[int, list[Callable[[StreamRunner, dict[str, Stream]], None]]]


def drive(runner: StreamRunner, schedule: Schedule) -> dict[str, Heard]:
    """Run ``schedule`` (call index → actions before that call's step) until every stream ended."""
    streams: dict[str, Stream] = {}
    heard: dict[str, Heard] = {}
    call = 0
    while call <= max(schedule) or any(not s.done for s in streams.values()):
        for action in schedule.get(call, []):
            action(runner, streams)
        runner.step()
        for name, stream in streams.items():
            heard.setdefault(name, Heard()).take(stream)
        call += 1
        assert call < 2_000, "streams never ended"
    return heard


@contextlib.contextmanager
def recorded_steps() -> Iterator[list[tuple[object, ...]]]:
    """Every device step run meanwhile: (rows, depformer, length or attended slots)."""
    calls: list[tuple[object, ...]] = []
    call = DeviceStep.__call__

    def record(self: DeviceStep, **kwargs: object) -> object:
        calls.append((self.n, kwargs.get("depformer"), kwargs.get("length"), kwargs.get("attend_slots")))
        return call(self, **kwargs)  # type: ignore[arg-type]

    DeviceStep.__call__ = record  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        DeviceStep.__call__ = call  # type: ignore[method-assign]


def start(name: str, snap: VoiceSnapshot | None, seed: int, text: str | None) -> Callable[..., None]:
    def run(runner: StreamRunner, streams: dict[str, Stream]) -> None:
        streams[name] = runner.start(snap, GenerationConfig(seed=seed), text=text, close=text is not None)

    return run


def push(name: str, words: str, close: bool = False) -> Callable[..., None]:
    def run(_: StreamRunner, streams: dict[str, Stream]) -> None:
        streams[name].push_text(words)
        if close:
            streams[name].close_text()

    return run


def cancel(name: str) -> Callable[..., None]:
    def run(_: StreamRunner, streams: dict[str, Stream]) -> None:
        streams[name].cancel()

    return run


def assert_same(got: Heard, want: Heard, pcm_atol: float = 0.0) -> None:
    assert got.status == want.status
    assert got.words == want.words
    assert len(got.codes) == len(want.codes)
    assert torch.equal(torch.stack(got.codes, dim=1), torch.stack(want.codes, dim=1))
    np.testing.assert_allclose(np.concatenate(got.pcm), np.concatenate(want.pcm), rtol=0, atol=pcm_atol)


def hear_both_orders(runtime: Dia2, snapshot: VoiceSnapshot) -> None:
    """Three slots: a closed turn cancelled mid-way, its slot taken by a new turn while the
    overlapped runner still has a step of the old one in flight; a turn fed word by word
    (edits that land while a step is in flight); a turn that joins late."""
    schedule: Schedule = {
        0: [start("closed", snapshot, 1, TURNS[1]), start("streamed", None, 2, None)],
        6: [start("late", snapshot, 3, TURNS[0])],
        30: [cancel("closed")],
        31: [start("reuse", snapshot, 4, TURNS[2])],
    }
    for i, word in enumerate(STREAMED):
        schedule.setdefault(3 * i + 1, []).append(push("streamed", word + " ", close=i == len(STREAMED) - 1))
    with recorded_steps() as plain_steps:
        plain = drive(StreamRunner(runtime, max_streams=3, overlap=False), schedule)
    runner = StreamRunner(runtime, max_streams=3, overlap=True)
    with recorded_steps() as overlapped_steps:
        overlapped = drive(runner, schedule)
    # The same device steps, in the same order: rows, depformer, and the cache length read
    # (a stream that ends with the step being read leaves an idle row at 0, as a free slot's).
    assert overlapped_steps == plain_steps
    for name in ("streamed", "late", "reuse"):
        assert plain[name].status == "done"
        assert_same(overlapped[name], plain[name])
    assert plain["streamed"].words == STREAMED[1:]  # every streamed word heard ([S1] is a tag)
    # The cancelled turn's frames until it left: the overlapped runner hands out each step's
    # frames one call later, so it heard one step less of it.
    got, want = overlapped["closed"], plain["closed"]
    assert got.status == want.status == "cancelled" and 0 < len(got.codes) <= len(want.codes)
    assert torch.equal(torch.stack(got.codes, dim=1), torch.stack(want.codes[: len(got.codes)], dim=1))
    assert not runner.engine._in_flight and runner._in_flight is None  # nothing left behind


def test_overlapped_steps_hear_exactly_the_plain_order(tiny_runtime: Dia2, snapshot: VoiceSnapshot) -> None:
    hear_both_orders(tiny_runtime, snapshot)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_overlapped_graphed_steps_hear_exactly_the_plain_order_on_cuda(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the overlap is real: step t+1 runs while the host commits step t, and the
    Mimi decode of t's frames is queued before it. fp32, graphs on in both orders."""
    from dia2.graphs import ENV_VAR

    monkeypatch.delenv(ENV_VAR, raising=False)
    runtime = Dia2.load(tiny_model_dir, device="cuda", dtype="float32", progress=False)
    assert StreamRunner(runtime, max_streams=1).overlap  # the default on CUDA
    hear_both_orders(runtime, build_snapshot(runtime, voice(with_s2=True)))


def test_a_long_turn_plays_as_parts_when_overlapped(tmp_path: Path) -> None:
    """A part ends in the step whose outcome the next step is planned from: the stream does not
    step again, and its next part starts in the same slot with a step still in flight."""
    from dia2.random_checkpoint import write_random_checkpoint

    folder = write_random_checkpoint(tmp_path / "short", "tiny", seed=0,
                                     config_overrides={"runtime": {"max_context_steps": 140}})
    runtime = Dia2.load(folder, device="cpu", progress=False)
    snap = build_snapshot(runtime, voice(with_s2=True))
    text = "[S1] Thanks for waiting. Your order left the warehouse today. It should arrive on Friday."
    schedule: Schedule = {0: [start("long", snap, 4, text), start("short", snap, 5, TURNS[0]),
                              start("fed", None, 11, None)]}
    # Fed a word every other call: whether a word still fits the part depends on the step in
    # flight's action at times; the overlapped runner reads that step first, so the cut matches.
    fed = (text + " Please call again if it does not. Have a nice day.").split()
    for i, word in enumerate(fed):
        schedule.setdefault(2 * i + 1, []).append(push("fed", word + " ", close=i == len(fed) - 1))
    plain = drive(StreamRunner(runtime, max_streams=3, overlap=False), schedule)
    runner = StreamRunner(runtime, max_streams=3, overlap=True)
    overlapped = drive(runner, schedule)
    assert plain["long"].status == "done" and plain["long"].parts >= 2 and plain["fed"].parts >= 2
    for name in ("long", "short", "fed"):
        # Same codes; the PCM to float rounding: a next part starts one step later overlapped
        # (after its last part's step is committed), so CPU decodes batch its frames differently.
        assert_same(overlapped[name], plain[name], pcm_atol=1e-4)
        assert overlapped[name].parts == plain[name].parts


def test_a_step_that_fails_in_flight_fails_only_its_stream(tiny_runtime: Dia2, snapshot: VoiceSnapshot) -> None:
    """A code outside the table read by the step in flight: the batch fails when it is read,
    nothing is committed, each stream's step runs again alone, and only the bad one fails."""
    schedule: Schedule = {0: [start("bad", snapshot, 1, TURNS[1]), start("good", snapshot, 2, TURNS[2])]}
    plain = drive(StreamRunner(tiny_runtime, max_streams=2, overlap=False), {0: schedule[0][1:]})

    def corrupt(runner: StreamRunner, streams: dict[str, Stream]) -> None:
        slot = streams["bad"].slot
        assert slot is not None
        # The column the stream's next step reads (one step is in flight; on the CPU it already
        # wrote this column): the step launched by the next call is fed an id outside the table.
        runner.engine.buffers.audio[slot, 5, runner.engine.next_position(slot)] = 99_999

    schedule[25] = [corrupt]
    overlapped = drive(StreamRunner(tiny_runtime, max_streams=2, overlap=True), schedule)
    assert overlapped["bad"].status == "failed"
    # Same codes; the PCM only to float rounding: the CPU decodes the emitting rows together,
    # and here "good" shared its decodes with "bad" until it failed.
    assert_same(overlapped["good"], plain["good"], pcm_atol=1e-4)


def test_the_engine_refuses_steps_out_of_order(tiny_runtime: Dia2) -> None:
    from dia2.engine import StepEngine

    engine = StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=2)
    bos = tiny_runtime.token_ids.bos
    for s in (0, 1):
        words = "[S1] Hello there, this script has enough words queued that the text never runs dry."
        text = new_text_state(engine.rules, tiny_runtime.script_entries(words), closed=False)
        engine.start_fresh(s, GenerationConfig(seed=s), text, bos)
    # Step to where the model's action decides the text (not forced padding, not inside a word).
    for _ in range(20):
        if all(action_decides(st.text, hold=needs_text(engine.rules, st.text))
               for st in (engine.slots[0], engine.slots[1]) if st is not None):
            break
        engine.step([0, 1])
    start = engine.slots[0].position
    first = engine.launch(engine.prepare([0, 1]))
    with pytest.raises(StreamError, match="has a step in flight"):
        engine.prepare([0])  # its state after `first` is not known without `after`
    after = engine.prepare([0, 1], after=first)
    assert [len(o) for o in after.outcomes] == [2, 2]  # both outcomes of the unread action
    with pytest.raises(StreamError, match="read the previous step"):
        engine.launch(after)
    engine.wait(first)
    more = tiny_runtime.script_entries("[S1] And more.")
    engine.edit_text(1, lambda text: push_entries(text, more))
    with pytest.raises(StreamError, match="changed since this step was prepared"):
        engine.launch(after)  # slot 1's outcomes were planned without the new words
    after = engine.prepare([0, 1], after=first)
    assert [len(o) for o in after.outcomes] == [1, 1]  # read: the action is known
    second = engine.launch(after)
    assert engine.next_position(0) == start + 2  # two steps in flight, none committed
    assert engine.slots[0].position == start
    last = tiny_runtime.script_entries("[S1] Last words.")
    engine.edit_text(1, lambda text: push_entries(text, last))  # lands while both steps are in flight
    for ticket in (first, second):
        for plan in ticket.outcomes[1].after:
            assert list(plan.text.entries)[-len(last):] == last
    engine.commit(first)
    engine.wait(second)
    engine.commit(second)
    assert engine.slots[0].position == start + 2 and not engine._in_flight
    assert list(engine.slots[1].text.entries)[-len(last):] == last  # not lost by either commit


def test_a_device_step_that_raises_releases_the_output_guard(tiny_runtime: Dia2,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Otherwise every later step and Mimi decode would raise OutputsUnread: all streams lost."""
    runner = StreamRunner(tiny_runtime, max_streams=1, overlap=True)
    stream = runner.start(None, GenerationConfig(seed=1), text=TURNS[0], close=True)
    runner.step()
    forward = DeviceStep.forward

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(DeviceStep, "forward", boom)
    runner.step()  # the launch ahead raises: the step in flight is still committed
    assert stream.status.value == "running"
    runner.step()  # planned again unoverlapped: it raises, runs again alone, and the stream fails
    assert stream.status.value == "failed" and "out of memory" in (stream.error or "")
    monkeypatch.setattr(DeviceStep, "forward", forward)
    again = runner.start(None, GenerationConfig(seed=1), text=TURNS[0], close=True)
    assert list(runner.iter_frames(again))  # the guard was released: steps and decodes run


def test_drain_finishes_the_step_in_flight(tiny_runtime: Dia2) -> None:
    plain = StreamRunner(tiny_runtime, max_streams=1, overlap=False)
    runner = StreamRunner(tiny_runtime, max_streams=1, overlap=True)
    heard = {}
    for name, r in (("plain", plain), ("overlapped", runner)):
        stream = r.start(None, GenerationConfig(seed=3), text=TURNS[1], close=True)
        for _ in range(25):
            r.step()
        r.drain()  # a no-op in the plain order
        heard[name] = [f.codes for f in stream.pop_frames()]
        assert not r.engine._in_flight and r._in_flight is None
        assert r.engine.slots[stream.slot].position == 25
    assert len(heard["overlapped"]) == len(heard["plain"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(heard["overlapped"], heard["plain"]))


def test_a_batch_that_failed_in_flight_retries_a_lone_survivor_instead_of_blaming_it(
    tiny_runtime: Dia2, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step in flight ran two streams and fails when read; one of them has hung up since.
    The other did nothing wrong: it is run again alone, not failed with the batch's error."""
    runner = StreamRunner(tiny_runtime, max_streams=2, overlap=True)
    a = runner.start(None, GenerationConfig(seed=1), text=TURNS[1], close=True)
    b = runner.start(None, GenerationConfig(seed=2), text=TURNS[2], close=True)
    runner.step()
    runner.step()
    assert runner._in_flight is not None and set(runner._in_flight.states) == {a.slot, b.slot}
    wait_edge, calls = DeviceStep.wait_edge, []

    def fails_once(self: DeviceStep) -> torch.Tensor:
        calls.append(self.n)
        if len(calls) == 1:
            raise RuntimeError("the batch failed")
        return wait_edge(self)

    monkeypatch.setattr(DeviceStep, "wait_edge", fails_once)
    b.cancel()
    runner.step()
    assert a.status.value == "running" and len(calls) == 2  # the retry of `a` alone read its step
    monkeypatch.undo()
    assert list(runner.iter_frames(a)) and a.status.value == "done"


def test_a_commit_that_raises_fails_its_streams_and_leaves_the_runner_usable(
    tiny_runtime: Dia2, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a step's records (tests, traces) can raise in a commit: its streams fail, its Mimi
    decode is still collected, nothing stays in flight, and the next turn plays."""
    from dia2.engine import StepEngine

    runner = StreamRunner(tiny_runtime, max_streams=1, overlap=True)
    stream = runner.start(None, GenerationConfig(seed=1), text=TURNS[1], close=True)
    while not stream.frames:
        runner.step()
    runner.engine.slots[stream.slot].record = []  # the step launched next keeps its records

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("record copy failed")

    monkeypatch.setattr(StepEngine, "_record", broken)
    runner.step()  # launches the recorded step
    runner.step()  # commits it: the record raises
    assert stream.status.value == "failed" and "record copy failed" in (stream.error or "")
    monkeypatch.undo()
    runner.drain()
    assert not runner.engine._in_flight and runner.frame_decoder._pending is None
    again = runner.start(None, GenerationConfig(seed=2), text=TURNS[0], close=True)
    assert list(runner.iter_frames(again)) and again.status.value == "done"


def test_an_interrupt_while_reading_a_step_leaves_nothing_in_flight(
    tiny_runtime: Dia2, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step is dropped, not left in flight: the next call steps from the committed state and
    the turn's tokens are those of an uninterrupted run."""
    plain = StreamRunner(tiny_runtime, max_streams=1, overlap=False)
    want = [f.codes for f in plain.iter_frames(plain.start(None, GenerationConfig(seed=4), text=TURNS[0], close=True))]
    runner = StreamRunner(tiny_runtime, max_streams=1, overlap=True)
    stream = runner.start(None, GenerationConfig(seed=4), text=TURNS[0], close=True)
    for _ in range(5):
        runner.step()
    wait_edge, calls = DeviceStep.wait_edge, []

    def interrupted(self: DeviceStep) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return wait_edge(self)

    monkeypatch.setattr(DeviceStep, "wait_edge", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.step()
    assert not runner.engine._in_flight
    got = [f.codes for f in stream.pop_frames()] + [f.codes for f in runner.iter_frames(stream)]
    assert stream.status.value == "done" and len(got) == len(want)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
