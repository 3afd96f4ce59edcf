"""The call simulator against a small fake callbridge over real loopback sockets.

The fake service below checks both signatures, answers TwiML, and speaks a known mu-law
pattern (never silence) as media + one mark per chunk, so every count the simulator reports
can be checked exactly, without timing assertions.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile as sf
from aiohttp import web
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

from callbridge.sim import (
    CallReport,
    FakeTwilioRest,
    PlayoutQueue,
    SimConfig,
    SimulatorError,
    format_report,
    main_simulate,
    run_simulation,
    simulate_call,
    ulaw_decode,
    validate_service_message,
)

AUTH_TOKEN = "test-auth-token"
API_TOKEN = "test-api-token"
ACCOUNT_SID = "AC" + "ab" * 16
PUBLIC = "https://bridge.example.com"
TONE = bytes(0x20 + (i % 32) for i in range(160))  # 20 ms of loud mu-law, no silence code


# ------------------------------------------------------------------------- the fake service


@dataclass
class Script:
    """How the fake service behaves."""

    chunks_per_turn: int = 5
    lead_chunks: int = 3  # sent at once; the rest paced at 20 ms
    greeting: bool = False  # speak turn "g" right after start when the webhook asks for it
    misbehave: bool = False  # send one of each kind of bad message before the first turn
    clear_after_echoes: int | None = None  # send clear once this many of a turn's marks have echoed
    barge_in: bool = False  # send clear when the caller gets loud
    hang_up_rest_url: str | None = None  # hang up through Twilio's REST API after the first turn
    reject: bool = False
    unconfigured: bool = False  # answer <Say>…<Hangup/> as callbridge does for an unknown voice


@dataclass
class FakeCall:
    call_sid: str
    greeting: str = ""
    stream_sid: str | None = None
    start: dict[str, Any] | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    marks_sent: list[str] = field(default_factory=list)
    echoes: list[str] = field(default_factory=list)
    dtmf: list[str] = field(default_factory=list)
    text_chunks: list[str] = field(default_factory=list)
    turns: asyncio.Queue[tuple[str, str]] = field(default_factory=asyncio.Queue)
    ws: web.WebSocketResponse | None = None
    text_ws: web.WebSocketResponse | None = None
    interrupted: bool = False
    got_stop: bool = False
    closed: bool = False
    # Set on every echo and at close: the fake's waits are on these, never on a clock.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    rest_answers: list[tuple[int, Any]] = field(default_factory=list)


    async def until(self, ready: Callable[[], bool], timeout_s: float = 60.0) -> None:
        """Wait for ``ready`` on the call's echoes and close (bounded: only a hang fails)."""
        async with asyncio.timeout(timeout_s):
            while not ready():
                self.changed.clear()
                await self.changed.wait()


class FakeService:
    """A tiny callbridge: webhook, media stream, POST turns and the text socket."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls: dict[str, FakeCall] = {}
        self.tokens: dict[str, str] = {}
        self.webhook_forms: list[dict[str, str]] = []
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.side_tasks: list[asyncio.Task[None]] = []
        self.base_url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/twilio/voice", self.voice)
        app.router.add_get("/twilio/stream/{token}", self.stream)
        app.router.add_post("/calls/{sid}/turns", self.post_turn)
        app.router.add_get("/calls/{sid}/text", self.text_socket)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.base_url

    async def stop(self) -> None:
        assert self._runner is not None
        await asyncio.gather(*self.side_tasks)
        await self._runner.cleanup()

    def only_call(self) -> FakeCall:
        assert len(self.calls) == 1
        return next(iter(self.calls.values()))

    async def voice(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        signed_url = PUBLIC + request.raw_path  # the public URL plus the query string as sent
        if not RequestValidator(AUTH_TOKEN).validate(signed_url, form, request.headers.get("X-Twilio-Signature", "")):
            return web.Response(status=403, text="bad signature")
        self.webhook_forms.append(form)
        if self.script.reject:
            return web.Response(text="<Response><Reject/></Response>", content_type="text/xml")
        if self.script.unconfigured:
            body = "<Response><Say>Sorry, this line is not configured correctly.</Say><Hangup/></Response>"
            return web.Response(text=body, content_type="text/xml")
        token = f"tok{next(self._ids)}"
        self.tokens[token] = form["CallSid"]
        self.calls[form["CallSid"]] = FakeCall(form["CallSid"], greeting=request.query.get("greeting", ""))
        answer = VoiceResponse()
        stream = answer.connect().stream(url=f"wss://bridge.example.com/twilio/stream/{token}")
        stream.parameter(name="token", value=token)
        stream.parameter(name="voice", value=request.query.get("voice", "default"))
        return web.Response(text=str(answer), content_type="text/xml")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        url = f"wss://bridge.example.com/twilio/stream/{token}"
        if not RequestValidator(AUTH_TOKEN).validate(url, {}, request.headers.get("x-twilio-signature", "")):
            return web.Response(status=403)
        call = self.calls[self.tokens.pop(token)]
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        call.ws = ws
        speaker: asyncio.Task[None] | None = None
        async for msg in ws:
            data = json.loads(msg.data)
            call.received.append(data)
            event = data["event"]
            if event == "start":
                call.start, call.stream_sid = data, data["streamSid"]
                speaker = asyncio.create_task(self.speaker(call))
            elif event == "mark":
                call.echoes.append(data["mark"]["name"])
                call.changed.set()
            elif event == "dtmf":
                call.dtmf.append(data["dtmf"]["digit"])
                await self.emit(call, {"event": "dtmf", "digit": data["dtmf"]["digit"]})
            elif event == "stop":
                call.got_stop = True
            elif event == "media" and self.script.barge_in and not call.interrupted:
                pcm = ulaw_decode(base64.b64decode(data["media"]["payload"])).astype(np.float64)
                if np.sqrt(np.mean(pcm**2)) > 1000:
                    call.interrupted = True
                    await ws.send_json({"event": "clear", "streamSid": call.stream_sid})
        call.closed = True
        call.changed.set()
        if speaker is not None:
            speaker.cancel()
        await self.emit(call, {"event": "call_ended"})
        if call.text_ws is not None:
            await call.text_ws.close()
        return ws

    async def emit(self, call: FakeCall, event: dict[str, Any]) -> None:
        if call.text_ws is not None and not call.text_ws.closed:
            await call.text_ws.send_json(event)

    async def speaker(self, call: FakeCall) -> None:
        if self.script.greeting and call.greeting:
            await self.speak(call, "g")
        while True:
            turn_id, _text = await call.turns.get()
            await self.speak(call, turn_id)
            if self.script.hang_up_rest_url:
                # Its own task: the stream closing (which the hang-up causes) cancels the speaker.
                self.side_tasks.append(asyncio.create_task(self.hang_up(call, self.script.hang_up_rest_url)))
                return

    async def speak(self, call: FakeCall, turn_id: str) -> None:
        ws, sid = call.ws, call.stream_sid
        assert ws is not None
        call.interrupted = False
        await self.emit(call, {"event": "turn_started", "turn_id": turn_id})
        if self.script.misbehave:
            self.script.misbehave = False
            await ws.send_bytes(TONE)  # 31950
            await ws.send_str("{not json")  # 31951
            await ws.send_json({"event": "hello", "streamSid": sid})  # 31951 unknown event
            await ws.send_json({"event": "mark", "streamSid": sid, "mark": {}})  # 31951 no name
            await ws.send_json({"event": "clear", "streamSid": "MZ" + "0" * 32})  # 31951 wrong sid
            payload = base64.b64encode(TONE).decode()
            await ws.send_json({"event": "media", "streamSid": sid, "media": {"payload": payload, "track": "outbound"}})
        names: list[str] = []
        for i in range(self.script.chunks_per_turn):
            if i >= self.script.lead_chunks:
                await asyncio.sleep(0.02)
            if call.interrupted:
                break
            await ws.send_json({"event": "media", "streamSid": sid, "media": {"payload": base64.b64encode(TONE).decode()}})
            name = f"{turn_id}-{i}"
            names.append(name)
            call.marks_sent.append(name)
            await ws.send_json({"event": "mark", "streamSid": sid, "mark": {"name": name}})
            if i == 0:
                await self.emit(call, {"event": "first_audio", "turn_id": turn_id})
        if self.script.clear_after_echoes is not None:
            await call.until(lambda: sum(n in call.echoes for n in names) >= self.script.clear_after_echoes
                             or call.closed)
            await ws.send_json({"event": "clear", "streamSid": sid})
        # Until the marks come back (the audio was played, or cleared) or the caller hung up.
        await call.until(lambda: set(names) <= set(call.echoes) or call.closed)
        heard = [n for n in names if n in call.echoes]
        await self.emit(call, {"event": "turn_done", "turn_id": turn_id, "interrupted": call.interrupted,
                               "heard": heard, "state": "interrupted" if call.interrupted else "done"})

    async def hang_up(self, call: FakeCall, rest_url: str) -> None:
        """Twilio's REST hang-up, twice: the second must say the call is gone (20404)."""
        url = f"{rest_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{call.call_sid}.json"
        headers = {"Authorization": aiohttp.encode_basic_auth(ACCOUNT_SID, AUTH_TOKEN)}
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                async with http.post(url, data={"Status": "completed"}, headers=headers) as resp:
                    call.rest_answers.append((resp.status, await resp.json()))

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {API_TOKEN}"

    async def post_turn(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        call = self.calls.get(request.match_info["sid"])
        if call is None:
            return web.json_response({"error": "no such call"}, status=404)
        body = await request.json()
        turn_id = f"t{next(self._ids)}"
        call.turns.put_nowait((turn_id, body["text"]))
        return web.json_response({"turn_id": turn_id}, status=202)

    async def text_socket(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401)
        call = self.calls.get(request.match_info["sid"])
        if call is None or call.ws is None:
            return web.Response(status=404)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        call.text_ws = ws
        turn_id: str | None = None
        parts: list[str] = []
        async for msg in ws:
            data = json.loads(msg.data)
            if data["type"] == "text":
                call.text_chunks.append(data["text"])
                if turn_id is None:
                    turn_id = f"s{next(self._ids)}"
                    await ws.send_json({"event": "turn_queued", "turn_id": turn_id})
                parts.append(data["text"])
            elif data["type"] == "end_turn" and turn_id is not None:
                call.turns.put_nowait((turn_id, "".join(parts)))
                turn_id, parts = None, []
        return ws


@pytest.fixture
async def start_fake():  # type: ignore[no-untyped-def]
    started: list[FakeService] = []

    async def start(script: Script | None = None) -> FakeService:
        service = FakeService(script or Script())
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        await service.stop()


def sim_config(base_url: str, **overrides: Any) -> SimConfig:
    settings: dict[str, Any] = dict(
        base_url=base_url, public_base_url=PUBLIC, twilio_auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID,
        api_token=API_TOKEN, quiet_s=0.2, linger_s=0.05, max_call_s=10.0, turn_timeout_s=5.0,
    )
    settings.update(overrides)
    return SimConfig(**settings)


def heard_audio(path: Path) -> np.ndarray:
    pcm, rate = sf.read(str(path), dtype="int16")
    assert rate == 8000
    return pcm


def assert_twilio_shaped(call: FakeCall, report: CallReport) -> None:
    """What Twilio's side sent: connected, start, then numbered messages; media counting up."""
    first, start = call.received[0], call.received[1]
    assert first == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert start["event"] == "start" and start["sequenceNumber"] == "1"
    assert start["streamSid"] == start["start"]["streamSid"] == report.stream_sid
    assert start["start"]["callSid"] == report.call_sid and start["start"]["accountSid"] == ACCOUNT_SID
    assert start["start"]["tracks"] == ["inbound"]
    assert start["start"]["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    assert [m["sequenceNumber"] for m in call.received[1:]] == [str(i) for i in range(1, len(call.received))]
    media = [m["media"] for m in call.received if m["event"] == "media"]
    assert [m["chunk"] for m in media] == [str(i) for i in range(1, len(media) + 1)]
    assert [m["timestamp"] for m in media] == [str(20 * i) for i in range(len(media))]
    assert all(len(base64.b64decode(m["payload"])) == 160 and m["track"] == "inbound" for m in media)


# ----------------------------------------------------------------------------------- tests


def test_playout_queue_echoes_marks_as_the_cursor_passes_and_clear_flushes_them() -> None:
    queue = PlayoutQueue()
    assert queue.push_mark("empty") == ["empty"]  # nothing queued: echoed at once
    assert queue.push_media(b"\x01" * 160, None)
    assert queue.push_mark("a") == []
    assert queue.push_media(b"\x02" * 80, None)
    assert queue.push_mark("b") == []
    assert queue.push_media(b"\x03" * 800, None)
    assert queue.push_mark("c") == []
    assert queue.advance(159) == []
    assert queue.advance(240) == ["a", "b"]
    assert queue.samples_to_next_mark() == 800
    assert queue.advance(400) == []
    assert queue.clear() == ["c"]
    assert queue.queued == 0 and queue.cleared_bytes == 640
    assert queue.advance(500) == []
    assert bytes(queue.out) == b"\x01" * 160 + b"\x02" * 80 + b"\x03" * 160 + b"\xff" * 100


def test_playout_queue_records_a_gap_only_when_audio_resumes_after_running_dry() -> None:
    queue = PlayoutQueue(cap_bytes=1000)
    queue.advance(50)  # silence before any audio is no gap
    queue.push_media(b"\x01" * 100, None)
    queue.advance(200)  # dry from 150
    queue.push_media(b"\x01" * 100, None)
    assert queue.gaps == [(150, 200)]
    assert not queue.push_media(b"\x01" * 1000, None)  # over the cap: discarded like Twilio
    assert queue.discarded_bytes == 1000


@pytest.mark.parametrize(
    ("message", "code_and_words"),
    [
        ("{oops", "31951 invalid JSON"),
        ('{"event": "hello", "streamSid": "MZ1"}', "31951 unknown event"),
        ('{"event": "mark", "streamSid": "MZ1", "mark": {}}', "31951 mark without mark.name"),
        ('{"event": "mark", "streamSid": "MZ1"}', "31951 mark without mark.name"),
        ('{"event": "clear", "streamSid": "MZ2"}', "31951 clear: wrong streamSid"),
        ('{"event": "clear", "streamSid": "MZ1", "x": 1}', "31951 clear: extra field"),
        ('{"event": "media", "streamSid": "MZ1", "media": {"payload": "***"}}', "31951 media: payload is not base64"),
        ('{"event": "media", "media": {"payload": ""}}', "31951 media: missing field"),
    ],
)
def test_invalid_service_messages_get_twilio_code_31951(message: str, code_and_words: str) -> None:
    parsed, problem = validate_service_message(message, "MZ1")
    assert parsed is None and problem is not None and problem.startswith(code_and_words)


def test_base_url_must_be_loopback_unless_allowed() -> None:
    with pytest.raises(SimulatorError, match="loopback"):
        SimConfig(base_url="http://10.1.2.3:8080")
    assert SimConfig(base_url="http://10.1.2.3:8080", allow_remote=True).base_url
    for url in ("http://127.0.0.1:1", "http://127.8.9.10:1", "http://[::1]:1", "http://localhost:1"):
        assert SimConfig(base_url=url).public_base == url


async def test_posted_turns_on_two_calls_count_chunks_marks_ttfa_and_write_wavs(start_fake, tmp_path: Path) -> None:
    fake = await start_fake(Script(chunks_per_turn=5))
    cfg = sim_config(fake.base_url, texts=["Hello there.", "Second turn."], calls=2,
                     webhook_query={"voice": "default", "note": "a b&c"},
                     out_wav=tmp_path / "heard.wav", report_path=tmp_path / "report.json")
    reports = await run_simulation(cfg)

    assert len({r.call_sid for r in reports}) == 2
    assert all(r.call_sid.startswith("CA") and len(r.call_sid) == 34 for r in reports)
    for report in reports:
        call = fake.calls[report.call_sid]
        assert report.error is None and report.protocol_errors == [] and not report.rejected
        assert report.ended_by == "simulator" and call.got_stop
        assert report.chunks == 10 and report.marks_sent == 10 and report.marks_echoed == 10
        assert call.echoes == call.marks_sent  # every mark came back, in order
        assert report.lost_or_reordered == 0 and report.marks_unechoed == 0
        assert report.custom_parameters == {"token": report.custom_parameters["token"], "voice": "default"}
        ttfa, heard = report.ttfa_ms["per_turn"], report.ttfa_heard_ms["per_turn"]
        assert len(ttfa) == 2 and all(v is not None and v >= 0 for v in ttfa)
        assert all(h >= t for h, t in zip(heard, ttfa))
        assert [t["turn_id"] for t in report.turns] == [t["turn_id"] for t in report.turns if t["turn_id"]]
        assert [t["chunks"] for t in report.turns] == [5, 5]
        assert report.audio_ms_played == 200.0 and report.audio_ms_cleared == 0
        assert_twilio_shaped(call, report)

        pcm = heard_audio(Path(report.wav_path or ""))
        assert pcm.size == report.played_samples
        assert np.array_equal(pcm[pcm != 0], np.tile(ulaw_decode(TONE), 10))  # all of it, in order

    assert {Path(r.wav_path or "").name for r in reports} == {"heard-1.wav", "heard-2.wav"}
    doc = json.loads((tmp_path / "report.json").read_text())
    assert len(doc["calls"]) == 2 and doc["summary"]["chunks"] == 20 and doc["summary"]["ok"] == 2
    for key in ("ttfa_ms", "ttfa_heard_ms", "chunks", "underruns", "gaps_ms", "lost_or_reordered", "marks_sent",
                "marks_echoed", "barge_in_to_clear_ms", "protocol_errors", "rejected", "pacing_jitter_ms",
                "max_queue_ms", "turns"):
        assert key in doc["calls"][0]
    form = fake.webhook_forms[0]
    assert form["CallStatus"] == "ringing" and form["Direction"] == "inbound" and form["ApiVersion"] == "2010-04-01"


async def test_streamed_turn_waits_for_the_greeting_and_relays_dtmf(start_fake) -> None:
    fake = await start_fake(Script(greeting=True, chunks_per_turn=4))
    text = "Streaming words one by one."
    cfg = sim_config(fake.base_url, texts=[text], stream_text=True, word_delay_s=0.005,
                     webhook_query={"greeting": "Hi there"}, dtmf=[(0.05, "7")])
    report = await simulate_call(cfg, 0)
    call = fake.only_call()

    assert report.error is None and report.protocol_errors == []
    greeting, turn = report.turns
    assert greeting["kind"] == "greeting" and greeting["turn_id"] == "g" and greeting["chunks"] == 4
    assert turn["kind"] == "text" and turn["turn_id"].startswith("s") and turn["chunks"] == 4
    assert turn["interrupted"] is False and turn["state"] == "done" and len(turn["heard"]) == 4
    assert turn["service_first_audio_ms"] is not None
    assert "".join(call.text_chunks) == text and len(call.text_chunks) == 5  # word by word
    assert call.dtmf == ["7"] and report.dtmf_sent == ["7"] and report.dtmf_events == ["7"]
    assert report.ttfa_ms["n"] == 1  # the greeting is a turn, not a text turn
    assert report.marks_echoed == report.marks_sent == 8 and report.lost_or_reordered == 0
    assert report.call_ended_event


async def test_misbehaving_service_is_reported_with_twilio_codes_and_network_drop_sends_no_stop(start_fake) -> None:
    fake = await start_fake(Script(misbehave=True, chunks_per_turn=2))
    report = await simulate_call(sim_config(fake.base_url, texts=["Hi."], drop_network=True), 0)
    call = fake.only_call()

    codes = [e.split(" ", 1)[0] for e in report.protocol_errors]
    assert codes == ["31950"] + ["31951"] * 5
    text = " | ".join(report.protocol_errors)
    for words in ("binary frame", "invalid JSON", "unknown event 'hello'", "mark without mark.name",
                  "wrong streamSid", "extra field(s) ['track']"):
        assert words in text
    assert report.chunks == 2 and report.marks_echoed == 2  # the bad messages were not acted on
    assert report.ended_by == "network_drop" and not report.ok
    await call.until(lambda: call.closed)  # the fake notices the dropped connection on its own schedule
    assert not call.got_stop


async def test_clear_empties_the_queue_and_echoes_every_pending_mark(start_fake, tmp_path: Path) -> None:
    fake = await start_fake(Script(chunks_per_turn=50, lead_chunks=50, clear_after_echoes=1))
    report = await simulate_call(sim_config(fake.base_url, texts=["A long answer."], out_wav=tmp_path / "h.wav"), 0)
    call = fake.only_call()

    assert report.clears == 1 and report.marks_cleared > 0
    assert report.marks_sent == report.marks_echoed == 50 and call.echoes == call.marks_sent
    assert report.audio_ms_cleared > 0
    assert report.audio_ms_played + report.audio_ms_cleared == report.audio_ms_received == 1000.0
    assert report.audio_ms_cleared <= report.max_queue_ms <= 1000.0  # what was cleared had been queued
    assert report.lost_or_reordered == 0
    pcm = heard_audio(tmp_path / "h.wav")
    assert np.count_nonzero(pcm) == round(report.audio_ms_played * 8)
    assert report.turns[0]["cleared"] is True


async def test_barge_in_speech_makes_the_service_clear_and_the_delay_is_measured(start_fake) -> None:
    fake = await start_fake(Script(chunks_per_turn=150, lead_chunks=150, barge_in=True))
    cfg = sim_config(fake.base_url, texts=["Talk over me."], stream_text=True, barge_in_at_s=0.3, speech_s=0.4)
    report = await simulate_call(cfg, 0)

    assert report.barge_in_to_clear_ms is not None and report.barge_in_to_clear_ms >= 0
    assert report.clears == 1 and report.audio_ms_cleared > 0
    assert report.marks_echoed == report.marks_sent and report.lost_or_reordered == 0
    assert report.turns[0]["interrupted"] is True
    assert report.protocol_errors == []


async def test_rest_hang_up_answers_200_then_404_and_ends_the_stream(start_fake) -> None:
    rest = FakeTwilioRest(ACCOUNT_SID, AUTH_TOKEN)
    rest_url = await rest.start()
    try:
        fake = await start_fake(Script(chunks_per_turn=2, hang_up_rest_url=rest_url))
        cfg = sim_config(fake.base_url, texts=["Goodbye.", "Never spoken."], rest_server=rest)
        report = await simulate_call(cfg, 0)
        call = fake.only_call()
        await asyncio.gather(*fake.side_tasks)

        assert [status for status, _ in call.rest_answers] == [200, 404]
        assert call.rest_answers[0][1]["status"] == "completed"
        assert call.rest_answers[1][1]["code"] == 20404
        assert report.ended_by == "rest" and call.got_stop
        assert report.ttfa_ms["n"] == 1  # the second turn was never sent
        assert rest.live_calls == frozenset()

        url = f"{rest_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/CA{'0' * 32}.json"
        async with aiohttp.ClientSession() as http:
            wrong = {"Authorization": aiohttp.encode_basic_auth(ACCOUNT_SID, "wrong")}
            async with http.post(url, data={"Status": "completed"}, headers=wrong) as r:
                assert r.status == 401 and (await r.json())["code"] == 20003
            right = {"Authorization": aiohttp.encode_basic_auth(ACCOUNT_SID, AUTH_TOKEN)}
            async with http.post(url, data={"Status": "completed"}, headers=right) as r:
                assert r.status == 404 and (await r.json())["code"] == 20404
    finally:
        await rest.stop()


async def test_full_service_is_reported_rejected_and_a_bad_signature_as_an_error(start_fake) -> None:
    full = await start_fake(Script(reject=True))
    report = await simulate_call(sim_config(full.base_url, texts=["Hi."]), 0)
    assert report.rejected and report.error is None and report.chunks == 0

    fake = await start_fake()
    report = await simulate_call(sim_config(fake.base_url, texts=["Hi."], twilio_auth_token="wrong"), 0)
    assert not report.rejected and report.error is not None and "403" in report.error
    assert fake.calls == {}


async def test_cli_places_a_call_and_writes_the_report(start_fake, tmp_path: Path) -> None:
    fake = await start_fake(Script(chunks_per_turn=3))
    args = ["simulate", "--base-url", fake.base_url, "--public-base-url", PUBLIC, "--auth-token", AUTH_TOKEN,
            "--api-token", API_TOKEN, "--account-sid", ACCOUNT_SID, "--text", "Hello.",
            "--out", str(tmp_path / "heard.wav"), "--report", str(tmp_path / "report.json")]
    # The CLI runs its own event loop, so it runs on a thread while the fake serves here.
    assert await asyncio.to_thread(main_simulate, args) == 0
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["calls"][0]["chunks"] == 3 and (tmp_path / "heard.wav").is_file()
    assert main_simulate(["--base-url", "http://192.0.2.1:80", "--text", "x"]) == 2


# ------------------------------------------------------------------ the newcomer's path (issue 11)


async def test_posted_turns_report_state_and_heard_words_from_the_text_socket(start_fake) -> None:
    """In HTTP mode the report's turns had no state and no heard words: the simulator now listens
    on the call's text socket for turn_done, as it does when streaming."""
    fake = await start_fake(Script(chunks_per_turn=3))
    report = await simulate_call(sim_config(fake.base_url, texts=["One.", "Two."]), 0)
    call = fake.only_call()
    assert report.error is None and report.clean
    assert [t["state"] for t in report.turns] == ["done", "done"]
    assert [t["heard"] for t in report.turns] == [call.marks_sent[:3], call.marks_sent[3:]]
    ids = [t["turn_id"] for t in report.turns]
    assert len(set(ids)) == 2 and all(i.startswith("t") for i in ids)


async def test_hold_keeps_the_call_open_for_a_turn_sent_by_hand(start_fake) -> None:
    fake = await start_fake(Script(chunks_per_turn=4))
    announced: list[str] = []
    by_hand: list[asyncio.Task[None]] = []

    async def curl(call_sid: str) -> None:  # what a developer does with the printed CallSid
        async with aiohttp.ClientSession() as http, http.post(
            f"{fake.base_url}/calls/{call_sid}/turns", json={"text": "By hand."},
            headers={"Authorization": f"Bearer {API_TOKEN}"},
        ) as resp:
            assert resp.status == 202

    def announce(line: str) -> None:
        announced.append(line)
        by_hand.append(asyncio.get_running_loop().create_task(curl(line.split()[1])))

    cfg = sim_config(fake.base_url, texts=["Scripted."], hold_s=2.0, announce=announce)
    report = await simulate_call(cfg, 0)
    await asyncio.gather(*by_hand)
    assert len(announced) == 1 and report.call_sid in announced[0] and "/turns" in announced[0]
    assert report.chunks == 8 and report.marks_echoed == 8  # the scripted turn and the one by hand
    assert report.ended_by == "simulator" and report.error is None
    with pytest.raises(SimulatorError, match="hold_s"):
        sim_config(fake.base_url, hold_s=10.0, max_call_s=10.0)


async def test_caller_wav_without_barge_in_is_a_reply_after_the_bot(start_fake, tmp_path: Path) -> None:
    """--caller-wav alone used to start at 0 s, over the greeting: a barge-in at once. Now the
    caller's audio starts once the bot's last turn has played (every mark echoed)."""
    fake = await start_fake(Script(greeting=True, chunks_per_turn=30, lead_chunks=30))
    wav = tmp_path / "caller.wav"
    t = np.arange(8000) / 8000
    sf.write(str(wav), (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 8000)
    cfg = sim_config(fake.base_url, texts=["Please answer after me."], caller_wav=wav,
                     webhook_query={"greeting": "Hi"})
    report = await simulate_call(cfg, 0)
    call = fake.only_call()

    def loud(m: dict[str, Any]) -> bool:
        pcm = ulaw_decode(base64.b64decode(m["media"]["payload"])).astype(np.float64)
        return m["event"] == "media" and float(np.sqrt(np.mean(pcm**2))) > 1000

    media = [i for i, m in enumerate(call.received) if m["event"] == "media"]
    loud_at = [i for i in media if loud(call.received[i])]
    last_echo = max(i for i, m in enumerate(call.received) if m["event"] == "mark")
    assert len(loud_at) >= 45  # the caller's second of audio went out (50 chunks, fades aside)
    assert loud_at[0] > last_echo  # after the last of the bot's audio was played
    assert report.error is None and report.audio_ms_cleared == 0 and len(call.echoes) == 60


async def test_summary_line_says_a_turn_was_interrupted(start_fake) -> None:
    fake = await start_fake(Script(chunks_per_turn=150, lead_chunks=150, barge_in=True))
    cfg = sim_config(fake.base_url, texts=["Talk over me."], barge_in_at_s=0.3, speech_s=0.4)
    report = await simulate_call(cfg, 0)
    assert report.interrupted_turns == 1
    assert "(1 interrupted)" in format_report(report)


async def test_unknown_voice_is_not_configured_not_full_and_a_dead_service_is_said_plainly(start_fake) -> None:
    fake = await start_fake(Script(unconfigured=True))
    report = await simulate_call(sim_config(fake.base_url, texts=["Hi."], webhook_query={"voice": "nobody"}), 0)
    assert report.rejected and report.refusal == "not_configured"
    line = format_report(report)
    assert "not configured" in line and "full" not in line and "not configured correctly" in line

    busy = await start_fake(Script(reject=True))
    report = await simulate_call(sim_config(busy.base_url, texts=["Hi."]), 0)
    assert report.refusal == "busy" and "busy" in format_report(report)

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    report = await simulate_call(sim_config(dead, texts=["Hi."]), 0)
    line = format_report(report)
    assert f"failed: no service answers at {dead}" in line and "callbridge serve" in line
    assert "\n" not in line and "None" not in line


def test_a_call_with_underruns_is_not_called_clean() -> None:
    report = CallReport(call_sid="CA" + "0" * 32, index=0, underruns=2, stream_sid="MZ1")
    assert report.ok and not report.clean
    assert "NOT clean: underruns" in format_report(report)
    assert "clean;" in format_report(CallReport(call_sid="CA" + "0" * 32, index=0, stream_sid="MZ1"))


async def test_cli_signs_over_callbridge_public_base_url_as_the_service_checks(
    start_fake, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's simulator command right after the set-up steps: the service checks signatures
    against CALLBRIDGE_PUBLIC_BASE_URL, so the simulator must sign over it (it signed over
    --base-url and got 403)."""
    fake = await start_fake(Script(chunks_per_turn=2))
    monkeypatch.setenv("CALLBRIDGE_PUBLIC_BASE_URL", PUBLIC)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
    monkeypatch.setenv("CALLBRIDGE_API_TOKEN", API_TOKEN)
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
    args = ["--base-url", fake.base_url, "--text", "Hello."]
    assert await asyncio.to_thread(main_simulate, args) == 0
    out = capsys.readouterr().out
    assert "1 clean" in out or "1 with underruns" in out


def test_app_server_needs_the_secret(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from callbridge.sim import main_simulate

    monkeypatch.delenv("CALLBRIDGE_APP_SECRET", raising=False)
    assert main_simulate(["--base-url", "http://127.0.0.1:9", "--app-server", "9"]) == 2
    assert "CALLBRIDGE_APP_SECRET" in capsys.readouterr().err
