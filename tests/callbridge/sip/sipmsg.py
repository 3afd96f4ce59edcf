"""Builders of the SIP requests a carrier sends, for the sans-I/O tests (text, as on the wire)."""

from __future__ import annotations

from sipmessage import Message, Response

CARRIER = ("127.0.0.1", 5062)
BRIDGE_IP = "127.0.0.1"
BRIDGE_PORT = 5080


def offer(*, port: int = 40000, address: str = "127.0.0.1", direction: str = "sendrecv",
          formats: str = "0 8 101", dtmf_pt: int = 101, version: int = 1, extra_media: str = "") -> bytes:
    lines = [
        "v=0",
        f"o=carrier 4242 {version} IN IP4 {address}",
        "s=-",
        f"c=IN IP4 {address}",
        "t=0 0",
        f"m=audio {port} RTP/AVP {formats}",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        f"a=rtpmap:{dtmf_pt} telephone-event/8000",
        f"a=fmtp:{dtmf_pt} 0-16",
        "a=ptime:20",
        f"a={direction}",
    ]
    if extra_media:
        lines.append(extra_media)
    return ("\r\n".join(lines) + "\r\n").encode()


def request(method: str, *, branch: str = "z9hG4bK-1", call_id: str = "call-1@carrier", cseq: int = 1,
            from_tag: str = "ftag", to_tag: str | None = None, body: bytes = b"", to_user: str = "+15550100",
            headers: dict[str, str] | None = None, cseq_method: str | None = None) -> bytes:
    to = f"<sip:{to_user}@{BRIDGE_IP}:{BRIDGE_PORT}>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} sip:{to_user}@{BRIDGE_IP}:{BRIDGE_PORT} SIP/2.0",
        f"Via: SIP/2.0/UDP {CARRIER[0]}:{CARRIER[1]};branch={branch};rport",
        "Max-Forwards: 70",
        f"From: \"Caller\" <sip:+15550199@{CARRIER[0]}>;tag={from_tag}",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {cseq_method or method}",
        f"Contact: <sip:caller@{CARRIER[0]}:{CARRIER[1]}>",
    ]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def invite(**kw: object) -> bytes:
    kw.setdefault("body", offer())
    return request("INVITE", **kw)  # type: ignore[arg-type]


def parse_response(data: bytes) -> Response:
    msg = Message.parse(data)
    assert isinstance(msg, Response), data[:80]
    return msg
