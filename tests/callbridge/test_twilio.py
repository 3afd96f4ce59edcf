"""callbridge.transports.twilio as sans-I/O: JSON in, events out, messages back; TwiML; signatures."""

from __future__ import annotations

import base64
import contextlib
import json
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callbridge.transports.twilio import (
    ERROR_CODES,
    HMAC_SHA256,
    Connected,
    Dtmf,
    Mark,
    Media,
    MediaFormat,
    MediaStreamProtocol,
    OutboundClear,
    OutboundMark,
    OutboundMedia,
    ProtocolError,
    Start,
    Stop,
    StreamState,
    Unknown,
    compute_signature,
    connect_stream_twiml,
    dump_event,
    parse_message,
    parse_outbound,
    public_url,
    reject_twiml,
    say_hangup_twiml,
    signature_key_id,
    validate_signature,
    websocket_url,
)

SID = "MZ00000000000000000000000000000000"
CALL = "CA00000000000000000000000000000000"
ACCOUNT = "AC00000000000000000000000000000000"
TOKEN = "test-auth-token"


def connected_msg() -> dict[str, Any]:
    return {"event": "connected", "protocol": "Call", "version": "1.0.0"}


def start_msg(**over: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": ACCOUNT,
            "streamSid": SID,
            "callSid": CALL,
            "tracks": ["inbound"],
            "customParameters": {"voice": "default", "token": "5f1c"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
        "streamSid": SID,
    }
    msg.update(over)
    return msg


def media_msg(seq: int = 2, chunk: int = 1, payload: bytes = b"\xff" * 160, sid: str = SID) -> dict[str, Any]:
    return {
        "event": "media",
        "sequenceNumber": str(seq),
        "media": {"track": "inbound", "chunk": str(chunk), "timestamp": str(20 * (chunk - 1)),
                  "payload": base64.b64encode(payload).decode()},
        "streamSid": sid,
    }


def mark_msg(name: str, seq: int = 3) -> dict[str, Any]:
    return {"event": "mark", "sequenceNumber": str(seq), "streamSid": SID, "mark": {"name": name}}


def dtmf_msg(digit: str = "7", seq: int = 4) -> dict[str, Any]:
    return {"event": "dtmf", "streamSid": SID, "sequenceNumber": str(seq),
            "dtmf": {"track": "inbound_track", "digit": digit}}


def stop_msg(seq: int = 5) -> dict[str, Any]:
    return {"event": "stop", "sequenceNumber": str(seq), "streamSid": SID,
            "stop": {"accountSid": ACCOUNT, "callSid": CALL}}


def j(msg: dict[str, Any]) -> str:
    return json.dumps(msg)


def started() -> MediaStreamProtocol:
    proto = MediaStreamProtocol()
    proto.receive(j(connected_msg()))
    proto.receive(j(start_msg()))
    return proto


def code_of(text: str | bytes, **kw: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        parse_message(text, **kw)
    return info.value.code


# --------------------------------------------------------------------------- parse_message


def test_parses_every_documented_event() -> None:
    assert parse_message(j(connected_msg())) == Connected("Call", "1.0.0")
    start = parse_message(j(start_msg()))
    assert start == Start(SID, CALL, ACCOUNT, ("inbound",), {"voice": "default", "token": "5f1c"},
                          MediaFormat("audio/x-mulaw", 8000, 1), 1)
    media = parse_message(j(media_msg(seq=3, chunk=2, payload=b"\x00\x7f\xff")))
    assert media == Media(SID, "inbound", 2, 20, b"\x00\x7f\xff", 3)
    assert parse_message(j(mark_msg("t3-g1-f120", seq=9))) == Mark(SID, "t3-g1-f120", 9)
    assert parse_message(j(dtmf_msg("#"))) == Dtmf(SID, "#", 4)
    assert parse_message(j(stop_msg(412))) == Stop(SID, CALL, ACCOUNT, 412)


def test_unknown_fields_are_ignored_and_unknown_events_returned() -> None:
    msg = media_msg()
    msg["future"] = {"x": 1}
    msg["media"]["loudness"] = "3"
    assert isinstance(parse_message(j(msg)), Media)
    event = parse_message(j({"event": "transcript", "streamSid": SID, "text": "hi"}))
    assert event == Unknown("transcript", {"event": "transcript", "streamSid": SID, "text": "hi"})


def test_lenient_where_it_does_not_matter() -> None:
    # connected without a version, a stop without its body, JSON integers for counts,
    # sampleRate as a string, start with only the inner streamSid.
    assert parse_message('{"event": "connected"}') == Connected("", "")
    assert parse_message(j({"event": "stop", "sequenceNumber": "9", "streamSid": SID})) == Stop(SID, "", "", 9)
    msg = media_msg()
    msg["sequenceNumber"] = 7
    assert parse_message(j(msg)).sequence_number == 7  # type: ignore[union-attr]
    start = start_msg()
    start["start"]["mediaFormat"]["sampleRate"] = "8000"
    del start["streamSid"]
    assert parse_message(j(start)).stream_sid == SID  # type: ignore[union-attr]


def test_any_payload_length_decodes() -> None:
    for n in (0, 1, 159, 160, 161, 8000):
        payload = bytes(i % 256 for i in range(n))
        assert parse_message(j(media_msg(payload=payload))).payload == payload  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (b'{"event": "connected"}', "binary_frame"),
        ("{not json", "bad_json"),
        ("", "bad_json"),
        ("[" * 100_000 + "]" * 100_000, "too_large"),
        ("[" * 30_000 + "]" * 30_000, "bad_json"),  # nesting deep enough to hit the recursion limit
        ("[1, 2]", "not_object"),
        ('"media"', "not_object"),
        ("null", "not_object"),
        ("{}", "missing_field"),
        ('{"event": 5}', "bad_field"),
    ],
)
def test_frame_level_errors(text: str | bytes, code: str) -> None:
    assert code_of(text) == code


def test_size_cap_is_a_parameter() -> None:
    text = j(media_msg(payload=b"\x00" * 600))
    assert isinstance(parse_message(text), Media)
    assert code_of(text, max_bytes=500) == "too_large"
    # The cap counts UTF-8 bytes, not characters.
    wide = json.dumps({"event": "x", "pad": "é" * 400}, ensure_ascii=False)
    assert len(wide) < 700 < len(wide.encode())
    assert code_of(wide, max_bytes=700) == "too_large"


def _without(msg: dict[str, Any], *path: str) -> dict[str, Any]:
    obj = msg
    for key in path[:-1]:
        obj = obj[key]
    del obj[path[-1]]
    return msg


@pytest.mark.parametrize(
    "msg",
    [
        _without(media_msg(), "streamSid"),
        _without(media_msg(), "sequenceNumber"),
        _without(media_msg(), "media"),
        _without(media_msg(), "media", "payload"),
        _without(media_msg(), "media", "chunk"),
        _without(media_msg(), "media", "timestamp"),
        _without(mark_msg("a"), "mark", "name"),
        _without(mark_msg("a"), "mark"),
        _without(dtmf_msg(), "dtmf", "digit"),
        _without(stop_msg(), "streamSid"),
        _without(start_msg(), "start"),
        _without(_without(start_msg(), "streamSid"), "start", "streamSid"),
        _without(start_msg(), "start", "callSid"),
        _without(start_msg(), "start", "accountSid"),
        _without(start_msg(), "start", "mediaFormat"),
        {**media_msg(), "streamSid": ""},
    ],
)
def test_missing_required_fields(msg: dict[str, Any]) -> None:
    assert code_of(j(msg)) == "missing_field"


@pytest.mark.parametrize("value", ["", "abc", "1.5", "-1", " 7", "1_000", "١٢", "0x10", 1.5, -3, True, [], {}])
def test_numbers_must_be_numbers(value: object) -> None:
    msg = media_msg()
    msg["media"]["chunk"] = value
    assert code_of(j(msg)) == "bad_number"
    msg = media_msg()
    msg["sequenceNumber"] = value
    assert code_of(j(msg)) == "bad_number"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.__setitem__("media", "abc"),
        lambda m: m["media"].__setitem__("payload", 12),
        lambda m: m["media"].__setitem__("track", ["inbound"]),
        lambda m: m.__setitem__("streamSid", 12),
    ],
)
def test_wrong_field_types(mutate: Any) -> None:
    msg = media_msg()
    mutate(msg)
    assert code_of(j(msg)) == "bad_field"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.__setitem__("tracks", "inbound"),
        lambda s: s.__setitem__("tracks", [1]),
        lambda s: s.__setitem__("customParameters", {"a": 1}),
        lambda s: s.__setitem__("customParameters", ["a"]),
        lambda s: s.__setitem__("callSid", 7),
    ],
)
def test_start_field_types(mutate: Any) -> None:
    msg = start_msg()
    mutate(msg["start"])
    assert code_of(j(msg)) == "bad_field"


@pytest.mark.parametrize("payload", ["not base64!", "AAA", "AA==AA==", "ÿÿÿÿ", "AA\nAA"])
def test_payload_must_be_strict_base64(payload: str) -> None:
    msg = media_msg()
    msg["media"]["payload"] = payload
    assert code_of(j(msg)) == "bad_payload"


@pytest.mark.parametrize(
    "fmt",
    [
        {"encoding": "audio/l16", "sampleRate": 8000, "channels": 1},
        {"encoding": "audio/x-mulaw", "sampleRate": 16000, "channels": 1},
        {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2},
        {"encoding": "audio/x-mulaw", "sampleRate": "8k", "channels": 1},
        {"encoding": "audio/x-mulaw", "sampleRate": True, "channels": 1},
        {"encoding": "audio/x-mulaw", "channels": 1},
        {"sampleRate": 8000, "channels": 1},
    ],
)
def test_start_refuses_other_audio_formats(fmt: dict[str, Any]) -> None:
    msg = start_msg()
    msg["start"]["mediaFormat"] = fmt
    assert code_of(j(msg)) == "bad_media_format"


def test_start_with_two_different_stream_sids() -> None:
    msg = start_msg(streamSid="MZ1")
    assert code_of(j(msg)) == "wrong_stream_sid"


def test_error_messages_do_not_leak_custom_parameters() -> None:
    msg = start_msg()
    msg["start"]["mediaFormat"]["channels"] = 2
    with pytest.raises(ProtocolError) as info:
        parse_message(j(msg))
    assert "5f1c" not in str(info.value)
    assert "5f1c" not in repr(parse_message(j(start_msg())))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
event_names = st.sampled_from(["connected", "start", "media", "mark", "dtmf", "stop", "clear", "other"])
field_names = st.sampled_from(
    ["event", "streamSid", "sequenceNumber", "start", "media", "mark", "dtmf", "stop", "payload", "chunk",
     "timestamp", "track", "name", "digit", "callSid", "accountSid", "mediaFormat", "customParameters",
     "tracks", "encoding", "sampleRate", "channels"]
)
twilio_like = st.recursive(
    json_values,
    lambda children: st.dictionaries(field_names, children | event_names, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200) | st.binary(max_size=50))
def test_arbitrary_text_raises_only_protocol_error(text: str | bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_message(text)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(twilio_like, event_names)
def test_arbitrary_json_raises_only_protocol_error(value: Any, event: str) -> None:
    if isinstance(value, dict):
        value.setdefault("event", event)
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        with contextlib.suppress(ProtocolError):
            parse_message(text)
        with contextlib.suppress(ProtocolError):
            parse_outbound(text)


def _paths(obj: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.extend(_paths(value, (*prefix, key)))
    return out


VALID = [connected_msg(), start_msg(), media_msg(), mark_msg("m"), dtmf_msg(), stop_msg()]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_valid_messages_with_one_field_replaced_raise_only_protocol_error(data: st.DataObject) -> None:
    msg = json.loads(json.dumps(data.draw(st.sampled_from(VALID))))
    path = data.draw(st.sampled_from(_paths(msg)))
    parent = msg
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()):
        parent[path[-1]] = data.draw(json_values)
    else:
        del parent[path[-1]]
    proto = MediaStreamProtocol()
    with contextlib.suppress(ProtocolError):
        proto.receive(j(start_msg()))
        proto.receive(j(msg))


@settings(max_examples=200)
@given(
    seq=st.integers(0, 10**9),
    chunk=st.integers(0, 10**9),
    payload=st.binary(max_size=400),
    name=st.text(min_size=1, max_size=30),
    params=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4),
)
def test_dump_then_parse_round_trips(seq: int, chunk: int, payload: bytes, name: str, params: dict[str, str]) -> None:
    events = [
        Connected("Call", "1.0.0"),
        Start(SID, CALL, ACCOUNT, ("inbound",), params, MediaFormat(), seq),
        Media(SID, "inbound", chunk, chunk * 20, payload, seq),
        Mark(SID, name, seq),
        Dtmf(SID, "*", seq),
        Stop(SID, CALL, ACCOUNT, seq),
    ]
    for event in events:
        assert parse_message(dump_event(event)) == event


# --------------------------------------------------------------------------- the state machine


def test_a_whole_stream_in_order() -> None:
    proto = MediaStreamProtocol()
    assert proto.state is StreamState.AWAITING_CONNECTED
    assert isinstance(proto.receive(j(connected_msg())), Connected)
    assert proto.state is StreamState.AWAITING_START and proto.stream_sid is None
    assert isinstance(proto.receive(j(start_msg())), Start)
    assert proto.state is StreamState.STREAMING and proto.stream_sid == SID and proto.connected_seen
    for i in range(1, 4):
        assert isinstance(proto.receive(j(media_msg(seq=1 + i, chunk=i))), Media)
    assert isinstance(proto.receive(j(dtmf_msg(seq=5))), Dtmf)
    assert isinstance(proto.receive(j({"event": "new-thing", "sequenceNumber": "6", "streamSid": SID})), Unknown)
    assert isinstance(proto.receive(j(stop_msg(seq=7))), Stop)
    assert proto.state is StreamState.STOPPED
    assert proto.sequence_gaps == 0 and proto.media_gaps == 0 and proto.messages_received == 8
    proto.close()
    proto.close()  # idempotent
    assert proto.state is StreamState.CLOSED


def test_start_without_connected_is_accepted() -> None:
    proto = MediaStreamProtocol()
    proto.receive(j(start_msg()))
    assert proto.state is StreamState.STREAMING
    assert not proto.connected_seen


@pytest.mark.parametrize("msg", [media_msg(), mark_msg("m"), dtmf_msg(), stop_msg()])
def test_events_before_start(msg: dict[str, Any]) -> None:
    for with_connected in (False, True):
        proto = MediaStreamProtocol()
        if with_connected:
            proto.receive(j(connected_msg()))
        with pytest.raises(ProtocolError) as info:
            proto.receive(j(msg))
        assert info.value.code == "before_start"


def test_unknown_events_before_start_are_ignored() -> None:
    proto = MediaStreamProtocol()
    assert isinstance(proto.receive('{"event": "hello"}'), Unknown)
    assert proto.state is StreamState.AWAITING_CONNECTED


@pytest.mark.parametrize(
    ("first", "then", "code"),
    [
        ([start_msg()], start_msg(), "duplicate_start"),
        ([connected_msg()], connected_msg(), "duplicate_connected"),
        ([start_msg()], connected_msg(), "duplicate_connected"),
        ([start_msg()], media_msg(sid="MZ1"), "wrong_stream_sid"),
        ([start_msg()], {**mark_msg("x"), "streamSid": "MZ1"}, "wrong_stream_sid"),
        ([start_msg(), stop_msg()], media_msg(), "after_stop"),
        ([start_msg(), stop_msg()], stop_msg(), "after_stop"),
        ([start_msg(), stop_msg()], {"event": "anything"}, "after_stop"),
    ],
)
def test_order_errors(first: list[dict[str, Any]], then: dict[str, Any], code: str) -> None:
    proto = MediaStreamProtocol()
    for msg in first:
        proto.receive(j(msg))
    with pytest.raises(ProtocolError) as info:
        proto.receive(j(then))
    assert info.value.code == code


def test_receive_after_close() -> None:
    proto = started()
    proto.close()
    with pytest.raises(ProtocolError) as info:
        proto.receive(j(media_msg()))
    assert info.value.code == "closed"


def test_receive_applies_the_size_cap() -> None:
    proto = MediaStreamProtocol(max_message_bytes=1024)
    proto.receive(j(start_msg()))
    with pytest.raises(ProtocolError) as info:
        proto.receive(j(media_msg(payload=b"\x00" * 2000)))
    assert info.value.code == "too_large"


def test_gaps_are_counted_not_raised() -> None:
    proto = started()
    proto.receive(j(media_msg(seq=2, chunk=1)))
    proto.receive(j(media_msg(seq=4, chunk=3)))  # one message lost
    proto.receive(j(media_msg(seq=3, chunk=2)))  # ... and it arrives late
    assert proto.sequence_gaps == 2
    assert proto.media_gaps == 2


def test_outbound_messages_have_the_exact_shapes() -> None:
    proto = started()
    assert json.loads(proto.media_message(b"\xff\x00")) == {
        "event": "media", "streamSid": SID, "media": {"payload": "/wA="}
    }
    assert json.loads(proto.mark_message("t1-g0-m1")) == {"event": "mark", "streamSid": SID, "mark": {"name": "t1-g0-m1"}}
    assert json.loads(proto.clear_message()) == {"event": "clear", "streamSid": SID}
    assert all(isinstance(m, str) for m in (proto.media_message(b"\x01"), proto.clear_message()))


def test_outbound_round_trips_through_the_strict_parser() -> None:
    proto = started()
    chunk = bytes(range(160))
    assert parse_outbound(proto.media_message(chunk)) == OutboundMedia(SID, chunk)
    assert parse_outbound(proto.mark_message("m1")) == OutboundMark(SID, "m1")
    assert parse_outbound(proto.clear_message()) == OutboundClear(SID)


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        ({"event": "media", "streamSid": SID, "media": {"payload": "AA==", "track": "outbound"}}, "extra_field"),
        ({"event": "clear", "streamSid": SID, "sequenceNumber": "1"}, "extra_field"),
        ({"event": "mark", "streamSid": SID, "mark": {}}, "missing_field"),
        ({"event": "mark", "streamSid": SID, "mark": {"name": ""}}, "missing_field"),
        ({"event": "connected", "streamSid": SID}, "unknown_event"),
        ({"event": "clear"}, "missing_field"),
    ],
)
def test_strict_outbound_parser_rejects_what_twilio_rejects(msg: dict[str, Any], code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_outbound(j(msg))
    assert info.value.code == code
    with pytest.raises(ProtocolError) as info:
        parse_outbound(b"{}")
    assert info.value.code == "binary_frame"


def test_nothing_is_sent_before_start_or_after_stop() -> None:
    proto = MediaStreamProtocol()
    proto.receive(j(connected_msg()))
    for build in (lambda: proto.media_message(b"\xff"), lambda: proto.mark_message("m"), proto.clear_message):
        with pytest.raises(ProtocolError) as info:
            build()
        assert info.value.code == "before_start"
    proto.receive(j(start_msg()))
    proto.receive(j(stop_msg(2)))
    with pytest.raises(ProtocolError) as info:
        proto.clear_message()
    assert info.value.code == "after_stop"
    proto.close()
    with pytest.raises(ProtocolError) as info:
        proto.media_message(b"\xff")
    assert info.value.code == "closed"


def test_outbound_argument_checks() -> None:
    proto = started()
    with pytest.raises(ValueError):
        proto.media_message(b"")
    with pytest.raises(ValueError):
        proto.mark_message("")


# --------------------------------------------------------------------------- TwiML


def _xml(text: str) -> ET.Element:
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    return ET.fromstring(text.split("?>", 1)[1])


def test_connect_stream_twiml() -> None:
    xml = connect_stream_twiml(
        "wss://bridge.example.com/twilio/media/tok123",
        {"voice": "default", "token": "abc", "greeting": 'Hi & "welcome" <there>'},
        status_callback="https://bridge.example.com/twilio/stream-status",
    )
    root = _xml(xml)
    assert [child.tag for child in root] == ["Connect"]  # nothing after </Connect>: hang up
    (stream,) = root.find("Connect")  # type: ignore[misc]
    assert stream.tag == "Stream"
    assert stream.attrib == {
        "url": "wss://bridge.example.com/twilio/media/tok123",
        "statusCallback": "https://bridge.example.com/twilio/stream-status",
        "statusCallbackMethod": "POST",
    }
    assert "track" not in stream.attrib
    params = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
    assert params == {"voice": "default", "token": "abc", "greeting": 'Hi & "welcome" <there>'}


def test_connect_stream_twiml_with_goodbye() -> None:
    root = _xml(connect_stream_twiml("wss://h/m", {}, goodbye="Goodbye."))
    assert [child.tag for child in root] == ["Connect", "Say", "Hangup"]
    assert root.find("Say").text == "Goodbye."  # type: ignore[union-attr]
    assert root.find("Connect/Stream").attrib == {"url": "wss://h/m"}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "url",
    ["https://h/m", "ws://h/m", "wss://h/m?token=1", "wss://h/m?", "wss://h/m#x", "wss:///m", "h/m", "/media"],
)
def test_stream_url_must_be_wss_without_query(url: str) -> None:
    with pytest.raises(ValueError):
        connect_stream_twiml(url, {})


def test_ws_only_for_local_runs() -> None:
    for url in ("ws://127.0.0.1:8080/m", "ws://localhost:8080/m", "ws://[::1]:8080/m"):
        assert f'url="{url}"' in connect_stream_twiml(url, {})
    with pytest.raises(ValueError):
        connect_stream_twiml("ws://10.0.0.5:8080/m", {})
    assert 'url="ws://sim:8080/m"' in connect_stream_twiml("ws://sim:8080/m", {}, allow_ws=True)


def test_error_codes_are_listed() -> None:
    assert {"binary_frame", "bad_json", "missing_field", "bad_payload", "bad_media_format", "too_large",
            "before_start", "duplicate_start", "wrong_stream_sid", "after_stop"} <= ERROR_CODES
    assert ProtocolError("start_timeout", "no start").code == "start_timeout"  # the app's own codes


def test_parameter_length_limit() -> None:
    connect_stream_twiml("wss://h/m", {"n": "v" * 498})  # 499 characters: fine
    with pytest.raises(ValueError, match="under 500"):
        connect_stream_twiml("wss://h/m", {"n": "v" * 499})
    with pytest.raises(ValueError):
        connect_stream_twiml("wss://h/m", {"": "v"})
    with pytest.raises(ValueError):
        connect_stream_twiml("wss://h/m", {"n": 5})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        connect_stream_twiml("wss://h/m", {}, status_callback="/relative")


def test_twiml_size_limit() -> None:
    many = {f"p{i}": "x" * 400 for i in range(200)}
    with pytest.raises(ValueError, match="64000"):
        connect_stream_twiml("wss://h/m", many)


def test_reject_and_say_hangup_twiml() -> None:
    assert _xml(reject_twiml()).find("Reject").attrib == {"reason": "busy"}  # type: ignore[union-attr]
    assert _xml(reject_twiml("rejected")).find("Reject").attrib == {"reason": "rejected"}  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        reject_twiml("nope")  # type: ignore[arg-type]
    root = _xml(say_hangup_twiml("We are busy & sorry."))
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert root.find("Say").text == "We are busy & sorry."  # type: ignore[union-attr]


# --------------------------------------------------------------------------- signatures and URLs

WEBHOOK = "https://bridge.example.com/twilio/voice"
FORM = {"CallSid": CALL, "AccountSid": ACCOUNT, "From": "+15550001111", "To": "+15550002222",
        "CallStatus": "ringing"}


def test_signature_round_trip_and_forgery() -> None:
    sig = compute_signature(TOKEN, WEBHOOK, FORM)
    assert validate_signature(TOKEN, WEBHOOK, FORM, sig)
    assert not validate_signature("other-token", WEBHOOK, FORM, sig)
    assert not validate_signature(TOKEN, WEBHOOK, {**FORM, "To": "+15559999999"}, sig)
    assert not validate_signature(TOKEN, WEBHOOK, {**FORM, "Extra": "1"}, sig)
    assert not validate_signature(TOKEN, WEBHOOK + "x", FORM, sig)
    assert not validate_signature(TOKEN, WEBHOOK, FORM, sig[:-2] + "AA")
    assert not validate_signature(TOKEN, WEBHOOK, FORM, None)
    assert not validate_signature(TOKEN, WEBHOOK, FORM, "")
    with pytest.raises(ValueError):
        validate_signature("", WEBHOOK, FORM, sig)


def test_signature_matches_the_documented_algorithm() -> None:
    import hashlib
    import hmac

    signed = WEBHOOK + "".join(k + FORM[k] for k in sorted(FORM))
    expected = base64.b64encode(hmac.new(TOKEN.encode(), signed.encode(), hashlib.sha1).digest()).decode()
    assert compute_signature(TOKEN, WEBHOOK, FORM) == expected


def test_signature_with_repeated_parameters() -> None:
    params = {"A": ["2", "1"], "B": "x"}
    sig = compute_signature(TOKEN, WEBHOOK, params)
    assert validate_signature(TOKEN, WEBHOOK, {"A": ["1", "2"], "B": "x"}, sig)
    assert not validate_signature(TOKEN, WEBHOOK, {"A": ["1"], "B": "x"}, sig)


@pytest.mark.parametrize(
    ("signed_url", "checked_url"),
    [
        ("https://bridge.example.com/v", "https://bridge.example.com:443/v"),
        ("https://bridge.example.com:443/v", "https://bridge.example.com/v"),
        ("https://bridge.example.com:8443/v", "https://bridge.example.com:8443/v"),
        ("wss://bridge.example.com/m", "wss://bridge.example.com:443/m"),
    ],
)
def test_signature_port_variants(signed_url: str, checked_url: str) -> None:
    sig = compute_signature(TOKEN, signed_url, {})
    assert validate_signature(TOKEN, checked_url, {}, sig)


def test_websocket_upgrade_signature_is_over_the_wss_url() -> None:
    url = websocket_url("https://bridge.example.com", "/twilio/media/tok123")
    assert url == "wss://bridge.example.com/twilio/media/tok123"
    sig = compute_signature(TOKEN, url, {})
    assert validate_signature(TOKEN, url, {}, sig)
    assert not validate_signature(TOKEN, "https://bridge.example.com/twilio/media/tok123", {}, sig)


def test_hmac_sha256_webhooks_rule_header() -> None:
    header = "key=webhooks_sharedkey_123,algorithm=HMAC_SHA256"
    assert signature_key_id(header) == "webhooks_sharedkey_123"
    assert signature_key_id(None) is None
    shared = "shared-secret"
    sig256 = compute_signature(shared, WEBHOOK, FORM, algorithm=HMAC_SHA256)
    assert validate_signature(shared, WEBHOOK, FORM, sig256, header)
    assert not validate_signature(shared, WEBHOOK, FORM, sig256)  # without the header: SHA1
    sig1 = compute_signature(shared, WEBHOOK, FORM)
    assert not validate_signature(shared, WEBHOOK, FORM, sig1, header)
    assert not validate_signature(shared, WEBHOOK, FORM, sig256, "key=k,algorithm=HMAC_MD5")


def test_json_body_signature() -> None:
    import hashlib

    body = '{"a": 1}'
    url = WEBHOOK + "?bodySHA256=" + hashlib.sha256(body.encode()).hexdigest()
    sig = compute_signature(TOKEN, url)
    assert validate_signature(TOKEN, url, body, sig)
    assert not validate_signature(TOKEN, url, '{"a": 2}', sig)


def test_public_and_websocket_urls() -> None:
    assert public_url("https://b.example.com", "/twilio/voice") == "https://b.example.com/twilio/voice"
    assert public_url("https://b.example.com/", "twilio/voice", "x=1&y=2") == "https://b.example.com/twilio/voice?x=1&y=2"
    assert public_url("https://b.example.com/prefix", "/v", "?a=b") == "https://b.example.com/prefix/v?a=b"
    assert websocket_url("http://127.0.0.1:8080", "/m") == "ws://127.0.0.1:8080/m"
    assert websocket_url("https://b.example.com:8443/p/", "/m/t") == "wss://b.example.com:8443/p/m/t"
    for bad in ("ftp://b/", "b.example.com", "https://b/?q=1"):
        with pytest.raises(ValueError):
            public_url(bad, "/v")
    with pytest.raises(ValueError):
        websocket_url("https://b", "/m?token=1")


# --------------------------------------------------------------------------- the Twilio leg


class _Socket:
    """What the leg needs of an aiohttp WebSocketResponse, recording what it sends."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed = False
        self.close_code: int | None = None

    async def send_str(self, data: str) -> None:
        self.sent.append(json.loads(data))

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        self.closed, self.close_code = True, code
        return True


async def test_the_twilio_leg_turns_frames_into_leg_events_and_sends_twilio_messages() -> None:
    from callbridge.calls.leg import CallerAudio, CallerDigit, LegEnded, MarkerPlayed
    from callbridge.config import Settings
    from callbridge.transports.twilio.leg import TwilioLeg

    socket = _Socket()
    leg = TwilioLeg(socket, call_sid=CALL, twilio=Settings().twilio, lead_ms=120)  # type: ignore[arg-type]
    assert (leg.info.carrier, leg.info.carrier_call_id, leg.info.media_id) == ("twilio", CALL, "")
    assert leg.receive(j(connected_msg())) is None
    start = leg.receive(j(start_msg()))
    assert isinstance(start, Start) and leg.info.media_id == SID
    audio = leg.receive(j(media_msg(seq=2, chunk=1, payload=b"\xff\x7f\x00" * 3)))
    assert isinstance(audio, CallerAudio) and audio.sample_rate == 8000
    assert audio.pcm16.dtype == np.int16 and audio.pcm16.shape == (9,)
    await leg.send_audio(b"\xff" * 160)
    await leg.send_marker("t1-g0-m1")
    await leg.clear()
    assert [m["event"] for m in socket.sent] == ["media", "mark", "clear"]
    assert socket.sent[1] == {"event": "mark", "streamSid": SID, "mark": {"name": "t1-g0-m1"}}
    assert leg.receive(j(mark_msg("t1-g0-m1", seq=3))) == MarkerPlayed("t1-g0-m1")
    assert leg.receive(j(dtmf_msg("5", seq=4))) == CallerDigit("5")
    assert leg.receive(j(stop_msg(5))) == LegEnded("hangup: stop")
    await leg.close("hangup: stop", timeout_s=1.0)
    assert socket.closed and socket.close_code == 1000


def test_the_twilio_leg_refuses_a_start_for_another_call() -> None:
    from callbridge.config import Settings
    from callbridge.transports.twilio.leg import TwilioLeg

    leg = TwilioLeg(_Socket(), call_sid="CA" + "7" * 32, twilio=Settings().twilio, lead_ms=120)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError) as info:
        leg.receive(j(start_msg()))
    assert info.value.code == "call_mismatch"
