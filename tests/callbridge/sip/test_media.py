"""RTP and the SIP leg's media, sans I/O: packets, RFC 4733 digits, pacing on a stepped clock, latching."""

from __future__ import annotations

import numpy as np
import pytest

from callbridge.audio import CHUNK_BYTES, alaw_to_pcm16, pcm16_to_alaw_numpy, ulaw_to_alaw
from callbridge.transports.sip.media import MAX_LATE_SLOTS, RtpReceiver, RtpSender
from callbridge.transports.sip.rtp import DtmfDetector, RtpError, build_packet, parse_packet
from callbridge.transports.sip.sdp import Answer

SDP_ADDR = ("127.0.0.1", 40000)


def answer(**over: object) -> Answer:
    base: dict[str, object] = dict(codec="PCMU", payload_type=0, dtmf_payload_type=101, remote_address=SDP_ADDR[0],
                                   remote_port=SDP_ADDR[1], direction="sendrecv", media_index=0, media_count=1)
    base.update(over)
    return Answer(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- G.711 A-law


def test_alaw_matches_audioop_for_every_value() -> None:
    audioop = pytest.importorskip("audioop")
    every = np.arange(65536, dtype=np.uint16).view(np.int16)
    assert pcm16_to_alaw_numpy(every) == audioop.lin2alaw(every.tobytes(), 2)
    all_bytes = bytes(range(256))
    assert (alaw_to_pcm16(all_bytes) == np.frombuffer(audioop.alaw2lin(all_bytes, 2), np.int16)).all()
    assert ulaw_to_alaw(all_bytes) == audioop.lin2alaw(audioop.ulaw2lin(all_bytes, 2), 2)


# ---------------------------------------------------------------------------- packets


def test_packet_round_trip_and_header_extras_skipped() -> None:
    data = build_packet(payload_type=0, sequence=65535, timestamp=2**32 - 1, ssrc=7, payload=b"ab", marker=True)
    pkt = parse_packet(data)
    assert (pkt.payload_type, pkt.sequence, pkt.timestamp, pkt.ssrc, pkt.marker, pkt.payload) == \
        (0, 65535, 2**32 - 1, 7, True, b"ab")
    # one CSRC, a one-word extension and two bytes of padding around the payload
    extended = bytes([0x80 | 0x20 | 0x10 | 1]) + data[1:12] + b"\0\0\0\1" + b"\xbe\xde\x00\x01" + b"\1\2\3\4" \
        + b"xy" + b"\0\2"
    assert parse_packet(extended).payload == b"xy"


@pytest.mark.parametrize("data,reason", [(b"\x80\x00", "short"), (b"\x40" + b"\0" * 11, "version"),
                                         (b"\xa0\x00" + b"\0" * 10 + b"\x09", "padding"),
                                         (b"\x80\xc8" + b"\0" * 10, "rtcp")])
def test_bad_packets_raise_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(RtpError) as err:
        parse_packet(data)
    assert err.value.reason == reason


# ---------------------------------------------------------------------------- RFC 4733


def event_packet(event: int, ts: int, *, end: bool, seq: int, marker: bool = False, ssrc: int = 1) -> bytes:
    payload = bytes([event, 0x80 if end else 0, 0, 160])
    return build_packet(payload_type=101, sequence=seq, timestamp=ts, ssrc=ssrc, payload=payload, marker=marker)


def press(det: DtmfDetector, event: int, ts: int, *, seq0: int, ends: int = 3) -> list[str]:
    out: list[str] = []
    for i in range(4):
        out += det.feed(parse_packet(event_packet(event, ts, end=False, seq=seq0 + i)))
    for i in range(ends):
        out += det.feed(parse_packet(event_packet(event, ts, end=True, seq=seq0 + 4 + i)))
    return out


def test_digits_by_end_bit_and_timestamp_without_marker_bits() -> None:
    det = DtmfDetector()
    got = press(det, 1, 1000, seq0=0) + press(det, 9, 3000, seq0=10) + press(det, 10, 5000, seq0=20) \
        + press(det, 11, 7000, seq0=30)
    assert got == ["1", "9", "*", "#"]  # three end packets each, reported once


def test_same_digit_twice_is_two_presses() -> None:
    det = DtmfDetector()
    assert press(det, 5, 1000, seq0=0) + press(det, 5, 2600, seq0=10) == ["5", "5"]


def test_lost_end_packets_reported_when_the_next_press_starts() -> None:
    det = DtmfDetector()
    assert press(det, 4, 1000, seq0=0, ends=0) == []
    assert press(det, 2, 3000, seq0=10) == ["4", "2"]
    assert det.flush() == []


def test_late_reordered_packet_of_a_reported_press_is_ignored() -> None:
    det = DtmfDetector()
    press(det, 3, 1000, seq0=0)
    assert det.feed(parse_packet(event_packet(3, 1000, end=False, seq=2))) == []


# ---------------------------------------------------------------------------- sending


def test_one_packet_per_slot_audio_then_silence_with_continuous_timestamps() -> None:
    sender = RtpSender(codec="PCMU", payload_type=0, max_queued=3, sequence=10, timestamp=1000, ssrc=5)
    sender.start(0.0)
    sender.push_audio(b"\x11" * CHUNK_BYTES)
    sender.push_audio(b"\x22" * CHUNK_BYTES)
    sent: list = []
    for slot in range(4):
        packets, _ = sender.tick(slot * 0.02)
        assert len(packets) == 1  # never more than one per slot when on time
        sent.append(parse_packet(packets[0]))
    assert [p.payload[:1] for p in sent] == [b"\x11", b"\x22", b"\xff", b"\xff"]
    assert [p.timestamp for p in sent] == [1000, 1160, 1320, 1480]
    assert [p.sequence for p in sent] == [11, 12, 13, 14]
    assert [p.marker for p in sent] == [True, False, False, False]
    assert sender.tick(0.079) == ([], [])  # slot 4 is due at 0.080


def test_marker_echoed_when_the_send_clock_passes_it() -> None:
    sender = RtpSender(codec="PCMU", payload_type=0, max_queued=3)
    sender.start(0.0)
    sender.push_audio(b"\x11" * CHUNK_BYTES)
    sender.push_marker("m1")
    sender.push_audio(b"\x22" * CHUNK_BYTES)
    sender.push_marker("m2")
    assert sender.tick(0.0)[1] == ["m1"]
    assert sender.tick(0.02)[1] == ["m2"]
    sender.push_marker("m3")  # nothing before it still to send: passes at the next slot
    assert sender.tick(0.04)[1] == ["m3"]


def test_clear_drops_audio_and_echoes_pending_markers() -> None:
    sender = RtpSender(codec="PCMU", payload_type=0, max_queued=3)
    sender.start(0.0)
    for i in range(3):
        sender.push_audio(b"\x11" * CHUNK_BYTES)
        sender.push_marker(f"m{i}")
    assert not sender.has_room
    with pytest.raises(OverflowError):
        sender.push_audio(b"\x11" * CHUNK_BYTES)
    assert sender.clear() == ["m0", "m1", "m2"]
    packets, echoed = sender.tick(0.0)
    assert echoed == [] and parse_packet(packets[0]).payload == b"\xff" * CHUNK_BYTES


def test_a_stall_skips_slots_instead_of_bursting() -> None:
    sender = RtpSender(codec="PCMU", payload_type=0, timestamp=0)
    sender.start(0.0)
    sender.tick(0.0)
    packets, _ = sender.tick(1.0)  # the loop was blocked for a second
    assert len(packets) == 1
    assert parse_packet(packets[0]).timestamp == 50 * CHUNK_BYTES  # the timestamp kept real time
    assert sender.slots_skipped == 49 > MAX_LATE_SLOTS
    assert len(sender.tick(1.02)[0]) == 1


def test_a_little_late_catches_up_within_the_bound() -> None:
    sender = RtpSender(codec="PCMU", payload_type=0)
    sender.start(0.0)
    assert len(sender.tick(0.045)[0]) == 3  # slots 0, 1, 2
    assert sender.slots_skipped == 0


def test_pcma_leg_converts_at_the_edge_and_fills_with_alaw_silence() -> None:
    sender = RtpSender(codec="PCMA", payload_type=8)
    sender.start(0.0)
    chunk = bytes(range(CHUNK_BYTES))
    sender.push_audio(chunk)
    first = parse_packet(sender.tick(0.0)[0][0])
    second = parse_packet(sender.tick(0.02)[0][0])
    assert first.payload_type == 8 and first.payload == ulaw_to_alaw(chunk)
    assert second.payload == b"\xd5" * CHUNK_BYTES


def test_on_hold_slots_pass_unsent_but_markers_still_echo() -> None:
    sender = RtpSender(codec="PCMU", payload_type=0, sending=False)
    sender.start(0.0)
    sender.push_audio(b"\x11" * CHUNK_BYTES)
    sender.push_marker("m")
    assert sender.tick(0.0) == ([], ["m"])


# ---------------------------------------------------------------------------- receiving


def audio_packet(seq: int, payload: bytes = b"\x00" * CHUNK_BYTES, pt: int = 0) -> bytes:
    return build_packet(payload_type=pt, sequence=seq, timestamp=seq * 160, ssrc=9, payload=payload)


def test_packets_from_the_sdp_address_decode_to_pcm() -> None:
    rx = RtpReceiver(answer(), signalling_host="127.0.0.1", media_timeout_s=10, started_at=0.0)
    got = rx.receive(audio_packet(1, b"\x00" * CHUNK_BYTES), SDP_ADDR, 0.0)
    assert got is not None and got.pcm16 is not None
    assert got.pcm16.dtype == np.int16 and got.pcm16.shape == (CHUNK_BYTES,) and got.pcm16[0] == -32124
    assert rx.remote == SDP_ADDR


def test_nat_latches_once_onto_the_signalling_source_and_drops_others() -> None:
    rx = RtpReceiver(answer(remote_address="10.0.0.5"), signalling_host="127.0.0.2", media_timeout_s=10,
                     started_at=0.0)
    assert rx.receive(audio_packet(1), ("127.0.0.9", 1234), 0.0) is None  # a stranger
    assert rx.receive(audio_packet(2), ("127.0.0.2", 31000), 0.0) is not None  # NAT: signalling IP, new port
    assert rx.remote == ("127.0.0.2", 31000)  # we send there from now on
    assert rx.receive(audio_packet(3), ("127.0.0.2", 31002), 0.0) is None  # latched once, not again
    assert rx.receive(audio_packet(4), ("10.0.0.5", 40000), 0.0) is None
    assert rx.packets_dropped_source == 3


def test_dtmf_on_the_offered_payload_type_only() -> None:
    rx = RtpReceiver(answer(dtmf_payload_type=96), signalling_host="127.0.0.1", media_timeout_s=10, started_at=0.0)
    end = build_packet(payload_type=96, sequence=1, timestamp=100, ssrc=9, payload=bytes([7, 0x80, 0, 160]))
    got = rx.receive(end, SDP_ADDR, 0.0)
    assert got is not None and got.digits == ("7",)
    wrong_pt = build_packet(payload_type=101, sequence=2, timestamp=300, ssrc=9, payload=bytes([8, 0x80, 0, 160]))
    assert rx.receive(wrong_pt, SDP_ADDR, 0.0) is None and rx.packets_other_pt == 1


def test_media_timeout_only_while_the_caller_should_send() -> None:
    rx = RtpReceiver(answer(), signalling_host="127.0.0.1", media_timeout_s=5, started_at=0.0)
    rx.receive(audio_packet(1), SDP_ADDR, 1.0)
    assert not rx.timed_out(6.0) and rx.timed_out(6.1)
    rx.update(answer(direction="sendonly"), 6.1)  # the caller put us on hold (they send nothing)
    assert not rx.timed_out(100.0)
    rx.update(answer(), 100.0)
    assert not rx.timed_out(105.0) and rx.timed_out(105.1)
