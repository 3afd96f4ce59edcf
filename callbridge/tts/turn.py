"""One turn as the event loop sees it, and the messages between the loop and the worker thread.

:class:`TurnHandle` is the loop-side end of a turn, :class:`Reservation` a slot held for a
call. The loop sends the worker commands (:data:`Command`); the worker sends back
:class:`Event` batches that :func:`deliver` applies on the loop.

Frame queue policy: the producer (the GPU thread) never blocks and never waits for a reader.
Frames are small (1920 float32 = 7.5 KiB per 80 ms), so each turn's queue is unbounded up to
``max_backlog_frames`` (default 1500 frames = 120 s of audio, far more than a reader that
keeps up can fall behind). A turn whose reader lets the backlog reach that cap has a dead
reader: its further frames are dropped (counted in :attr:`TurnTiming.dropped_frames` and
logged) and the turn is cancelled to free the GPU slot. With a live reader there are no drops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from dia2 import AudioFrame, GenerationConfig, StreamRunner, StreamStatus, VoiceSnapshot

from .errors import TtsError, TurnFailed

log = logging.getLogger("callbridge.tts")


class SlotOwner(Protocol):
    """What a handle needs of its worker (:class:`~callbridge.tts.worker.TtsWorker`): its name, the
    command queue, and the slot accounting."""

    name: str

    def _submit(self, command: Command) -> None: ...

    def _end_hold(self, handle: TurnHandle) -> None: ...

    def _release_reservation(self, reservation: Reservation) -> None: ...


@dataclass
class TurnTiming:
    """Timing and counters of one turn. Times are ``time.monotonic()`` seconds.

    Updated on the event loop's thread only (the worker sends copies of its counters along
    with the frames), so reading it from the loop is always consistent.
    """

    opened_at: float  # open_turn was called
    started_at: float | None = None  # the worker restored the snapshot (the turn's first step is next)
    first_frame_at: float | None = None  # the worker had the first complete PCM frame
    ended_at: float | None = None  # the worker ended the turn (done, cancelled or failed)
    steps_to_first_frame: int | None = None  # steps of this turn up to and including its first frame
    steps: int = 0  # steps this turn took part in
    held_steps: int = 0  # steps spent waiting for text (streaming underruns)
    parts: int = 1  # long turns are spoken in parts (each restarted from the snapshot)
    frames: int = 0  # frames delivered to the reader's queue
    dropped_frames: int = 0  # frames dropped because the reader's backlog hit the cap

    @property
    def time_to_first_frame_s(self) -> float | None:
        """Seconds from ``open_turn`` to the first complete frame on the worker."""
        return None if self.first_frame_at is None else self.first_frame_at - self.opened_at


@dataclass(frozen=True)
class Counters:
    """The worker-side counters of a turn, copied into the event that carries them."""

    started_at: float | None
    first_frame_at: float | None
    steps_to_first_frame: int | None
    steps: int
    held_steps: int
    parts: int


@dataclass(frozen=True)
class Event:
    """Worker → loop: a turn started, got frames, and/or ended."""

    handle: TurnHandle
    counters: Counters
    started: bool = False
    frames: tuple[AudioFrame, ...] = ()
    ended: StreamStatus | None = None  # DONE, CANCELLED or FAILED: the turn's last event
    error: str | None = None
    ended_at: float | None = None


NO_COUNTERS: Final = Counters(None, None, None, 0, 0, 1)  # a turn that never started


# ---------------------------------------------------------------------------- commands (loop → worker)


@dataclass(frozen=True)
class Open:
    handle: TurnHandle
    snapshot: VoiceSnapshot
    config: GenerationConfig
    text: str | None
    close: bool


@dataclass(frozen=True)
class Push:
    handle: TurnHandle
    text: str


@dataclass(frozen=True)
class CloseText:
    handle: TurnHandle


@dataclass(frozen=True)
class Cancel:
    handle: TurnHandle


@dataclass(frozen=True)
class RunFn:
    fn: Callable[[StreamRunner], Any]
    future: concurrent.futures.Future[Any]


@dataclass(frozen=True)
class Stop:
    pass


Command = Open | Push | CloseText | Cancel | RunFn | Stop


# ---------------------------------------------------------------------------- handles


class Reservation:
    """One stream slot held for a phone call from admission to hang-up. Build with :meth:`TtsWorker.reserve`.

    Turns opened with ``reservation=`` use this slot, one at a time, and are never refused
    for lack of capacity. :meth:`release` (idempotent; also the context-manager exit) gives
    the slot back; a turn still running on it keeps the slot until it ends.
    """

    _ids = itertools.count(1)

    def __init__(self, worker: SlotOwner) -> None:
        self.id = next(Reservation._ids)
        self._worker = worker
        self._released = False
        self._turn: TurnHandle | None = None  # guarded by the worker's lock

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        self._worker._release_reservation(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class TurnHandle:
    """The loop-side end of one turn. Build with :meth:`TtsWorker.open_turn`.

    ``push_text``, ``close_text`` and ``cancel`` never block: they queue a command that the
    worker thread applies between two steps (they may be called from any thread). Frames
    come out of :meth:`frames`, meant for one reader on the loop that opened the turn.
    """

    def __init__(self, worker: SlotOwner, turn_id: str, loop: asyncio.AbstractEventLoop,
                 reservation: Reservation | None, max_backlog_frames: int) -> None:
        self.turn_id = turn_id
        self.timing = TurnTiming(opened_at=time.monotonic())
        self.status = StreamStatus.RUNNING  # as the loop knows it (set from the worker's events)
        self.error: str | None = None
        #: The runner slot, set by the worker when the turn starts (diagnostics, tests).
        self.slot: int | None = None
        self._worker = worker
        self._loop = loop
        self._reservation = reservation
        self._holds_slot = reservation is None  # guarded by the worker's lock
        self._max_backlog = max_backlog_frames
        self._queue: asyncio.Queue[AudioFrame | None] = asyncio.Queue()  # None: the turn ended
        self._started: asyncio.Future[None] = loop.create_future()
        self._text_closed = False
        self._cancel_requested = False
        self._log = logging.LoggerAdapter(log, {"worker": worker.name, "turn_id": turn_id})

    def __repr__(self) -> str:
        return f"<TurnHandle {self.turn_id} {self.status.value}>"

    @property
    def done(self) -> bool:
        """True once the worker has ended the turn and said so (its last frame is queued)."""
        return self.status is not StreamStatus.RUNNING

    @property
    def text_closed(self) -> bool:
        return self._text_closed

    def push_text(self, text: str) -> None:
        """Add text (any chunking; a word is taken once whitespace follows it, or at close)."""
        if self._text_closed:
            raise TtsError(f"turn {self.turn_id}: cannot push text after close_text()")
        if self._cancel_requested or self.done:
            return  # the turn is over; late text from an LLM stream is not an error
        self._worker._submit(Push(self, text))

    def close_text(self) -> None:
        """No more text: the turn ends after its last word and the flush tail."""
        if self._text_closed:
            return
        self._text_closed = True
        if not (self._cancel_requested or self.done):
            self._worker._submit(CloseText(self))

    def cancel(self) -> None:
        """Stop the turn (barge-in). Its slot is free for a turn opened right after this call."""
        if self._cancel_requested or self.done:
            return
        self._cancel_requested = True
        self._worker._end_hold(self)  # before the command: FIFO makes the runner slot free in time
        self._worker._submit(Cancel(self))

    async def frames(self) -> AsyncIterator[AudioFrame]:
        """Yield the turn's frames as they complete; end when the turn ends.

        Raises :class:`TurnFailed` after the last good frame if the turn failed. A cancelled
        turn (by :meth:`cancel` or the worker's stop) just ends.
        """
        while True:
            frame = await self._queue.get()
            if frame is None:
                self._queue.put_nowait(None)  # a second reader (or call) ends at once too
                if self.status is StreamStatus.FAILED:
                    raise TurnFailed(self.error or "turn failed")
                return
            yield frame

    # ---- loop side of the worker's events

    def _apply(self, event: Event) -> None:
        c = event.counters
        t = self.timing
        t.started_at, t.first_frame_at = c.started_at, c.first_frame_at
        t.steps_to_first_frame, t.steps, t.held_steps, t.parts = c.steps_to_first_frame, c.steps, c.held_steps, c.parts
        for frame in event.frames:
            if self._queue.qsize() >= self._max_backlog:
                t.dropped_frames += 1
                if t.dropped_frames == 1:
                    self._log.warning("turn %s: reader is %d frames behind; dropping frames and cancelling",
                                      self.turn_id, self._queue.qsize())
                    self.cancel()
                continue
            self._queue.put_nowait(frame)
            t.frames += 1
        if event.started and not self._started.done():
            self._started.set_result(None)
        if event.ended is not None:
            t.ended_at = event.ended_at
            self.status = event.ended
            self.error = event.error
            if not self._started.done():
                if event.ended is StreamStatus.FAILED:
                    self._started.set_exception(TurnFailed(event.error or "turn failed to start"))
                else:
                    self._started.set_result(None)
            self._queue.put_nowait(None)


def deliver(events: list[Event]) -> None:
    """Runs on the event loop: apply the worker's events to their handles in order."""
    for event in events:
        event.handle._apply(event)
