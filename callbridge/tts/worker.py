"""The TTS Worker: one per GPU, its own thread steps every active turn together.

The asyncio event loop never runs torch. A :class:`TtsWorker` owns a
:class:`dia2.stream.StreamRunner` on a dedicated thread; the loop talks to it through one
thread-safe command queue, and results come back with ``loop.call_soon_threadsafe`` into a
per-turn asyncio queue that :meth:`TurnHandle.frames` reads.

Thread loop: with no active stream the thread blocks on the command queue (no busy loop);
otherwise it applies every pending command (open, push text, close text, cancel), runs one
``runner.step()`` for all active streams (one batched forward pass), hands the new frames
and ended turns to the loop in one callback per loop, and goes round again. So a command
takes effect before the next step: a cancel frees its slot within one step.

Admission is counted in streams and decided on the caller's side, synchronously: a turn
takes a slot when it is opened and gives it back when it ends or is cancelled. Commands are
handled in FIFO order, so a slot given back by :meth:`TurnHandle.cancel` is free in the runner
before any turn opened after that cancel starts. A phone call can hold one slot for its whole
life with :meth:`TtsWorker.reserve`, so its turns are never refused mid-call.

Command queue: a ``queue.SimpleQueue``, unbounded on purpose: its producer is the event loop,
which must never block on a put, and its items are a few words of text or a flag each.

Lifecycle (:class:`WorkerState`, checked transitions): STARTING (the thread builds the runner,
which captures the CUDA graphs on a GPU, then steps a warm-up turn to its first frame) →
READY (serving) → STOPPED. Only a READY worker admits: :meth:`TtsWorker.reserve` says no
before the warm-up is done.

Faults: a stream whose step raises is failed (:class:`TurnFailed` from ``frames()``) and the
others go on (the runner retries a failed batch stream by stream). The worker itself is
*faulted* when its runner cannot be trusted any more: the start-up (runner or warm-up) raised,
something escaped a loop iteration, :data:`FAULT_AFTER_FAILED_STEPS` steps in a row failed
every stream they ran (a lost CUDA context fails everything), or the thread died. Then every
live turn fails (the call plays its fallback), queued opens fail, the state is FAULTED, the
thread exits, and listeners (:meth:`TtsWorker.add_state_listener`) are told; the service
restarts it with :meth:`TtsWorker.restart` (``web/worker_supervisor.py``: bounded, logged).
While a restarted worker warms up, new turns fail at once instead of waiting in silence.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from dia2 import (
    AudioFrame,
    DeviceLost,
    Dia2,
    GenerationConfig,
    Stream,
    StreamRunner,
    StreamStatus,
    VoiceSnapshot,
)

from .errors import TtsError, TurnFailed, WorkerClosed, WorkerFaulted, WorkerFull
from .generation import warm_up_config
from .turn import (
    NO_COUNTERS,
    Cancel,
    CloseText,
    Command,
    Counters,
    Event,
    Open,
    Push,
    Reservation,
    RunFn,
    Stop,
    TurnHandle,
    deliver,
)

log = logging.getLogger("callbridge.tts")

T = TypeVar("T")

#: 120 s of 80 ms frames: a reader this far behind is not reading any more.
DEFAULT_MAX_BACKLOG_FRAMES: Final = 1500
#: Warm-up text: long enough that the first frame (and so every kernel of a step, the
#: depformer and the Mimi decoder included) is reached before it ends.
WARM_UP_TEXT: Final = "[S1] Warming up the voice."
#: Bound on warm-up steps (a tiny model with a short context could otherwise wander).
WARM_UP_MAX_STEPS: Final = 64
#: Steps in a row in which every running stream failed: the runner itself is broken (a lost
#: CUDA context fails every stream of every step), so the worker faults and is rebuilt.
FAULT_AFTER_FAILED_STEPS: Final = 3

RunnerFactory = Callable[[Dia2, int], StreamRunner]


class WorkerState(enum.Enum):
    STARTING = "starting"  # the thread builds the runner (CUDA graphs) and warms up
    READY = "ready"  # warmed up: admits and serves turns
    FAULTED = "faulted"  # the runner failed or the thread died; restart() or stop()
    STOPPED = "stopped"  # stop() was called: nothing more, ever


_WORKER_TRANSITIONS: Final[dict[WorkerState, frozenset[WorkerState]]] = {
    WorkerState.STARTING: frozenset({WorkerState.READY, WorkerState.FAULTED, WorkerState.STOPPED}),
    WorkerState.READY: frozenset({WorkerState.FAULTED, WorkerState.STOPPED}),
    WorkerState.FAULTED: frozenset({WorkerState.STARTING, WorkerState.STOPPED}),
    WorkerState.STOPPED: frozenset(),
}


@dataclass
class _Live:
    """Worker-thread bookkeeping of a started turn."""

    handle: TurnHandle
    stream: Stream
    started_at: float
    first_frame_at: float | None = None

    def counters(self) -> Counters:
        s = self.stream.stats
        return Counters(
            started_at=self.started_at, first_frame_at=self.first_frame_at,
            steps_to_first_frame=s.steps_to_first_frame, steps=s.steps, held_steps=s.held_steps, parts=s.parts,
        )




@dataclass
class _Outbox:
    """Events of one loop iteration, grouped by loop: one ``call_soon_threadsafe`` per loop."""

    by_loop: dict[asyncio.AbstractEventLoop, list[Event]] = field(default_factory=dict)

    def add(self, event: Event) -> None:
        self.by_loop.setdefault(event.handle._loop, []).append(event)


class TtsWorker:
    """One GPU's TTS worker: a thread that owns a :class:`StreamRunner` of ``max_streams`` slots.

    Lifecycle: ``start()`` (spawns the thread, which first runs a warm-up turn; ``await
    ready()`` to wait for it), ``open_turn(...)`` per text turn, ``await stop()`` (or the
    blocking ``close()``) at shutdown. Admission is counted in streams: ``capacity``,
    ``active`` (turns running), ``free`` (slots neither running nor reserved).
    """

    def __init__(self, runtime: Dia2, max_streams: int, *, name: str = "tts-0",
                 max_backlog_frames: int = DEFAULT_MAX_BACKLOG_FRAMES,
                 runner_factory: RunnerFactory = StreamRunner) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        if max_backlog_frames < 1:
            raise ValueError(f"max_backlog_frames must be >= 1, got {max_backlog_frames}")
        self.runtime = runtime
        self.name = name
        self.max_backlog_frames = max_backlog_frames
        self._capacity = max_streams
        self._runner_factory = runner_factory  # tests inject faults through it
        self._runner: StreamRunner | None = None  # built on the worker thread
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the slot accounting below (held for microseconds)
        self._held = 0  # slots taken: reservations + turns that do not run on a live reservation
        self._handles: set[TurnHandle] = set()  # turns opened and not yet ended on the loop side
        self._thread: threading.Thread | None = None
        self._closed = False
        self._ready: concurrent.futures.Future[float] = concurrent.futures.Future()
        self._live: dict[TurnHandle, _Live] = {}  # worker thread only
        self._state = WorkerState.STARTING  # guarded by the lock; changed by _set_state only
        self._fault: str | None = None  # why it is FAULTED
        self._device_lost = False  # the fault was dia2.DeviceLost: no restart in this process helps
        self._starts = 0  # threads started (1 + restarts)
        self._failed_steps = 0  # steps in a row that failed every stream (worker thread)
        self._last_step_error: str | None = None
        self._listeners: list[Callable[[WorkerState, str | None], None]] = []
        self.steps = 0  # batched steps run (worker thread writes, anyone may read)
        self.warm_up_s: float | None = None

    # ---- lifecycle

    def start(self, *, warm_up: bool = True) -> None:
        """Spawn the worker thread. It warms up first (one short turn with no voice, so the
        first caller pays no first-use cost); turns opened meanwhile wait in the queue."""
        if self._thread is not None:
            raise TtsError(f"worker {self.name} was already started")
        if self._closed:
            raise WorkerClosed(f"worker {self.name} is stopped")
        self._spawn(warm_up)

    def restart(self, *, warm_up: bool = True, join_timeout_s: float = 30.0) -> None:
        """Start a fresh runner on a fresh thread after a fault (blocking: joins the old thread).

        Turns that were live at the fault have failed already; reservations stay valid.
        Raises :class:`TtsError` unless the worker is FAULTED, :class:`WorkerClosed` once stopped.
        """
        state = self.state
        if self._device_lost:
            raise TtsError(f"worker {self.name}: the device is lost ({self.fault}); only a new process can use it")
        if state is not WorkerState.FAULTED:
            if state is WorkerState.STOPPED:
                raise WorkerClosed(f"worker {self.name} is stopped")
            raise TtsError(f"worker {self.name} is {state.value}; only a faulted worker restarts")
        self._set_state(WorkerState.FAULTED, self.fault)  # a thread that died without saying so
        old = self._thread
        if old is not None:
            old.join(join_timeout_s)
            if old.is_alive():
                raise TtsError(f"worker {self.name}: the faulted thread did not exit within {join_timeout_s:.0f} s")
        if not self._set_state(WorkerState.STARTING):
            raise WorkerClosed(f"worker {self.name} is stopped")
        self._spawn(warm_up)

    def _spawn(self, warm_up: bool) -> None:
        self._ready = concurrent.futures.Future()
        self._runner = None
        self._failed_steps = 0
        self._starts += 1
        self._thread = threading.Thread(target=self._run, args=(warm_up,), name=self.name, daemon=True)
        self._thread.start()

    async def ready(self) -> float:
        """Wait until the thread is up and warmed up; returns the warm-up time in seconds.

        Raises :class:`WorkerFaulted` if the start-up failed (the worker is FAULTED).
        """
        return await asyncio.wrap_future(self._ready)

    @property
    def state(self) -> WorkerState:
        """As of now; a READY worker whose thread has died reads FAULTED."""
        with self._lock:
            state = self._state
        thread = self._thread
        if state in (WorkerState.STARTING, WorkerState.READY) and (thread is None or not thread.is_alive()):
            return WorkerState.FAULTED if thread is not None else state
        return state

    @property
    def fault(self) -> str | None:
        """Why the worker is not serving (a fault's reason), or None while it starts or serves."""
        state = self.state
        if state is WorkerState.FAULTED:
            return self._fault or "the worker thread is not running"
        return None

    @property
    def device_lost(self) -> bool:
        """The worker faulted on :class:`dia2.DeviceLost`: unrecoverable in this process (every
        later call on the device fails), so :meth:`restart` refuses; the process must be restarted."""
        return self._device_lost

    def add_state_listener(self, listener: Callable[[WorkerState, str | None], None]) -> None:
        """``listener(state, reason)`` on every change, called on the thread that made it (any thread)."""
        self._listeners.append(listener)

    def _set_state(self, new: WorkerState, reason: str | None = None) -> bool:
        """Move to ``new`` if the table allows; False (no change) once STOPPED: stopping wins."""
        with self._lock:
            old = self._state
            if old is new or old is WorkerState.STOPPED:
                return old is new
            if new not in _WORKER_TRANSITIONS[old]:
                raise RuntimeError(f"tts worker {self.name}: illegal transition {old.value} -> {new.value}")
            self._state = new
            self._fault = reason if new is WorkerState.FAULTED else None
        for listener in list(self._listeners):
            try:
                listener(new, reason)
            except Exception:  # a listener's bug must not take the worker's thread with it
                log.exception("tts worker %s: state listener failed", self.name)
        return True

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new turns, cancel every running turn (their ``frames()`` end), join the thread."""
        await asyncio.to_thread(self.close, timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Blocking :meth:`stop`, for code outside the event loop."""
        self._closed = True
        self._set_state(WorkerState.STOPPED)
        thread = self._thread
        if thread is None:
            return
        self._commands.put(Stop())
        thread.join(timeout_s)
        if thread.is_alive():
            log.error("tts worker %s did not stop within %.1f s", self.name, timeout_s)

    # ---- admission (counted in streams)

    @property
    def capacity(self) -> int:
        """Stream slots of the runner (``max_streams``)."""
        return self._capacity

    @property
    def active(self) -> int:
        """Turns opened and not yet ended."""
        return len(self._handles)

    @property
    def free(self) -> int:
        """Slots neither used by a turn nor held by a reservation."""
        with self._lock:
            return self._capacity - self._held

    @property
    def closed(self) -> bool:
        return self._closed

    def can_admit(self, streams: int = 1) -> bool:
        """True when ``streams`` more slots could be taken now (and the worker is READY)."""
        return self.state is WorkerState.READY and self.free >= streams

    def reserve(self) -> Reservation | None:
        """Hold one slot for a call (webhook admission); None when full, or not READY (warming
        up, faulted, stopped): a call is never admitted into a worker that cannot serve it.

        Release it at hang-up (``Reservation.release()`` or ``with``).
        """
        if self.state is not WorkerState.READY:
            return None
        with self._lock:
            if self._held >= self._capacity:
                return None
            self._held += 1
        return Reservation(self)

    def _release_reservation(self, reservation: Reservation) -> None:
        with self._lock:
            if reservation._released:
                return
            reservation._released = True
            turn = reservation._turn
            if turn is not None and not turn._holds_slot:
                turn._holds_slot = True  # the running turn keeps the slot until it ends
            else:
                self._held -= 1

    def _take_slot(self, handle: TurnHandle, reservation: Reservation | None) -> None:
        with self._lock:
            if reservation is not None:
                if reservation._released:
                    raise TtsError(f"reservation {reservation.id} was released")
                if reservation._turn is not None:
                    raise WorkerFull(f"reservation {reservation.id} already runs turn "
                                     f"{reservation._turn.turn_id}; cancel it first")
                reservation._turn = handle
            elif self._held >= self._capacity:
                raise WorkerFull(f"worker {self.name}: all {self._capacity} stream slots are taken")
            else:
                self._held += 1
            self._handles.add(handle)

    def _end_hold(self, handle: TurnHandle) -> None:
        """The turn no longer needs its slot (ended, or cancel queued). Idempotent; any thread."""
        with self._lock:
            if handle not in self._handles:
                return
            self._handles.discard(handle)
            if handle._holds_slot:
                handle._holds_slot = False
                self._held -= 1
            res = handle._reservation
            if res is not None and res._turn is handle:
                res._turn = None

    # ---- turns

    async def open_turn(
        self,
        snapshot: VoiceSnapshot,
        config: GenerationConfig,
        *,
        turn_id: str,
        text: str | None = None,
        close: bool = False,
        reservation: Reservation | None = None,
    ) -> TurnHandle:
        """Start a turn restored from ``snapshot``; returns once the worker has started it.

        ``text``: its first text (more with ``push_text``); ``close``: no more text after it.
        ``reservation``: run on a call's reserved slot instead of a free one.
        Raises :class:`WorkerFull` (no slot), :class:`WorkerClosed` (stopped), or
        :class:`TurnFailed` (the worker could not start it, e.g. unusable text).
        """
        if self._closed:
            raise WorkerClosed(f"worker {self.name} is stopped")
        if self._thread is None:
            raise TtsError(f"worker {self.name} is not started; call start() first")
        handle = TurnHandle(self, turn_id, asyncio.get_running_loop(), reservation, self.max_backlog_frames)
        self._take_slot(handle, reservation)
        if close:
            handle._text_closed = True
        refusal = self._submit_open(Open(handle, snapshot, config, text, close))
        if refusal is not None:
            self._end_hold(handle)
            raise refusal
        try:
            await asyncio.shield(handle._started)
        except asyncio.CancelledError:
            handle.cancel()  # the opener gave up: do not leak the slot
            raise
        return handle

    async def run_in_thread(self, fn: Callable[[StreamRunner], T]) -> T:
        """Run ``fn(runner)`` on the worker thread between two steps; for diagnostics and tests."""
        if self._thread is None or self._closed:
            raise WorkerClosed(f"worker {self.name} is not running")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        refusal = self._submit_open(RunFn(fn, future))
        if refusal is not None:
            raise refusal
        return await asyncio.wrap_future(future)

    def _submit(self, command: Command) -> None:
        self._commands.put(command)

    def _submit_open(self, command: Open | RunFn) -> TtsError | None:
        """Queue a command that needs an answer, or say why not. Under the lock, so that a thread
        that faults or stops (the state changes under the same lock, then the thread drains the
        queue) never leaves one unanswered."""
        with self._lock:
            state = self._state
            if state is WorkerState.STOPPED:
                return WorkerClosed(f"worker {self.name} is stopped")
            if state is WorkerState.FAULTED or (state is WorkerState.STARTING and self._starts > 1):
                why = self._fault if state is WorkerState.FAULTED else "warming up again after a fault"
                return TurnFailed(f"the TTS worker is restarting ({why})")
            self._commands.put(command)
        return None

    # ---- the thread

    def _run(self, warm_up: bool) -> None:
        """The worker thread: build the runner, warm up, serve; on a fault, fail what it held and exit."""
        fault: str | None = "the worker thread exited without saying why"
        try:
            fault = self._start_and_serve(warm_up)
        except BaseException as exc:  # the thread is dying: its turns must not wait forever (below)
            fault = f"worker thread died: {type(exc).__name__}: {exc}"
            log.critical("tts worker %s: %s", self.name, fault, exc_info=exc)
        finally:
            if fault is None:
                self._drain_after_stop()
                log.info("tts worker %s stopped after %d steps", self.name, self.steps)
            else:
                self._fail_everything(fault)

    def _start_and_serve(self, warm_up: bool) -> str | None:
        """Returns None when stopped, or the reason of a fault."""
        try:
            runner = self._runner_factory(self.runtime, self._capacity)
            self._runner = runner
            seconds = self._warm_up() if warm_up else 0.0
        except Exception as exc:
            self._device_lost = isinstance(exc, DeviceLost)
            fault = f"start-up failed: {type(exc).__name__}: {exc}"
            log.error("tts worker %s: %s", self.name, fault, exc_info=exc)
            return fault
        self.warm_up_s = seconds
        if not self._set_state(WorkerState.READY):  # stopped while warming up
            self._ready.set_exception(WorkerClosed(f"worker {self.name} was stopped while starting"))
            return None
        self._ready.set_result(seconds)
        log.info("tts worker %s ready: %d streams, warm-up %.0f ms", self.name, self._capacity, seconds * 1e3)
        while True:
            outbox = _Outbox()
            try:
                if not runner.streams:
                    runner.drain()  # idle: the last step in flight (overlapped runner) is read and committed
                if self._apply_commands(runner, outbox, block=not runner.streams):
                    self._cancel_all(outbox, StreamStatus.CANCELLED, None)
                    self._flush(outbox)
                    return None
                if runner.streams:
                    self._step(runner, outbox)
            except Exception as exc:  # escaped the runner's own isolation: the runner is suspect
                self._flush(outbox)
                # Set before the fault is announced (_fail_everything): a listener sees it.
                self._device_lost = isinstance(exc, DeviceLost)
                log.error("tts worker %s: step loop error", self.name, exc_info=exc)
                return f"step loop error: {type(exc).__name__}: {exc}"
            self._flush(outbox)
            if self._failed_steps >= FAULT_AFTER_FAILED_STEPS:
                return f"{self._failed_steps} steps in a row failed every stream (last: {self._last_step_error})"

    def _fail_everything(self, fault: str) -> None:
        """A fault: FAULTED first (under the lock: no new open is queued after it), then every live
        turn and every queued open fails with the reason, and the thread exits."""
        self._set_state(WorkerState.FAULTED, fault)
        log.error("tts worker %s faulted: %s; failing %d live turn(s)", self.name, fault, len(self._live))
        outbox = _Outbox()
        self._cancel_all(outbox, StreamStatus.FAILED, f"tts worker fault: {fault}")
        self._flush(outbox)
        if not self._ready.done():
            self._ready.set_exception(WorkerFaulted(fault))
        self._drain_after_stop(failed=fault)
        self._runner = None

    def _warm_up(self) -> float:
        """One short turn with no voice prompt, stepped to its first frame, then cancelled."""
        runner = self._runner
        assert runner is not None
        start = time.monotonic()
        stream = runner.start(None, warm_up_config(), text=WARM_UP_TEXT, close=True)
        for _ in range(WARM_UP_MAX_STEPS):
            runner.step()
            if stream.stats.first_frame_at is not None or stream.done:
                break
        stream.cancel()
        runner.drain()
        return time.monotonic() - start

    def _apply_commands(self, runner: StreamRunner, outbox: _Outbox, *, block: bool) -> bool:
        """Apply every queued command (waiting for one first if ``block``); True on stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return False
        while True:
            if isinstance(command, Stop):
                return True
            self._apply(runner, command, outbox)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return False

    def _apply(self, runner: StreamRunner, command: Command, outbox: _Outbox) -> None:
        if isinstance(command, Open):
            self._open(runner, command, outbox)
        elif isinstance(command, RunFn):
            if command.future.set_running_or_notify_cancel():
                try:
                    command.future.set_result(command.fn(runner))
                except Exception as exc:  # the caller's function: its error goes back to the caller
                    command.future.set_exception(exc)
        elif isinstance(command, Push | CloseText | Cancel):
            live = self._live.get(command.handle)
            if live is None:
                return  # ended already (or never started): nothing to do
            if isinstance(command, Cancel):
                live.stream.cancel()
                self._end(live, outbox, StreamStatus.CANCELLED, None)
                return
            try:
                if isinstance(command, Push):
                    live.stream.push_text(command.text)
                else:
                    live.stream.close_text()
            except Exception as exc:  # e.g. ScriptError for markup it cannot speak: this turn fails
                live.stream.cancel()
                self._end(live, outbox, StreamStatus.FAILED, f"{type(exc).__name__}: {exc}")

    def _open(self, runner: StreamRunner, command: Open, outbox: _Outbox) -> None:
        handle = command.handle
        if handle._cancel_requested:
            outbox.add(Event(handle, NO_COUNTERS, ended=StreamStatus.CANCELLED, ended_at=time.monotonic()))
            return
        try:
            stream = runner.start(command.snapshot, command.config)
        except Exception as exc:  # e.g. a snapshot for another model: this turn fails, not the worker
            handle._log.warning("turn %s could not start: %s: %s", handle.turn_id, type(exc).__name__, exc)
            self._end_hold(handle)
            outbox.add(Event(handle, NO_COUNTERS, ended=StreamStatus.FAILED, error=f"{type(exc).__name__}: {exc}",
                              ended_at=time.monotonic()))
            return
        live = _Live(handle, stream, started_at=time.monotonic())
        self._live[handle] = live
        handle.slot = stream.slot
        outbox.add(Event(handle, live.counters(), started=True))
        handle._log.debug("turn %s started in slot %s", handle.turn_id, stream.slot)
        try:
            if command.text:
                stream.push_text(command.text)
            if command.close:
                stream.close_text()
        except Exception as exc:  # unusable text: this turn fails
            stream.cancel()
            self._end(live, outbox, StreamStatus.FAILED, f"{type(exc).__name__}: {exc}")

    def _step(self, runner: StreamRunner, outbox: _Outbox) -> None:
        """One batched step of every running stream, then hand out frames and ends."""
        ran = len(runner.streams)
        runner.step()
        self.steps += 1
        now = time.monotonic()
        failed = [live for live in self._live.values() if live.stream.status is StreamStatus.FAILED]
        if ran and len(failed) == ran:
            self._failed_steps += 1
            self._last_step_error = failed[-1].stream.error
        else:
            self._failed_steps = 0
        for live in list(self._live.values()):
            frames = live.stream.pop_frames()
            if frames and live.first_frame_at is None:
                live.first_frame_at = now
            status = live.stream.status
            if status is StreamStatus.RUNNING:
                if frames:
                    outbox.add(Event(live.handle, live.counters(), frames=tuple(frames)))
                continue
            self._end(live, outbox, status, live.stream.error, frames=tuple(frames))

    def _end(self, live: _Live, outbox: _Outbox, ended: StreamStatus, error: str | None,
             frames: tuple[AudioFrame, ...] = ()) -> None:
        """The turn is over on the worker: forget it, give its slot back, tell the loop, log it."""
        handle = live.handle
        self._live.pop(handle, None)
        self._end_hold(handle)
        outbox.add(Event(handle, live.counters(), frames=frames, ended=ended, error=error, ended_at=time.monotonic()))
        stats = live.stream.stats
        ttff_ms = (live.first_frame_at - handle.timing.opened_at) * 1e3 if live.first_frame_at is not None else None
        if ended is StreamStatus.FAILED:
            handle._log.error("turn %s failed after %d steps: %s", handle.turn_id, stats.steps, error)
        else:
            handle._log.info(
                "turn %s %s: first frame %s ms after open, %s steps to first frame, %d steps, %d held, %d part(s)",
                handle.turn_id, ended.value, f"{ttff_ms:.0f}" if ttff_ms is not None else "-",
                stats.steps_to_first_frame, stats.steps, stats.held_steps, stats.parts,
            )

    def _cancel_all(self, outbox: _Outbox, ended: StreamStatus, error: str | None) -> None:
        for live in list(self._live.values()):
            if not live.stream.done:
                try:
                    live.stream.cancel()
                except Exception:  # a faulted runner may fail even this; the turn ends regardless
                    handle_log = live.handle._log
                    handle_log.exception("turn %s: cancel failed on the runner", live.handle.turn_id)
            self._end(live, outbox, ended, error)

    def _flush(self, outbox: _Outbox) -> None:
        """One ``call_soon_threadsafe`` per loop with this iteration's events; never blocks."""
        for loop, events in outbox.by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver, events)
            except RuntimeError:  # that loop is closed: nobody will read these turns
                for event in events:
                    live = self._live.get(event.handle)
                    if live is not None:
                        live.stream.cancel()
                        self._live.pop(event.handle, None)
                    self._end_hold(event.handle)
                log.warning("tts worker %s: event loop closed; dropped %d event(s)", self.name, len(events))

    def _drain_after_stop(self, failed: str | None = None) -> None:
        """Commands left when the thread exits: opens end as cancelled (stop) or failed (a fault:
        ``failed`` says why), calls are refused."""
        outbox = _Outbox()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, Open):
                self._end_hold(command.handle)
                if failed is None:
                    outbox.add(Event(command.handle, NO_COUNTERS, ended=StreamStatus.CANCELLED,
                                      ended_at=time.monotonic()))
                else:
                    outbox.add(Event(command.handle, NO_COUNTERS, ended=StreamStatus.FAILED,
                                      error=f"tts worker fault: {failed}", ended_at=time.monotonic()))
            elif isinstance(command, RunFn) and command.future.set_running_or_notify_cancel():
                command.future.set_exception(WorkerClosed(f"worker {self.name} is stopped") if failed is None
                                             else WorkerFaulted(failed))
        self._flush(outbox)
