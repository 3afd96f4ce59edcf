"""Pacing outbound audio into a call: absolute deadlines, a small bounded lead.

Twilio plays what we send at real-time speed from a queue. Send too slowly and the caller
hears gaps; send everything at once and barge-in depends entirely on ``clear`` while marks
stop saying what is playing (shared/docs/twilio-media-streams.md §5). So chunk ``n`` of a
run is sent no earlier than ``t0 + n × chunk − lead``: Twilio's queue then holds at most
``lead`` of audio, and the first ``lead`` of a turn goes out at once.

Deadlines are absolute (``t0 + n × chunk``, computed by multiplication) so timer error
never accumulates. When the estimated queue runs dry (a stall, or an idle gap between
turns), the schedule restarts from now: the sender refills the lead and no more, instead of
bursting out every chunk it is "owed".
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Pacer"]


class Pacer:
    """When to send the next 20 ms chunk. Pure bookkeeping on an injectable clock; no sleeping.

    Use::

        await asyncio.sleep(pacer.delay_for_next())
        await ws.send_str(msg)
        pacer.sent()

    ``queued_ms`` estimates how much audio Twilio holds that has not played yet (the lead
    actually in use). Call :meth:`reset` after a ``clear`` (Twilio's queue is empty).
    """

    def __init__(
        self,
        chunk_ms: float = 20.0,
        lead_ms: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if chunk_ms <= 0:
            raise ValueError(f"chunk_ms must be > 0, got {chunk_ms}")
        if lead_ms < chunk_ms:
            raise ValueError(f"lead_ms ({lead_ms}) must be at least one chunk ({chunk_ms} ms)")
        self.chunk_ms = chunk_ms
        self.lead_ms = lead_ms
        self._chunk_s = chunk_ms / 1000.0
        self._lead_s = lead_ms / 1000.0
        self._clock = clock
        self._t0: float | None = None  # when chunk 0 of the current run started playing
        self._count = 0  # chunks sent in the current run
        self.chunks_sent = 0  # over the pacer's life
        self.restarts = 0  # runs restarted because Twilio's queue ran dry (gap or underrun)

    def _end(self) -> float | None:
        """Clock time at which everything sent so far will have played (None: nothing queued)."""
        if self._t0 is None:
            return None
        return self._t0 + self._count * self._chunk_s

    def delay_for_next(self, n: int = 1) -> float:
        """Seconds to wait before sending the next ``n`` chunks; 0.0 when they are due now."""
        end = self._end()
        now = self._clock()
        if end is None or end <= now:
            return 0.0  # nothing queued at Twilio: play at once
        # Sending n more makes the queue end + n×chunk − now; keep that within the lead.
        return max(0.0, end + n * self._chunk_s - self._lead_s - now)

    def sent(self, n: int = 1) -> None:
        """Record that ``n`` chunks were just handed to the socket."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        end = self._end()
        now = self._clock()
        if end is None or end < now:
            # Nothing left to play at Twilio: this chunk starts playing now. Restarting (not
            # catching up) is what keeps a stall from turning into a burst.
            if end is not None:
                self.restarts += 1
            self._t0 = now
            self._count = 0
        self._count += n
        self.chunks_sent += n

    def queued_ms(self) -> float:
        """Audio sent but not yet played, in ms, as estimated from the clock (0 when drained)."""
        end = self._end()
        if end is None:
            return 0.0
        return max(0.0, (end - self._clock()) * 1000.0)

    def reset(self) -> None:
        """Forget the schedule (after ``clear``): the next chunk starts a new run from now."""
        self._t0 = None
        self._count = 0
