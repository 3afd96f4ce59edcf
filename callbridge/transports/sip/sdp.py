"""SDP offer/answer for one audio stream (RFC 4566, RFC 3264), sans I/O.

We answer; we never offer first. The answer takes the first codec of the offer that we allow
(G.711 PCMU or PCMA, 8 kHz, 20 ms), telephone-event on the payload type *the offer used* (a
carrier offering it on 96 ignores digits sent on 101), and the offer's direction mirrored
(hold: ``sendonly`` is answered ``recvonly``; answering ``sendrecv`` there makes carriers hang
up). Other m-lines (video) are refused with port 0, in their place, as RFC 3264 §6 requires.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "CODECS",
    "Answer",
    "MediaLine",
    "SdpError",
    "SessionDescription",
    "build_sdp",
    "mirror_direction",
    "negotiate",
    "parse_sdp",
]

CODECS: Final = ("PCMU", "PCMA")  # what the media path converts; names as in a=rtpmap
_STATIC_PT: Final = {0: ("PCMU", 8000), 8: ("PCMA", 8000)}
_DIRECTIONS: Final = ("sendrecv", "sendonly", "recvonly", "inactive")
MAX_SDP_BYTES: Final = 4096
_MAX_FORMATS: Final = 64


class SdpError(Exception):
    """An offer we cannot parse or answer. ``status`` is the SIP response to send (400 or 488)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


@dataclass(frozen=True)
class MediaLine:
    """One ``m=`` section: its kind, port, protocol, formats and the attributes we read."""

    kind: str  # "audio", "video", ...
    port: int
    proto: str  # "RTP/AVP", "RTP/SAVP", ...
    formats: tuple[str, ...]
    address: str  # c= of the section, else the session's
    rtpmap: dict[int, tuple[str, int]] = field(default_factory=dict)  # pt -> (encoding, rate)
    direction: str = "sendrecv"
    ptime_ms: int | None = None


@dataclass(frozen=True)
class SessionDescription:
    origin_user: str
    session_id: str
    version: int
    address: str  # session-level c=
    media: tuple[MediaLine, ...]


def parse_sdp(body: bytes) -> SessionDescription:
    """Parse the lines we need; unknown lines are ignored. Raises :class:`SdpError` (400)."""
    if len(body) > MAX_SDP_BYTES:
        raise SdpError(400, f"SDP of {len(body)} bytes is over {MAX_SDP_BYTES}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SdpError(400, "SDP is not UTF-8") from None
    origin: tuple[str, str, int] | None = None
    session_addr = ""
    session_dir = "sendrecv"
    media: list[dict[str, object]] = []
    try:
        for raw in text.splitlines():
            line = raw.strip()
            if len(line) < 2 or line[1] != "=":
                continue
            kind, value = line[0], line[2:]
            current = media[-1] if media else None
            if kind == "o":
                parts = value.split()
                origin = (parts[0], parts[1], int(parts[2]))
            elif kind == "c":
                parts = value.split()
                if parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
                    raise SdpError(488, f"unsupported connection line c={value}")
                addr = parts[2].split("/")[0]
                ipaddress.ip_address(addr)  # a hostname here would need DNS: refuse it
                if current is None:
                    session_addr = addr
                else:
                    current["address"] = addr
            elif kind == "m":
                parts = value.split()
                port = int(parts[1].split("/")[0])
                if not 0 <= port <= 65535 or len(parts) > 3 + _MAX_FORMATS:
                    raise SdpError(400, f"bad media line m={value[:80]}")
                media.append({"kind": parts[0], "port": port, "proto": parts[2], "formats": tuple(parts[3:]),
                              "rtpmap": {}, "direction": None, "ptime": None, "address": None})
            elif kind == "a":
                name, _, arg = value.partition(":")
                if name in _DIRECTIONS:
                    if current is None:
                        session_dir = name
                    else:
                        current["direction"] = name
                elif name == "rtpmap" and current is not None:
                    pt_text, _, enc = arg.partition(" ")
                    enc_parts = enc.split("/")
                    rtpmap = current["rtpmap"]
                    assert isinstance(rtpmap, dict)
                    rtpmap[int(pt_text)] = (enc_parts[0], int(enc_parts[1]))
                elif name == "ptime" and current is not None:
                    current["ptime"] = int(float(arg))
    except SdpError:
        raise
    except (ValueError, IndexError):
        raise SdpError(400, "malformed SDP line") from None
    if origin is None:
        raise SdpError(400, "SDP has no o= line")
    lines = tuple(
        MediaLine(
            kind=str(m["kind"]), port=int(m["port"]), proto=str(m["proto"]),  # type: ignore[call-overload]
            formats=m["formats"],  # type: ignore[arg-type]
            address=str(m["address"] or session_addr),
            rtpmap=m["rtpmap"],  # type: ignore[arg-type]
            direction=str(m["direction"] or session_dir),
            ptime_ms=m["ptime"],  # type: ignore[arg-type]
        )
        for m in media
    )
    return SessionDescription(origin_user=origin[0], session_id=origin[1], version=origin[2],
                              address=session_addr, media=lines)


def mirror_direction(offered: str) -> str:
    """The answer's direction for an offer's (RFC 3264 §6.1)."""
    return {"sendonly": "recvonly", "recvonly": "sendonly"}.get(offered, offered)


@dataclass(frozen=True)
class Answer:
    """What we agreed for the audio stream, and what goes into our SDP."""

    codec: str  # "PCMU" or "PCMA"
    payload_type: int
    dtmf_payload_type: int | None  # telephone-event, on the offer's payload type
    remote_address: str  # where the offerer wants RTP ("" when on hold with c=0.0.0.0)
    remote_port: int
    direction: str  # our direction, mirrored from the offer
    media_index: int  # which m-line is the audio
    media_count: int  # m-lines in the offer (the answer has as many)
    rejected_kinds: tuple[str, ...] = ()  # kinds of the other m-lines, answered with port 0

    @property
    def we_send(self) -> bool:
        return self.direction in ("sendrecv", "sendonly")

    @property
    def they_send(self) -> bool:
        return self.direction in ("sendrecv", "recvonly")


def negotiate(offer: SessionDescription, allowed: tuple[str, ...] = CODECS) -> Answer:
    """Pick codec, DTMF payload type and direction for an offer. Raises :class:`SdpError` (488)."""
    for index, line in enumerate(offer.media):
        if line.kind != "audio" or line.port == 0:
            continue
        if line.proto not in ("RTP/AVP", "RTP/AVPF"):
            raise SdpError(488, f"media protocol {line.proto} not supported (no SRTP yet)")
        codec: tuple[str, int] | None = None
        dtmf: int | None = None
        for fmt in line.formats:
            if not fmt.isdigit():
                continue
            pt = int(fmt)
            enc, rate = line.rtpmap.get(pt) or _STATIC_PT.get(pt, ("", 0))
            name = enc.upper()
            if codec is None and rate == 8000 and name in allowed:
                codec = (name, pt)
            elif dtmf is None and rate == 8000 and name == "TELEPHONE-EVENT":
                dtmf = pt
        if codec is None:
            raise SdpError(488, "no common codec (we take " + ", ".join(allowed) + ")")
        direction = line.direction
        address = line.address
        if address in ("0.0.0.0", "::"):  # RFC 2543 hold: "do not send to me"
            address = ""
            direction = {"sendrecv": "sendonly", "recvonly": "inactive"}.get(direction, direction)
        return Answer(
            codec=codec[0], payload_type=codec[1], dtmf_payload_type=dtmf,
            remote_address=address, remote_port=line.port, direction=mirror_direction(direction),
            media_index=index, media_count=len(offer.media),
            rejected_kinds=tuple(m.kind for i, m in enumerate(offer.media) if i != index),
        )
    raise SdpError(488, "the offer has no audio stream")


def build_sdp(answer: Answer, *, address: str, port: int, session_id: str, version: int) -> bytes:
    """Our SDP: one audio stream at ``address:port`` with the agreed codec, DTMF and direction."""
    ip = "IP6" if ":" in address else "IP4"
    lines = [
        "v=0",
        f"o=callbridge {session_id} {version} IN {ip} {address}",
        "s=callbridge",
        f"c=IN {ip} {address}",
        "t=0 0",
    ]
    others = iter(answer.rejected_kinds)
    for index in range(answer.media_count):
        if index != answer.media_index:
            lines.append(f"m={next(others)} 0 RTP/AVP 0")
            continue
        fmts = [str(answer.payload_type)]
        if answer.dtmf_payload_type is not None:
            fmts.append(str(answer.dtmf_payload_type))
        lines.append(f"m=audio {port} RTP/AVP {' '.join(fmts)}")
        lines.append(f"a=rtpmap:{answer.payload_type} {answer.codec}/8000")
        if answer.dtmf_payload_type is not None:
            lines.append(f"a=rtpmap:{answer.dtmf_payload_type} telephone-event/8000")
            lines.append(f"a=fmtp:{answer.dtmf_payload_type} 0-15")
        lines.append("a=ptime:20")
        lines.append(f"a={answer.direction}")
    return ("\r\n".join(lines) + "\r\n").encode()
