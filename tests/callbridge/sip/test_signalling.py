"""The SIP user-agent server as sans-I/O: datagrams in, responses and call events out, time stepped by hand."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sipmessage import Message, Request

from callbridge.transports.sip import (
    AllowList,
    CallConfirmed,
    CallEnded,
    CallOffered,
    DigestAuth,
    DigitReceived,
    MediaUpdated,
    RateLimiter,
    Send,
    Trunk,
    UasSettings,
    UserAgentServer,
    parse_networks,
    parse_sdp,
)
from callbridge.transports.sip.message import SipParseError, parse_message
from callbridge.transports.sip.transactions import T1, T2, TIMEOUT

from .sipmsg import BRIDGE_IP, BRIDGE_PORT, CARRIER, invite, offer, parse_response, request

RTP_PORT = 30000


def make_uas(*, allow: str = "127.0.0.0/8", digest: DigestAuth | None = None, rate: float = 1000.0) -> UserAgentServer:
    return UserAgentServer(
        settings=UasSettings(public_address=BRIDGE_IP, port=BRIDGE_PORT),
        allow=AllowList.of(allow),
        limiter=RateLimiter(rate_per_s=rate, burst=rate),
        digest=digest,
    )


def sends(actions: list) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


def codes(actions: list) -> list[int]:
    return [parse_response(a.data).code for a in sends(actions)]


def offered(actions: list) -> CallOffered:
    found = [a for a in actions if isinstance(a, CallOffered)]
    assert len(found) == 1, actions
    return found[0]


def answered_call(uas: UserAgentServer, now: float = 0.0, **kw: object) -> tuple[str, str]:
    """An INVITE answered 200 and ACKed; returns (handle, our To tag)."""
    out = uas.receive(invite(**kw), CARRIER, now)
    handle = offered(out).handle
    uas.ring(handle, now)
    ok = parse_response(uas.answer(handle, RTP_PORT, now)[0].data)
    tag = ok.to_address.parameters["tag"]
    assert tag
    acked = uas.receive(request("ACK", branch="z9hG4bK-ack", cseq=int(kw.get("cseq", 1)), to_tag=tag, **_dialog(kw)), CARRIER, now)
    assert acked == [CallConfirmed(handle)]
    return handle, tag


def _dialog(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k in ("call_id", "from_tag")}


# ---------------------------------------------------------------------------- parsing edge


def test_parse_rejects_oversize_bad_utf8_and_missing_headers() -> None:
    with pytest.raises(SipParseError) as big:
        parse_message(invite(), max_bytes=100)
    assert big.value.reason == "too_large"
    with pytest.raises(SipParseError) as utf:
        parse_message(invite().replace(b"Caller", b"\xff\xfe"))
    assert utf.value.reason == "bad_utf8"
    no_callid = b"\r\n".join(line for line in invite().split(b"\r\n") if not line.startswith(b"Call-ID"))
    with pytest.raises(SipParseError) as missing:
        parse_message(no_callid)
    assert missing.value.reason == "missing_header"
    with pytest.raises(SipParseError) as short:
        parse_message(invite().replace(b"Content-Length: ", b"Content-Length: 9"))
    assert short.value.reason == "short_body"
    assert parse_message(b"\r\n\r\n") is None  # keep-alive


def test_folded_header_lines_are_unfolded() -> None:
    data = invite().replace(b"Max-Forwards: 70", b"Subject: a\r\n  folded line\r\nMax-Forwards: 70")
    msg = parse_message(data)
    assert isinstance(msg, Request)
    assert msg.headers["Subject"] == "a folded line"


def test_bad_datagrams_are_counted_and_never_answered() -> None:
    uas = make_uas()
    for junk in (b"hello", b"\xff" * 50 + b"\r\n\r\n", invite().replace(b"CSeq: 1 INVITE", b"CSeq: x")):
        assert uas.receive(junk, CARRIER, 0.0) == []
    assert sum(v for k, v in uas.counters.items() if k.startswith("dropped_")) == 3


# ---------------------------------------------------------------------------- who may call


def test_stranger_gets_no_answer_at_all() -> None:
    uas = make_uas(allow="10.0.0.0/8")
    assert uas.receive(invite(), CARRIER, 0.0) == []
    assert uas.receive(request("OPTIONS"), CARRIER, 0.0) == []
    assert uas.counters["dropped_stranger"] == 2


def test_rate_limit_per_source_drops_the_excess_silently() -> None:
    uas = make_uas(rate=2.0)
    got = [uas.receive(request("OPTIONS", branch=f"z9hG4bK-{i}"), CARRIER, 0.0) for i in range(5)]
    assert [bool(g) for g in got] == [True, True, False, False, False]
    assert uas.receive(request("OPTIONS", branch="z9hG4bK-later"), CARRIER, 1.0)  # refilled


def test_digest_challenge_then_accept() -> None:
    auth = DigestAuth(username="trunk", password="s3cret")
    uas = make_uas(digest=auth)
    out = uas.receive(invite(), CARRIER, 10.0)
    resp = parse_response(out[0].data)
    assert resp.code == 407
    challenge = resp.headers["Proxy-Authenticate"]
    params = dict(p.strip().split("=", 1) for p in challenge[len("Digest "):].split(","))
    nonce = params["nonce"].strip('"')
    uri = f"sip:+15550100@{BRIDGE_IP}:{BRIDGE_PORT}"

    def creds(password: str) -> str:
        ha1 = hashlib.md5(f"trunk:callbridge:{password}".encode()).hexdigest()
        ha2 = hashlib.md5(f"INVITE:{uri}".encode()).hexdigest()
        response = hashlib.md5(f"{ha1}:{nonce}:00000001:abc:auth:{ha2}".encode()).hexdigest()
        return (f'Digest username="trunk", realm="callbridge", nonce="{nonce}", uri="{uri}", '
                f'response="{response}", algorithm=MD5, qop=auth, nc=00000001, cnonce="abc"')

    wrong = uas.receive(invite(branch="z9hG4bK-2", cseq=2, headers={"Proxy-Authorization": creds("nope")}),
                        CARRIER, 11.0)
    assert codes(wrong) == [407]
    good = uas.receive(invite(branch="z9hG4bK-3", cseq=3, headers={"Proxy-Authorization": creds("s3cret")}),
                       CARRIER, 12.0)
    assert codes(good) == [100]
    offered(good)
    stale = uas.receive(invite(branch="z9hG4bK-4", call_id="c2", headers={"Proxy-Authorization": creds("s3cret")}),
                        CARRIER, 12.0 + auth.nonce_ttl_s + 1)
    assert codes(stale) == [407]
    assert "stale=true" in parse_response(stale[0].data).headers["Proxy-Authenticate"]


# ---------------------------------------------------------------------------- INVITE, ACK, BYE


def test_invite_ring_answer_ack_bye_from_caller() -> None:
    uas = make_uas()
    out = uas.receive(invite(), CARRIER, 0.0)
    assert codes(out) == [100]
    call = offered(out)
    assert (call.to_user, call.from_user, call.call_id) == ("+15550100", "+15550199", "call-1@carrier")
    assert call.media.codec == "PCMU" and call.media.dtmf_payload_type == 101
    assert (call.media.remote_address, call.media.remote_port) == ("127.0.0.1", 40000)
    assert codes(uas.ring(call.handle, 0.0)) == [180]
    ok = parse_response(uas.answer(call.handle, RTP_PORT, 0.0)[0].data)
    assert ok.code == 200 and ok.headers["Content-Type"] == "application/sdp"
    answer = parse_sdp(ok.body)
    assert answer.media[0].port == RTP_PORT and answer.media[0].formats == ("0", "101")
    assert answer.media[0].direction == "sendrecv"
    tag = ok.to_address.parameters["tag"]
    assert uas.receive(request("ACK", branch="z9hG4bK-a", to_tag=tag), CARRIER, 0.1) == [CallConfirmed(call.handle)]
    bye = uas.receive(request("BYE", branch="z9hG4bK-b", cseq=2, to_tag=tag), CARRIER, 5.0)
    assert codes(bye) == [200]
    assert CallEnded(call.handle, "hangup: caller") in bye


def test_retransmitted_invite_is_answered_again_never_a_second_call() -> None:
    uas = make_uas()
    first = uas.receive(invite(), CARRIER, 0.0)
    handle = offered(first).handle
    again = uas.receive(invite(), CARRIER, 0.5)
    assert codes(again) == [100] and not any(isinstance(a, CallOffered) for a in again)
    uas.ring(handle, 0.6)
    assert codes(uas.receive(invite(), CARRIER, 1.0)) == [180]
    uas.answer(handle, RTP_PORT, 1.1)
    assert codes(uas.receive(invite(), CARRIER, 1.5)) == [200]
    assert len(uas.calls) == 1 and uas.transactions.retransmissions_absorbed == 3


def test_200_is_resent_until_the_ack_then_stops() -> None:
    uas = make_uas()
    handle = offered(uas.receive(invite(), CARRIER, 0.0)).handle
    tag = parse_response(uas.answer(handle, RTP_PORT, 0.0)[0].data).to_address.parameters["tag"]
    times = []
    now = 0.0
    while len(times) < 4:
        now = uas.next_deadline()
        assert now is not None
        if codes(uas.tick(now)) == [200]:
            times.append(now)
    assert times == [T1, 3 * T1, 7 * T1, 7 * T1 + T2]  # T1, doubling, capped at T2
    uas.receive(request("ACK", branch="z9hG4bK-a", to_tag=tag), CARRIER, now)
    assert sends(uas.tick(now + 10)) == []


def test_200_never_acked_ends_the_call_with_bye() -> None:
    uas = make_uas()
    handle = offered(uas.receive(invite(), CARRIER, 0.0)).handle
    uas.answer(handle, RTP_PORT, 0.0)
    out = uas.tick(TIMEOUT)
    assert CallEnded(handle, "error: no ACK") in out
    bye = [Message.parse(s.data) for s in sends(out) if s.data.startswith(b"BYE")]
    assert len(bye) == 1 and bye[0].call_id == "call-1@carrier"


def test_repeated_bye_is_answered_200_again() -> None:
    uas = make_uas()
    handle, tag = answered_call(uas)
    bye = request("BYE", branch="z9hG4bK-b", cseq=2, to_tag=tag)
    first = uas.receive(bye, CARRIER, 1.0)
    again = uas.receive(bye, CARRIER, 1.5)
    assert codes(first) == codes(again) == [200]
    assert [a for a in again if isinstance(a, CallEnded)] == []


def test_bye_for_unknown_dialog_is_481() -> None:
    uas = make_uas()
    assert codes(uas.receive(request("BYE", to_tag="nope", cseq=2), CARRIER, 0.0)) == [481]


def test_bridge_hang_up_sends_bye_resent_until_answered() -> None:
    uas = make_uas()
    handle, tag = answered_call(uas)
    out = uas.hang_up(handle, 1.0)
    bye = Message.parse(out[0].data)
    assert isinstance(bye, Request) and bye.method == "BYE"
    assert out[0].dest == CARRIER
    assert bye.from_address.parameters["tag"] == tag and bye.to_address.parameters["tag"] == "ftag"
    assert uas.hang_up(handle, 1.0) == []  # idempotent
    assert sends(uas.tick(1.0 + T1))[0].data == out[0].data
    ok = f"SIP/2.0 200 OK\r\nVia: {bye.headers['Via']}\r\nFrom: {bye.headers['From']}\r\nTo: {bye.headers['To']}\r\n" \
         f"Call-ID: {bye.call_id}\r\nCSeq: {bye.headers['CSeq']}\r\nContent-Length: 0\r\n\r\n"
    uas.receive(ok.encode(), CARRIER, 1.6)
    assert not uas.transactions.client


def test_cancel_while_ringing_gets_200_and_487() -> None:
    uas = make_uas()
    handle = offered(uas.receive(invite(), CARRIER, 0.0)).handle
    uas.ring(handle, 0.0)
    out = uas.receive(request("CANCEL", cseq=1), CARRIER, 1.0)
    assert codes(out) == [200, 487]
    assert CallEnded(handle, "hangup: cancelled") in out
    assert uas.answer(handle, RTP_PORT, 1.1) == []  # too late
    # 487 resent until its ACK (same branch as the INVITE), then silence
    assert codes(uas.tick(1.0 + T1)) == [487]
    uas.receive(request("ACK", cseq=1, to_tag=uas.calls[handle].local_tag), CARRIER, 1.6)
    assert sends(uas.tick(1.0 + 3 * T1)) == []


def test_cancel_of_unknown_invite_is_481() -> None:
    uas = make_uas()
    assert codes(uas.receive(request("CANCEL", cseq=1), CARRIER, 0.0)) == [481]


def test_options_answered_and_other_methods_405() -> None:
    uas = make_uas()
    ok = parse_response(uas.receive(request("OPTIONS"), CARRIER, 0.0)[0].data)
    assert ok.code == 200 and "INVITE" in ok.headers["Allow"]
    assert codes(uas.receive(request("REGISTER", branch="z9hG4bK-r"), CARRIER, 0.0)) == [405]


@pytest.mark.parametrize("status", [404, 486, 503])
def test_application_rejects_unknown_number_or_full(status: int) -> None:
    uas = make_uas()
    handle = offered(uas.receive(invite(), CARRIER, 0.0)).handle
    resp = parse_response(uas.reject(handle, status, 0.0)[0].data)
    assert resp.code == status
    assert (resp.headers.get("Retry-After") is not None) == (status == 503)
    assert codes(uas.receive(invite(), CARRIER, 0.5)) == [status]  # a repeat gets the same answer


def test_offer_without_common_codec_is_488_and_no_call() -> None:
    uas = make_uas()
    out = uas.receive(invite(body=offer(formats="9 101")), CARRIER, 0.0)
    assert codes(out) == [488] and not uas.calls


def test_unsupported_required_extension_is_420() -> None:
    uas = make_uas()
    resp = parse_response(uas.receive(invite(headers={"Require": "100rel"}), CARRIER, 0.0)[0].data)
    assert resp.code == 420 and resp.headers["Unsupported"] == "100rel"


# ---------------------------------------------------------------------------- re-INVITE, UPDATE, timers


def reinvite(tag: str, cseq: int, body: bytes, **kw: object) -> bytes:
    return request("INVITE", branch=f"z9hG4bK-re{cseq}", cseq=cseq, to_tag=tag, body=body, **kw)  # type: ignore[arg-type]


def test_hold_is_mirrored_with_the_version_bumped_and_resume_restores() -> None:
    uas = make_uas()
    handle, tag = answered_call(uas)
    v1 = uas.calls[handle].sdp_version
    hold = uas.receive(reinvite(tag, 2, offer(direction="sendonly", version=2)), CARRIER, 1.0)
    ok = parse_response(sends(hold)[0].data)
    sdp = parse_sdp(ok.body)
    assert ok.code == 200 and sdp.media[0].direction == "recvonly" and sdp.version == v1 + 1
    updates = [a for a in hold if isinstance(a, MediaUpdated)]
    assert len(updates) == 1 and not updates[0].media.we_send
    assert uas.receive(request("ACK", branch="z9hG4bK-a2", cseq=2, to_tag=tag), CARRIER, 1.1) == []
    resume = uas.receive(reinvite(tag, 3, offer(direction="sendrecv", version=3)), CARRIER, 2.0)
    sdp = parse_sdp(parse_response(sends(resume)[0].data).body)
    assert sdp.media[0].direction == "sendrecv" and sdp.version == v1 + 2


def test_refresh_with_the_same_media_keeps_the_version() -> None:
    uas = make_uas()
    handle, tag = answered_call(uas)
    out = uas.receive(reinvite(tag, 2, offer()), CARRIER, 1.0)
    assert parse_sdp(parse_response(sends(out)[0].data).body).version == uas.calls[handle].sdp_version == 1
    assert not any(isinstance(a, MediaUpdated) for a in out)


def test_retransmitted_reinvite_is_absorbed() -> None:
    uas = make_uas()
    _, tag = answered_call(uas)
    first = uas.receive(reinvite(tag, 2, offer(direction="sendonly")), CARRIER, 1.0)
    again = uas.receive(reinvite(tag, 2, offer(direction="sendonly")), CARRIER, 1.4)
    assert codes(again) == [200] and sends(again)[0].data == sends(first)[0].data
    assert not any(isinstance(a, MediaUpdated) for a in again)


def test_update_with_new_address_moves_media() -> None:
    uas = make_uas()
    handle, tag = answered_call(uas)
    out = uas.receive(request("UPDATE", branch="z9hG4bK-u", cseq=2, to_tag=tag, body=offer(port=41000)),
                      CARRIER, 1.0)
    assert codes(out) == [200]
    assert [a.media.remote_port for a in out if isinstance(a, MediaUpdated)] == [41000]


def test_reinvite_switching_codec_is_488_and_media_stays() -> None:
    uas = make_uas()
    handle, tag = answered_call(uas)
    assert codes(uas.receive(reinvite(tag, 2, offer(formats="8 101")), CARRIER, 1.0)) == [488]
    assert uas.calls[handle].answer.codec == "PCMU"


def test_session_timer_refreshed_by_carrier_else_bye() -> None:
    uas = make_uas()
    headers = {"Session-Expires": "120;refresher=uac", "Supported": "timer"}
    out = uas.receive(invite(headers=headers), CARRIER, 0.0)
    handle = offered(out).handle
    ok = parse_response(uas.answer(handle, RTP_PORT, 0.0)[0].data)
    assert ok.headers["Session-Expires"] == "120;refresher=uac" and ok.headers["Require"] == "timer"
    tag = ok.to_address.parameters["tag"]
    uas.receive(request("ACK", branch="z9hG4bK-a", to_tag=tag), CARRIER, 0.1)
    deadline = 120 - 32.0
    assert uas.calls[handle].timer is not None and uas.calls[handle].timer.expires_at == deadline
    refresh = request("UPDATE", branch="z9hG4bK-u", cseq=2, to_tag=tag, headers=headers)
    assert codes(uas.receive(refresh, CARRIER, 60.0)) == [200]
    assert uas.tick(deadline + 1) == []  # the refresh moved the deadline
    out = uas.tick(60.0 + deadline)
    assert CallEnded(handle, "error: session expired") in out
    assert any(s.data.startswith(b"BYE") for s in sends(out))


def test_session_interval_below_floor_is_422() -> None:
    uas = make_uas()
    resp = parse_response(uas.receive(invite(headers={"Session-Expires": "30", "Supported": "timer"}),
                                      CARRIER, 0.0)[0].data)
    assert resp.code == 422 and resp.headers["Min-SE"] == "90"


def test_info_dtmf_relay_digit_is_an_event() -> None:
    uas = make_uas()
    handle, tag = answered_call(uas)
    info = request("INFO", branch="z9hG4bK-i", cseq=2, to_tag=tag, body=b"Signal=5\r\nDuration=160\r\n",
                   headers={"Content-Type": "application/dtmf-relay"})
    out = uas.receive(info.replace(b"Content-Type: application/sdp\r\n", b""), CARRIER, 1.0)
    assert codes(out) == [200] and DigitReceived(handle, "5") in out


def test_out_of_order_cseq_is_500() -> None:
    uas = make_uas()
    _, tag = answered_call(uas, cseq=5)
    assert codes(uas.receive(request("BYE", branch="z9hG4bK-b", cseq=4, to_tag=tag), CARRIER, 1.0)) == [500]


def test_ended_calls_are_forgotten_after_the_transaction_timeout() -> None:
    uas = make_uas()
    handle, tag = answered_call(uas)
    uas.receive(request("BYE", branch="z9hG4bK-b", cseq=2, to_tag=tag), CARRIER, 1.0)
    uas.tick(1.0 + TIMEOUT)
    assert handle not in uas.calls and not uas.transactions.server


def test_trunks_first_match_decides_digest() -> None:
    auth = DigestAuth(username="pbx", password="pw")
    uas = UserAgentServer(
        settings=UasSettings(public_address=BRIDGE_IP, port=BRIDGE_PORT),
        allow=AllowList((Trunk("carrier", parse_networks("127.0.0.1/32"), digest=False),
                         Trunk("pbx", parse_networks("127.0.0.0/8"), digest=True))),
        limiter=RateLimiter(rate_per_s=100, burst=100), digest=auth,
    )
    carrier = uas.receive(invite(), CARRIER, 0.0)
    assert codes(carrier) == [100] and offered(carrier).trunk == "carrier"
    assert codes(uas.receive(invite(call_id="c2", branch="z9hG4bK-p"), ("127.0.0.2", 5060), 0.0)) == [407]


def test_allow_list_rejects_bad_cidr_with_the_entry_named() -> None:
    with pytest.raises(ValueError, match="'10.0.0.300'"):
        parse_networks("10.0.0.0/8, 10.0.0.300")


def test_responses_tell_the_client_its_real_source_rport() -> None:
    uas = make_uas()
    resp = parse_response(uas.receive(request("OPTIONS"), ("127.0.0.7", 31000), 0.0)[0].data)
    top = resp.via[0]
    assert top.parameters["rport"] == "31000" and top.parameters["received"] == "127.0.0.7"
    assert top.parameters["branch"] == "z9hG4bK-1"


# ---------------------------------------------------------------------------- fuzz


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mangled_datagrams_never_raise(data: st.DataObject) -> None:
    """Any datagram, however broken, is answered or dropped; nothing escapes the server."""
    uas = make_uas()
    _, tag = answered_call(uas, call_id="live", from_tag="live")  # a live dialog the mangled requests may hit
    in_dialog = {"call_id": "live", "from_tag": "live", "to_tag": tag}
    base = bytearray(data.draw(st.sampled_from([
        invite(), request("BYE", to_tag="x", cseq=2), request("CANCEL"), request("OPTIONS"),
        invite(headers={"Session-Expires": "abc", "Supported": "timer", "Require": "timer"}),
        invite(body=offer().replace(b"RTP/AVP 0 8 101", b"RTP/AVP x y")),
        reinvite(tag, 2, offer(direction="sendonly"), call_id="live", from_tag="live"),
        request("UPDATE", branch="z9hG4bK-u", cseq=3, body=offer(port=41000), **in_dialog),  # type: ignore[arg-type]
        request("INFO", branch="z9hG4bK-i", cseq=4, body=b"Signal=5\r\n",
                headers={"Content-Type": "application/dtmf-relay"}, **in_dialog),  # type: ignore[arg-type]
        request("BYE", branch="z9hG4bK-b", cseq=5, **in_dialog),  # type: ignore[arg-type]
    ])))
    for _ in range(data.draw(st.integers(0, 8))):
        pos = data.draw(st.integers(0, len(base) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "dup", "byte"]))
        if op == "flip":
            base[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del base[pos:pos + data.draw(st.integers(1, 20))]
        elif op == "dup":
            base[pos:pos] = base[pos:pos + data.draw(st.integers(1, 20))]
        else:
            base[pos] = data.draw(st.integers(0, 255))
        if not base:
            break
    for action in uas.receive(bytes(base), CARRIER, 0.0) + uas.tick(100.0):
        if isinstance(action, Send):
            assert action.dest == CARRIER
