"""The TTS worker's lifecycle: not ready before its warm-up, faults (injected on the CPU) fail the
live turns and refuse new ones, and a restart serves again. Every wait is on an event."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from callbridge.tts import TtsWorker, TurnFailed, TurnHandle, WorkerFaulted, WorkerState
from dia2 import Dia2, GenerationConfig, StreamRunner
from dia2.snapshot import VoiceSnapshot

pytestmark = pytest.mark.timeout(240)

TURN = "[S1] How can I help you today?"
HOLDING = "[S1] One moment please, "  # never closed: it holds until cancelled or failed
WAIT_S = 120.0  # bound on each wait: only a hang fails it


class Faults:
    """Runners built through :meth:`factory` fail on demand (set from the test's thread)."""

    def __init__(self, runtime: Dia2) -> None:
        self.runtime = runtime
        self.builds = 0
        self.gate = threading.Event()  # a build waits on it (graph capture that takes long)
        self.gate.set()
        self.building = threading.Event()
        self.fail_builds_from = 10**9  # builds with this number or later raise
        self.escape: BaseException | None = None  # raised out of runner.step()
        self.device_lost = False  # every stream's device step raises (the runner isolates it)

    def factory(self, runtime: Dia2, max_streams: int) -> StreamRunner:
        self.builds += 1
        self.building.set()
        assert self.gate.wait(WAIT_S)
        if self.builds >= self.fail_builds_from:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        runner = StreamRunner(runtime, max_streams)
        engine_step = runner.engine.step
        runner_step = runner.step

        def step() -> Any:
            if self.escape is not None:
                raise self.escape
            return runner_step()

        def device_step(*args: Any, **kwargs: Any) -> Any:
            if self.device_lost:
                raise RuntimeError("CUDA error: device-side assert triggered")
            return engine_step(*args, **kwargs)

        runner.step = step  # type: ignore[method-assign]
        runner.engine.step = device_step  # type: ignore[method-assign]
        return runner


class States:
    """The worker's state changes, awaitable on the loop."""

    def __init__(self, worker: TtsWorker) -> None:
        self.seen: list[tuple[WorkerState, str | None]] = []
        self._changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        worker.add_state_listener(lambda s, r: loop.call_soon_threadsafe(self._note, s, r))

    def _note(self, state: WorkerState, reason: str | None) -> None:
        self.seen.append((state, reason))
        self._changed.set()

    async def reach(self, state: WorkerState) -> str | None:
        async with asyncio.timeout(WAIT_S):
            while not any(s is state for s, _ in self.seen):
                self._changed.clear()
                await self._changed.wait()
        return next(r for s, r in self.seen if s is state)


@pytest.fixture
async def make(tiny_runtime: Dia2) -> AsyncIterator[Callable[..., tuple[TtsWorker, Faults, States]]]:
    built: list[tuple[TtsWorker, Faults]] = []

    def build(max_streams: int = 2) -> tuple[TtsWorker, Faults, States]:
        faults = Faults(tiny_runtime)
        worker = TtsWorker(tiny_runtime, max_streams, runner_factory=faults.factory)
        built.append((worker, faults))
        return worker, faults, States(worker)

    yield build
    for worker, faults in built:
        faults.gate.set()
        await worker.stop()


async def holding_turn(worker: TtsWorker, snapshot: VoiceSnapshot, turn_id: str, **kw: Any) -> TurnHandle:
    handle = await worker.open_turn(snapshot, GenerationConfig(seed=1), turn_id=turn_id, text=HOLDING, **kw)
    async with asyncio.timeout(WAIT_S):
        await anext(aiter(handle.frames()))  # it speaks
    return handle


async def rest_of(handle: TurnHandle) -> None:
    async with asyncio.timeout(WAIT_S):
        async for _ in handle.frames():
            pass


async def test_no_admission_until_the_warm_up_is_done(make: Callable[..., Any]) -> None:
    worker, faults, states = make()
    faults.gate.clear()  # the runner build (graph capture on a GPU) takes its time
    worker.start()
    await asyncio.to_thread(faults.building.wait, WAIT_S)
    assert worker.state is WorkerState.STARTING
    assert worker.reserve() is None and not worker.can_admit()
    faults.gate.set()
    await worker.ready()
    assert worker.state is WorkerState.READY and worker.warm_up_s is not None
    reservation = worker.reserve()
    assert reservation is not None
    reservation.release()


async def test_a_failed_start_up_faults_the_worker(make: Callable[..., Any], tiny_snapshot: VoiceSnapshot) -> None:
    worker, faults, states = make()
    faults.fail_builds_from = 1
    worker.start()
    with pytest.raises(WorkerFaulted, match="start-up failed: RuntimeError: CUDA error"):
        await worker.ready()
    assert "start-up failed" in (await states.reach(WorkerState.FAULTED) or "")
    assert worker.state is WorkerState.FAULTED and worker.reserve() is None
    with pytest.raises(TurnFailed, match="restarting"):
        await worker.open_turn(tiny_snapshot, GenerationConfig(), turn_id="t", text=TURN, close=True)


async def test_a_fault_fails_the_live_turn_refuses_new_ones_and_a_restart_serves_again(
    make: Callable[..., Any], tiny_snapshot: VoiceSnapshot
) -> None:
    worker, faults, states = make()
    worker.start()
    await worker.ready()
    reservation = worker.reserve()
    assert reservation is not None
    live = await holding_turn(worker, tiny_snapshot, "live", reservation=reservation)
    faults.escape = RuntimeError("injected")
    with pytest.raises(TurnFailed, match="tts worker fault: step loop error: RuntimeError: injected"):
        await rest_of(live)
    await states.reach(WorkerState.FAULTED)
    assert worker.fault is not None and "injected" in worker.fault
    assert worker.reserve() is None  # admission paused
    with pytest.raises(TurnFailed, match="restarting"):
        await worker.open_turn(tiny_snapshot, GenerationConfig(), turn_id="t2", text=TURN, close=True,
                               reservation=reservation)
    faults.escape = None
    faults.gate.clear()
    faults.building.clear()  # set by the first build: wait for the restart's own
    restarting = asyncio.create_task(asyncio.to_thread(worker.restart))
    await asyncio.to_thread(faults.building.wait, WAIT_S)
    with pytest.raises(TurnFailed, match="warming up again"):  # no silent wait behind a warm-up
        await worker.open_turn(tiny_snapshot, GenerationConfig(), turn_id="t3", text=TURN, close=True,
                               reservation=reservation)
    faults.gate.set()
    await restarting
    await worker.ready()
    assert worker.state is WorkerState.READY
    # The call's reservation survived the restart: its next turn plays in full.
    handle = await worker.open_turn(tiny_snapshot, GenerationConfig(seed=2), turn_id="after", text=TURN, close=True,
                                    reservation=reservation)
    await rest_of(handle)
    assert handle.timing.frames > 0
    reservation.release()
    assert worker.free == worker.capacity and worker.active == 0


async def test_a_lost_device_fails_every_stream_and_faults_the_worker(
    make: Callable[..., Any], tiny_snapshot: VoiceSnapshot
) -> None:
    """The runner isolates a failing stream step by step; when every step fails every stream
    (a lost CUDA context), the worker stops trusting its runner and faults."""
    worker, faults, states = make()
    worker.start()
    await worker.ready()
    faults.device_lost = True
    for n in range(3):
        handle = await worker.open_turn(tiny_snapshot, GenerationConfig(), turn_id=f"t{n}", text=TURN, close=True)
        with pytest.raises(TurnFailed, match="device-side assert"):
            await rest_of(handle)
    reason = await states.reach(WorkerState.FAULTED)
    assert reason is not None and "3 steps in a row failed every stream" in reason


async def test_a_dying_thread_fails_its_turns_and_reads_faulted(
    make: Callable[..., Any], tiny_snapshot: VoiceSnapshot
) -> None:
    class Death(BaseException):
        pass

    worker, faults, states = make()
    worker.start()
    await worker.ready()
    live = await holding_turn(worker, tiny_snapshot, "live")
    faults.escape = Death("gone")
    with pytest.raises(TurnFailed, match="worker thread died: Death: gone"):
        await rest_of(live)
    await states.reach(WorkerState.FAULTED)
    assert worker.state is WorkerState.FAULTED and worker.reserve() is None
