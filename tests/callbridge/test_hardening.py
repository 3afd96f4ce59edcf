"""Hardening over the real service: bad input, faults and shutdown, each next to a healthy call.

Every case states its defined outcome (an HTTP status or a WebSocket close code, and at most
one WARNING line for the call) and checks that the other call in progress is untouched and
that no TTS stream slot is left behind. Cases already covered in test_service.py (bad JSON,
oversized and binary frames, webhook signatures, API token and 404/413/429 over HTTP) and
test_twilio.py (the sans-I/O parser) are not repeated here.

Raw Twilio stand-ins (:class:`RawCall`) send exactly the frames a case needs and echo marks
at once (Twilio's playback queue, always empty); the healthy call is the simulator's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile as sf
from aiohttp import web

from callbridge.audio import ulaw_to_pcm16
from callbridge.calls.fallback import FALLBACK_SILENCE_MS, load_fallback_audio
from callbridge.calls.turns import TurnRejected
from callbridge.config import Settings, SettingsError
from callbridge.sim import FakeTwilioRest, SimConfig, simulate_call
from callbridge.sim.ports import free_tcp_port
from callbridge.transports.twilio import compute_signature
from callbridge.web.app import build_app, drain_calls
from callbridge.web.services import SERVICES, Services, redact_url
from dia2 import Dia2

from .test_service import ACCOUNT, API, AUTH, PUBLIC, WAIT_S, settings_for, until

BAD_TOKEN = 10**6  # outside any text vocabulary: the embedding lookup of its step raises
HEALTHY_TEXT = "One moment please, I am checking that for you."
HOLDING = "One moment please, "  # a streamed turn that never closes: it pads until cut

pytestmark = pytest.mark.timeout(240)


# ------------------------------------------------------------------ service fixture (settings as in test_service.py)


@dataclass
class Service:
    base: str
    port: int
    app: web.Application
    runner: web.AppRunner
    rest: FakeTwilioRest
    cleaned: bool = False

    @property
    def svc(self) -> Services:
        return self.app[SERVICES]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API}"}

    def sim(self, **kw: Any) -> SimConfig:
        defaults: dict[str, Any] = dict(base_url=self.base, public_base_url=PUBLIC, twilio_auth_token=AUTH,
                                        account_sid=ACCOUNT, api_token=API, max_call_s=60.0, rest_server=self.rest)
        defaults.update(kw)
        return SimConfig(**defaults)

    def healthy_call(self, index: int = 0) -> asyncio.Task[Any]:
        # A streamed turn: the simulated caller hangs up on its turn_done event, not after the
        # 0.5 s of silence that ends a POSTed turn in the simulator (a clock a loaded machine fools).
        return asyncio.create_task(simulate_call(self.sim(texts=[HEALTHY_TEXT], stream_text=True), index))

    async def shutdown(self) -> None:
        if not self.cleaned:
            self.cleaned = True
            await self.runner.cleanup()


@contextlib.asynccontextmanager
async def running(tiny_runtime: Dia2, tmp: Path, **sections: dict[str, Any]) -> AsyncIterator[Service]:
    rest = FakeTwilioRest(account_sid=ACCOUNT, auth_token=AUTH)
    rest_url = await rest.start()
    port = free_tcp_port()
    app = build_app(settings_for(port, tmp, rest_url, **sections), runtime=tiny_runtime)
    runner = web.AppRunner(app, shutdown_timeout=5.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    service = Service(f"http://127.0.0.1:{port}", port, app, runner, rest)
    try:
        yield service
    finally:
        await service.shutdown()
        await rest.stop()


def clean(report: dict[str, Any]) -> None:
    """The healthy call: no error, nothing lost, every mark echoed, audio for its last turn."""
    assert report["error"] is None, report["error"]
    assert report["protocol_errors"] == []
    assert report["lost_or_reordered"] == 0
    assert report["marks_echoed"] == report["marks_sent"] > 0
    assert report["turns"][-1]["chunks"] > 0


def no_slot_left(service: Service) -> None:
    svc = service.svc
    assert svc.worker is not None
    assert svc.worker.active == 0 and svc.worker.free == svc.worker.capacity
    assert svc.calls == {} and svc.tokens.tokens == {}


def warnings_for(caplog: pytest.LogCaptureFixture, call_sid: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and getattr(r, "call_sid", None) == call_sid]


# ------------------------------------------------------------------ a raw Twilio stand-in


def sid(prefix: str, n: int) -> str:
    return prefix + f"{n:032d}"


async def admit(http: aiohttp.ClientSession, service: Service, call_sid: str, query: str = "") -> str:
    """POST the signed webhook; returns the TwiML."""
    form = {"CallSid": call_sid, "AccountSid": ACCOUNT, "From": "+1", "To": "+2", "CallStatus": "ringing"}
    path = "/twilio/voice" + (f"?{query}" if query else "")
    sig = compute_signature(AUTH, PUBLIC + path, form)
    async with http.post(service.base + path, data=form, headers={"X-Twilio-Signature": sig}) as resp:
        assert resp.status == 200
        return await resp.text()


def stream_url_of(twiml: str) -> str:
    return twiml.split('url="')[1].split('"')[0]


def start_message(call_sid: str, stream_sid: str, seq: int = 1) -> dict[str, Any]:
    return {"event": "start", "sequenceNumber": str(seq), "streamSid": stream_sid,
            "start": {"accountSid": ACCOUNT, "streamSid": stream_sid, "callSid": call_sid, "tracks": ["inbound"],
                      "customParameters": {}, "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                                              "channels": 1}}}


@dataclass
class RawCall:
    """One media stream driven by hand; records what the service sends, echoes marks at once."""

    service: Service
    http: aiohttp.ClientSession
    call_sid: str
    stream_sid: str = ""
    ws: aiohttp.ClientWebSocketResponse | None = None
    sent: list[tuple[str, Any]] = field(default_factory=list)  # ("media", bytes) / ("mark", name) / ("clear", None)
    events: list[dict[str, Any]] = field(default_factory=list)  # control-API events of the call
    text_ws: aiohttp.ClientWebSocketResponse | None = None
    seq: int = 1
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def open(self, *, start: bool = True) -> None:
        self.stream_sid = "MZ" + self.call_sid[2:]
        twiml = await admit(self.http, self.service, self.call_sid)
        url = stream_url_of(twiml)
        self.ws = await self.http.ws_connect(self.service.base + url.removeprefix("wss://bridge.test"),
                                             headers={"X-Twilio-Signature": compute_signature(AUTH, url, {})})
        await self.ws.send_str(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        if start:
            await self.ws.send_str(json.dumps(start_message(self.call_sid, self.stream_sid)))
            await until(lambda: self.call_sid in self.service.svc.calls, "call registered")
        self.tasks.append(asyncio.create_task(self._read()))

    async def send(self, event: str, **body: Any) -> None:
        assert self.ws is not None
        self.seq += 1
        await self.ws.send_str(json.dumps({"event": event, "sequenceNumber": str(self.seq),
                                           "streamSid": self.stream_sid, **body}))

    async def media(self, payload: bytes) -> None:
        await self.send("media", media={"track": "inbound", "chunk": str(self.seq), "timestamp": str(20 * self.seq),
                                        "payload": base64.b64encode(payload).decode()})

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if data["event"] == "media":
                self.sent.append(("media", base64.b64decode(data["media"]["payload"])))
            elif data["event"] == "mark":
                self.sent.append(("mark", data["mark"]["name"]))
                with contextlib.suppress(ConnectionError):
                    await self.send("mark", mark={"name": data["mark"]["name"]})
            else:
                self.sent.append((data["event"], None))

    @property
    def closed(self) -> bool:
        return self.ws is not None and self.ws.closed

    @property
    def close_code(self) -> int | None:
        return None if self.ws is None else self.ws.close_code

    @property
    def media_chunks(self) -> int:
        return sum(kind == "media" for kind, _ in self.sent)

    async def text_socket(self) -> None:
        """The control API's streaming text socket for this call; events go to ``events``."""
        self.text_ws = await self.http.ws_connect(f"{self.service.base}/calls/{self.call_sid}/text",
                                                  headers=self.service.headers)

        async def pump() -> None:
            assert self.text_ws is not None
            async for msg in self.text_ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self.events.append(json.loads(msg.data))

        self.tasks.append(asyncio.create_task(pump()))

    async def say(self, **message: Any) -> None:
        assert self.text_ws is not None
        await self.text_ws.send_json(message)

    def turn_done(self, n: int) -> list[dict[str, Any]]:
        done = [e for e in self.events if e.get("event") == "turn_done"]
        return done[n:n + 1]

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == "error"]

    async def close(self) -> None:
        # Stop the readers first: closing a client socket another task is reading waits on
        # that reader (and then on the session's 300 s default timeout).
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for ws in (self.text_ws, self.ws):
            if ws is not None and not ws.closed:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(10):
                        await ws.close()


@contextlib.asynccontextmanager
async def raw_call(service: Service, n: int, *, start: bool = True) -> AsyncIterator[RawCall]:
    # Bounded: a wait on a server that is shutting down fails the test instead of hanging it.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as http:
        call = RawCall(service, http, sid("CA", n))
        try:
            await call.open(start=start)
            yield call
        finally:
            await call.close()


async def holding_turn(call: RawCall) -> int:
    """Start a streamed turn that never closes; returns its TTS slot once audio flows."""
    await call.text_socket()
    await call.say(type="text", text=HOLDING)
    live = call.service.svc.calls[call.call_sid]
    await until(lambda: live.turns.current is not None and live.turns.current.handle is not None and call.media_chunks > 0,
                "the holding turn speaks")
    assert live.turns.current is not None and live.turns.current.handle is not None and live.turns.current.handle.slot is not None
    return live.turns.current.handle.slot


# ------------------------------------------------------------------ 1. bad input on the media stream


def _media(stream_sid: str, payload: str = "//8=", seq: int = 2) -> dict[str, Any]:
    return {"event": "media", "sequenceNumber": str(seq), "streamSid": stream_sid,
            "media": {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": payload}}


def _bad_cases() -> dict[str, tuple[str, Callable[[str, str], list[dict[str, Any]] | None]]]:
    """name -> (expected ProtocolError code, frames after `connected` given (call_sid, stream_sid))."""
    def after_start(*extra: dict[str, Any]) -> Callable[[str, str], list[dict[str, Any]]]:
        return lambda call_sid, ms: [start_message(call_sid, ms), *extra]

    return {
        "missing_field": ("missing_field", lambda c, ms: [start_message(c, ms),
                                                         {"event": "media", "sequenceNumber": "2", "streamSid": ms}]),
        "wrong_stream_sid": ("wrong_stream_sid", lambda c, ms: [start_message(c, ms), _media("MZ" + "9" * 32)]),
        "bad_payload": ("bad_payload", lambda c, ms: [start_message(c, ms), _media(ms, payload="not base64!")]),
        "media_before_start": ("before_start", lambda c, ms: [_media(ms)]),
        "duplicate_start": ("duplicate_start", lambda c, ms: [start_message(c, ms), start_message(c, ms, seq=2)]),
        "start_for_another_call": ("call_mismatch", lambda c, ms: [start_message("CA" + "8" * 32, ms)]),
        "no_start": ("start_timeout", lambda c, ms: None),
        "flood": ("flood", lambda c, ms: [start_message(c, ms)] + [
            {"event": "noise", "sequenceNumber": str(i), "streamSid": ms} for i in range(2, 400)]),
    }


async def test_each_bad_frame_ends_only_its_own_call_with_1008_and_one_warning(
    tiny_runtime: Dia2, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Eight bad streams at once next to a healthy call: each closes 1008 with one WARNING line
    naming its error code; the healthy call loses nothing; every reservation comes back."""
    cases = _bad_cases()
    async with running(tiny_runtime, tmp_path, twilio={"start_timeout_s": 0.5}) as service:
        healthy = service.healthy_call()
        await until(lambda: service.svc.calls != {}, "the healthy call started")

        async def bad(n: int, frames: Callable[[str, str], list[dict[str, Any]] | None]) -> int | None:
            async with raw_call(service, n, start=False) as call:
                for frame in frames(call.call_sid, call.stream_sid) or []:
                    assert call.ws is not None
                    with contextlib.suppress(ConnectionError):
                        await call.ws.send_str(json.dumps(frame))
                await until(lambda: call.closed, "the service closes the socket")
                return call.close_code

        codes = await asyncio.gather(*(bad(100 + i, frames) for i, (_, frames) in enumerate(cases.values())))
        clean((await healthy).to_json())
        await until(lambda: service.svc.calls == {}, "every call is gone")
        no_slot_left(service)
    for i, (name, (code, _)) in enumerate(cases.items()):
        assert codes[i] == 1008, (name, codes[i])
        lines = warnings_for(caplog, sid("CA", 100 + i))
        assert len(lines) == 1 and code in lines[0].getMessage(), (name, [r.getMessage() for r in lines])


async def test_unknown_events_and_any_payload_length_keep_the_call_up(
    tiny_runtime: Dia2, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unknown events are ignored (one DEBUG line each), payloads of any length (empty, odd,
    longer than 20 ms) are decoded: the call goes on, its turn plays, `stop` closes with 1000."""
    caplog.set_level(logging.DEBUG, logger="callbridge")
    async with running(tiny_runtime, tmp_path) as service, raw_call(service, 200) as call:
        await call.send("noise", noise={"x": 1})
        await call.send("transcription", anything=[1, 2, 3])
        async with call.http.post(f"{service.base}/calls/{call.call_sid}/turns", headers=service.headers,
                                  json={"text": "Sure, one moment."}) as resp:
            assert resp.status == 202
        for n in (0, 1, 7, 161, 4000):  # while the bot talks, so the barge-in detector reads them
            await call.media(bytes([0xFF]) * n)
        live = service.svc.calls[call.call_sid]
        await until(lambda: bool(live.turns.history) and live.turns.history[-1].state.value == "done", "the turn plays out")
        await call.send("stop", stop={"accountSid": ACCOUNT, "callSid": call.call_sid})
        await until(lambda: call.closed, "closed after stop")
        assert call.close_code == 1000
        assert live.end_reason == "hangup: stop"
    ignored = [r.getMessage() for r in caplog.records if "unknown Media Streams event" in r.getMessage()]
    assert len(ignored) == 2 and all(r.levelno == logging.DEBUG for r in caplog.records
                                     if "unknown Media Streams event" in r.getMessage())
    assert warnings_for(caplog, call.call_sid) == []


async def test_a_call_is_closed_at_max_call_s(tiny_runtime: Dia2, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    async with running(tiny_runtime, tmp_path, calls={"max_call_s": 1.0}) as service, raw_call(service, 250) as call:
        for _ in range(3):
            await call.media(bytes([0xFF]) * 160)
        await until(lambda: call.closed, "closed at the limit")
        assert call.close_code == 1000
    lines = warnings_for(caplog, call.call_sid)
    assert len(lines) == 1 and "max_call_s" in lines[0].getMessage()


async def test_with_signature_checks_off_a_bad_signature_is_accepted_but_logged(
    tiny_runtime: Dia2, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Local development only: the request goes through and one WARNING says it would not have."""
    async with running(tiny_runtime, tmp_path, twilio={"validate_signatures": False}) as service:
        form = {"CallSid": sid("CA", 260), "AccountSid": ACCOUNT, "From": "+1", "To": "+2"}
        async with aiohttp.ClientSession() as http, http.post(f"{service.base}/twilio/voice", data=form) as resp:
            assert resp.status == 200 and "<Stream" in await resp.text()
    [line] = [r.getMessage() for r in caplog.records if "validate_signatures is off" in r.getMessage()]
    assert line.startswith("POST /twilio/voice: missing Twilio signature")


@pytest.mark.parametrize("how", ["stop", "dropped"])
async def test_stop_or_disconnect_mid_turn_frees_the_stream_slot_before_the_next_step(
    tiny_runtime: Dia2, tmp_path: Path, how: str
) -> None:
    """Before the fix, ending a call marked its turn interrupted but never cancelled the TTS
    stream: a holding turn kept its slot (and stepped) until the 120 s dead-reader cap."""
    async with running(tiny_runtime, tmp_path) as service:
        healthy = service.healthy_call()
        worker = service.svc.worker
        assert worker is not None
        async with raw_call(service, 300) as call:
            slot = await holding_turn(call)
            stream = await worker.run_in_thread(lambda r: r.streams[slot])
            if how == "stop":
                await call.send("stop", stop={"accountSid": ACCOUNT, "callSid": call.call_sid})
            else:  # the network drops: no stop, no close frame
                assert call.ws is not None
                raw = call.ws.get_extra_info("socket")
                assert raw is not None
                raw.shutdown(socket.SHUT_RDWR)
            await until(lambda: call.call_sid not in service.svc.calls, "the call is gone")
            # A command queued after the call ended runs before the worker's next step (FIFO):
            # the stream is already cancelled and out of the runner.
            freed = await worker.run_in_thread(lambda r: stream.done and r.streams.get(slot) is not stream)
            assert freed
        clean((await healthy).to_json())
        await until(lambda: service.svc.calls == {}, "every call is gone")
        no_slot_left(service)


# ------------------------------------------------------------------ 3. faults


def _tone_wav(path: Path, seconds: float = 0.2, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    sf.write(str(path), np.stack([tone, tone], axis=1).astype(np.float32), rate)  # stereo, 16 kHz
    return path


def test_fallback_audio_loads_any_wav_and_refuses_bad_ones(tmp_path: Path) -> None:
    assert load_fallback_audio("") == bytes([0xFF]) * (FALLBACK_SILENCE_MS * 8)
    ulaw = load_fallback_audio(str(_tone_wav(tmp_path / "sorry.wav")))
    assert len(ulaw) == 1600 and ulaw != bytes([0xFF]) * 1600  # 0.2 s at 8 kHz, whole chunks
    with pytest.raises(SettingsError, match="calls.fallback_audio"):
        load_fallback_audio(str(tmp_path / "missing.wav"))
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really")
    with pytest.raises(SettingsError, match="cannot read"):
        load_fallback_audio(str(tmp_path / "junk.wav"))
    with pytest.raises(SettingsError, match="short clip"):
        load_fallback_audio(str(_tone_wav(tmp_path / "long.wav", seconds=6.0, rate=8000)))
    with pytest.raises(SettingsError, match="send_buffer_bytes"):
        Settings().with_(audio={"send_buffer_bytes": 100})


async def test_a_step_that_raises_plays_the_fallback_and_the_call_goes_on(tiny_runtime: Dia2, tmp_path: Path) -> None:
    """The worker's step raises for one turn: that turn ends `failed` and the caller hears the
    configured clip (exactly its bytes, then a mark); the call takes its next turn; the worker
    and the other call go on."""
    wav = _tone_wav(tmp_path / "sorry.wav")
    expected = load_fallback_audio(str(wav))
    chunks = [expected[i:i + 160] for i in range(0, len(expected), 160)]
    async with running(tiny_runtime, tmp_path, calls={"fallback_audio": str(wav)}) as service:
        healthy = service.healthy_call()
        worker = service.svc.worker
        assert worker is not None
        async with raw_call(service, 400) as call:
            slot = await holding_turn(call)
            await worker.run_in_thread(lambda r: r.engine.edit_text(slot, lambda text: text.pending_tokens.append(BAD_TOKEN)))
            await until(lambda: bool(call.turn_done(0)), "the failing turn ends")
            [failed] = call.turn_done(0)
            assert failed["state"] == "failed" and "IndexError" in failed["error"]
            await until(lambda: ("mark", "t1-g0-fallback") in call.sent, "the fallback is sent")
            at = call.sent.index(("mark", "t1-g0-fallback"))
            assert call.sent[at - len(chunks):at] == [("media", c) for c in chunks]
            await call.say(type="turn", text="Thanks for waiting.")
            await until(lambda: bool(call.turn_done(1)), "the next turn ends")
            assert call.turn_done(1)[0]["state"] == "done"
            assert service.svc.calls[call.call_sid].state.value == "active"
        clean((await healthy).to_json())
        await until(lambda: service.svc.calls == {}, "every call is gone")
        no_slot_left(service)


def _masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _stalling_stream(service: Service, http: aiohttp.ClientSession, call_sid: str) -> socket.socket:
    """A media stream on a plain socket with a tiny receive buffer, that will never be read."""
    url = stream_url_of(await admit(http, service, call_sid))
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", service.port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET {url.removeprefix('wss://bridge.test')} HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\n"
               f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Version: 13\r\nX-Twilio-Signature: {compute_signature(AUTH, url, {})}\r\n\r\n")
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # byte by byte: leave any frame after it unread
        head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    for message in ({"event": "connected", "protocol": "Call", "version": "1.0.0"},
                    start_message(call_sid, "MZ" + call_sid[2:])):
        await loop.sock_sendall(sock, _masked_text_frame(json.dumps(message)))
    return sock


async def test_a_stalled_twilio_reader_ends_only_its_call_by_send_timeout(
    tiny_runtime: Dia2, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Twilio stops reading mid-turn: the bounded send buffer fills, the send times out, the
    call ends (`error: send timeout`, one WARNING), its slot is freed and its connection is
    aborted (a close frame cannot reach a peer that reads nothing); the other call is clean."""
    async with running(tiny_runtime, tmp_path, audio={"send_timeout_s": 0.5}) as service:
        healthy = service.healthy_call()
        call_sid = sid("CA", 500)
        async with aiohttp.ClientSession() as http:
            sock = await _stalling_stream(service, http, call_sid)
            try:
                await until(lambda: call_sid in service.svc.calls, "the stalled call started")
                live = service.svc.calls[call_sid]
                async with http.post(f"{service.base}/calls/{call_sid}/turns", headers=service.headers,
                                     json={"text": "This is a long answer. " * 40}) as resp:
                    assert resp.status == 202
                await until(lambda: call_sid not in service.svc.calls, "the stalled call ends")
                assert live.end_reason == "error: send timeout"
                assert live.stats.chunks_sent > 0
                loop = asyncio.get_running_loop()
                async with asyncio.timeout(WAIT_S):  # the service dropped the connection
                    with contextlib.suppress(ConnectionError):
                        while await loop.sock_recv(sock, 65536):
                            pass
            finally:
                sock.close()
        clean((await healthy).to_json())
        await until(lambda: service.svc.calls == {}, "every call is gone")
        no_slot_left(service)
    lines = warnings_for(caplog, call_sid)
    assert len(lines) == 1 and "accepted nothing" in lines[0].getMessage()


async def test_shutdown_drains_marks_then_closes_every_call_with_going_away(tiny_runtime: Dia2, tmp_path: Path) -> None:
    """Shutdown while a caller is still hearing its last turn: that audio plays out and every
    mark is echoed (the simulator plays it in real time) before the socket closes with 1001;
    an idle call closes with 1001 too; new turns are refused meanwhile (409), /healthz says
    503; then the runner's cleanup stops the worker.

    The drain must run before ``AppRunner.cleanup()``: the bug was draining in on_shutdown,
    after aiohttp had stopped reading every connection, so no echo could ever arrive and
    shutdown always waited its full timeout with the marks lost."""
    async with running(tiny_runtime, tmp_path, server={"shutdown_timeout_s": 30.0}) as service:
        worker = service.svc.worker
        assert worker is not None
        async with raw_call(service, 600) as idle:
            finishing = asyncio.create_task(simulate_call(service.sim(
                texts=["Goodbye, and thanks for calling."], linger_s=30.0), 0))
            await until(lambda: len(service.svc.calls) == 2, "the second call started")
            [live] = [c for c in service.svc.calls.values() if c.call_sid != idle.call_sid]
            # All of the turn is generated and queued; most of it is still to be sent and heard.
            await until(lambda: live.turns.current is not None and live.turns.current.state.value == "sent", "turn generated")
            draining = asyncio.create_task(drain_calls(service.app))  # on SIGTERM, before cleanup()
            await until(lambda: service.svc.shutting_down, "shutdown began")
            with pytest.raises(TurnRejected) as refused:
                live.add_turn("One more?", close=True)
            assert refused.value.status == 409
            async with aiohttp.ClientSession() as http, http.get(f"{service.base}/healthz") as resp:
                assert resp.status == 503  # the load balancer stops sending calls
            await draining
            await service.shutdown()
            report = (await finishing).to_json()
            assert report["error"] is None and report["ended_by"] == "service"
            assert report["marks_echoed"] == report["marks_sent"] > 0 and report["lost_or_reordered"] == 0
            assert live.turns.history[-1].state.value == "done"  # its end mark came back: heard to the end
            assert live.end_reason == "shutdown"  # closed with close_code_for("shutdown") == 1001
            assert idle.close_code == 1001
        assert worker.closed and worker.active == 0


async def test_shutdown_cuts_a_call_that_does_not_drain_in_time(tiny_runtime: Dia2, tmp_path: Path) -> None:
    async with running(tiny_runtime, tmp_path, server={"shutdown_timeout_s": 0.5}) as service:
        worker = service.svc.worker
        assert worker is not None
        async with raw_call(service, 610) as endless:
            await holding_turn(endless)
            live = service.svc.calls[endless.call_sid]
            await service.shutdown()
            await until(lambda: endless.closed, "closed")
            assert endless.close_code == 1001 and live.turns.history[-1].state.value == "interrupted"
        assert worker.closed and worker.active == 0


# ------------------------------------------------------------------ control API and webhook


async def test_control_api_text_is_normalised_or_refused_and_never_breaks_the_call(
    tiny_runtime: Dia2, tmp_path: Path
) -> None:
    """Text with control/format characters or lone surrogates is cleaned; other scripts and
    emoji are spoken (byte-level tokenizer); nothing-to-say text is refused with 400; a bad
    speaker tag fails only its turn (fallback, then the next turn plays); a word too long to
    ever fit the model's context is refused (400), whole or streamed. Over the streaming
    socket: 401 without the token, 413 past the length limit, 429 past the queue bound."""
    async with running(tiny_runtime, tmp_path, calls={"max_queued_turns": 2, "max_turn_chars": 200}) as service:
        healthy = service.healthy_call()
        async with raw_call(service, 700) as call:
            turns = f"{service.base}/calls/{call.call_sid}/turns"
            h = service.headers
            for text in ("\x00\x07\u200b\u202e", "\udfff\ud800 \u200d"):  # controls, format, lone surrogates
                async with call.http.post(turns, headers=h, json={"text": text}) as resp:
                    assert resp.status == 400 and "nothing to speak" in (await resp.json())["error"]
            for bad_token in ("", "wrong"):
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await call.http.ws_connect(f"{service.base}/calls/{call.call_sid}/text",
                                               headers={"Authorization": f"Bearer {bad_token}"})
                assert err.value.status == 401
            await call.text_socket()
            ids = []
            for text in ("Hello\x00 wo\u200brld \x1b[31m, \ud800 fine.", "你好，世界。 مرحبا 🙂 Ελληνικά.",
                         "[S3] Who is this?", "Back to normal."):
                async with call.http.post(turns, headers=h, json={"text": text}) as resp:
                    assert resp.status == 202, await resp.text()
                    ids.append((await resp.json())["turn_id"])
                if len(ids) == 2:
                    await until(lambda: len(call.turn_done(1)) == 1, "two turns played")
            await until(lambda: len([e for e in call.events if e.get("event") == "turn_done"]) == 4, "all turns end")
            states = {e["turn_id"]: e for e in call.events if e.get("event") == "turn_done"}
            assert [states[i]["state"] for i in ids] == ["done", "done", "failed", "done"]
            assert "[S3]" in states[ids[2]]["error"]
            assert ("mark", "t3-g0-fallback") in call.sent
            # A word that could never fit the model's context is refused, whole or streamed.
            async with call.http.post(turns, headers=h, json={"text": "Visit " + "ab" * 40 + " now."}) as resp:
                assert resp.status == 400 and "word of 80 characters" in (await resp.json())["error"]
            await call.say(type="text", text="Your code is " + "x" * 40)
            await call.say(type="text", text="y" * 40)  # the same word, now 80 characters: refused
            await call.say(type="text", text=" thanks." + " word" * 30)  # then past the turn's 200 characters
            await call.say(type="end_turn")
            for _ in range(4):  # faster than it can be spoken
                await call.say(type="turn", text="Queued words.")
            await until(lambda: len(call.errors()) >= 3, "the refusals arrive")
            assert [e["status"] for e in call.errors()][:3] == [400, 413, 429]
        clean((await healthy).to_json())
        await until(lambda: service.svc.calls == {}, "every call is gone")
        no_slot_left(service)


async def test_webhook_unknown_voice_forged_status_callback_and_replayed_upgrade(
    tiny_runtime: Dia2, tmp_path: Path
) -> None:
    """An unknown voice gets a spoken apology and a hang-up (200, no slot held); a forged
    stream status callback 403; a captured upgrade replayed after `start` 403."""
    async with running(tiny_runtime, tmp_path) as service, aiohttp.ClientSession() as http:
        worker = service.svc.worker
        assert worker is not None
        twiml = await admit(http, service, sid("CA", 800), query="voice=nobody")
        assert "<Say>" in twiml and "<Hangup" in twiml and "<Stream" not in twiml
        assert worker.free == worker.capacity and service.svc.tokens.tokens == {}
        metrics = await (await http.get(f"{service.base}/metrics")).text()
        assert 'callbridge_rejected_total{reason="unknown_voice"} 1.0' in metrics
        form = {"CallSid": sid("CA", 801), "StreamEvent": "stream-started"}
        forged = compute_signature("not-the-token", PUBLIC + "/twilio/stream-status", form)
        async with http.post(f"{service.base}/twilio/stream-status", data=form,
                             headers={"X-Twilio-Signature": forged}) as resp:
            assert resp.status == 403
        good = compute_signature(AUTH, PUBLIC + "/twilio/stream-status", form)
        async with http.post(f"{service.base}/twilio/stream-status", data=form,
                             headers={"X-Twilio-Signature": good}) as resp:
            assert resp.status == 204
        url = stream_url_of(await admit(http, service, sid("CA", 802)))
        path, headers = url.removeprefix("wss://bridge.test"), {"X-Twilio-Signature": compute_signature(AUTH, url, {})}
        async with http.ws_connect(service.base + path, headers=headers) as ws:
            await ws.send_str(json.dumps(start_message(sid("CA", 802), "MZ" + "1" * 32)))
            await until(lambda: sid("CA", 802) in service.svc.calls, "the call started")
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect(service.base + path, headers=headers)  # the same signed request again
            assert err.value.status == 403


async def test_tokens_and_signatures_never_reach_the_logs(
    tiny_runtime: Dia2, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's access log writes the request line: ``?token=`` and the stream path's one-time
    token are redacted there; our own lines never carry a token, a signature or a payload."""
    caplog.set_level(logging.DEBUG)
    async with running(tiny_runtime, tmp_path) as service, aiohttp.ClientSession() as http:
        twiml = await admit(http, service, sid("CA", 900))
        url = stream_url_of(twiml)
        stream_token = url.rsplit("/", 1)[1]
        signature = compute_signature(AUTH, url, {})
        async with http.get(f"{service.base}/calls?token={API}") as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.WSServerHandshakeError):  # a bad signature: logged, without the token
            await http.ws_connect(service.base + url.removeprefix("wss://bridge.test"),
                                  headers={"X-Twilio-Signature": "AAAA" + signature[4:]})
        report = (await simulate_call(service.sim(texts=["Hi there."], dtmf=[(0.2, "7")]), 0)).to_json()
        clean(report)
    text = "\n".join(f"{r.name} {r.getMessage()} {getattr(r, 'first_request_line', '')}" for r in caplog.records)
    assert "aiohttp.access" in text and "[redacted]" in text
    for secret in (API, AUTH, stream_token, signature):
        assert secret not in text
    assert "dtmf 7" not in text


def test_redact_url() -> None:
    assert redact_url('"GET /ws/stream_tts?format=x&token=s3cret HTTP/1.1"') == (
        '"GET /ws/stream_tts?format=x&token=[redacted] HTTP/1.1"')
    assert redact_url("GET /twilio/stream/abc-DEF_1 HTTP/1.1") == "GET /twilio/stream/[redacted] HTTP/1.1"
    assert redact_url("GET /calls?tokens=1") == "GET /calls?tokens=1"


# ------------------------------------------------------------------ the call core behind the Twilio leg


async def test_a_stream_token_is_consumed_by_exactly_one_upgrade(tiny_runtime: Dia2, tmp_path: Path) -> None:
    """Before the fix the upgrade only peeked at the token: a second upgrade with the same
    signed URL built a second call holding the first one's reservation, and its closing before
    `start` released that reservation under the live call. Now the second upgrade gets 403 and
    the first call keeps its slot, speaks, and gives the slot back once."""
    async with running(tiny_runtime, tmp_path) as service, aiohttp.ClientSession() as http:
        worker = service.svc.worker
        assert worker is not None
        call_sid = sid("CA", 950)
        url = stream_url_of(await admit(http, service, call_sid))
        path, headers = url.removeprefix("wss://bridge.test"), {"X-Twilio-Signature": compute_signature(AUTH, url, {})}
        async with http.ws_connect(service.base + path, headers=headers) as first:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect(service.base + path, headers=headers)  # the same signed URL again
            assert err.value.status == 403
            assert worker.free == worker.capacity - 1  # the first call's reservation is still held
            await first.send_str(json.dumps(start_message(call_sid, "MZ" + call_sid[2:])))
            await until(lambda: call_sid in service.svc.calls, "the call started")
            async with http.post(f"{service.base}/calls/{call_sid}/turns", headers=service.headers,
                                 json={"text": "Still here."}) as resp:
                assert resp.status == 202
            live = service.svc.calls[call_sid]

            async def play_twilio() -> None:  # echo every mark at once
                async for msg in first:
                    data = json.loads(msg.data)
                    if data["event"] == "mark":
                        await first.send_str(json.dumps({"event": "mark", "sequenceNumber": "9",
                                                         "streamSid": data["streamSid"], "mark": data["mark"]}))

            echoer = asyncio.create_task(play_twilio())
            await until(lambda: bool(live.turns.history) and live.turns.history[-1].ended, "the turn played")
            echoer.cancel()
            await asyncio.gather(echoer, return_exceptions=True)
            assert live.turns.history[-1].state.value == "done"
        await until(lambda: service.svc.calls == {}, "the call is gone")
        no_slot_left(service)


async def test_two_hang_ups_drain_once_and_call_twilio_once(tiny_runtime: Dia2, tmp_path: Path) -> None:
    """Before the fix each POST /hangup drained and called Twilio's REST API on its own, and the
    end reason was always "api"; now a second hang-up joins the first: one REST request."""
    async with running(tiny_runtime, tmp_path) as service, raw_call(service, 960) as call:
        await call.text_socket()
        for _ in range(2):
            async with call.http.post(f"{service.base}/calls/{call.call_sid}/hangup", headers=service.headers) as resp:
                assert resp.status == 202
        await until(lambda: any(e.get("event") == "call_ended" for e in call.events), "the call ended")
        [ended] = [e for e in call.events if e.get("event") == "call_ended"]
        assert ended["reason"] == "hangup: api"
        assert [r.call_sid for r in service.rest.requests] == [call.call_sid]


async def test_every_caller_frame_reaches_the_call_while_the_bot_is_silent(tiny_runtime: Dia2, tmp_path: Path) -> None:
    """Caller audio used to be dropped whenever the bot was silent; now every media frame, in
    order, reaches the call's caller-audio consumers (barge-in now, a transcriber next)."""
    async with running(tiny_runtime, tmp_path) as service, raw_call(service, 970) as call:
        live = service.svc.calls[call.call_sid]
        heard: list[np.ndarray] = []
        live.caller_audio.append(lambda audio: heard.append(audio.pcm16))
        payloads = [bytes([(i * 7 + j) % 256 for j in range(160)]) for i in range(40)]
        for payload in payloads:
            await call.media(payload)
        await until(lambda: len(heard) == len(payloads), "every frame reached the consumer")
        assert all(np.array_equal(pcm, ulaw_to_pcm16(p)) for pcm, p in zip(heard, payloads, strict=True))
        assert live.bargein is not None and live.bargein.frames_seen == len(payloads)


async def test_a_queued_turn_says_whether_it_plays_now_or_waits(tiny_runtime: Dia2, tmp_path: Path) -> None:
    async with running(tiny_runtime, tmp_path) as service, raw_call(service, 980) as call:
        turns = f"{service.base}/calls/{call.call_sid}/turns"
        answers = []
        for text in ("First one.", "Second one.", "Third one."):
            async with call.http.post(turns, headers=service.headers, json={"text": text}) as resp:
                assert resp.status == 202
                answers.append(await resp.json())
        assert [(a["status"], a["ahead"]) for a in answers] == [("playing", 0), ("queued", 1), ("queued", 2)]
