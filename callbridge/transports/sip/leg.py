"""A SIP call's :class:`~callbridge.calls.leg.Leg`: RTP over one UDP socket, signalling through the server.

The leg owns the call's RTP socket, a :class:`~.media.RtpSender` and a :class:`~.media.RtpReceiver`,
and one clock task that wakes at every 20 ms slot to send a packet (audio or silence), echo the
markers the clock passed, and check the media timeout. Caller audio and digits go to the sink
(the call) as they arrive. Hanging up goes through the :class:`~.endpoint.SipServer` (BYE).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Final, Protocol

from ...audio import CHUNK_MS, LINE_RATE
from ...calls.leg import (
    CallerAudio,
    CallerDigit,
    Leg,
    LegEnded,
    LegEvent,
    LegEventSink,
    LegInfo,
    LegPacing,
    MarkerPlayed,
)
from .media import RtpReceiver, RtpSender
from .sdp import Answer

log = logging.getLogger(__name__)

__all__ = ["LEAD_CHUNKS", "Signalling", "SipLeg"]

Addr = tuple[str, int]
LEAD_CHUNKS: Final = 3  # 60 ms ahead of real time: enough to ride out loop jitter, small for barge-in


class Signalling(Protocol):
    """What a leg asks of the SIP server (:class:`~.endpoint.SipServer`): end the dialog, free the port."""

    def hang_up(self, handle: str, reason: str) -> None: ...

    def release(self, leg: SipLeg) -> None: ...


class _RtpProtocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Addr], None]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("RTP socket error: %s", exc)  # ICMP unreachable from a peer that went away


class SipLeg(Leg):
    """One inbound SIP call's media and its way back to the signalling server."""

    def __init__(self, server: Signalling, handle: str, info: LegInfo, answer: Answer, *,
                 signalling_host: str, transport: asyncio.DatagramTransport, port: int,
                 media_timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self.info = info
        self.pacing = LegPacing(chunk_ms=CHUNK_MS, lead_ms=LEAD_CHUNKS * CHUNK_MS, marker_echo="send_clock")
        self.handle = handle
        self.port = port
        self._server = server
        self._loop = loop
        self._transport = transport
        self.sender = RtpSender(codec=answer.codec, payload_type=answer.payload_type, max_queued=LEAD_CHUNKS,
                                sending=answer.we_send)
        self.receiver = RtpReceiver(answer, signalling_host=signalling_host, media_timeout_s=media_timeout_s,
                                    started_at=loop.time())
        self._sink: LegEventSink | None = None
        self._room = asyncio.Event()
        self._room.set()
        self._clock: asyncio.Task[None] | None = None
        self.ended: str | None = None  # why the leg ended (set once)
        self.closed = False
        self.digits_received = 0

    # ------------------------------------------------------------------ wiring

    def attach(self, sink: LegEventSink) -> None:
        """Deliver caller events to ``sink`` (the call) from now on."""
        self._sink = sink

    def on_datagram(self, data: bytes, source: Addr) -> None:
        got = self.receiver.receive(data, source, self._loop.time())
        if got is None or self.ended is not None:
            return
        if got.pcm16 is not None:
            self._emit(CallerAudio(pcm16=got.pcm16, sample_rate=LINE_RATE))
        for digit in got.digits:
            self.digits_received += 1
            self._emit(CallerDigit(digit))

    def digit(self, digit: str) -> None:
        """A digit that came by SIP INFO."""
        self.digits_received += 1
        self._emit(CallerDigit(digit))

    def start_media(self) -> None:
        if self._clock is None:
            self.sender.start(self._loop.time())
            self._clock = asyncio.create_task(self._run_clock(), name=f"sip-rtp-{self.handle}")

    def media_updated(self, answer: Answer) -> None:
        """Hold/resume or a new address from a re-INVITE/UPDATE."""
        self.receiver.update(answer, self._loop.time())
        self.sender.sending = answer.we_send

    def ended_by_carrier(self, reason: str) -> None:
        """The dialog ended from the network side (BYE, CANCEL, timers): tell the call, stop media."""
        if self.ended is None:
            self.ended = reason
            for digit in self.receiver.flush_digits():
                self._emit(CallerDigit(digit))
            self._emit(LegEnded(reason))
        self._stop_clock()

    def _emit(self, event: LegEvent) -> None:
        if self._sink is not None:
            self._sink.on_leg_event(event)

    async def _run_clock(self) -> None:
        try:
            while True:
                due = self.sender.next_due()
                assert due is not None
                delay = due - self._loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                now = self._loop.time()
                packets, markers = self.sender.tick(now)
                remote = self.receiver.remote
                if remote is not None:
                    for packet in packets:
                        self._transport.sendto(packet, remote)
                for name in markers:
                    self._emit(MarkerPlayed(name))
                if self.sender.has_room:
                    self._room.set()
                if self.receiver.timed_out(now):
                    self._server.hang_up(self.handle, "error: media timeout")
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("SIP media clock failed; ending the call", extra={"call_id": self.handle})
            self._server.hang_up(self.handle, "error: media clock")

    def _stop_clock(self) -> None:
        if self._clock is not None and not self._clock.done() and self._clock is not asyncio.current_task():
            self._clock.cancel()

    # ------------------------------------------------------------------ Leg

    async def send_audio(self, ulaw8k: bytes) -> None:
        while not self.sender.has_room:
            if self.ended is not None:
                return  # the call is ending; nothing will play
            self._room.clear()
            await self._room.wait()
        if self.ended is None:
            self.sender.push_audio(ulaw8k)

    async def send_marker(self, name: str) -> None:
        if self.ended is not None:
            self._emit(MarkerPlayed(name))  # nothing left to play: it counts as passed
            return
        self.sender.push_marker(name)

    async def clear(self) -> None:
        for name in self.sender.clear():
            self._emit(MarkerPlayed(name))
        self._room.set()

    async def hang_up(self) -> None:
        self._server.hang_up(self.handle, "hangup: bridge")

    async def close(self, reason: str, timeout_s: float) -> None:
        if self.closed:
            return
        self.closed = True
        if self.ended is None:
            self.ended = reason
            self._server.hang_up(self.handle, "hangup: bridge")  # BYE, unless the dialog already ended
        self._room.set()  # wake a sender waiting for room
        clock, self._clock = self._clock, None
        if clock is not None and not clock.done():
            clock.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(clock), timeout_s)
        self._transport.close()
        self._server.release(self)
