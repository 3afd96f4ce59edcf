"""Twilio: Media Streams (wire format, connection state machine), TwiML, signatures, REST hang-up,
and the Twilio leg of a call.

Sans-I/O modules (``wire``, ``protocol``, ``twiml``, ``signatures``) are re-exported here; the
REST hang-up (``rest``) and the leg (``leg``: a :class:`callbridge.calls.leg.Leg` over the media
socket) do I/O and are imported from their modules.
"""

from .protocol import MediaStreamProtocol, StreamState
from .signatures import (
    HMAC_SHA1,
    HMAC_SHA256,
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    compute_signature,
    public_url,
    signature_key_id,
    validate_signature,
    websocket_url,
)
from .twiml import MAX_PARAMETER_CHARS, MAX_TWIML_BYTES, connect_stream_twiml, reject_twiml, say_hangup_twiml
from .wire import (
    ERROR_CODES,
    MAX_MESSAGE_BYTES,
    Connected,
    Dtmf,
    Event,
    Mark,
    Media,
    MediaFormat,
    OutboundClear,
    OutboundMark,
    OutboundMedia,
    OutboundMessage,
    ProtocolError,
    Start,
    Stop,
    Unknown,
    dump_event,
    parse_message,
    parse_outbound,
)

__all__ = [
    "ERROR_CODES",
    "HMAC_SHA1",
    "HMAC_SHA256",
    "MAX_MESSAGE_BYTES",
    "MAX_PARAMETER_CHARS",
    "MAX_TWIML_BYTES",
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
    "OutboundMessage",
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
