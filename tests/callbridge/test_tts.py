"""The TTS Worker on the tiny random checkpoint (CPU float32): streaming, admission, cancel, faults, stop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import torch

from callbridge.tts import TtsError, TtsWorker, TurnFailed, TurnHandle, WorkerClosed, WorkerFull
from dia2 import Dia2, GenerationConfig
from dia2.snapshot import VoiceSnapshot
from dia2.stream import AudioFrame, StreamRunner, StreamStatus

TURN = "[S1] How can I help you today?"
OTHER = "[S1] Fine, thanks."
# An open turn that never gets more text: it holds (pads) forever until cancelled or stopped.
HOLDING = "[S1] One moment please, "
BAD_TOKEN = 10**6  # outside any text vocabulary: the embedding lookup of its step raises
TIMEOUT_S = 120.0

MakeWorker = Callable[..., Any]


@pytest.fixture
async def make_worker(tiny_runtime: Dia2) -> AsyncIterator[MakeWorker]:
    """Start workers on the tiny runtime (warmed up); every one is stopped at teardown."""
    workers: list[TtsWorker] = []

    async def make(max_streams: int = 2, **kwargs: Any) -> TtsWorker:
        worker = TtsWorker(tiny_runtime, max_streams, **kwargs)
        workers.append(worker)
        worker.start()
        await worker.ready()
        return worker

    yield make
    for worker in workers:
        await worker.stop()


def runner_codes(runtime: Dia2, snapshot: VoiceSnapshot, text: str, cfg: GenerationConfig) -> list[AudioFrame]:
    """The reference: the same turn run on a StreamRunner directly (on the test's thread)."""
    runner = StreamRunner(runtime, max_streams=1)
    return list(runner.iter_frames(runner.start(snapshot, cfg, text=text, close=True)))


def stack(frames: list[AudioFrame]) -> torch.Tensor:
    return torch.stack([f.codes for f in frames], dim=1)


async def collect(handle: TurnHandle) -> list[AudioFrame]:
    async with asyncio.timeout(TIMEOUT_S):
        return [frame async for frame in handle.frames()]


async def first_frame(frames: AsyncIterator[AudioFrame]) -> AudioFrame:
    async with asyncio.timeout(TIMEOUT_S):
        return await anext(frames)


async def test_worker_frames_equal_the_runner_run_directly(
    tiny_runtime: Dia2, tiny_snapshot: VoiceSnapshot, make_worker: MakeWorker
) -> None:
    cfg = GenerationConfig(seed=7)
    ref = runner_codes(tiny_runtime, tiny_snapshot, TURN, cfg)
    worker = await make_worker(max_streams=2)
    handle = await worker.open_turn(tiny_snapshot, cfg, turn_id="t1", text=TURN, close=True)
    frames = await collect(handle)
    assert handle.status is StreamStatus.DONE and handle.done
    assert [f.index for f in frames] == list(range(len(ref)))
    assert torch.equal(stack(frames), stack(ref))
    assert all(np.array_equal(a.pcm24k, b.pcm24k) for a, b in zip(frames, ref))
    assert [w for f in frames for w in f.words] == TURN.split()[1:]
    t = handle.timing
    assert t.steps_to_first_frame == 18  # max delay + 1 after the prompt: restored, not warmed up
    assert t.first_frame_at is not None and t.started_at is not None
    assert t.opened_at <= t.started_at <= t.first_frame_at
    assert t.time_to_first_frame_s is not None and t.time_to_first_frame_s > 0
    assert t.steps >= len(frames) + 17 and t.frames == len(frames) and t.dropped_frames == 0
    assert worker.active == 0 and worker.free == 2


async def test_two_turns_at_once_both_complete(
    tiny_runtime: Dia2, tiny_snapshot: VoiceSnapshot, make_worker: MakeWorker
) -> None:
    greedy = GenerationConfig().greedy()  # batched equals alone exactly with greedy sampling
    refs = [runner_codes(tiny_runtime, tiny_snapshot, text, greedy) for text in (TURN, OTHER)]
    worker = await make_worker(max_streams=2)
    a = await worker.open_turn(tiny_snapshot, greedy, turn_id="a", text=TURN, close=True)
    b = await worker.open_turn(tiny_snapshot, greedy, turn_id="b", text=OTHER, close=True)
    assert {a.slot, b.slot} == {0, 1}
    got = await asyncio.gather(collect(a), collect(b))
    for handle, frames, ref in zip((a, b), got, refs):
        assert handle.status is StreamStatus.DONE
        assert torch.equal(stack(frames), stack(ref))


async def test_text_pushed_word_by_word_through_the_handle(
    tiny_snapshot: VoiceSnapshot, make_worker: MakeWorker
) -> None:
    worker = await make_worker(max_streams=1)
    handle = await worker.open_turn(tiny_snapshot, GenerationConfig(seed=3), turn_id="llm")
    words = ["[S1]", "Sure,", "I", "can", "move", "your", "appointment", "to", "Tuesday."]

    async def writer() -> None:
        for word in words:  # as an LLM would: a word at a time, while audio is generated
            handle.push_text(word + " ")
            await asyncio.sleep(0.02)
        handle.close_text()

    frames, _ = await asyncio.gather(collect(handle), writer())
    assert handle.status is StreamStatus.DONE
    assert [w for f in frames for w in f.words] == words[1:]
    with pytest.raises(TtsError, match="after close_text"):
        handle.push_text("more")


async def test_cancel_frees_the_slot_for_a_turn_opened_right_after(
    tiny_snapshot: VoiceSnapshot, make_worker: MakeWorker
) -> None:
    worker = await make_worker(max_streams=1)
    held = await worker.open_turn(tiny_snapshot, GenerationConfig(seed=1), turn_id="barged", text=HOLDING)
    frames = held.frames()
    await first_frame(frames)
    assert worker.free == 0 and not worker.can_admit()
    held.cancel()
    assert worker.free == 1  # at once, on the caller's side
    nxt = await worker.open_turn(tiny_snapshot, GenerationConfig(seed=2), turn_id="next", text=OTHER, close=True)
    async with asyncio.timeout(TIMEOUT_S):
        async for _ in frames:  # the cancelled turn's frames end, without an error
            pass
    assert held.status is StreamStatus.CANCELLED
    assert (await collect(nxt)) and nxt.status is StreamStatus.DONE


async def test_admission_refuses_the_n_plus_first_stream(
    tiny_snapshot: VoiceSnapshot, make_worker: MakeWorker
) -> None:
    worker = await make_worker(max_streams=2)
    assert worker.capacity == 2 and worker.free == 2 and worker.can_admit(2)
    call = worker.reserve()  # a phone call admitted by the webhook holds one slot
    assert call is not None and worker.free == 1
    first = await worker.open_turn(tiny_snapshot, GenerationConfig(seed=1), turn_id="1", text=HOLDING)
    assert worker.free == 0 and not worker.can_admit() and worker.reserve() is None
    with pytest.raises(WorkerFull):
        await worker.open_turn(tiny_snapshot, GenerationConfig(seed=2), turn_id="3", text=HOLDING)
    # The admitted call still gets its turn on its reserved slot, one at a time.
    mine = await worker.open_turn(tiny_snapshot, GenerationConfig(seed=3), turn_id="2", text=HOLDING,
                                  reservation=call)
    assert worker.active == 2
    with pytest.raises(WorkerFull, match="already runs turn"):
        await worker.open_turn(tiny_snapshot, GenerationConfig(), turn_id="2b", reservation=call)
    call.release()  # hang-up while its turn runs: the slot comes back when the turn ends
    assert worker.free == 0
    mine.cancel()
    assert worker.free == 1
    first.cancel()
    assert worker.free == 2 and worker.active == 0


async def test_a_stream_whose_step_raises_fails_while_the_other_completes(
    tiny_runtime: Dia2, tiny_snapshot: VoiceSnapshot, make_worker: MakeWorker
) -> None:
    """The batched step raised for every stream of the batch; only the bad stream may fail."""
    greedy = GenerationConfig().greedy()
    ref = runner_codes(tiny_runtime, tiny_snapshot, TURN, greedy)
    worker = await make_worker(max_streams=2)
    good = await worker.open_turn(tiny_snapshot, greedy, turn_id="good", text=TURN, close=True)
    bad = await worker.open_turn(tiny_snapshot, GenerationConfig(seed=5), turn_id="bad", text=HOLDING)
    bad_frames = bad.frames()
    await first_frame(bad_frames)
    slot = bad.slot
    assert slot is not None
    await worker.run_in_thread(lambda r: r.engine.edit_text(slot, lambda text: text.pending_tokens.append(BAD_TOKEN)))
    with pytest.raises(TurnFailed, match="IndexError"):
        async with asyncio.timeout(TIMEOUT_S):
            async for _ in bad_frames:
                pass
    assert bad.status is StreamStatus.FAILED and bad.error is not None
    frames = await collect(good)
    assert good.status is StreamStatus.DONE
    assert torch.equal(stack(frames), stack(ref))  # the retried steps gave the same tokens
    # The worker goes on: the failed turn's slot is free and new turns run.
    again = await worker.open_turn(tiny_snapshot, greedy, turn_id="again", text=OTHER, close=True)
    assert (await collect(again)) and again.status is StreamStatus.DONE


async def test_stop_during_a_turn_ends_it_cleanly(tiny_snapshot: VoiceSnapshot, make_worker: MakeWorker) -> None:
    worker = await make_worker(max_streams=1)
    handle = await worker.open_turn(tiny_snapshot, GenerationConfig(seed=1), turn_id="t", text=HOLDING)
    frames = handle.frames()
    await first_frame(frames)
    await worker.stop()
    async with asyncio.timeout(TIMEOUT_S):
        async for _ in frames:  # ends, without an error
            pass
    assert handle.status is StreamStatus.CANCELLED
    assert worker._thread is not None and not worker._thread.is_alive()
    assert worker.reserve() is None and not worker.can_admit()
    with pytest.raises(WorkerClosed):
        await worker.open_turn(tiny_snapshot, GenerationConfig(), turn_id="late", text=OTHER, close=True)


async def test_model_steps_never_run_on_the_event_loop_thread(
    tiny_snapshot: VoiceSnapshot, make_worker: MakeWorker
) -> None:
    worker = await make_worker(max_streams=1)
    step_threads: set[int] = set()

    def spy(runner: StreamRunner) -> None:
        real = runner.step

        def step() -> Any:
            step_threads.add(threading.get_ident())
            return real()

        runner.step = step  # type: ignore[method-assign]

    await worker.run_in_thread(spy)
    handle = await worker.open_turn(tiny_snapshot, GenerationConfig(seed=4), turn_id="t", text=TURN, close=True)
    frames = await collect(handle)
    assert frames and handle.status is StreamStatus.DONE
    # Structural (no wall-clock bound): every step ran on the worker's thread, never on the loop's.
    assert step_threads and threading.get_ident() not in step_threads


def test_runner_retries_a_failed_batch_stream_by_stream(tiny_runtime: Dia2, tiny_snapshot: VoiceSnapshot) -> None:
    """Before the fix a batched step that raised failed every stream of the batch."""
    greedy = GenerationConfig().greedy()
    ref = runner_codes(tiny_runtime, tiny_snapshot, OTHER, greedy)
    runner = StreamRunner(tiny_runtime, max_streams=3, overlap=False)  # the position check below is the plain order's
    good = runner.start(tiny_snapshot, greedy, text=OTHER, close=True)
    bad = runner.start(tiny_snapshot, GenerationConfig(seed=1), text=HOLDING)
    other = runner.start(tiny_snapshot, GenerationConfig(seed=2), text=TURN, close=True)
    frames = []
    for _ in range(3):
        runner.step()
        frames.extend(good.pop_frames())
    assert bad.slot is not None
    state = runner.engine.slots[bad.slot]
    assert state is not None
    runner.engine.edit_text(bad.slot, lambda text: text.pending_tokens.append(BAD_TOKEN))  # fed once its turn comes
    position = state.position
    for _ in range(20):
        position = state.position
        runner.step()
        frames.extend(good.pop_frames())
        if bad.done:
            break
    assert bad.status is StreamStatus.FAILED and "IndexError" in (bad.error or "")
    assert state.position == position  # the failed step left the slot's host state as it was
    assert not good.done and not other.done
    frames.extend(runner.iter_frames(good))
    assert torch.equal(stack(frames), stack(ref))
    assert list(runner.iter_frames(other)) and other.status is StreamStatus.DONE
