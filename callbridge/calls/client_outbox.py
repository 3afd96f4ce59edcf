"""What one client socket of a call (the text socket, the app connection) has waiting to be sent.

An :class:`ClientOutbox` is a call listener (``call.listeners``: the call's events arrive through
``put_nowait``) that also holds the socket's own replies and, when the client subscribed to it,
the caller's raw audio in 20 ms frames. One task per socket drains it (:meth:`ClientOutbox.take`), so
a socket has exactly one sender.

Caller audio is opt-in and bounded: at most ``audio_frames`` frames wait; a new frame beyond
that drops the oldest and counts it, and the next take reports the count as an
``audio_dropped`` event. The call's reader task is never blocked by a slow client.
"""

from __future__ import annotations

import asyncio
import collections
import enum
from typing import Any

import numpy as np

from ..audio import CHUNK_MS, LINE_RATE, pcm16_to_ulaw
from .leg import CallerAudio

__all__ = ["AudioFormat", "ClientOutbox"]

class AudioFormat(enum.Enum):
    ULAW = "ulaw"  # G.711 mu-law, 8 kHz, 160 bytes a frame
    PCM16 = "pcm16"  # 16-bit little-endian PCM at the leg's rate (8 kHz: 320 bytes a frame)


class ClientOutbox(asyncio.Queue[dict[str, Any]]):
    """A call listener plus this socket's replies and subscribed caller audio; one drainer."""

    def __init__(self, maxsize: int = 1000, audio_frames: int = 50) -> None:
        super().__init__(maxsize=maxsize)
        self.wake = asyncio.Event()  # set by every put: the drainer waits on it
        self.audio_frames = audio_frames
        self.audio_format: AudioFormat | None = None
        self._audio: collections.deque[bytes] = collections.deque()
        self._pending_pcm = np.zeros(0, dtype=np.int16)  # samples not yet a whole 20 ms frame
        self._rate = 0
        self._retry: collections.deque[dict[str, Any] | bytes] = collections.deque()
        self.audio_dropped = 0  # dropped since the last report
        self.audio_dropped_total = 0
        self.audio_sent = 0

    # ------------------------------------------------------------------ in

    def put_nowait(self, item: dict[str, Any]) -> None:
        super().put_nowait(item)
        self.wake.set()

    def reply(self, event: dict[str, Any], *, first: bool = False) -> None:
        """A message for this socket only (an error, a pong); never dropped for a full queue.
        ``first``: ahead of everything waiting (a resumed connection's ``call_resumed``)."""
        if first:
            self._retry.appendleft(event)
        else:
            self._retry.append(event)
        self.wake.set()

    def subscribe_audio(self, fmt: AudioFormat) -> None:
        self.audio_format = fmt
        self._pending_pcm = np.zeros(0, dtype=np.int16)

    def unsubscribe_audio(self) -> None:
        self.audio_format = None
        self._audio.clear()
        # Frames taken but not sent (a dropped connection) go too: a subscription ends here.
        self._retry = collections.deque(item for item in self._retry if not isinstance(item, bytes))
        self._pending_pcm = np.zeros(0, dtype=np.int16)

    def on_caller_audio(self, frame: CallerAudio) -> None:
        """A caller-audio consumer (``call.caller_audio``): cut into 20 ms frames, encode, queue."""
        fmt = self.audio_format
        if fmt is None:
            return
        if frame.sample_rate != self._rate:
            self._rate = frame.sample_rate
            self._pending_pcm = np.zeros(0, dtype=np.int16)
        pcm = np.concatenate([self._pending_pcm, frame.pcm16]) if self._pending_pcm.size else frame.pcm16
        step = frame.sample_rate * CHUNK_MS // 1000
        whole = (pcm.size // step) * step
        self._pending_pcm = pcm[whole:].copy()
        for start in range(0, whole, step):
            block = pcm[start : start + step]
            if fmt is AudioFormat.ULAW:
                if frame.sample_rate != LINE_RATE:
                    continue  # refused at subscribe time for such legs; never sent at the wrong rate
                data = pcm16_to_ulaw(block)
            else:
                data = block.astype("<i2").tobytes()
            if len(self._audio) >= self.audio_frames:
                self._audio.popleft()  # drop-oldest: the app hears the newest audio, the call never waits
                self.audio_dropped += 1
                self.audio_dropped_total += 1
            self._audio.append(data)
        self.wake.set()

    # ------------------------------------------------------------------ out

    def unget(self, item: dict[str, Any] | bytes) -> None:
        """An item taken but not sent (the socket went away): it is sent first next time."""
        self._retry.appendleft(item)

    async def take(self) -> list[dict[str, Any] | bytes]:
        """Wait for something to send; returns it in order: replies and unsent items, events,
        an ``audio_dropped`` report if frames were dropped, then audio frames."""
        while True:
            self.wake.clear()
            items: list[dict[str, Any] | bytes] = list(self._retry)
            self._retry.clear()
            while not self.empty():
                items.append(self.get_nowait())
            if self.audio_dropped:
                items.append({"event": "audio_dropped", "frames": self.audio_dropped,
                              "total": self.audio_dropped_total})
                self.audio_dropped = 0
            items.extend(self._audio)
            self.audio_sent += len(self._audio)
            self._audio.clear()
            if items:
                return items
            await self.wake.wait()
