"""A leg for tests of the call core without a carrier: it records what the call sends and
lets the test play the far end (report markers played, send caller audio, end the leg)."""

from __future__ import annotations

import asyncio
from typing import Any

from callbridge.audio import CHUNK_MS
from callbridge.calls.leg import Leg, LegInfo, LegPacing


class RecordingLeg(Leg):
    def __init__(self, call_id: str = "CA" + "5" * 32, lead_ms: int = 120) -> None:
        self.info = LegInfo(carrier="test", carrier_call_id=call_id, media_id="MZtest")
        self.pacing = LegPacing(chunk_ms=CHUNK_MS, lead_ms=lead_ms, marker_echo="send_clock")
        self.sent: list[tuple[str, Any]] = []  # ("audio", bytes) / ("marker", name) / ("clear", None)
        self.hang_ups = 0
        self.closed_with: str | None = None
        self.changed = asyncio.Event()

    def _record(self, kind: str, data: Any) -> None:
        self.sent.append((kind, data))
        self.changed.set()

    async def send_audio(self, ulaw8k: bytes) -> None:
        self._record("audio", ulaw8k)

    async def send_marker(self, name: str) -> None:
        self._record("marker", name)

    async def clear(self) -> None:
        self._record("clear", None)

    async def hang_up(self) -> None:
        self.hang_ups += 1

    async def close(self, reason: str, timeout_s: float) -> None:
        self.closed_with = reason

    def markers(self) -> list[str]:
        return [name for kind, name in self.sent if kind == "marker"]
