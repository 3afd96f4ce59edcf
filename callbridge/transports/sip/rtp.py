"""RTP packets (RFC 3550) and RFC 4733 telephone-event digits, sans I/O.

Only what a G.711 voice leg needs: the fixed header, CSRCs, extension and padding skipped
on the way in, a plain header on the way out. Digits are detected from telephone-event
packets by the *end bit and the event timestamp*, never by the marker bit: some carriers
never set it, and every digit's three end packets carry the same timestamp, so the
timestamp is what tells one key press from the next.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Final

__all__ = ["DTMF_EVENTS", "DtmfDetector", "RtpError", "RtpPacket", "build_packet", "parse_packet"]

_HEADER: Final = struct.Struct("!BBHII")
DTMF_EVENTS: Final = "0123456789*#ABCD"  # RFC 4733 §3.2: events 0-15


class RtpError(ValueError):
    """A datagram that is not an RTP packet we can use; ``reason`` is a short code for counters."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    marker: bool
    payload: bytes


def parse_packet(data: bytes) -> RtpPacket:
    if len(data) < _HEADER.size:
        raise RtpError("short")
    first, second, seq, ts, ssrc = _HEADER.unpack_from(data)
    if first >> 6 != 2:
        raise RtpError("version")
    offset = _HEADER.size + 4 * (first & 0x0F)  # CSRC list
    if first & 0x10:  # header extension: 16-bit profile, 16-bit length in words
        if len(data) < offset + 4:
            raise RtpError("short")
        (words,) = struct.unpack_from("!H", data, offset + 2)
        offset += 4 + 4 * words
    end = len(data)
    if first & 0x20:  # padding: the last byte counts it
        if end == 0 or data[-1] == 0 or data[-1] > end - offset:
            raise RtpError("padding")
        end -= data[-1]
    if offset > end:
        raise RtpError("short")
    pt = second & 0x7F
    if 72 <= pt <= 76:
        raise RtpError("rtcp")  # RTCP on the RTP port (rtcp-mux we did not offer)
    return RtpPacket(pt, seq, ts, ssrc, bool(second & 0x80), bytes(data[offset:end]))


def build_packet(*, payload_type: int, sequence: int, timestamp: int, ssrc: int, payload: bytes,
                 marker: bool = False) -> bytes:
    return _HEADER.pack(0x80, (0x80 if marker else 0) | payload_type, sequence & 0xFFFF,
                        timestamp & 0xFFFFFFFF, ssrc & 0xFFFFFFFF) + payload


class DtmfDetector:
    """RFC 4733 telephone-event payloads → digits, once per key press.

    A press is identified by (SSRC, RTP timestamp, event). It is reported when its first end
    packet arrives, or, if every end packet was lost, when the next press begins. Repeats of
    the end packet and reordered late packets of a reported press are ignored.
    """

    def __init__(self) -> None:
        self._current: tuple[int, int, int] | None = None  # (ssrc, timestamp, event) in progress
        self._reported: deque[tuple[int, int, int]] = deque(maxlen=32)
        self.malformed = 0

    def feed(self, pkt: RtpPacket) -> list[str]:
        """Digits completed by this telephone-event packet (usually none or one)."""
        if len(pkt.payload) < 4:
            self.malformed += 1
            return []
        event, flags = pkt.payload[0], pkt.payload[1]
        if event >= len(DTMF_EVENTS):
            return []  # tones and flash events are not digits
        key = (pkt.ssrc, pkt.timestamp, event)
        if key in self._reported:
            return []
        out: list[str] = []
        if self._current is not None and self._current != key:
            out.append(self._report(self._current))  # the previous press never showed its end
        self._current = key
        if flags & 0x80:  # E bit
            out.append(self._report(key))
        return out

    def flush(self) -> list[str]:
        """A press still without an end (the stream stopped): report it."""
        return [self._report(self._current)] if self._current is not None else []

    def _report(self, key: tuple[int, int, int]) -> str:
        self._reported.append(key)
        if self._current == key:
            self._current = None
        return DTMF_EVENTS[key[2]]
