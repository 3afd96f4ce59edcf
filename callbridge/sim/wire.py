"""What the service says to "Twilio", checked as Twilio would: the webhook's TwiML and the
media socket's messages. Written from the docs, never from ``callbridge.transports.twilio``."""

from __future__ import annotations

import base64
import binascii
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

TWILIO_EVENTS_IN = ("media", "mark", "clear")  # the only events a service may send


# ------------------------------------------------------------------------------- TwiML


@dataclass(frozen=True)
class TwimlAnswer:
    """What the webhook answered: the stream to open, or a refusal."""

    stream_url: str | None
    parameters: dict[str, str]
    verbs: list[str]  # top-level verbs in order, e.g. ["Connect"] or ["Say", "Hangup"]
    one_way: bool  # <Start><Stream>: Twilio would never play our audio
    said: str = ""  # the text of any <Say>: what the caller hears before a hang-up

    @property
    def rejected(self) -> bool:
        return self.stream_url is None and not self.one_way

    @property
    def refusal(self) -> str | None:
        """Why no stream: "busy" for ``<Reject>`` (the service is full), "not_configured" for
        ``<Say>…<Hangup/>`` (the service answered but cannot take this call: unknown voice)."""
        if not self.rejected:
            return None
        return "busy" if "Reject" in self.verbs else "not_configured"


def parse_twiml(body: bytes) -> TwimlAnswer:
    """Parse a TwiML ``<Response>``; raises ValueError when it is not one."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise ValueError(f"TwiML is not XML: {exc}") from exc
    if root.tag != "Response":
        raise ValueError(f"TwiML root is <{root.tag}>, expected <Response>")
    stream = root.find("Connect/Stream")
    one_way = stream is None and root.find("Start/Stream") is not None
    params: dict[str, str] = {}
    if stream is not None:
        for p in stream.findall("Parameter"):
            params[p.get("name", "")] = p.get("value", "")
    url = stream.get("url") if stream is not None else None
    said = " ".join((e.text or "").strip() for e in root.findall("Say")).strip()
    return TwimlAnswer(stream_url=url, parameters=params, verbs=[c.tag for c in root], one_way=one_way, said=said)


# ---------------------------------------------------------------- messages from the service


@dataclass(frozen=True)
class ServiceMessage:
    """One valid message the service sent to "Twilio"."""

    event: Literal["media", "mark", "clear"]
    payload: bytes = b""  # media: raw mu-law
    name: str = ""  # mark


_BODY_KEYS: dict[str, frozenset[str]] = {"media": frozenset({"payload"}), "mark": frozenset({"name"})}


def validate_service_message(text: str, stream_sid: str) -> tuple[ServiceMessage | None, str | None]:
    """Check one text frame against Twilio's rules; returns (message, None) or (None, error).

    Errors carry Twilio's code: 31951 for bad JSON, unknown events, missing or extra fields,
    a missing ``mark.name``, a wrong ``streamSid`` or a payload that is not base64.
    """
    try:
        obj = json.loads(text)
    except ValueError:
        return None, f"31951 invalid JSON: {text[:60]!r}"
    if not isinstance(obj, dict):
        return None, "31951 message is not a JSON object"
    event = obj.get("event")
    if event not in TWILIO_EVENTS_IN:
        return None, f"31951 unknown event {event!r}"
    required = {"event", "streamSid"} | ({event} if event != "clear" else set())
    missing, extra = sorted(required - obj.keys()), sorted(obj.keys() - required)
    if event == "mark" and "mark" in missing:
        return None, "31951 mark without mark.name"
    if missing:
        return None, f"31951 {event}: missing field(s) {missing}"
    if extra:
        return None, f"31951 {event}: extra field(s) {extra}"
    if obj["streamSid"] != stream_sid:
        return None, f"31951 {event}: wrong streamSid {str(obj['streamSid'])[:40]!r}"
    if event == "clear":
        return ServiceMessage("clear"), None
    body = obj[event]
    if not isinstance(body, dict):
        return None, f"31951 {event}: '{event}' is not an object"
    keys = _BODY_KEYS[event]
    if event == "mark" and not isinstance(body.get("name"), str):
        return None, "31951 mark without mark.name"
    if not keys <= body.keys():
        return None, f"31951 {event}: missing field(s) {sorted(keys - body.keys())} in '{event}'"
    if body.keys() - keys:
        return None, f"31951 {event}: extra field(s) {sorted(body.keys() - keys)} in '{event}'"
    if event == "mark":
        return ServiceMessage("mark", name=body["name"]), None
    payload = body["payload"]
    if not isinstance(payload, str):
        return None, "31951 media: payload is not a string"
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None, "31951 media: payload is not base64"
    return ServiceMessage("media", payload=raw), None
