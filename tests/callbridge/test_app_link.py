"""The app connection ([app] websocket_url) over loopback: the bridge dials a test app for every
call, signed; the app hears every event and runs the call with the text socket's messages;
an app that cannot be reached or drops is decided (resume, or a message and a hang-up); the
caller's raw audio on subscription, bounded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from callbridge.calls.call import Call
from callbridge.calls.client_outbox import AudioFormat, ClientOutbox
from callbridge.calls.leg import CallerAudio
from callbridge.sim import simulate_call
from callbridge.sim.ports import free_tcp_port
from callbridge.web.app_link import signature_headers, verify_signature
from callbridge.web.services import SERVICES
from dia2 import Dia2

from .app_server import SECRET, AppServer
from .test_service import API, WAIT_S, Service, running

pytestmark = pytest.mark.timeout(240)


def app_section(url: str, **extra: Any) -> dict[str, Any]:
    return {"websocket_url": url, "secret": SECRET, "connect_timeout_s": 2.0, **extra}


def ended_calls(service: Service) -> asyncio.Queue[Call]:
    left: asyncio.Queue[Call] = asyncio.Queue()
    service.app[SERVICES].call_observers.append(left.put_nowait)
    return left


async def test_the_app_hears_of_the_call_and_runs_it(tiny_runtime: Dia2, tmp_path: Path) -> None:
    app = await AppServer().start()
    try:
        async with running(tiny_runtime, tmp_path, app=app_section(app.url)) as service:
            cfg = service.sim(hold_s=40.0, max_call_s=60.0)
            sim = asyncio.create_task(simulate_call(cfg, 0))
            conn = await app.next_connection()
            started = await conn.next_event("call_started")
            assert started["call_sid"] == conn.call_id
            assert (started["carrier"], started["from"], started["to"]) == ("twilio", cfg.from_number, cfg.to_number)
            assert started["voice"] == "default" and isinstance(started["custom"], dict)
            await conn.send({"type": "ping"})
            await conn.next_event("pong")
            await conn.send({"type": "no such thing"})
            error = await conn.next_event("error")
            assert error["status"] == 400 and "unknown message type" in error["message"]
            await conn.send({"type": "turn", "text": "Hello from the app."})
            done = await conn.next_event("turn_done")
            assert done["state"] == "done"
            await conn.send({"type": "hangup"})
            ended = await conn.next_event("call_ended")
            assert ended["reason"] == "hangup: app"
            async with asyncio.timeout(WAIT_S):
                await conn.closed.wait()
            report = (await sim).to_json()
            assert report["chunks"] > 0 and report["ended_by"] == "rest"
            # The simulator's text socket saw the same call: both channels work side by side.
            assert report["service_events"]["turn_done"] >= 1
        assert app.bad_signatures == 0
    finally:
        await app.stop()


async def test_an_app_that_cannot_be_reached_gets_the_caller_a_message_and_a_hang_up(
        tiny_runtime: Dia2, tmp_path: Path) -> None:
    nowhere = f"ws://127.0.0.1:{free_tcp_port()}/callbridge"  # nothing listens there
    async with running(tiny_runtime, tmp_path, app=app_section(nowhere, connect_attempts=2)) as service:
        left = ended_calls(service)
        sim = asyncio.create_task(simulate_call(service.sim(hold_s=40.0, max_call_s=60.0), 0))
        async with asyncio.timeout(WAIT_S):
            call = await left.get()
        assert call.end_reason == "hangup: app unreachable"
        said = [t for t in call.turns.history if t.source == "service"]
        assert len(said) == 1 and said[0].state.value == "done"  # the message played whole
        report = (await sim).to_json()
        assert report["chunks"] > 0 and report["ended_by"] == "rest"
        assert report["service_events"].get("app_unreachable") == 1


async def test_an_app_that_drops_resumes_the_same_call(tiny_runtime: Dia2, tmp_path: Path) -> None:
    app = await AppServer().start()
    try:
        async with running(tiny_runtime, tmp_path, app=app_section(app.url)) as service:
            sim = asyncio.create_task(simulate_call(service.sim(hold_s=40.0, max_call_s=60.0), 0))
            first = await app.next_connection()
            await first.next_event("call_started")
            await first.ws.close()
            second = await app.next_connection()
            resumed = await second.next_event("call_resumed")
            assert resumed["call_sid"] == first.call_id == second.call_id and resumed["events_lost"] is False
            await second.send({"type": "turn", "text": "Still here."})
            assert (await second.next_event("turn_done"))["state"] == "done"
            await second.send({"type": "hangup"})
            assert (await second.next_event("call_ended"))["reason"] == "hangup: app"
            await sim
    finally:
        await app.stop()


async def test_an_app_that_drops_for_good_gets_the_caller_a_message(tiny_runtime: Dia2, tmp_path: Path) -> None:
    app = await AppServer().start()
    try:
        async with running(tiny_runtime, tmp_path, app=app_section(app.url, reconnect_grace_s=1.0)) as service:
            left = ended_calls(service)
            sim = asyncio.create_task(simulate_call(service.sim(hold_s=40.0, max_call_s=60.0), 0))
            conn = await app.next_connection()
            await conn.next_event("call_started")
            app.refuse = True  # every redial is answered 403
            await conn.ws.close()
            async with asyncio.timeout(WAIT_S):
                call = await left.get()
            assert call.end_reason == "hangup: app unreachable" and app.refused >= 1
            assert [t.state.value for t in call.turns.history if t.source == "service"] == ["done"]
            await sim
    finally:
        await app.stop()


def test_the_signature_binds_secret_call_and_time() -> None:
    now = time.time()
    headers = signature_headers(SECRET, "CA123", now=now)
    assert verify_signature(SECRET, headers, now=now)
    assert not verify_signature("another-secret-0123456789", headers, now=now)
    assert not verify_signature(SECRET, {**headers, "X-Callbridge-Call-Id": "CA999"}, now=now)
    assert not verify_signature(SECRET, headers, now=now + 301)  # replayed too late
    assert not verify_signature(SECRET, {}, now=now)


# ------------------------------------------------------------------------------ caller audio


async def test_the_app_and_the_text_socket_get_the_callers_audio_on_subscription(
        tiny_runtime: Dia2, tmp_path: Path) -> None:
    app = await AppServer().start()
    try:
        async with running(tiny_runtime, tmp_path, app=app_section(app.url)) as service:
            sim = asyncio.create_task(simulate_call(service.sim(hold_s=40.0, max_call_s=60.0), 0))
            conn = await app.next_connection()
            await conn.next_event("call_started")
            assert conn.audio.empty()  # opt-in: nothing before a subscription
            await conn.send({"type": "subscribe_audio", "format": "pcm16"})
            sub = await conn.next_event("audio_subscribed")
            assert (sub["format"], sub["sample_rate"], sub["frame_ms"]) == ("pcm16", 8000, 20)
            frames = [await asyncio.wait_for(conn.audio.get(), WAIT_S) for _ in range(5)]
            assert {len(f) for f in frames} == {320}
            async with aiohttp.ClientSession() as http, http.ws_connect(
                    f"{service.base}/calls/{conn.call_id}/text", headers={"Authorization": f"Bearer {API}"}) as ws:
                await ws.send_json({"type": "subscribe_audio", "format": "ulaw"})
                got: list[bytes] = []
                async with asyncio.timeout(WAIT_S):
                    while len(got) < 5:
                        msg = await ws.receive()
                        if msg.type is aiohttp.WSMsgType.BINARY:
                            got.append(bytes(msg.data))
                        elif msg.type is aiohttp.WSMsgType.TEXT:
                            assert msg.json()["event"] != "error", msg.data
                assert {len(f) for f in got} == {160}
                await ws.send_json({"type": "subscribe_audio", "format": "opus"})
                while (msg := await ws.receive(timeout=WAIT_S)).type is aiohttp.WSMsgType.BINARY:
                    pass
                assert msg.json()["event"] == "error" and "'format'" in msg.json()["message"]
            await conn.send({"type": "hangup"})
            await conn.next_event("call_ended")
            await sim
    finally:
        await app.stop()


def _frame(value: int) -> CallerAudio:
    return CallerAudio(np.full(160, value, dtype=np.int16), 8000)


async def test_subscribed_audio_is_bounded_and_drops_the_oldest_counted() -> None:
    box = ClientOutbox(audio_frames=50)
    box.on_caller_audio(_frame(1))
    assert await _take_now(box) == []  # not subscribed: nothing kept
    box.subscribe_audio(AudioFormat.PCM16)
    for i in range(60):  # nobody drains: 10 too many
        box.on_caller_audio(_frame(i))
    items = await box.take()
    assert items[0] == {"event": "audio_dropped", "frames": 10, "total": 10}
    frames = items[1:]
    assert len(frames) == 50
    assert [np.frombuffer(f, "<i2")[0] for f in frames] == list(range(10, 60))  # the newest kept, in order
    # Frames of another size are cut into 20 ms frames; the remainder waits for the next.
    box.on_caller_audio(CallerAudio(np.arange(400, dtype=np.int16), 8000))
    [f1, f2] = await box.take()
    assert np.frombuffer(f1, "<i2").tolist() == list(range(160)) and len(f2) == 320
    box.on_caller_audio(CallerAudio(np.zeros(80, dtype=np.int16), 8000))
    [f3] = await box.take()
    assert np.frombuffer(f3, "<i2")[:80].tolist() == list(range(320, 400))


async def _take_now(box: ClientOutbox) -> list[Any]:
    try:
        return await asyncio.wait_for(box.take(), 0.01)
    except TimeoutError:
        return []
