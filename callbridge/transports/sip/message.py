"""SIP messages at the edge, sans I/O: bytes in, checked :class:`Request`/:class:`Response` out.

Parsing is ``sipmessage``'s (RFC 3261 grammar); this module adds what a server facing the
internet needs before trusting a datagram: a size cap, header folding (which ``sipmessage``
does not unfold), bad UTF-8 caught (``sipmessage`` raises ``UnicodeDecodeError``), the
mandatory headers checked, and the body cut to ``Content-Length``. Every failure is a
:class:`SipParseError` with a short reason code; the server counts it and drops the datagram.

It also builds what we send: responses that copy the request's Via/From/To/Call-ID/CSeq
(RFC 3261 §8.2.6) and in-dialog requests (BYE).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Final

from sipmessage import CSeq, Request, Response, Via
from sipmessage import Message as _Message

__all__ = [
    "MAX_MESSAGE_BYTES",
    "SERVER_NAME",
    "Request",
    "Response",
    "SipParseError",
    "TransactionKey",
    "build_response",
    "new_branch",
    "new_tag",
    "parse_message",
    "transaction_key",
]

MAX_MESSAGE_BYTES: Final = 8192
"""Default cap on one datagram. UDP SIP fits a path MTU (~1300 bytes, RFC 3261 §18.1.1);
carriers' INVITEs with long SDP stay under 4 KiB. Larger datagrams are dropped."""

SERVER_NAME: Final = "callbridge"
MAGIC_COOKIE: Final = "z9hG4bK"  # RFC 3261 branch prefix
_FOLD = re.compile(rb"\r\n[ \t]+")
_REQUIRED: Final = ("Via", "From", "To", "Call-ID", "CSeq")


class SipParseError(Exception):
    """A datagram that is not a usable SIP message. ``reason`` is a short code for counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse_message(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Request | Response | None:
    """One datagram → a checked request or response; ``None`` for a CRLF keep-alive (RFC 5626).

    Raises :class:`SipParseError` for anything else that is not a well-formed SIP message.
    """
    if len(data) > max_bytes:
        raise SipParseError("too_large", f"{len(data)} bytes > {max_bytes}")
    if not data.strip(b"\r\n"):
        return None
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise SipParseError("truncated", "no blank line after the headers")
    head = _FOLD.sub(b" ", head)  # RFC 3261 §7.3.1: a header may continue on indented lines
    try:
        msg = _Message.parse(head + b"\r\n\r\n" + body)
    except UnicodeDecodeError:
        raise SipParseError("bad_utf8", "headers are not UTF-8") from None
    except (ValueError, KeyError, IndexError):
        raise SipParseError("bad_syntax", "not a SIP request or response") from None
    for name in _REQUIRED:
        if msg.headers.get(name) is None:
            raise SipParseError("missing_header", name)
    try:
        cseq = msg.cseq
        vias = msg.via
        msg.from_address  # noqa: B018 - parse now, so later code may rely on it
        msg.to_address  # noqa: B018
        length = msg.content_length
    except (ValueError, KeyError, IndexError):
        raise SipParseError("bad_header", "Via, From, To, CSeq or Content-Length is malformed") from None
    if not vias:
        raise SipParseError("missing_header", "Via")
    if isinstance(msg, Request) and cseq.method != msg.method and msg.method not in ("ACK", "CANCEL"):
        raise SipParseError("cseq_method", f"CSeq method {cseq.method} on a {msg.method}")
    if isinstance(msg, Request) and msg.method in ("ACK", "CANCEL") and cseq.method != msg.method:
        raise SipParseError("cseq_method", f"CSeq method {cseq.method} on a {msg.method}")
    if length is not None:
        if length < 0 or length > len(msg.body):
            raise SipParseError("short_body", f"Content-Length {length} > {len(msg.body)} bytes received")
        msg.body = msg.body[:length]
    return msg


def new_tag() -> str:
    """A From/To tag: 64 random bits (RFC 3261 §19.3 wants at least 32)."""
    return secrets.token_hex(8)


def new_branch() -> str:
    """A Via branch for a request we originate (RFC 3261 §8.1.1.7)."""
    return MAGIC_COOKIE + secrets.token_hex(10)


@dataclass(frozen=True)
class TransactionKey:
    """What matches a request to its server transaction (RFC 3261 §17.2.3).

    ACK and CANCEL carry the INVITE's branch; ``method`` keeps a CANCEL apart from the INVITE
    it cancels, and an ACK is keyed as the INVITE it acknowledges.
    """

    branch: str
    sent_by: str
    method: str


def transaction_key(req: Request) -> TransactionKey:
    top: Via = req.via[0]
    method = "INVITE" if req.method == "ACK" else req.method
    branch = top.parameters.get("branch") or ""
    sent_by = f"{top.host}:{top.port or 5060}"
    if not branch.startswith(MAGIC_COOKIE):
        # RFC 2543 peers: no unique branch; fall back on the dialog and sequence identifiers.
        from_tag = req.from_address.parameters.get("tag") or ""
        branch = f"2543/{req.call_id}/{from_tag}/{req.cseq.sequence}"
    return TransactionKey(branch=branch, sent_by=sent_by, method=method)


_REASONS: Final = {
    100: "Trying", 180: "Ringing", 200: "OK", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 407: "Proxy Authentication Required",
    415: "Unsupported Media Type", 420: "Bad Extension", 422: "Session Interval Too Small",
    481: "Call/Transaction Does Not Exist", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 491: "Request Pending", 500: "Server Internal Error", 503: "Service Unavailable",
}


def build_response(
    req: Request,
    code: int,
    *,
    to_tag: str | None = None,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    content_type: str = "application/sdp",
) -> Response:
    """The response to ``req``: its Via/From/To/Call-ID/CSeq copied, our To tag added (RFC 3261 §8.2.6).

    ``to_tag`` is ignored when the request's To already has one (an in-dialog request).
    """
    resp = Response(code=code, phrase=_REASONS.get(code, "Unknown"))
    resp.headers.setlist("Via", req.headers.getlist("Via"))
    resp.headers.set("From", req.headers["From"])
    to = req.headers["To"]
    if to_tag and code > 100 and req.to_address.parameters.get("tag") is None:
        to = f"{to};tag={to_tag}"
    resp.headers.set("To", to)
    resp.headers.set("Call-ID", req.call_id)
    resp.headers.set("CSeq", str(CSeq(req.cseq.sequence, req.cseq.method)))
    resp.headers.set("Server", SERVER_NAME)
    for name, value in (headers or {}).items():
        resp.headers.set(name, value)
    if body:
        resp.headers.set("Content-Type", content_type)
    resp.headers.set("Content-Length", str(len(body)))
    resp.body = body
    return resp
