"""One SIP call's RTP media, sans I/O: the paced sender and the receiver, driven by a clock.

**Out** (:class:`RtpSender`). An RTP peer plays what arrives when it arrives; it does not queue
seconds of audio the way Twilio does. So the call hands the leg 20 ms mu-law chunks a little
ahead of time (a small lead: the queue holds a few chunks), and the sender emits exactly one
packet per 20 ms slot of its own clock: the next chunk, or silence when the queue is empty,
so the stream never stops between turns (carriers end calls whose media goes quiet). Slots
are absolute (``t0 + n × 20 ms``); after a stall the clock skips the missed slots (the RTP
timestamp jumps with them: the far end hears a gap, never a burst).

Markers ride in the same queue. A marker is echoed when the send clock passes it: the slot
that sent the last chunk before it has gone out (no far end echoes RTP for us). ``clear``
drops the queued audio and echoes every pending marker.

**In** (:class:`RtpReceiver`). Packets are accepted from the address in the caller's SDP, or,
once, from another port of the signalling source's IP (NAT rewrote the port or the SDP holds
a private address): symmetric RTP latches onto that source and sends there too. Anything
else is dropped and counted. Audio is decoded to 16-bit PCM; telephone-event packets become
digits; a receiver that hears nothing for the media timeout (while the caller is supposed to
send) says so.
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from ...audio import (
    ALAW_SILENCE,
    CHUNK_BYTES,
    CHUNK_MS,
    ULAW_SILENCE,
    alaw_to_pcm16,
    ulaw_to_alaw,
    ulaw_to_pcm16,
)
from .rtp import DtmfDetector, RtpError, RtpPacket, build_packet, parse_packet
from .sdp import Answer

__all__ = ["Marker", "RtpReceiver", "RtpSender", "Received"]

Addr = tuple[str, int]
CHUNK_S: Final = CHUNK_MS / 1000
MAX_LATE_SLOTS: Final = 3  # behind by more than this many slots: skip them rather than burst


@dataclass(frozen=True)
class Marker:
    name: str


@dataclass
class RtpSender:
    """Emits one packet per 20 ms slot; the queue holds at most ``max_queued`` chunks (the lead)."""

    codec: str  # "PCMU" or "PCMA"
    payload_type: int
    max_queued: int = 3
    ssrc: int = field(default_factory=lambda: secrets.randbits(32))
    sequence: int = field(default_factory=lambda: secrets.randbits(16))
    timestamp: int = field(default_factory=lambda: secrets.randbits(32))
    sending: bool = True  # False while the caller holds us (recvonly/inactive): slots pass unsent
    packets_sent: int = 0
    audio_chunks_sent: int = 0
    silence_chunks_sent: int = 0
    slots_skipped: int = 0
    _queue: deque[bytes | Marker] = field(default_factory=deque)
    _t0: float | None = None
    _slot: int = 0  # index of the next slot
    _talking: bool = False

    @property
    def queued_chunks(self) -> int:
        return sum(1 for item in self._queue if not isinstance(item, Marker))

    @property
    def has_room(self) -> bool:
        return self.queued_chunks < self.max_queued

    def start(self, now: float) -> None:
        self._t0 = now
        self._slot = 0

    def push_audio(self, ulaw: bytes) -> None:
        if len(ulaw) != CHUNK_BYTES:
            raise ValueError(f"expected one {CHUNK_MS} ms chunk of {CHUNK_BYTES} bytes, got {len(ulaw)}")
        if not self.has_room:
            raise OverflowError("the send queue is full: wait for has_room")
        self._queue.append(bytes(ulaw))

    def push_marker(self, name: str) -> None:
        self._queue.append(Marker(name))

    def clear(self) -> list[str]:
        """Drop queued audio; the names of every pending marker (all count as played)."""
        names = [item.name for item in self._queue if isinstance(item, Marker)]
        self._queue.clear()
        return names

    def next_due(self) -> float | None:
        return None if self._t0 is None else self._t0 + self._slot * CHUNK_S

    def tick(self, now: float) -> tuple[list[bytes], list[str]]:
        """Packets whose slot has come, and markers the clock passed, as of ``now``."""
        if self._t0 is None:
            return [], []
        due = int((now - self._t0) / CHUNK_S + 1e-9) + 1 - self._slot
        if due <= 0:
            return [], []
        if due > MAX_LATE_SLOTS:
            skipped = due - 1
            self._slot += skipped
            self.timestamp += skipped * CHUNK_BYTES
            self.slots_skipped += skipped
            self._talking = False  # the far end hears a gap: the next audio starts a talkspurt
            due = 1
        packets: list[bytes] = []
        echoed: list[str] = self._pop_markers()
        for _ in range(due):
            chunk = self._queue.popleft() if self._queue else None
            assert not isinstance(chunk, Marker)
            packet = self._packet(chunk)
            if packet is not None:
                packets.append(packet)
            echoed += self._pop_markers()
            self._slot += 1
        return packets, echoed

    def _pop_markers(self) -> list[str]:
        names: list[str] = []
        while self._queue and isinstance(self._queue[0], Marker):
            item = self._queue.popleft()
            assert isinstance(item, Marker)
            names.append(item.name)
        return names

    def _packet(self, ulaw: bytes | None) -> bytes | None:
        audio = ulaw is not None
        if audio:
            self.audio_chunks_sent += 1
        else:
            self.silence_chunks_sent += 1
        marker = audio and not self._talking  # RFC 3551 §4.1: first packet of a talkspurt
        self._talking = audio
        payload = self._encode(ulaw)
        ts = self.timestamp
        self.timestamp += CHUNK_BYTES
        if not self.sending:
            return None
        self.sequence = (self.sequence + 1) & 0xFFFF
        self.packets_sent += 1
        return build_packet(payload_type=self.payload_type, sequence=self.sequence, timestamp=ts,
                            ssrc=self.ssrc, payload=payload, marker=marker)

    def _encode(self, ulaw: bytes | None) -> bytes:
        if self.codec == "PCMA":
            return bytes([ALAW_SILENCE]) * CHUNK_BYTES if ulaw is None else ulaw_to_alaw(ulaw)
        return bytes([ULAW_SILENCE]) * CHUNK_BYTES if ulaw is None else ulaw


@dataclass(frozen=True)
class Received:
    """What one accepted packet carried: caller audio, digits, or neither (comfort noise...)."""

    pcm16: np.ndarray | None
    digits: tuple[str, ...] = ()


@dataclass
class RtpReceiver:
    answer: Answer
    signalling_host: str  # the IP the call's SIP came from: the one source we may latch onto
    media_timeout_s: float
    started_at: float
    packets_received: int = 0
    packets_dropped_source: int = 0
    packets_dropped_bad: int = 0
    packets_other_pt: int = 0
    sequence_gaps: int = 0
    latched: Addr | None = None
    _last_rx: float = 0.0
    _last_seq: int | None = None
    _dtmf: DtmfDetector = field(default_factory=DtmfDetector)

    def __post_init__(self) -> None:
        self._last_rx = self.started_at

    @property
    def sdp_address(self) -> Addr | None:
        if not self.answer.remote_address or not self.answer.remote_port:
            return None
        return (self.answer.remote_address, self.answer.remote_port)

    @property
    def remote(self) -> Addr | None:
        """Where our packets go: the latched source, else the SDP address (None: on hold, nowhere)."""
        return self.latched or self.sdp_address

    def update(self, answer: Answer, now: float) -> None:
        """A re-INVITE/UPDATE: a new SDP address may be latched afresh; the media timeout restarts."""
        if (answer.remote_address, answer.remote_port) != (self.answer.remote_address, self.answer.remote_port):
            self.latched = None
        self.answer = answer
        self._last_rx = now

    def _accepts(self, source: Addr) -> bool:
        if self.latched is not None:
            return source == self.latched
        if source == self.sdp_address or source[0] == self.signalling_host:
            self.latched = source  # once: symmetric RTP from here on
            return True
        return False

    def receive(self, data: bytes, source: Addr, now: float) -> Received | None:
        """One datagram on our RTP port; None when it is dropped."""
        if not self._accepts(source):
            self.packets_dropped_source += 1
            return None
        try:
            pkt = parse_packet(data)
        except RtpError:
            self.packets_dropped_bad += 1
            return None
        self.packets_received += 1
        self._last_rx = now
        if pkt.payload_type == self.answer.dtmf_payload_type:
            return Received(None, tuple(self._dtmf.feed(pkt)))
        if pkt.payload_type != self.answer.payload_type:
            self.packets_other_pt += 1  # comfort noise (13) and the like
            return None
        self._count_sequence(pkt)
        return Received(self._decode(pkt))

    def _count_sequence(self, pkt: RtpPacket) -> None:
        if self._last_seq is not None and pkt.sequence != (self._last_seq + 1) & 0xFFFF:
            self.sequence_gaps += 1
        self._last_seq = pkt.sequence

    def _decode(self, pkt: RtpPacket) -> np.ndarray:
        if self.answer.codec == "PCMA":
            return alaw_to_pcm16(pkt.payload).copy()
        return ulaw_to_pcm16(pkt.payload)

    def timed_out(self, now: float) -> bool:
        """No packet for the media timeout while the caller should be sending (not on hold)."""
        if not self.answer.they_send:
            self._last_rx = now  # on hold: silence is expected; the timeout restarts on resume
            return False
        return now - self._last_rx > self.media_timeout_s

    def flush_digits(self) -> list[str]:
        return self._dtmf.flush()
