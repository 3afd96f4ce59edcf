"""``/ws/stream_tts``: plain streaming TTS over a WebSocket, for apps that are not on Twilio.

Protocol (compatible with the clients our users already have):
- on connect the server sends ``{"event": "ready", "sample_rate": 24000}``;
- the client sends ``{"type": "tts", "text": "[S1] Hi.", ...}`` with optional ``cfg_scale``,
  ``temperature``, ``top_k``, ``chunk_frames``, ``voice``, ``format`` (``pcm_24k`` or
  ``mulaw_8k``) and ``stream`` (true: the text continues in ``{"type": "text", "text": …}``
  messages until ``{"type": "close"}``); ``{"type": "cancel"}`` stops the request being served
  and drops those waiting;
- the server sends binary messages = 1 byte "is last" flag + audio (16-bit little-endian PCM
  at 24 kHz, or mu-law at 8 kHz), and JSON events ``first_audio``, ``words``, ``done`` (with
  ``chunks`` and ``cancelled``) and ``error`` (with ``message``; both carry ``request``, the
  request's number on the connection from 1, when they answer one); ``{"event": "ping"}``
  keep-alives may come, answered by ``{"type": "pong"}``.

Several requests may follow on one connection: they are served one at a time in the order
they came (up to :data:`MAX_QUEUED_REQUESTS` waiting), and each gets exactly one ``done`` or
``error``. A ``tts`` sent while a streaming request's text is still open is refused (the
``text`` messages that follow would be ambiguous), as is every message that cannot be acted
on (not JSON, no ``type``, ``text`` with no open stream, an unknown type): never ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from typing import Any

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from dia2 import MAX_TOP_K, GenerationConfig, SamplingParams, StreamStatus

from ..audio import OutboundAudio
from ..calls.turns import open_word_after
from ..tts import TurnFailed, TurnHandle, WorkerClosed, WorkerFull, generation_config
from ..voices import VoiceError
from .services import SERVICES, JsonError, check_api_token

log = logging.getLogger(__name__)

PING_INTERVAL_S = 20.0
MAX_TEXT_CHARS = 5000


class RequestError(Exception):
    pass


def _config(msg: dict[str, Any], base: GenerationConfig, seed: int) -> GenerationConfig:
    def num(key: str, default: float, lo: float, hi: float) -> float:
        value = msg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise RequestError(f"'{key}' must be a number in [{lo}, {hi}]")
        return float(value)

    top_k = num("top_k", base.audio.top_k, 0, MAX_TOP_K)  # 0: no cut; the engine refuses larger cuts
    return dataclasses.replace(
        base,
        audio=SamplingParams(num("temperature", base.audio.temperature, 0.0, 5.0), int(top_k)),
        cfg_scale=num("cfg_scale", base.cfg_scale, 0.0, 20.0),
        seed=seed,
    )


def _encode(pcm24k: np.ndarray, fmt: str, outbound: OutboundAudio | None) -> bytes:
    if fmt == "mulaw_8k":
        assert outbound is not None
        return b"".join(outbound.push(pcm24k))
    return (np.clip(pcm24k, -1.0, 1.0) * 32767).astype("<i2").tobytes()


#: Requests a connection may have waiting behind the one being served.
MAX_QUEUED_REQUESTS = 16


class _Request:
    """One ``tts`` message: served in arrival order; every request gets exactly one ``done`` or ``error``."""

    def __init__(self, msg: dict[str, Any], index: int) -> None:
        self.msg = msg
        self.index = index
        self.streaming = bool(msg.get("stream", False))
        # Text that follows a streaming request ({"type": "text"}), None once closed or cancelled.
        self.text: asyncio.Queue[str | None] = asyncio.Queue()
        self.cancelled = asyncio.Event()
        self.text_open = self.streaming

    def cancel(self) -> None:
        self.cancelled.set()
        self.close_text()

    def close_text(self) -> None:
        if self.text_open:
            self.text_open = False
            self.text.put_nowait(None)


class _Connection:
    """What the handler knows of one connection: requests waiting, the one being served, and
    the streaming request whose text is still open (``text`` and ``close`` messages go to it)."""

    def __init__(self) -> None:
        self.waiting: deque[_Request] = deque()
        self.arrived = asyncio.Event()  # set when a request is queued: the server task waits on it
        self.current: _Request | None = None
        self.open_stream: _Request | None = None
        self.count = 0

    def dispatch(self, data: Any) -> str | None:
        """Route one parsed message; returns the text of an ``error`` event to send, if any."""
        if not isinstance(data, dict):
            return "each message must be a JSON object with a 'type'"
        kind = data.get("type")
        if kind == "pong":
            return None
        if kind == "tts":
            if self.open_stream is not None:
                return (f"request {self.open_stream.index} is still streaming its text: send "
                        "{\"type\": \"close\"} (or cancel) before the next tts")
            if len(self.waiting) >= MAX_QUEUED_REQUESTS:
                return f"{MAX_QUEUED_REQUESTS} requests are already waiting on this connection; wait for their done events"
            self.count += 1
            request = _Request(data, self.count)
            self.waiting.append(request)
            self.arrived.set()
            if request.streaming:
                self.open_stream = request
            return None
        if kind in ("text", "close"):
            stream = self.open_stream
            if stream is None:
                return f"{kind!r} needs an open streaming request (send a tts with \"stream\": true first)"
            if kind == "close":
                self.open_stream = None
                stream.close_text()
            elif not isinstance(data.get("text"), str):
                return "'text' must be a string"
            else:
                stream.text.put_nowait(data["text"])
            return None
        if kind == "cancel":
            live = self.live()
            if not live:
                return "nothing to cancel: no request is running"
            for request in live:
                request.cancel()
            self.open_stream = None
            return None
        return f"unknown message type {kind!r} (expected tts, text, close, cancel or pong)"

    def live(self) -> list[_Request]:
        """The request being served and those waiting, in order."""
        return [r for r in (self.current, *self.waiting) if r is not None]

    async def next_request(self) -> _Request:
        while not self.waiting:
            self.arrived.clear()
            await self.arrived.wait()
        self.current = self.waiting.popleft()
        return self.current


async def stream_tts_handler(request: web.Request) -> web.WebSocketResponse:
    """The handler is the only reader of the socket; a task serves the requests one by one.

    If that task fails (a bug, a lost socket), the connection ends with an ``error`` event and
    close code 1011; it never leaves the handler waiting."""
    check_api_token(request)
    svc = request.app[SERVICES]
    _, worker, voices = svc.require()
    readiness = svc.readiness()
    if not readiness.ready:
        raise JsonError(503, f"not ready: {readiness.reason}")
    ws = web.WebSocketResponse(max_msg_size=256 * 1024)
    await ws.prepare(request)
    svc.sockets.add(ws)
    await ws.send_json({"event": "ready", "sample_rate": 24000})
    t = svc.settings.tts
    base = generation_config(t, seed=t.seed)
    conn = _Connection()

    async def serve() -> None:
        while True:
            req = await conn.next_request()
            try:
                if req.cancelled.is_set():
                    await ws.send_json({"event": "done", "request": req.index, "chunks": 0, "cancelled": True})
                    continue
                await _serve_request(ws, req, worker, voices, base, svc.settings.calls.max_word_chars)
            except RequestError as exc:
                await ws.send_json({"event": "error", "request": req.index, "message": str(exc)})
                if conn.open_stream is req:
                    conn.open_stream = None  # its text has nowhere to go: the next tts may come
            finally:
                conn.current = None

    async def pinger() -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            await ws.send_json({"event": "ping"})

    def on_task_end(task: asyncio.Task[None]) -> None:
        if task.cancelled() or ws.closed:
            return
        exc = task.exception()
        if isinstance(exc, ConnectionError):  # the client went away mid-send
            log.info("/ws/stream_tts: %s: connection lost: %s", task.get_name(), exc)
        else:
            log.error("/ws/stream_tts: %s ended: %s", task.get_name(), exc, exc_info=exc)
        message = f"internal error: {type(exc).__name__}: {exc}" if exc else "internal error"
        ending = asyncio.get_running_loop().create_task(_end_with_error(ws, message))
        tasks.add(ending)  # a strong reference until it is done

    tasks: set[asyncio.Task[None]] = set()
    for name, coro in (("server", serve()), ("pinger", pinger())):
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(on_task_end)
        tasks.add(task)
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                await ws.send_json({"event": "error", "message": "send JSON text messages"})
                continue
            try:
                data = msg.json()
            except ValueError as exc:
                await ws.send_json({"event": "error", "message": f"not JSON: {exc}"})
                continue
            error = conn.dispatch(data)
            if error is not None:
                await ws.send_json({"event": "error", "message": error})
    finally:
        for req in conn.live():
            req.cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return ws


async def _end_with_error(ws: web.WebSocketResponse, message: str) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.send_json({"event": "error", "message": message})
    await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal error")


async def _serve_request(ws, req, worker, voices, base, max_word_chars) -> None:  # type: ignore[no-untyped-def]
    msg, index = req.msg, req.index
    text = msg.get("text", "")
    if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
        raise RequestError(f"'text' must be a string of at most {MAX_TEXT_CHARS} characters")
    streaming = req.streaming
    if not streaming and not text.strip():
        raise RequestError("'text' is empty")
    word_limit = max_word_chars
    try:
        open_chars = open_word_after(0, text, word_limit)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    fmt = msg.get("format", "pcm_24k")
    if fmt not in ("pcm_24k", "mulaw_8k"):
        raise RequestError("'format' must be pcm_24k or mulaw_8k")
    chunk_frames = msg.get("chunk_frames", 1)
    if not isinstance(chunk_frames, int) or not 1 <= chunk_frames <= 50:
        raise RequestError("'chunk_frames' must be an integer 1…50")
    try:
        voice = voices.get(msg.get("voice"))
    except VoiceError as exc:
        raise RequestError(str(exc)) from None
    cfg = _config(msg, base, seed=base.seed + index)
    started = time.monotonic()
    try:
        handle: TurnHandle = await worker.open_turn(voice.snapshot, cfg, turn_id=f"ws-{index}", text=text or None,
                                                    close=not streaming)
    except WorkerFull:
        raise RequestError("the TTS worker is full; try again shortly") from None
    except (TurnFailed, WorkerClosed) as exc:
        raise RequestError(f"generation failed: {exc}") from None
    outbound = OutboundAudio() if fmt == "mulaw_8k" else None

    async def forward_text() -> None:
        nonlocal open_chars
        while True:
            more = await req.text.get()
            if more is None:
                if req.cancelled.is_set():
                    handle.cancel()
                else:
                    handle.close_text()
                return
            try:
                open_chars = open_word_after(open_chars, more, word_limit)
            except ValueError as exc:
                await ws.send_json({"event": "error", "message": str(exc)})
                req.cancel()
                handle.cancel()
                return
            handle.push_text(more)

    async def cancel_on_request() -> None:
        await req.cancelled.wait()
        handle.cancel()

    helpers = [asyncio.create_task(forward_text()), asyncio.create_task(cancel_on_request())]
    chunks = 0
    pending: list[np.ndarray] = []
    first = True
    try:
        async for frame in handle.frames():
            if frame.words:
                await ws.send_json({"event": "words", "words": frame.words, "frame": frame.index})
            pending.append(frame.pcm24k)
            if len(pending) >= chunk_frames:
                await ws.send_bytes(b"\x00" + _encode(np.concatenate(pending), fmt, outbound))
                pending.clear()
                chunks += 1
                if first:
                    first = False
                    await ws.send_json({"event": "first_audio", "ms": round(1000 * (time.monotonic() - started), 1)})
        tail = _encode(np.concatenate(pending), fmt, outbound) if pending else b""
        if outbound is not None:
            tail += b"".join(outbound.finish())
        await ws.send_bytes(b"\x01" + tail)
        chunks += 1
        await ws.send_json({"event": "done", "request": index, "chunks": chunks,
                           "cancelled": handle.status is StreamStatus.CANCELLED})
    except TurnFailed as exc:
        await ws.send_json({"event": "error", "request": index, "message": f"generation failed: {exc}"})
    finally:
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        handle.cancel()
