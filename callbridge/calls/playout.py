"""Playout: the only sender into a call's leg, and the call's record of what the caller heard.

The speaker puts 20 ms mu-law chunks and markers into the outbox; the writer task takes them
out in order and sends them through the :class:`~callbridge.calls.leg.Leg`, pacing the
audio on a monotonic clock so the far end never holds more than the leg's ``lead_ms``.

Markers say what the caller has actually heard: each carries the words spoken since the
previous one, and when the leg reports it played those words are heard. A turn's last
marker, once played, means the turn is done.

Playback epochs: every cut (barge-in, interrupt, cancel) bumps ``epoch``, asks the leg to
``clear`` and fades out the chunk that was playing. Chunks and markers carry the epoch they
were made in, so anything from before a cut is dropped unsent, and a marker that comes back
after a cut (a ``clear`` returns every pending marker) is not counted as heard.

Pending markers live here and only here (sent, not yet played, oldest first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from ..audio import CHUNK_MS, Pacer, fade_out_chunk
from ..metrics import Metrics
from .leg import Leg
from .turns import Turn

__all__ = ["CallStats", "Playout", "SendTimeout", "SentMarker"]

OUTBOX_ITEMS = 2000  # 40 s of chunks: the speaker waits when the writer is this far behind
RECENT_CHUNKS = 16  # sent chunks kept for the fade-out (more than any lead in use)


class SendTimeout(Exception):
    """The leg did not accept a send within ``audio.send_timeout_s`` (a stalled far end)."""


@dataclass
class CallStats:
    started_at: float = field(default_factory=time.monotonic)
    turns: int = 0
    chunks_sent: int = 0
    marks_sent: int = 0
    marks_echoed: int = 0
    stale_echoes: int = 0  # markers that came back after a cut: dropped, not played
    marks_out_of_order: int = 0  # markers skipped by a later one coming back first
    marks_unknown: int = 0  # came back but never sent (or came back twice)
    underruns: int = 0
    barge_ins: int = 0
    dropped_chunks: int = 0
    failed_turns: int = 0
    first_ttfa_ms: float | None = None
    # CRC-32 chained over every media payload sent, in order: a simulator that chains what it
    # received the same way proves that nothing was lost or reordered (bench/soak.py).
    media_crc32: int = 0


@dataclass
class SentMarker:
    turn: Turn
    epoch: int
    words: list[str]
    end_of_turn: bool


@dataclass
class _Item:
    kind: Literal["media", "marker", "wake"]
    epoch: int
    data: bytes | str = b""
    turn: Turn | None = None
    words: list[str] = field(default_factory=list)
    end_of_turn: bool = False


class Playout:
    """ClientOutbox, writer, pacing, markers and fade-out of one call.

    ``on_first_audio(turn, ttfa_ms)``, ``on_heard(turn, words)`` and ``on_turn_played(turn)``
    tell the call what happened (it emits the events and ends turns).
    """

    def __init__(
        self,
        leg: Leg,
        *,
        fade_out_ms: float,
        send_timeout_s: float,
        stats: CallStats,
        metrics: Metrics,
        log: logging.LoggerAdapter[logging.Logger],
        on_first_audio: Callable[[Turn, float], None],
        on_heard: Callable[[Turn, list[str]], None],
        on_turn_played: Callable[[Turn], None],
        on_progress: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if leg.pacing.chunk_ms != CHUNK_MS:
            raise ValueError(f"the call sends {CHUNK_MS} ms chunks; this leg wants {leg.pacing.chunk_ms} ms")
        self.leg = leg
        self.fade_out_ms = fade_out_ms
        self.send_timeout_s = send_timeout_s
        self.stats = stats
        self.metrics = metrics
        self.log = log
        self._on_first_audio = on_first_audio
        self._on_heard = on_heard
        self._on_turn_played = on_turn_played
        self._on_progress = on_progress  # something sent or played: a drain looks again
        self._stopped = False
        self.epoch = 0
        self.pending: dict[str, SentMarker] = {}  # sent, not yet played; insertion order = send order
        self._outbox: asyncio.Queue[_Item] = asyncio.Queue(maxsize=OUTBOX_ITEMS)
        self._clear_pending = False
        self._pacer = Pacer(chunk_ms=CHUNK_MS, lead_ms=leg.pacing.lead_ms, clock=clock)
        self._recent: deque[bytes] = deque(maxlen=RECENT_CHUNKS)
        self._queued_at_cut_ms = 0.0

    # ---- the speaker's side

    async def put_audio(self, epoch: int, chunk: bytes, turn: Turn | None) -> None:
        """Queue one chunk made in ``epoch`` (``turn`` None: fallback audio, in no turn's counts)."""
        await self._outbox.put(_Item("media", epoch, chunk, turn))

    async def put_marker(self, epoch: int, name: str, turn: Turn, words: list[str], *, end_of_turn: bool = False) -> None:
        """Queue a marker after the audio queued so far; ``words`` are heard once it has played."""
        await self._outbox.put(_Item("marker", epoch, name, turn, list(words), end_of_turn))

    # ---- what is playing

    @property
    def audible(self) -> bool:
        """Audio of this epoch is playing or queued at the far end (a marker of it not yet played)."""
        return any(m.epoch == self.epoch for m in self.pending.values())

    def playing_turn(self) -> Turn | None:
        """The turn whose audio is at the far end's playhead: that of the oldest marker still pending."""
        return next((m.turn for m in self.pending.values() if m.epoch == self.epoch), None)

    @property
    def all_sent(self) -> bool:
        return self._outbox.empty()

    def cut(self) -> None:
        """Stop the audio: a new epoch, a ``clear`` and the fade-out before anything else is sent."""
        self.epoch += 1
        self._clear_pending = True
        self._queued_at_cut_ms = self._pacer.queued_ms()
        self._pacer.reset()
        self.wake()

    def wake(self) -> None:
        """Let the writer look at its flags now (after a cut, or when the call ends)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._outbox.put_nowait(_Item("wake", self.epoch))

    def stop(self) -> None:
        """The call has ended: the writer returns at its next look instead of waiting for more."""
        self._stopped = True
        self.wake()

    def marker_played(self, name: str) -> None:
        """The leg says marker ``name`` has played (or was cleared)."""
        self._on_progress()
        sent = self.pending.get(name)
        if sent is None:
            self.stats.marks_unknown += 1
            self.log.debug("marker %r came back but is not pending; ignored", name)
            return
        # Markers come back in the order they were sent: an older one still pending was skipped.
        self.stats.marks_out_of_order += list(self.pending).index(name)
        del self.pending[name]
        self.stats.marks_echoed += 1
        self.metrics.marks_echoed_total.inc()
        if sent.epoch != self.epoch:
            self.stats.stale_echoes += 1  # dropped by a cut, not played
            return
        turn = sent.turn
        if sent.words:
            turn.heard.extend(sent.words)
            self._on_heard(turn, sent.words)
        if sent.end_of_turn:
            self._on_turn_played(turn)

    # ---- the writer

    async def run(self) -> None:
        """The writer task: send everything queued, in order and paced, until cancelled or stopped.

        Raises :class:`SendTimeout` when the leg accepts nothing for ``send_timeout_s`` and
        ``ConnectionError`` when it has gone; the call ends on either.
        """
        while not self._stopped:
            if self._clear_pending:
                self._clear_pending = False
                await self._bounded(self.leg.clear())
                await self._send_fade_out()
            item = await self._outbox.get()
            self._on_progress()  # taken, even if not sent (a wake, a chunk of an old epoch)
            if self._stopped:
                return  # stop() posts one wake item: never wait for another one
            if item.kind == "wake":
                continue
            if item.epoch != self.epoch:
                self.stats.dropped_chunks += item.kind == "media"
                continue
            if item.kind == "media":
                await self._send_media(item)
            else:
                name = str(item.data)
                assert item.turn is not None
                self.pending[name] = SentMarker(item.turn, item.epoch, item.words, item.end_of_turn)
                await self._bounded(self.leg.send_marker(name))
                self.stats.marks_sent += 1
                self.metrics.marks_sent_total.inc()

    async def _send_media(self, item: _Item) -> None:
        delay = self._pacer.delay_for_next()
        if delay > 0:
            await asyncio.sleep(delay)
            if item.epoch != self.epoch:  # a cut while we waited
                self.stats.dropped_chunks += 1
                return
        elif self._pacer.queued_ms() <= 0 and item.turn is not None and item.turn.chunks > 0:
            # The far end's queue ran dry mid-turn: the caller heard a gap.
            item.turn.underruns += 1
            self.stats.underruns += 1
            self.metrics.underruns_total.inc()
        data = bytes(item.data)
        await self._send_chunk(data)
        self._pacer.sent()
        self._recent.append(data)
        turn = item.turn
        if turn is not None:
            turn.chunks += 1
            if turn.first_chunk_at is None:
                turn.first_chunk_at = time.monotonic()
                ttfa = turn.ttfa_ms or 0.0
                self.metrics.ttfa_seconds.observe(ttfa / 1000)
                if self.stats.first_ttfa_ms is None:
                    self.stats.first_ttfa_ms = ttfa
                self._on_first_audio(turn, ttfa)

    async def _send_fade_out(self) -> None:
        """After a clear, the chunk that was playing, faded to silence (no click at the cut).

        The pacer knew how much audio the far end still held; the chunk at the playhead is
        that many chunks back in the ring of recently sent ones.
        """
        behind = math.ceil(self._queued_at_cut_ms / CHUNK_MS)
        recent = list(self._recent)
        self._recent.clear()
        if self.fade_out_ms <= 0 or behind < 1 or behind > len(recent):
            return
        await self._send_chunk(fade_out_chunk(recent[-behind], self.fade_out_ms))

    async def _send_chunk(self, data: bytes) -> None:
        await self._bounded(self.leg.send_audio(data))
        self.stats.chunks_sent += 1
        self.stats.media_crc32 = zlib.crc32(data, self.stats.media_crc32)
        self.metrics.chunks_sent_total.inc()

    async def _bounded(self, send: Awaitable[None]) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that arrives as the
        # send completes, and the writer would outlive the call's end (which then waits forever).
        try:
            async with asyncio.timeout(self.send_timeout_s):
                await send
        except TimeoutError:
            raise SendTimeout from None
        self._on_progress()
