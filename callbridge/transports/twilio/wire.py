"""Twilio Media Streams wire format, sans I/O: text frames in, typed events out.

Nothing here touches a socket. :func:`parse_message` turns one WebSocket text frame into an
event and :func:`parse_outbound` checks a message we send as strictly as Twilio does. The
order of events on one connection is :mod:`.protocol`'s job; TwiML is :mod:`.twiml`'s and
request signatures :mod:`.signatures`'.

The wire format is in shared/docs/twilio-media-streams.md (§3 inbound, §4 outbound, §9
signatures). Parsing is strict where a mistake matters (stream ids, numbers, the audio
format, base64) and lenient elsewhere: unknown fields are ignored and unknown events come
back as :class:`Unknown`, because Twilio adds fields without notice.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

log = logging.getLogger(__name__)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "Connected",
    "Dtmf",
    "Event",
    "Mark",
    "Media",
    "MediaFormat",
    "OutboundClear",
    "OutboundMark",
    "OutboundMedia",
    "OutboundMessage",
    "ERROR_CODES",
    "ProtocolError",
    "Start",
    "Stop",
    "Unknown",
    "dump_event",
    "parse_message",
    "parse_outbound",
]

MAX_MESSAGE_BYTES: Final = 64 * 1024
"""Default cap on one inbound frame. Twilio's frames are ~400 bytes; aiohttp allows 4 MiB."""

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
    """The JSON text Twilio would send for ``event`` (inverse of parsing; for tests: the simulator
    has its own wire code by design, so it checks the service from outside)."""
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
    """Parse a message *we* send, as strictly as Twilio does (for tests; the simulator has its own).

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
