"""The Twilio leg: a call's :class:`~callbridge.calls.leg.Leg` over one Media Streams WebSocket.

The web handler is the only reader of the socket: it hands each text frame to
:meth:`TwilioLeg.receive`, which checks it with :class:`MediaStreamProtocol` and turns it into
the call's :data:`~callbridge.calls.leg.LegEvent` (``media`` → caller audio decoded to PCM,
``mark`` → marker played, ``dtmf`` → digit, ``stop`` → leg ended). The call's writer is the
only sender: audio, markers and ``clear`` go out as Twilio's messages, unchanged on the wire.
Twilio echoes every mark once its playback queue reaches it, and every pending one at once
after a ``clear``, which is exactly the leg contract. Hang-up is Twilio's REST API.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Protocol

from ...audio import CHUNK_MS, InboundAudio
from ...calls.leg import CallerAudio, CallerDigit, Leg, LegEnded, LegEvent, LegInfo, LegPacing, MarkerPlayed
from ...config import TwilioSettings
from ..websocket import close_code_for, close_socket
from .protocol import MediaStreamProtocol
from .rest import complete_call
from .wire import Dtmf, Mark, Media, ProtocolError, Start, Stop

__all__ = ["MediaSocket", "TwilioLeg"]


class MediaSocket(Protocol):
    """What the leg needs of the socket (an aiohttp ``WebSocketResponse``)."""

    @property
    def closed(self) -> bool: ...

    async def send_str(self, data: str) -> None: ...

    async def close(self, *, code: int = ..., message: bytes = ...) -> bool: ...


class TwilioLeg(Leg):
    """One call's Media Streams connection as a leg. Build it when the upgrade is accepted."""

    def __init__(self, ws: MediaSocket, *, call_sid: str, twilio: TwilioSettings, lead_ms: int,
                 transport: asyncio.Transport | None = None, from_number: str = "", to_number: str = "") -> None:
        self.info = LegInfo(carrier="twilio", carrier_call_id=call_sid, from_number=from_number, to_number=to_number)
        # Twilio buffers what we send and echoes marks itself once it has played up to them.
        self.pacing = LegPacing(chunk_ms=CHUNK_MS, lead_ms=lead_ms, marker_echo="far_end")
        self.protocol = MediaStreamProtocol(max_message_bytes=twilio.max_message_bytes)
        self._ws = ws
        self._transport = transport
        self._twilio = twilio
        self._inbound = InboundAudio()
        self._hung_up = False

    # ---- caller → call

    def receive(self, data: str | bytes) -> Start | LegEvent | None:
        """One text frame from Twilio → the ``Start`` (once), a leg event, or None (nothing for the call).

        Raises :class:`ProtocolError` for a frame or an order that breaks the protocol, and for
        a ``start`` of another call than the one this stream was issued for.
        """
        event = self.protocol.receive(data)
        if isinstance(event, Media):
            return CallerAudio(self._inbound.decode(event.payload), self._inbound.sample_rate)
        if isinstance(event, Mark):
            return MarkerPlayed(event.name)
        if isinstance(event, Dtmf):
            return CallerDigit(event.digit)
        if isinstance(event, Stop):
            return LegEnded("hangup: stop")
        if isinstance(event, Start):
            if event.call_sid != self.info.carrier_call_id:
                raise ProtocolError("call_mismatch", "start does not match the call this stream was issued for")
            self.info = dataclasses.replace(self.info, media_id=event.stream_sid,
                                            custom=dict(event.custom_parameters))
            return event
        return None  # connected, or an event we do not handle (the protocol logged it)

    # ---- call → caller

    async def send_audio(self, ulaw8k: bytes) -> None:
        await self._ws.send_str(self.protocol.media_message(ulaw8k))

    async def send_marker(self, name: str) -> None:
        await self._ws.send_str(self.protocol.mark_message(name))

    async def clear(self) -> None:
        await self._ws.send_str(self.protocol.clear_message())

    async def hang_up(self) -> None:
        """``calls(sid).update(status="completed")`` through the REST API, once."""
        if self._hung_up:
            return
        self._hung_up = True
        await complete_call(self._twilio, self.info.carrier_call_id)

    async def close(self, reason: str, timeout_s: float) -> None:
        """Close the socket with the code for ``reason`` (1000, 1001, 1008 or 1011), bounded."""
        self.protocol.close()
        await close_socket(self._ws, self._transport, close_code_for(reason), reason, timeout_s)  # type: ignore[arg-type]
