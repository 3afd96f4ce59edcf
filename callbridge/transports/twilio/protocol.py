"""One Media Streams connection as a state machine, sans I/O.

:class:`MediaStreamProtocol` checks the order of inbound events (``connected``, ``start``,
then ``media``/``mark``/``dtmf`` for the same stream, ``stop``) and builds the three
messages we may send (``media``, ``mark``, ``clear``) in exactly Twilio's shapes
(shared/docs/twilio-media-streams.md §3–§4). It never touches a socket.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
from typing import Final

from .wire import (
    _DIGITS,
    MAX_MESSAGE_BYTES,
    Connected,
    Event,
    Media,
    ProtocolError,
    Start,
    Stop,
    Unknown,
    parse_message,
)

log = logging.getLogger(__name__)

__all__ = ["MediaStreamProtocol", "StreamState"]

class StreamState(enum.Enum):
    """Where one Media Streams connection is."""

    AWAITING_CONNECTED = "awaiting_connected"
    AWAITING_START = "awaiting_start"
    STREAMING = "streaming"
    STOPPED = "stopped"  # Twilio sent stop; the socket is about to close
    CLOSED = "closed"  # the socket is gone (closed by either side, or dropped)


_TRANSITIONS: Final[dict[StreamState, frozenset[StreamState]]] = {
    # `connected` is optional in practice: `start` may come first.
    StreamState.AWAITING_CONNECTED: frozenset(
        {StreamState.AWAITING_START, StreamState.STREAMING, StreamState.CLOSED}
    ),
    StreamState.AWAITING_START: frozenset({StreamState.STREAMING, StreamState.CLOSED}),
    StreamState.STREAMING: frozenset({StreamState.STOPPED, StreamState.CLOSED}),
    StreamState.STOPPED: frozenset({StreamState.CLOSED}),
    StreamState.CLOSED: frozenset(),
}


class MediaStreamProtocol:
    """One Media Streams connection: checks the order of inbound events, builds outbound ones.

    Feed every text frame to :meth:`receive`; send what :meth:`media_message`,
    :meth:`mark_message` and :meth:`clear_message` return as text frames. Call
    :meth:`close` when the socket goes away. Anomalies that are not errors (sequence and
    media chunk gaps) are counted, never raised. Which marks are pending, and what an echo
    means, is the call's bookkeeping (:class:`callbridge.calls.playout.Playout`), not the wire's.
    """

    def __init__(self, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self.state = StreamState.AWAITING_CONNECTED
        self.start: Start | None = None
        self.connected_seen = False
        self.messages_received = 0
        self.sequence_gaps = 0  # sequenceNumber did not count up by one
        self.media_gaps = 0  # media.chunk did not count up by one (lost or reordered audio)
        self._last_sequence: int | None = None
        self._last_chunk: int | None = None

    @property
    def stream_sid(self) -> str | None:
        return None if self.start is None else self.start.stream_sid

    def _move(self, new: StreamState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"illegal stream transition {self.state.value} -> {new.value}")
        self.state = new

    def _check_open(self) -> None:
        if self.state is StreamState.CLOSED:
            raise ProtocolError("closed", "the stream's socket is closed")
        if self.state is StreamState.STOPPED:
            raise ProtocolError("after_stop", "the stream has stopped")

    def receive(self, text: str | bytes) -> Event:
        """Parse one inbound frame and check it against the connection's state."""
        self._check_open()
        event = parse_message(text, max_bytes=self.max_message_bytes)
        self.messages_received += 1
        if isinstance(event, Connected):
            if self.state is not StreamState.AWAITING_CONNECTED:
                raise ProtocolError("duplicate_connected", "connected may only come first")
            self.connected_seen = True
            self._move(StreamState.AWAITING_START)
            return event
        if isinstance(event, Unknown):
            log.debug("ignoring unknown Media Streams event %r", event.event[:40])
            number = event.raw.get("sequenceNumber")
            if self.start is not None and isinstance(number, str) and _DIGITS.fullmatch(number):
                self._count_sequence(int(number))  # it still counts in Twilio's numbering
            return event
        if isinstance(event, Start):
            if self.state is StreamState.STREAMING:
                raise ProtocolError("duplicate_start", "start may only come once")
            if not self.connected_seen:
                log.debug("start arrived without connected first")
            self.start = event
            self._last_sequence = event.sequence_number
            self._move(StreamState.STREAMING)
            return event
        # media, mark, dtmf and stop all need a started stream with the same sid.
        if self.start is None:
            raise ProtocolError("before_start", f"{type(event).__name__.lower()} before start")
        if event.stream_sid != self.start.stream_sid:
            raise ProtocolError("wrong_stream_sid", f"{type(event).__name__.lower()} for another stream")
        self._count_sequence(event.sequence_number)
        if isinstance(event, Media):
            if self._last_chunk is not None and event.chunk != self._last_chunk + 1:
                self.media_gaps += 1
            self._last_chunk = event.chunk
        elif isinstance(event, Stop):
            self._move(StreamState.STOPPED)
        return event

    def _count_sequence(self, number: int) -> None:
        if self._last_sequence is not None and number != self._last_sequence + 1:
            self.sequence_gaps += 1
        self._last_sequence = number

    def close(self) -> None:
        """The socket is gone (idempotent). Any later call raises ``closed``."""
        if self.state is not StreamState.CLOSED:
            self._move(StreamState.CLOSED)

    # Outbound: exactly the shapes of §4, no extra fields, compact JSON, text frames.

    def _sid_for_send(self) -> str:
        self._check_open()
        if self.start is None:
            raise ProtocolError("before_start", "nothing may be sent before start (no streamSid yet)")
        return self.start.stream_sid

    def media_message(self, ulaw: bytes) -> str:
        """A ``media`` message carrying raw 8 kHz mu-law bytes (any length but zero)."""
        sid = self._sid_for_send()
        if not ulaw:
            raise ValueError("an empty media payload plays nothing; do not send it")
        payload = base64.b64encode(ulaw).decode("ascii")
        return json.dumps({"event": "media", "streamSid": sid, "media": {"payload": payload}}, separators=(",", ":"))

    def mark_message(self, name: str) -> str:
        """A ``mark`` placed at the current end of Twilio's playback queue; echoed when reached."""
        sid = self._sid_for_send()
        if not name:
            raise ValueError("a mark needs a non-empty name")
        return json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": name}}, separators=(",", ":"))

    def clear_message(self) -> str:
        """A ``clear``: Twilio drops its queued audio and echoes every pending mark at once."""
        sid = self._sid_for_send()
        return json.dumps({"event": "clear", "streamSid": sid}, separators=(",", ":"))
