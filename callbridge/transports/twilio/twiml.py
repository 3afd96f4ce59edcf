"""The TwiML we answer Twilio's voice webhook with: connect a stream, reject, or say and hang up."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Final, Literal
from urllib.parse import urlsplit

from twilio.twiml.voice_response import VoiceResponse

from .signatures import check_http_url

__all__ = ["MAX_PARAMETER_CHARS", "MAX_TWIML_BYTES", "connect_stream_twiml", "reject_twiml", "say_hangup_twiml"]

MAX_PARAMETER_CHARS: Final = 500
"""A ``<Parameter>``'s name and value together must be *under* this many characters."""

MAX_TWIML_BYTES: Final = 64_000
"""Twilio fails a TwiML body above 64 kB with error 11750."""


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
        check_http_url(status_callback, "status_callback")
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
