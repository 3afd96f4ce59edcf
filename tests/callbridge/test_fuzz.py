"""Property tests of the edges that take outside input, beyond those in test_twilio.py,
test_audio.py and tests/dia2/test_text.py (single frames, one-turn resampler splits,
normalize_text cleanliness, ScriptCursor splits).

Here: whole event *sequences* through the protocol state machine, signature checks on
anything a request can carry, the mu-law codec and the caller-audio path (decode + barge-in
detector) chunked against whole, the outbound converter across many turns ended every way,
the text normaliser cut at whitespace, the per-word limit on streamed turn text, and log
redaction. Each test either holds the property or raises only the module's defined error
types. Examples are bounded so the file runs in seconds.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import string
from dataclasses import replace
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callbridge.audio import CHUNK_BYTES, InboundAudio, OutboundAudio, pcm16_to_ulaw, ulaw_to_pcm16
from callbridge.audio.vad import BargeInDetector
from callbridge.calls.turns import TurnQueue, TurnRejected
from callbridge.config import Settings
from callbridge.metrics import Metrics
from callbridge.transports.twilio import (
    Event,
    MediaStreamProtocol,
    ProtocolError,
    Start,
    Stop,
    StreamState,
    compute_signature,
    public_url,
    validate_signature,
)
from callbridge.web.services import redact_url
from dia2.text import normalize_text

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SID = "MZ" + "0" * 32
OTHER_SID = "MZ" + "1" * 32
CALL = "CA" + "0" * 32
ACCOUNT = "AC" + "0" * 32
PARAM = "s3cr3t-param-value"


def splits(data: st.DataObject, n: int, max_cuts: int = 10) -> list[tuple[int, int]]:
    """Random cut points over ``n`` items, as (start, end) pairs covering 0..n."""
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=max_cuts)))
    bounds = [0, *cuts, n]
    return list(zip(bounds, bounds[1:], strict=False))


# ------------------------------------------------------------------ Twilio: sequences of events


def _message(kind: str, sid: str, seq: int, payload: bytes) -> dict[str, Any]:
    if kind == "connected":
        return {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    msg: dict[str, Any] = {"event": kind, "sequenceNumber": str(seq), "streamSid": sid}
    if kind == "start":
        msg["start"] = {"accountSid": ACCOUNT, "streamSid": sid, "callSid": CALL, "tracks": ["inbound"],
                        "customParameters": {"token": PARAM},
                        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
    elif kind == "media":
        msg["media"] = {"track": "inbound", "chunk": str(seq), "timestamp": str(20 * seq),
                        "payload": base64.b64encode(payload).decode()}
    elif kind == "mark":
        msg["mark"] = {"name": f"m{seq}"}
    elif kind == "dtmf":
        msg["dtmf"] = {"track": "inbound_track", "digit": "5"}
    elif kind == "stop":
        msg["stop"] = {"accountSid": ACCOUNT, "callSid": CALL}
    return msg


_STEP = st.tuples(
    st.sampled_from(["connected", "start", "media", "mark", "dtmf", "stop", "noise"]),
    st.sampled_from([SID] * 7 + [OTHER_SID]),
    st.integers(0, 50),
    st.binary(max_size=400),
    st.sampled_from(["json"] * 8 + ["bytes", "truncated"]),  # mostly well-formed: reach deep states
)


@FAST
@given(st.lists(_STEP, max_size=25))
def test_any_event_sequence_yields_events_or_protocol_error_and_keeps_state_consistent(
    steps: list[tuple[str, str, int, bytes, str]],
) -> None:
    """What the media handler does: stop at the first ProtocolError (the call ends)."""
    proto = MediaStreamProtocol()
    for kind, sid, seq, payload, framing in steps:
        text = json.dumps(_message(kind, sid, seq, payload))
        frame: str | bytes = text
        if framing == "bytes":
            frame = text.encode()
        elif framing == "truncated":
            frame = text[: len(text) // 2]
        before = proto.state
        try:
            event: Event = proto.receive(frame)
        except ProtocolError as exc:
            assert exc.code and PARAM not in str(exc)  # errors never carry parameters or payloads
            break
        if isinstance(event, Start):
            assert before in (StreamState.AWAITING_CONNECTED, StreamState.AWAITING_START)
        if isinstance(event, Stop):
            assert proto.state is StreamState.STOPPED
        # The sid of every stream event is the started one; nothing streams before start.
        sid_of = getattr(event, "stream_sid", None)
        if sid_of is not None:
            assert proto.stream_sid == sid_of
        assert (proto.start is not None) == (proto.state in (StreamState.STREAMING, StreamState.STOPPED))


# ------------------------------------------------------------------ Twilio: signatures


_URL_PATH = st.text(alphabet=string.ascii_letters + string.digits + "-._~/%", max_size=30)
_QUERY = st.text(alphabet=string.ascii_letters + string.digits + "=&%+-._~", max_size=40)
_FORM = st.dictionaries(st.text(max_size=10), st.text(max_size=12) | st.lists(st.text(max_size=6), min_size=1,
                                                                                    max_size=3), max_size=5)
_HEADER = st.none() | st.text(max_size=60)


@FAST
@given(path=_URL_PATH, query=_QUERY, form=_FORM, signature=_HEADER, settings_header=_HEADER)
def test_signature_checks_answer_yes_or_no_for_anything_a_request_carries(
    path: str, query: str, form: dict[str, Any], signature: str | None, settings_header: str | None
) -> None:
    """A forged, garbled or missing header is a 403, never a 500; the genuine one passes."""
    url = public_url("https://bridge.test", "/twilio/voice" + ("/" + path if path else ""), query)
    assert validate_signature("token", url, form, signature, settings_header) in (True, False)
    genuine = compute_signature("token", url, form)
    assert validate_signature("token", url, form, genuine) is True
    assert validate_signature("other-token", url, form, genuine) is False


# ------------------------------------------------------------------ mu-law and the caller-audio path


@FAST
@given(st.data(), st.binary(max_size=2000))
def test_mulaw_decode_chunked_equals_whole_and_reencodes(data: st.DataObject, ulaw: bytes) -> None:
    whole = ulaw_to_pcm16(ulaw)
    parts = [ulaw_to_pcm16(ulaw[a:b]) for a, b in splits(data, len(ulaw))]
    assert np.array_equal(np.concatenate([whole[:0], *parts]), whole)
    # Decoding then encoding gives every byte back but 0x7F ("negative zero"), which becomes 0xFF.
    assert pcm16_to_ulaw(whole) == ulaw.replace(b"\x7f", b"\xff")
    inbound = InboundAudio()
    assert np.array_equal(np.concatenate([whole[:0], *(inbound.decode(ulaw[a:b]) for a, b in splits(data, len(ulaw)))]),
                          whole)
    assert inbound.bytes_in == len(ulaw)


@FAST
@given(st.data(), st.lists(st.integers(-32768, 32767), max_size=1500))
def test_mulaw_encode_chunked_equals_whole(data: st.DataObject, samples: list[int]) -> None:
    pcm = np.array(samples, dtype=np.int16)
    whole = pcm16_to_ulaw(pcm)
    assert len(whole) == len(pcm)
    assert b"".join(pcm16_to_ulaw(pcm[a:b]) for a, b in splits(data, len(pcm))) == whole
    assert np.array_equal(ulaw_to_pcm16(pcm16_to_ulaw(ulaw_to_pcm16(whole))), ulaw_to_pcm16(whole))  # idempotent


def _voiced(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 8000
    level = rng.uniform(0.0, 0.5)
    sig = sum(np.sin(2 * np.pi * k * 140 * t) / k for k in range(1, 8)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    gate = np.repeat(rng.random(n // 800 + 1) < 0.6, 800)[:n]  # speech and pauses in 100 ms blocks
    return (sig * gate * level * 32767 / 3).astype(np.int16)


@settings(max_examples=40, deadline=None)
@given(st.data(), st.integers(0, 12000), st.integers(0, 2**32 - 1))
def test_barge_in_detector_fires_the_same_for_any_payload_sizes(data: st.DataObject, n: int, seed: int) -> None:
    """Twilio payloads of any length (not just 160 bytes) give the same barge-in decisions."""
    ulaw = pcm16_to_ulaw(_voiced(n, seed))
    whole = BargeInDetector(min_speech_ms=120)
    fired_whole = [whole.feed(ulaw_to_pcm16(ulaw[i:i + 160])) for i in range(0, n, 160)]
    pieces = BargeInDetector(min_speech_ms=120)
    fired = [pieces.feed(ulaw_to_pcm16(ulaw[a:b])) for a, b in splits(data, n, max_cuts=20)]
    assert pieces.triggers == whole.triggers == sum(fired_whole)
    assert any(fired) == (whole.triggers > 0)  # (one piece may hold two utterances: feed says "fired")
    assert pieces.speech_ms == whole.speech_ms


# ------------------------------------------------------------------ the outbound converter across turns


_TURN = st.tuples(
    st.integers(0, 6000),  # 24 kHz samples
    st.integers(0, 2**32 - 1),  # seed
    st.floats(0.0, 4.0),  # level: above 1.0 clips
    st.sampled_from(["finish", "finish", "drop"]),
)


def _one_turn(out: OutboundAudio, pcm: np.ndarray, cuts: list[tuple[int, int]], end: str) -> list[bytes]:
    chunks = [c for a, b in cuts for c in out.push(pcm[a:b])]
    if end == "finish":
        chunks += out.finish()
    else:
        out.drop()
    return chunks


@settings(max_examples=30, deadline=None)
@given(st.data(), st.lists(_TURN, min_size=1, max_size=4), st.sampled_from(["LQ", "HQ"]))
def test_each_turn_on_a_reused_converter_equals_a_fresh_one(
    data: st.DataObject, turns: list[tuple[int, int, float, str]], quality: str
) -> None:
    """Finish and drop (barge-in after clear) both leave no state behind: turn k on
    the call's converter is byte for byte what a new converter makes of it with the same cuts;
    a finished turn is also what one push makes of it (chunked equals whole)."""
    shared = OutboundAudio(quality)
    for n, seed, level, end in turns:
        pcm = (np.random.default_rng(seed).standard_normal(n) * level).astype(np.float32)
        cuts = splits(data, n)
        got = _one_turn(shared, pcm, cuts, end)
        assert got == _one_turn(OutboundAudio(quality), pcm, cuts, end)
        assert all(len(c) == CHUNK_BYTES for c in got)
        if end == "finish":
            assert got == _one_turn(OutboundAudio(quality), pcm, [(0, n)], end)
            assert len(got) == math.ceil(((n + 1) // 3) / CHUNK_BYTES)
        assert len(got) <= math.ceil(((n + 1) // 3) / CHUNK_BYTES)


@FAST
@given(st.sampled_from([np.int16, np.float64, np.int32, np.float16]), st.integers(0, 3))
def test_the_converter_refuses_other_shapes_and_types_with_its_own_errors(dtype: Any, ndim: int) -> None:
    pcm = np.zeros((4,) * ndim, dtype=dtype) if ndim else np.array(0, dtype=dtype)
    out = OutboundAudio()
    try:
        chunks = out.push(pcm)
    except (TypeError, ValueError):
        return
    assert np.dtype(dtype).kind == "f" and ndim == 1 and chunks == []


# ------------------------------------------------------------------ text: the normaliser and word limits


_WS = st.sampled_from([" ", "\n", "\t", "\r\n", "\u00a0", "\u3000", "\u2028", "\x1c", "  "])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(max_size=12), min_size=1, max_size=6), st.data())
def test_normalize_text_cut_at_whitespace_equals_whole(parts: list[str], data: st.DataObject) -> None:
    """What ScriptCursor relies on: normalising pieces split at whitespace, then joining them
    with one space, is normalising the whole (NFKC never composes across whitespace)."""
    seps = [data.draw(_WS) for _ in parts[1:]]
    whole = parts[0] + "".join(sep + part for sep, part in zip(seps, parts[1:], strict=True))
    joined = " ".join(normalize_text(p) for p in parts)
    assert normalize_text(whole) == normalize_text(joined)


def _turns(max_word_chars: int = 16) -> TurnQueue:
    """A call's turn queue (where every text limit is checked), without a call around it."""
    base = Settings()
    limits = replace(base.calls, max_word_chars=max_word_chars, max_turn_chars=10_000, max_queued_turns=10)
    return TurnQueue(CALL, limits, Metrics(), lambda event: None, logging.LoggerAdapter(logging.getLogger("test")))


def _accepted(run: Any) -> bool:
    try:
        run()
    except TurnRejected as exc:
        assert exc.status == 400 and "limit is 16" in str(exc)
        return False
    return True


_TEXT = st.text(alphabet=st.sampled_from(list("abcxyz \n\t\u00a0\u3000")) | st.characters(), max_size=120)


@settings(max_examples=150, deadline=None)
@given(_TEXT, st.data())
def test_the_word_limit_is_the_same_whole_or_streamed_in_any_chunks(text: str, data: st.DataObject) -> None:
    """A word may be split across an LLM's chunks: the open word carries over, so a text is
    refused (400) streamed exactly when it is refused whole, and accepted text arrives intact."""
    def whole_turn() -> None:
        turns = _turns()
        turns.check_text(text)
        turns.add(text, close=True, interrupt=False, source="api")

    whole = _accepted(whole_turn)
    turns = _turns()
    turn = turns.add(None, close=False, interrupt=False, source="stream")
    streamed = all(_accepted(lambda a=a, b=b: turns.push_text(turn, text[a:b])) for a, b in splits(data, len(text)))
    assert streamed == whole
    if whole:
        parts = [turn.text_parts.get_nowait() for _ in range(turn.text_parts.qsize())]
        assert "".join(p for p in parts if p is not None) == text  # nothing lost or reordered


_URL_TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "-_.~%", min_size=6, max_size=40)


@FAST
@given(_URL_TOKEN, _URL_TOKEN, st.sampled_from(["/calls", "/ws/stream_tts", "/calls/CA1/text"]))
def test_redaction_never_lets_a_url_token_through(api_token: str, stream_token: str, route: str) -> None:
    lines = [
        f'127.0.0.1 "GET {route}?token={api_token} HTTP/1.1" 200',
        f'127.0.0.1 "GET {route}?a=1&token={api_token}&b=2 HTTP/1.1" 401',
        f'127.0.0.1 "GET /twilio/stream/{stream_token} HTTP/1.1" 101',
        f"rejected GET /twilio/stream/{stream_token}?x=1",
    ]
    for line in lines:
        out = redact_url(line)
        assert "[redacted]" in out
        assert f"token={api_token}" not in out and f"/stream/{stream_token}" not in out
        assert redact_url(out) == out

