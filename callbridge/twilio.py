"""Twilio Media Streams, sans I/O: text frames in, typed events out, outbound messages back.

Nothing here touches a socket. :func:`parse_message` turns one WebSocket text frame into an
event; :class:`MediaStreamProtocol` checks the order of events on one connection and
builds the three messages we may send (``media``, ``mark``, ``clear``). The module also
writes the TwiML that points a call at us and checks Twilio's request signatures.

The wire format is in shared/docs/twilio-media-streams.md (§3 inbound, §4 outbound, §9
signatures). Parsing is strict where a mistake matters (stream ids, numbers, the audio
format, base64) and lenient elsewhere: unknown fields are ignored and unknown events come
back as :class:`Unknown`, because Twilio adds fields without notice.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import json
import logging
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from twilio.request_validator import (
    HMAC_SHA1,
    HMAC_SHA256,
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)
from twilio.twiml.voice_response import VoiceResponse

log = logging.getLogger(__name__)

__all__ = [
    "HMAC_SHA1",
    "HMAC_SHA256",
    "MAX_MESSAGE_BYTES",
    "SIGNATURE_HEADER",
    "SIGNATURE_SETTINGS_HEADER",
    "Connected",
    "Dtmf",
    "Event",
    "Mark",
    "Media",
    "MediaFormat",
    "MediaStreamProtocol",
    "OutboundClear",
    "OutboundMark",
    "OutboundMedia",
    "ERROR_CODES",
    "ProtocolError",
    "Start",
    "Stop",
    "StreamState",
    "Unknown",
    "compute_signature",
    "connect_stream_twiml",
    "dump_event",
    "parse_message",
    "parse_outbound",
    "public_url",
    "reject_twiml",
    "say_hangup_twiml",
    "signature_key_id",
    "validate_signature",
    "websocket_url",
]

MAX_MESSAGE_BYTES: Final = 64 * 1024
"""Default cap on one inbound frame. Twilio's frames are ~400 bytes; aiohttp allows 4 MiB."""

MAX_PARAMETER_CHARS: Final = 500
"""A ``<Parameter>``'s name and value together must be *under* this many characters."""

MAX_TWIML_BYTES: Final = 64_000
"""Twilio fails a TwiML body above 64 kB with error 11750."""

MULAW: Final = "audio/x-mulaw"
SAMPLE_RATE: Final = 8000

ERROR_CODES: Final = frozenset({
    # one frame on its own
    "binary_frame",  # a binary WebSocket frame (Twilio only sends text)
    "too_large",  # over the size cap
    "bad_json",  # not JSON at all
    "not_object",  # JSON, but not an object
    "missing_field",  # a required field is absent
    "bad_field",  # a field has the wrong JSON type
    "bad_number",  # a numeric field that is not a non-negative integer
    "bad_payload",  # media payload is not strict base64
    "bad_media_format",  # start.mediaFormat is not mu-law, 8000 Hz, mono
    "unknown_event",  # outbound parsing only: an event we may not send
    "extra_field",  # outbound parsing only: a field Twilio would reject (31951)
    # order on one connection
    "duplicate_connected",
    "before_start",
    "duplicate_start",
    "wrong_stream_sid",
    "after_stop",
    "closed",
})
"""The codes this module raises. The app may raise its own (a start timeout, say)."""


class ProtocolError(Exception):
    """A frame or an event order that breaks the Media Streams protocol.

    ``code`` is machine-readable (see :data:`ERROR_CODES`); the app maps it to a close code
    and a metric label. The message never contains payloads or custom parameters (they can
    carry tokens).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class MediaFormat:
    """``start.mediaFormat``; only mu-law / 8000 Hz / mono gets past :func:`parse_message`."""

    encoding: str = MULAW
    sample_rate: int = SAMPLE_RATE
    channels: int = 1


@dataclass(frozen=True)
class Connected:
    """First message of a stream. We answer nothing (an unknown reply gives warning 31951)."""

    protocol: str
    version: str


@dataclass(frozen=True)
class Start:
    """The stream started: from here we know ``stream_sid`` and may send."""

    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    # Caller data from <Parameter>s; excluded from the hash (a dict) and from repr (tokens).
    custom_parameters: dict[str, str] = field(hash=False, repr=False)
    media_format: MediaFormat
    sequence_number: int


@dataclass(frozen=True)
class Media:
    """Caller audio: ``payload`` is raw mu-law (decoded from base64), 1 byte per 1/8000 s."""

    stream_sid: str
    track: str
    chunk: int  # counts from 1, one per media message
    timestamp_ms: int  # since the stream started
    payload: bytes = field(repr=False)
    sequence_number: int


@dataclass(frozen=True)
class Mark:
    """Echo of a mark we sent: the audio before it has played, or was cleared."""

    stream_sid: str
    name: str
    sequence_number: int


@dataclass(frozen=True)
class Dtmf:
    """A key the caller pressed (``0``-``9``, ``*``, ``#``)."""

    stream_sid: str
    digit: str
    sequence_number: int


@dataclass(frozen=True)
class Stop:
    """Last message of a stream. ``call_sid``/``account_sid`` are "" if Twilio left them out."""

    stream_sid: str
    call_sid: str
    account_sid: str
    sequence_number: int


@dataclass(frozen=True)
class Unknown:
    """An event we do not handle; logged at debug and ignored."""

    event: str
    raw: dict[str, Any] = field(hash=False, repr=False)


Event = Connected | Start | Media | Mark | Dtmf | Stop | Unknown


# --------------------------------------------------------------------------- parsing

# ASCII digits only: int() would also take " 7", "1_000" and non-ASCII digits.
_DIGITS = re.compile(r"[0-9]{1,18}")


def _load_object(text: str | bytes, max_bytes: int) -> dict[str, Any]:
    if isinstance(text, bytes | bytearray | memoryview):
        raise ProtocolError("binary_frame", "Media Streams messages are text frames")
    if len(text) > max_bytes or (not text.isascii() and len(text.encode("utf-8", "surrogatepass")) > max_bytes):
        raise ProtocolError("too_large", f"message over {max_bytes} bytes")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested arrays
        raise ProtocolError("bad_json", f"invalid JSON: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("not_object", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _obj(parent: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = parent.get(key)
    if value is None:
        raise ProtocolError("missing_field", f"{where}.{key} is missing")
    if not isinstance(value, dict):
        raise ProtocolError("bad_field", f"{where}.{key} must be an object")
    return value


def _str(parent: Mapping[str, Any], key: str, where: str, *, default: str | None = None) -> str:
    value = parent.get(key)
    if value is None:
        if default is not None:
            return default
        raise ProtocolError("missing_field", f"{where}.{key} is missing")
    if not isinstance(value, str):
        raise ProtocolError("bad_field", f"{where}.{key} must be a string")
    return value


def _sid(parent: Mapping[str, Any], key: str, where: str) -> str:
    value = _str(parent, key, where)
    if not value:
        raise ProtocolError("missing_field", f"{where}.{key} is empty")
    return value


def _int(parent: Mapping[str, Any], key: str, where: str) -> int:
    """A count Twilio sends as a decimal string; a plain JSON integer is accepted too."""
    value = parent.get(key)
    if value is None:
        raise ProtocolError("missing_field", f"{where}.{key} is missing")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**18:
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    raise ProtocolError("bad_number", f"{where}.{key} is not a non-negative integer")


def _format_int(value: object, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    raise ProtocolError("bad_media_format", f"mediaFormat.{name} is not an integer")


def _parse_media_format(start: Mapping[str, Any]) -> MediaFormat:
    fmt = _obj(start, "mediaFormat", "start")
    encoding = fmt.get("encoding")
    if not isinstance(encoding, str) or encoding.lower() != MULAW:
        raise ProtocolError("bad_media_format", f"encoding {encoding!r}; only {MULAW} is supported")
    rate = _format_int(fmt.get("sampleRate"), "sampleRate")
    channels = _format_int(fmt.get("channels"), "channels")
    if rate != SAMPLE_RATE or channels != 1:
        raise ProtocolError("bad_media_format", f"{rate} Hz x {channels} channels; expected 8000 Hz mono")
    return MediaFormat(MULAW, rate, channels)


def _parse_start(obj: Mapping[str, Any]) -> Start:
    start = _obj(obj, "start", "message")
    inner_sid = start.get("streamSid")
    outer_sid = obj.get("streamSid")
    if inner_sid is None and outer_sid is None:
        raise ProtocolError("missing_field", "streamSid is missing")
    stream_sid = _sid(start, "streamSid", "start") if inner_sid is not None else _sid(obj, "streamSid", "message")
    if outer_sid is not None and _sid(obj, "streamSid", "message") != stream_sid:
        raise ProtocolError("wrong_stream_sid", "streamSid differs between the message and start")
    tracks_raw = start.get("tracks", [])
    if not isinstance(tracks_raw, list) or not all(isinstance(t, str) for t in tracks_raw):
        raise ProtocolError("bad_field", "start.tracks must be a list of strings")
    params_raw = start.get("customParameters", {})
    if params_raw is None:
        params_raw = {}
    if not isinstance(params_raw, dict) or not all(isinstance(v, str) for v in params_raw.values()):
        raise ProtocolError("bad_field", "start.customParameters must map strings to strings")
    return Start(
        stream_sid=stream_sid,
        call_sid=_sid(start, "callSid", "start"),
        account_sid=_sid(start, "accountSid", "start"),
        tracks=tuple(tracks_raw),
        custom_parameters=dict(params_raw),
        media_format=_parse_media_format(start),
        sequence_number=_int(obj, "sequenceNumber", "message"),
    )


def _parse_media(obj: Mapping[str, Any]) -> Media:
    media = _obj(obj, "media", "message")
    try:
        # validate=True: refuse characters outside the base64 alphabet instead of skipping them.
        payload = base64.b64decode(_str(media, "payload", "media"), validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise ProtocolError("bad_payload", "media.payload is not base64") from None
    return Media(
        stream_sid=_sid(obj, "streamSid", "message"),
        track=_str(media, "track", "media", default="inbound"),
        chunk=_int(media, "chunk", "media"),
        timestamp_ms=_int(media, "timestamp", "media"),
        payload=payload,
        sequence_number=_int(obj, "sequenceNumber", "message"),
    )


def _parse_stop(obj: Mapping[str, Any]) -> Stop:
    # Lenient body: a stop ends the stream whatever it carries.
    stop = obj.get("stop")
    body: Mapping[str, Any] = stop if isinstance(stop, dict) else {}
    return Stop(
        stream_sid=_sid(obj, "streamSid", "message"),
        call_sid=_str(body, "callSid", "stop", default=""),
        account_sid=_str(body, "accountSid", "stop", default=""),
        sequence_number=_int(obj, "sequenceNumber", "message"),
    )


def parse_message(text: str | bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Event:
    """Parse one frame that Twilio sent us into an event.

    Raises :class:`ProtocolError` (and nothing else) for a binary frame, a frame over
    ``max_bytes``, bad JSON, a missing or mistyped required field, a number that is not
    one, a payload that is not base64, or a ``start`` whose audio is not mu-law/8000/mono.
    Unknown fields are ignored; unknown events come back as :class:`Unknown`.
    """
    obj = _load_object(text, max_bytes)
    event = _str(obj, "event", "message")
    if event == "media":  # the hot path: 50 per second per call
        return _parse_media(obj)
    if event == "connected":
        # Informational only: default rather than fail if a Twilio look-alike leaves them out.
        return Connected(_str(obj, "protocol", "message", default=""), _str(obj, "version", "message", default=""))
    if event == "start":
        return _parse_start(obj)
    if event == "mark":
        return Mark(
            stream_sid=_sid(obj, "streamSid", "message"),
            name=_str(_obj(obj, "mark", "message"), "name", "mark"),
            sequence_number=_int(obj, "sequenceNumber", "message"),
        )
    if event == "dtmf":
        return Dtmf(
            stream_sid=_sid(obj, "streamSid", "message"),
            digit=_str(_obj(obj, "dtmf", "message"), "digit", "dtmf"),
            sequence_number=_int(obj, "sequenceNumber", "message"),
        )
    if event == "stop":
        return _parse_stop(obj)
    return Unknown(event, obj)


def dump_event(event: Event) -> str:
    """The JSON text Twilio would send for ``event`` (the simulator's side; inverse of parsing)."""
    msg: dict[str, Any]
    if isinstance(event, Connected):
        msg = {"event": "connected", "protocol": event.protocol, "version": event.version}
    elif isinstance(event, Start):
        msg = {
            "event": "start",
            "sequenceNumber": str(event.sequence_number),
            "start": {
                "accountSid": event.account_sid,
                "streamSid": event.stream_sid,
                "callSid": event.call_sid,
                "tracks": list(event.tracks),
                "customParameters": dict(event.custom_parameters),
                "mediaFormat": {
                    "encoding": event.media_format.encoding,
                    "sampleRate": event.media_format.sample_rate,
                    "channels": event.media_format.channels,
                },
            },
            "streamSid": event.stream_sid,
        }
    elif isinstance(event, Media):
        msg = {
            "event": "media",
            "sequenceNumber": str(event.sequence_number),
            "media": {
                "track": event.track,
                "chunk": str(event.chunk),
                "timestamp": str(event.timestamp_ms),
                "payload": base64.b64encode(event.payload).decode("ascii"),
            },
            "streamSid": event.stream_sid,
        }
    elif isinstance(event, Mark):
        msg = {"event": "mark", "sequenceNumber": str(event.sequence_number), "streamSid": event.stream_sid,
               "mark": {"name": event.name}}
    elif isinstance(event, Dtmf):
        msg = {"event": "dtmf", "streamSid": event.stream_sid, "sequenceNumber": str(event.sequence_number),
               "dtmf": {"track": "inbound_track", "digit": event.digit}}
    elif isinstance(event, Stop):
        msg = {"event": "stop", "sequenceNumber": str(event.sequence_number), "streamSid": event.stream_sid,
               "stop": {"accountSid": event.account_sid, "callSid": event.call_sid}}
    else:
        msg = dict(event.raw)
    return json.dumps(msg, separators=(",", ":"))


# --------------------------------------------------------------------------- outbound messages


@dataclass(frozen=True)
class OutboundMedia:
    """A ``media`` message as we send it: ``payload`` is raw mu-law."""

    stream_sid: str
    payload: bytes = field(repr=False)


@dataclass(frozen=True)
class OutboundMark:
    stream_sid: str
    name: str


@dataclass(frozen=True)
class OutboundClear:
    stream_sid: str


OutboundMessage = OutboundMedia | OutboundMark | OutboundClear

# Exactly these keys, as Twilio checks them (an extra or a missing one is warning 31951).
_OUTBOUND_KEYS: Final = {
    "media": ({"event", "streamSid", "media"}, {"payload"}),
    "mark": ({"event", "streamSid", "mark"}, {"name"}),
    "clear": ({"event", "streamSid"}, None),
}


def parse_outbound(text: str | bytes, *, max_bytes: int = 16 * 1024 * 1024) -> OutboundMessage:
    """Parse a message *we* send, as strictly as Twilio does (the simulator and tests use it).

    Extra or missing fields, unknown events, binary frames and a mark without a name all
    raise :class:`ProtocolError`. The stream id is returned, not checked.
    """
    obj = _load_object(text, max_bytes)
    event = _str(obj, "event", "message")
    if event not in _OUTBOUND_KEYS:
        raise ProtocolError("unknown_event", f"{event!r} is not an event we may send")
    top, inner = _OUTBOUND_KEYS[event]
    if set(obj) - top:
        raise ProtocolError("extra_field", f"unexpected fields in {event}: {sorted(set(obj) - top)}")
    stream_sid = _sid(obj, "streamSid", "message")
    if inner is None:
        return OutboundClear(stream_sid)
    body = _obj(obj, event, "message")
    if set(body) - inner:
        raise ProtocolError("extra_field", f"unexpected fields in {event}.{event}: {sorted(set(body) - inner)}")
    if event == "mark":
        name = _str(body, "name", "mark")
        if not name:
            raise ProtocolError("missing_field", "mark.name is empty")
        return OutboundMark(stream_sid, name)
    try:
        payload = base64.b64decode(_str(body, "payload", "media"), validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("bad_payload", "media.payload is not base64") from None
    return OutboundMedia(stream_sid, payload)


# --------------------------------------------------------------------------- the state machine


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
    :meth:`close` when the socket goes away. Anomalies that are not errors (sequence gaps,
    marks echoed out of order) are counted, never raised.
    """

    def __init__(self, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self.state = StreamState.AWAITING_CONNECTED
        self.start: Start | None = None
        self.connected_seen = False
        self.messages_received = 0
        self.sequence_gaps = 0  # sequenceNumber did not count up by one
        self.media_gaps = 0  # media.chunk did not count up by one (lost or reordered audio)
        self.marks_out_of_order = 0  # an echo that skipped older pending marks
        self.marks_unknown = 0  # an echo of a name we never sent (or already echoed)
        self._last_sequence: int | None = None
        self._last_chunk: int | None = None
        self._pending_marks: deque[str] = deque()

    @property
    def stream_sid(self) -> str | None:
        return None if self.start is None else self.start.stream_sid

    @property
    def pending_marks(self) -> tuple[str, ...]:
        """Names of marks sent and not yet echoed, oldest first."""
        return tuple(self._pending_marks)

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
        elif isinstance(event, Mark):
            self._echoed(event.name)
        elif isinstance(event, Stop):
            self._move(StreamState.STOPPED)
        return event

    def _count_sequence(self, number: int) -> None:
        if self._last_sequence is not None and number != self._last_sequence + 1:
            self.sequence_gaps += 1
        self._last_sequence = number

    def _echoed(self, name: str) -> None:
        if self._pending_marks and self._pending_marks[0] == name:
            self._pending_marks.popleft()
        elif name in self._pending_marks:
            # Echoes follow the single playback queue, so this means a lost echo.
            while self._pending_marks.popleft() != name:
                self.marks_out_of_order += 1
        else:
            self.marks_unknown += 1

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
        self._pending_marks.append(name)
        return json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": name}}, separators=(",", ":"))

    def clear_message(self) -> str:
        """A ``clear``: Twilio drops its queued audio and echoes every pending mark at once."""
        sid = self._sid_for_send()
        return json.dumps({"event": "clear", "streamSid": sid}, separators=(",", ":"))


# --------------------------------------------------------------------------- TwiML


def _render(response: VoiceResponse) -> str:
    xml = str(response)
    if len(xml.encode("utf-8")) > MAX_TWIML_BYTES:
        raise ValueError(f"TwiML is {len(xml.encode('utf-8'))} bytes; Twilio's limit is {MAX_TWIML_BYTES}")
    return xml


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_stream_url(url: str, *, allow_ws: bool) -> None:
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError("stream URL has no host")
    # Twilio only connects to wss://. Plain ws:// is for local runs (the simulator), which
    # Twilio could never reach anyway: allowed for loopback hosts, elsewhere only on request.
    local = allow_ws or _is_loopback(parts.hostname)
    if parts.scheme != "wss" and not (parts.scheme == "ws" and local):
        raise ValueError(f"stream URL must use wss:// (got {parts.scheme or 'no scheme'}://)")
    if "?" in url or parts.fragment:
        # Twilio drops query strings on <Stream url>: carry data in <Parameter>s or the path.
        raise ValueError("stream URL must not have a query string or fragment; use parameters")


def _check_http_url(url: str, what: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{what} must be an absolute http(s) URL")


def connect_stream_twiml(
    stream_url: str,
    parameters: Mapping[str, str],
    *,
    status_callback: str | None = None,
    goodbye: str | None = None,
    allow_ws: bool = False,
) -> str:
    """TwiML that connects the call to our WebSocket: ``<Connect><Stream>`` with parameters.

    ``stream_url`` must be ``wss://`` and have no query string; ``ws://`` is accepted for
    a loopback host (the local simulator) or with ``allow_ws``. Each parameter's name plus value must stay under
    500 characters. When our socket closes the call hangs up, unless ``goodbye`` is given:
    then Twilio says it first. Nothing else ever follows ``</Connect>`` (a ``<Pause>``
    there would keep the caller in silence).
    """
    _check_stream_url(stream_url, allow_ws=allow_ws)
    for name, value in parameters.items():
        if not isinstance(name, str) or not isinstance(value, str) or not name:
            raise ValueError("parameter names and values must be strings; names non-empty")
        if len(name) + len(value) >= MAX_PARAMETER_CHARS:
            raise ValueError(
                f"parameter {name[:40]!r}: name + value is {len(name) + len(value)} characters; "
                f"Twilio needs under {MAX_PARAMETER_CHARS}"
            )
    response = VoiceResponse()
    connect = response.connect()
    if status_callback is not None:
        _check_http_url(status_callback, "status_callback")
        stream = connect.stream(url=stream_url, status_callback=status_callback, status_callback_method="POST")
    else:
        stream = connect.stream(url=stream_url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    if goodbye:
        response.say(goodbye)
        response.hangup()
    return _render(response)


def reject_twiml(reason: Literal["busy", "rejected"] = "busy") -> str:
    """``<Reject>``: refuse the call without answering it (no charge; the caller hears busy)."""
    if reason not in ("busy", "rejected"):
        raise ValueError(f"reject reason must be 'busy' or 'rejected', not {reason!r}")
    response = VoiceResponse()
    response.reject(reason=reason)
    return _render(response)


def say_hangup_twiml(text: str) -> str:
    """``<Say>text</Say><Hangup/>``: answer, speak with Twilio's voice, hang up."""
    response = VoiceResponse()
    response.say(text)
    response.hangup()
    return _render(response)


# --------------------------------------------------------------------------- signatures and URLs


class _Params:
    """Adapts ``{name: value or [values]}`` to the ``getall`` that RequestValidator looks for.

    Without it a plain dict with list values would be hashed as one value and fail.
    """

    def __init__(self, params: Mapping[str, str | Sequence[str]]) -> None:
        self._params = params

    def __iter__(self) -> Any:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def getall(self, name: str) -> list[str]:
        value = self._params[name]
        return [value] if isinstance(value, str) else list(value)


def _adapt(params: Mapping[str, str | Sequence[str]] | str | None) -> Any:
    if params is None:
        return {}
    if isinstance(params, str):
        return params  # a raw JSON body: checked against bodySHA256 in the URL
    if hasattr(params, "getall"):
        return params  # multidict / aiohttp form data already has the right shape
    return _Params(params)


def validate_signature(
    auth_token: str,
    url: str,
    params: Mapping[str, str | Sequence[str]] | str | None,
    signature: str | None,
    settings_header: str | None = None,
) -> bool:
    """Whether ``signature`` (the ``X-Twilio-Signature`` header) is Twilio's for this request.

    ``url`` is the URL exactly as Twilio was given it (a configured public URL, never
    ``request.url``): ``https://…`` with the query string for a webhook, the ``wss://…``
    stream URL for the WebSocket upgrade. ``params`` is every form field Twilio posted
    (``{}`` for the upgrade), or the raw body string for a JSON webhook. With the
    ``X-Twilio-Webhooks-Signature-Settings`` header, the algorithm it names is used and
    ``auth_token`` must be that Webhooks Rule's SharedKey secret (see
    :func:`signature_key_id`). The port is tried with and without, as Twilio is not
    consistent; the comparison is constant-time. A missing signature is invalid.
    """
    if not auth_token:
        raise ValueError("an empty auth token would accept forged signatures")
    if not signature:
        return False
    algorithm = get_signature_algorithm(settings_header)
    return bool(RequestValidator(auth_token).validate(url, _adapt(params), signature, algorithm=algorithm))


def signature_key_id(settings_header: str | None) -> str | None:
    """The ``key=`` of ``X-Twilio-Webhooks-Signature-Settings``: which SharedKey signed the request."""
    for part in (settings_header or "").split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip() == "key" and value.strip():
            return value.strip()
    return None


def compute_signature(
    auth_token: str,
    url: str,
    params: Mapping[str, str | Sequence[str]] | None = None,
    *,
    algorithm: str = HMAC_SHA1,
) -> str:
    """The ``X-Twilio-Signature`` Twilio would send (for the simulator and tests)."""
    return str(RequestValidator(auth_token).compute_signature(url, _adapt(params), algorithm=algorithm))


def public_url(base_url: str, path: str, query: str = "") -> str:
    """The public URL Twilio requests: ``base_url`` (http/https, may have a path) + ``path`` + query.

    Signatures are computed over this, so build it from configuration, never from the
    request as a proxy or tunnel delivered it.
    """
    _check_http_url(base_url, "base_url")
    if urlsplit(base_url).query or "?" in base_url or "?" in path:
        raise ValueError("put the query string in `query`, not in base_url or path")
    url = base_url.rstrip("/") + "/" + path.lstrip("/")
    query = query.removeprefix("?")
    return f"{url}?{query}" if query else url


def websocket_url(base_url: str, path: str) -> str:
    """The ``<Stream url>`` for ``path``: https→wss, http→ws (local only); never a query string."""
    url = public_url(base_url, path)
    scheme, rest = url.split("://", 1)
    return ("wss" if scheme == "https" else "ws") + "://" + rest
