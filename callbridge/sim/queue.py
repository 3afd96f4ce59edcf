"""Twilio's side of the audio: G.711 mu-law and the playback queue on a sample clock."""

from __future__ import annotations

from collections import deque

import numpy as np

from .report import TurnStats

SAMPLE_RATE = 8000  # mu-law bytes (= samples) per second, both directions
CHUNK_BYTES = 160  # one Twilio chunk: 20 ms of mu-law
CHUNK_S = CHUNK_BYTES / SAMPLE_RATE
SILENCE_BYTE = 0xFF  # mu-law code of PCM 0
MAX_QUEUE_BYTES = 10 * 60 * SAMPLE_RATE  # Twilio keeps about 10 min, then discards (31931)


# ------------------------------------------------------------------------------- mu-law


def _build_ulaw_decode_table() -> np.ndarray:
    """G.711 mu-law byte → int16, the table every implementation (audioop included) shares."""
    codes = np.arange(256, dtype=np.int32) ^ 0xFF  # all bits are inverted on the wire
    segment = (codes >> 4) & 0x07
    magnitude = (((codes & 0x0F) << 3) + 0x84) << segment
    return np.where(codes & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


ULAW_DECODE = _build_ulaw_decode_table()
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)


def ulaw_decode(data: bytes) -> np.ndarray:
    """Mu-law bytes → int16 PCM at the same rate, shape [T]."""
    return ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """int16 PCM [T] → mu-law bytes, in audioop's 14-bit form (shift by 2, clip 8159, bias 33).

    Byte for byte what ``audioop.lin2ulaw(pcm, 2)`` returns (doc §13), without importing it.
    """
    x = pcm.astype(np.int32) >> 2
    negative = x < 0
    mask = np.where(negative, 0x7F, 0xFF)
    x = np.minimum(np.abs(x), 8159) + 33
    segment = np.searchsorted(_ULAW_SEG_END, x, side="left")  # first end >= x
    code = (np.minimum(segment, 7) << 4) | ((x >> (np.minimum(segment, 7) + 1)) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)
    return ((code ^ mask) & 0xFF).astype(np.uint8).tobytes()


# ------------------------------------------------------------------------- playback queue


class PlayoutQueue:
    """Twilio's playback queue on a sample clock, with no I/O.

    ``advance(to)`` plays the timeline up to sample ``to`` (8000 per second since ``start``):
    queued audio first, digital silence once the queue is dry. Marks sit at the byte position
    where they were queued and come out of ``advance`` as the cursor passes them, of
    ``push_mark`` at once when nothing is queued, and of ``clear`` all together.
    """

    def __init__(self, cap_bytes: int = MAX_QUEUE_BYTES) -> None:
        self.cap_bytes = cap_bytes
        self.clock = 0  # samples of timeline produced
        self.out = bytearray()  # the timeline as heard, mu-law
        self.queued = 0  # bytes waiting
        self.enqueued_total = 0  # bytes ever accepted: the absolute end of the queue
        self.consumed_total = 0  # bytes ever played or cleared: the absolute cursor
        self.played_audio = 0
        self.cleared_bytes = 0
        self.discarded_bytes = 0
        self.empty_since: int | None = 0  # clock when the queue last became empty
        self.gaps: list[tuple[int, int]] = []  # (dry from, audio again at) in samples
        self._dry_since: int | None = None  # set only after audio played: a gap candidate
        self._chunks: deque[tuple[bytes, TurnStats | None]] = deque()
        self._head = 0  # bytes of _chunks[0] already played
        self._marks: deque[tuple[int, str]] = deque()  # (absolute position, name)

    @property
    def pending_marks(self) -> list[str]:
        return [name for _, name in self._marks]

    def samples_to_next_mark(self) -> int | None:
        """Samples of playback until the next mark is due (None when none is pending)."""
        return self._marks[0][0] - self.consumed_total if self._marks else None

    def advance(self, to_sample: int) -> list[str]:
        """Play up to ``to_sample``; returns the names of marks passed, in order."""
        due: list[str] = []
        remaining = to_sample - self.clock
        while remaining > 0 and self._chunks:
            data, turn = self._chunks[0]
            take = min(remaining, len(data) - self._head)
            self.out += data[self._head : self._head + take]
            if turn is not None:
                turn.on_played(self.clock, take)
            self.clock += take
            self.consumed_total += take
            self.played_audio += take
            self.queued -= take
            remaining -= take
            self._head += take
            if self._head == len(data):
                self._chunks.popleft()
                self._head = 0
            while self._marks and self._marks[0][0] <= self.consumed_total:
                due.append(self._marks.popleft()[1])
            if self.queued == 0:
                self._dry_since = self.empty_since = self.clock
        if remaining > 0:
            self.out += bytes([SILENCE_BYTE]) * remaining
            self.clock += remaining
        return due

    def push_media(self, payload: bytes, turn: TurnStats | None) -> bool:
        """Queue a payload of any size; False when it would pass the cap (Twilio: 31931)."""
        if self.queued + len(payload) > self.cap_bytes:
            self.discarded_bytes += len(payload)
            return False
        if not payload:
            return True
        if self.queued == 0 and self._dry_since is not None and self.clock > self._dry_since:
            self.gaps.append((self._dry_since, self.clock))
        self._dry_since = self.empty_since = None
        self._chunks.append((payload, turn))
        self.queued += len(payload)
        self.enqueued_total += len(payload)
        return True

    def push_mark(self, name: str) -> list[str]:
        """Place a mark at the end of the queue; echoed at once if nothing is queued."""
        if self.queued == 0:
            return [name]
        self._marks.append((self.enqueued_total, name))
        return []

    def clear(self) -> list[str]:
        """Drop everything queued; returns every pending mark, in order."""
        self.cleared_bytes += self.queued
        self.consumed_total += self.queued
        self.queued = 0
        self._chunks.clear()
        self._head = 0
        self._dry_since = None  # silence after a clear is wanted, not an underrun
        self.empty_since = self.clock
        names = [name for _, name in self._marks]
        self._marks.clear()
        return names
