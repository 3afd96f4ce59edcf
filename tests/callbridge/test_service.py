"""The whole service over real loopback sockets: tiny model, TTS worker thread, simulated Twilio."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from callbridge.config import Settings
from callbridge.sim import FakeTwilioRest, SimConfig, run_simulation, simulate_call
from callbridge.sim.ports import free_tcp_port
from callbridge.transports.twilio import compute_signature
from callbridge.web.app import build_app
from callbridge.web.services import SERVICES
from dia2 import Dia2

AUTH = "test-twilio-auth-token-0123456789"
API = "test-api-token-abcdef"
ACCOUNT = "AC" + "0" * 32
PUBLIC = "https://bridge.test"

WAIT_S = 60.0  # bound on every wait for an event (not a timing assertion: only a hang fails it)

pytestmark = pytest.mark.timeout(240)


async def until(ready: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Wait for a condition on the service's state (bounded: a hang fails the test, slowness does not)."""
    async with asyncio.timeout(timeout_s):
        while not ready():
            await asyncio.sleep(0.02)
    assert ready(), what


@dataclass
class Service:
    base: str
    app: web.Application
    rest: FakeTwilioRest

    def sim(self, **kw: object) -> SimConfig:
        defaults: dict[str, object] = dict(
            base_url=self.base,
            public_base_url=PUBLIC,
            twilio_auth_token=AUTH,
            account_sid=ACCOUNT,
            api_token=API,
            max_call_s=60.0,
            rest_server=self.rest,
        )
        defaults.update(kw)
        return SimConfig(**defaults)  # type: ignore[arg-type]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API}"}


def settings_for(port: int, tmp: Path, rest_url: str, **sections: dict[str, object]) -> Settings:
    base = Settings().with_(
        server={"host": "127.0.0.1", "port": port, "public_base_url": PUBLIC, "shutdown_timeout_s": 1.0},
        auth={"enabled": True, "api_token": API},
        twilio={"auth_token": AUTH, "account_sid": ACCOUNT, "api_base_url": rest_url, "start_timeout_s": 2.0},
        voices={"dir": str(tmp / "voices")},
        tts={"max_streams": 10},
        calls={"max_calls": 10, "hangup_drain_timeout_s": 1.0},
    )
    return base.with_(**sections) if sections else base


@contextlib.asynccontextmanager
async def running(tiny_runtime: Dia2, tmp: Path, **sections: dict[str, object]) -> AsyncIterator[Service]:
    rest = FakeTwilioRest(account_sid=ACCOUNT, auth_token=AUTH)
    rest_url = await rest.start()
    port = free_tcp_port()
    app = build_app(settings_for(port, tmp, rest_url, **sections), runtime=tiny_runtime)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield Service(f"http://127.0.0.1:{port}", app, rest)
    finally:
        await runner.cleanup()
        await rest.stop()


@pytest.fixture
async def service(tiny_runtime: Dia2, tmp_path: Path) -> AsyncIterator[Service]:
    async with running(tiny_runtime, tmp_path) as svc:
        yield svc


def clean(report: dict) -> None:
    assert report["error"] is None, report["error"]
    assert report["protocol_errors"] == []
    assert report["lost_or_reordered"] == 0
    assert report["marks_echoed"] == report["marks_sent"] > 0


async def test_a_full_call_greeting_then_two_turns(service: Service, tmp_path: Path) -> None:
    left = asyncio.Event()
    service.app[SERVICES].call_observers.append(lambda call: left.set())
    cfg = service.sim(texts=["Hello there.", "Your order ships today."], webhook_query={"greeting": "Hi, welcome."},
                      out_wav=tmp_path / "heard.wav", report_path=tmp_path / "report.json")
    [report] = [r.to_json() for r in await run_simulation(cfg)]
    clean(report)
    assert report["rejected"] is False
    turns = report["turns"]
    assert len(turns) == 3 and all(t["chunks"] > 0 for t in turns)  # greeting + two turns
    assert all(t["ttfa_ms"] is not None for t in turns[1:])
    assert (tmp_path / "heard.wav").stat().st_size > 44
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["calls"][0]["chunks"] == report["chunks"]
    async with asyncio.timeout(WAIT_S):
        await left.wait()
    assert service.app[SERVICES].calls == {}  # the call is gone after stop


async def test_a_streamed_text_turn_and_its_events(service: Service) -> None:
    cfg = service.sim(texts=["Sure, let me check that for you."], stream_text=True)
    report = (await simulate_call(cfg, 0)).to_json()
    clean(report)
    turn = report["turns"][-1]
    assert turn["chunks"] > 0 and turn["state"] == "done" and turn["interrupted"] is False
    assert turn["heard"] == ["Sure,", "let", "me", "check", "that", "for", "you."]


async def test_barge_in_clears_and_cancels_the_turn(service: Service) -> None:
    text = "This is a long answer that keeps going so that the caller has time to interrupt it."
    cfg = service.sim(texts=[text], stream_text=True, barge_in_at_s=1.0, speech_s=1.5)
    report = (await simulate_call(cfg, 0)).to_json()
    assert report["protocol_errors"] == [] and report["lost_or_reordered"] == 0
    assert report["clears"] >= 1 and report["barge_in_to_clear_ms"] is not None
    turn = report["turns"][-1]
    assert turn["cleared"] and turn["interrupted"] is True
    assert len(turn["heard"]) < len(text.split())  # only what played before the clear


async def test_signatures_are_required_on_webhook_and_upgrade(service: Service) -> None:
    form = {"CallSid": "CA" + "1" * 32, "AccountSid": ACCOUNT, "From": "+1", "To": "+2", "CallStatus": "ringing"}
    url = f"{service.base}/twilio/voice"
    good = compute_signature(AUTH, PUBLIC + "/twilio/voice", form)
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=form) as resp:
            assert resp.status == 403  # missing
        async with http.post(url, data=form, headers={"X-Twilio-Signature": "AAAA" + good[4:]}) as resp:
            assert resp.status == 403  # forged
        signed_over_local = compute_signature(AUTH, url, form)
        async with http.post(url, data=form, headers={"X-Twilio-Signature": signed_over_local}) as resp:
            assert resp.status == 403  # signed for another host: the public URL is what counts
        async with http.post(url, data=form, headers={"X-Twilio-Signature": good}) as resp:
            assert resp.status == 200
            twiml = await resp.text()
        async with http.post(url, data=form, headers={"X-Twilio-Signature": good}) as resp:
            assert resp.status == 403  # a replayed webhook mints no second token
        stream_url = twiml.split('url="')[1].split('"')[0]
        path = stream_url.removeprefix("wss://bridge.test")
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(service.base + path)
        assert err.value.status == 403
        bad = compute_signature(AUTH, "https://bridge.test" + path, {})  # https, not the wss URL
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(service.base + path, headers={"X-Twilio-Signature": bad})
        assert err.value.status == 403
        good_ws = compute_signature(AUTH, stream_url, {})
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(service.base + "/twilio/stream/not-a-token", headers={
                "X-Twilio-Signature": compute_signature(AUTH, "wss://bridge.test/twilio/stream/not-a-token", {})})
        assert err.value.status == 403
        async with http.ws_connect(service.base + path, headers={"X-Twilio-Signature": good_ws}) as ws:
            await ws.close()


async def _open_raw_stream(http: aiohttp.ClientSession, service: Service, call_sid: str) -> aiohttp.ClientWebSocketResponse:
    form = {"CallSid": call_sid, "AccountSid": ACCOUNT, "From": "+1", "To": "+2", "CallStatus": "ringing"}
    sig = compute_signature(AUTH, PUBLIC + "/twilio/voice", form)
    async with http.post(f"{service.base}/twilio/voice", data=form, headers={"X-Twilio-Signature": sig}) as resp:
        twiml = await resp.text()
    stream_url = twiml.split('url="')[1].split('"')[0]
    return await http.ws_connect(
        service.base + stream_url.removeprefix("wss://bridge.test"),
        headers={"X-Twilio-Signature": compute_signature(AUTH, stream_url, {})},
    )


def _start(call_sid: str, stream_sid: str) -> str:
    return json.dumps({
        "event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
        "start": {"accountSid": ACCOUNT, "streamSid": stream_sid, "callSid": call_sid, "tracks": ["inbound"],
                  "customParameters": {}, "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}},
    })


@pytest.mark.parametrize("bad", ["{not json", "x" * 70000, "binary"])
async def test_a_bad_message_ends_that_call_only(service: Service, bad: str) -> None:
    healthy = asyncio.create_task(simulate_call(service.sim(texts=["One moment please, I am checking."]), 0))
    calls = service.app[SERVICES].calls
    await until(lambda: any(c.stats.chunks_sent > 0 for c in calls.values()), "the healthy call is speaking")
    sid = "CA" + "2" * 32
    async with aiohttp.ClientSession() as http:
        ws = await _open_raw_stream(http, service, sid)
        await ws.send_str(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send_str(_start(sid, "MZ" + "2" * 32))
        if bad == "binary":
            await ws.send_bytes(b"\x00\x01")
        else:
            await ws.send_str(bad)
        msg = await ws.receive(timeout=5)
        while msg.type is aiohttp.WSMsgType.TEXT:  # our greeting-less call sends nothing else first
            msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        assert ws.close_code in (1008, 1009)
        await ws.close()
    report = (await healthy).to_json()
    clean(report)
    assert report["turns"][-1]["chunks"] > 0


async def test_ten_simultaneous_calls_lose_nothing(service: Service) -> None:
    # Streamed turns: each simulated caller hangs up on the turn's turn_done event and an empty
    # queue. A POSTed turn ends in the simulator after 0.5 s of silence (it gets no events), a
    # clock that a loaded machine's pause mid-turn can fool (a mark then arrives after the stop).
    cfg = service.sim(texts=["Thanks for calling, goodbye."], calls=10, stream_text=True)
    reports = [r.to_json() for r in await run_simulation(cfg)]
    assert len(reports) == 10
    for report in reports:
        clean(report)
        assert report["chunks"] > 0


async def test_full_service_rejects_the_next_call(tiny_runtime: Dia2, tmp_path: Path) -> None:
    async with running(tiny_runtime, tmp_path, calls={"max_calls": 1}) as svc:
        first = asyncio.create_task(simulate_call(svc.sim(texts=["Please hold the line for a moment."]), 0))
        await until(lambda: svc.app[SERVICES].calls != {}, "the first call holds the only place")
        second = (await simulate_call(svc.sim(texts=["Hi."]), 1)).to_json()
        assert second["rejected"] is True
        clean((await first).to_json())


async def test_hang_up_through_the_api(service: Service) -> None:
    call = asyncio.create_task(simulate_call(service.sim(texts=["Goodbye now, and thank you."], linger_s=30.0), 0))
    calls = service.app[SERVICES].calls
    await until(lambda: any(c.turns.history and c.turns.history[-1].state.value == "done" for c in calls.values()),
                "the call's turn has played")
    [sid] = calls
    async with aiohttp.ClientSession(headers=service.headers) as http, \
            http.post(f"{service.base}/calls/{sid}/hangup") as resp:
        assert resp.status == 202
    report = (await call).to_json()
    assert report["ended_by"] == "rest"
    assert any(r.call_sid == sid for r in service.rest.requests)


async def test_control_api_errors(service: Service) -> None:
    call = asyncio.create_task(simulate_call(service.sim(texts=["Hello."], linger_s=3.0), 0))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{service.base}/calls") as resp:
            assert resp.status == 401
        async with http.get(f"{service.base}/calls", headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        async with http.get(f"{service.base}/calls?token={API}") as resp:
            assert resp.status == 200
        h = service.headers
        async with http.post(f"{service.base}/calls/CAnope/turns", json={"text": "hi"}, headers=h) as resp:
            assert resp.status == 404
        live = service.app[SERVICES].calls
        await until(lambda: any(c.state.value == "active" for c in live.values()), "the call is active")
        async with http.get(f"{service.base}/calls", headers=h) as resp:
            [listed] = (await resp.json())["calls"]
        sid = listed["call_sid"]
        turns = f"{service.base}/calls/{sid}/turns"
        async with http.post(turns, json={"text": "x" * 5000}, headers=h) as resp:
            assert resp.status == 413
        async with http.post(turns, data="not json", headers=h) as resp:
            assert resp.status == 400
        async with http.post(turns, json={"text": ""}, headers=h) as resp:
            assert resp.status == 400
        statuses = []
        for _ in range(12):
            async with http.post(turns, json={"text": "Queued words."}, headers=h) as resp:
                statuses.append(resp.status)
        assert statuses.count(202) >= 8 and statuses[-1] == 429  # bounded queue, defined refusal
        async with http.post(f"{service.base}/calls/{sid}/interrupt", headers=h) as resp:
            assert resp.status == 200
        async with http.get(f"{service.base}/calls/{sid}", headers=h) as resp:
            view = await resp.json()
            assert view["queued_turns"] == []
    report = (await call).to_json()
    assert report["protocol_errors"] == [] and report["lost_or_reordered"] == 0


async def test_health_and_metrics(service: Service) -> None:
    await simulate_call(service.sim(texts=["Hi."]), 0)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{service.base}/healthz") as resp:
            body = await resp.json()
            assert resp.status == 200 and body["status"] == "ok" and body["voices"] == ["default"]
        async with http.get(f"{service.base}/metrics") as resp:
            text = await resp.text()
    assert "callbridge_ttfa_seconds_count" in text
    assert 'callbridge_turns_total{outcome="done"}' in text


async def test_plain_tts_socket(service: Service) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(f"{service.base}/ws/stream_tts")
        async with http.ws_connect(f"{service.base}/ws/stream_tts?token={API}") as ws:
            assert (await ws.receive_json())["event"] == "ready"
            for fmt, width in (("pcm_24k", 2), ("mulaw_8k", 1)):
                await ws.send_json({"type": "tts", "text": "[S1] Hi, my name is Bob.", "format": fmt, "chunk_frames": 2})
                audio, events, last = bytearray(), [], None
                while True:
                    msg = await ws.receive(timeout=30)
                    if msg.type is aiohttp.WSMsgType.BINARY:
                        last = msg.data[0]
                        audio += msg.data[1:]
                    else:
                        event = json.loads(msg.data)
                        events.append(event["event"])
                        if event["event"] in ("done", "error"):
                            break
                assert events[-1] == "done" and "first_audio" in events and "words" in events
                assert last == 1 and len(audio) > 0 and len(audio) % width == 0
            await ws.send_json({"type": "tts", "text": "", "format": "pcm_24k"})
            assert (await ws.receive_json())["event"] == "error"
