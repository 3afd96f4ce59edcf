"""``/ws/stream_tts``: plain streaming TTS over a WebSocket, for apps that are not on Twilio.

Protocol (compatible with the clients our users already have):
- on connect the server sends ``{"event": "ready", "sample_rate": 24000}``;
- the client sends ``{"type": "tts", "text": "[S1] Hi.", ...}`` with optional ``cfg_scale``,
  ``temperature``, ``top_k``, ``chunk_frames``, ``voice``, ``format`` (``pcm_24k`` or
  ``mulaw_8k``) and ``stream`` (true: the text continues in ``{"type": "text", "text": …}``
  messages until ``{"type": "close"}``); ``{"type": "cancel"}`` stops the request;
- the server sends binary messages = 1 byte "is last" flag + audio (16-bit little-endian PCM
  at 24 kHz, or mu-law at 8 kHz), and JSON events ``first_audio``, ``words``, ``done`` (with
  ``chunks``) and ``error`` (with ``message``); ``{"event": "ping"}`` keep-alives may come,
  answered by ``{"type": "pong"}``. Several requests may follow on one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from dia2 import GenerationConfig, SamplingParams, StreamStatus

from ..audio import OutboundAudio
from ..calls.turns import open_word_after
from ..tts import TurnFailed, TurnHandle, WorkerFull, generation_config
from ..voices import VoiceError
from .services import SERVICES, check_api_token

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

    top_k = num("top_k", base.audio.top_k, 0, 2048)
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


async def stream_tts_handler(request: web.Request) -> web.WebSocketResponse:

    check_api_token(request)
    svc = request.app[SERVICES]
    _, worker, voices = svc.require()
    ws = web.WebSocketResponse(max_msg_size=256 * 1024)
    await ws.prepare(request)
    svc.sockets.add(ws)
    await ws.send_json({"event": "ready", "sample_rate": 24000})
    t = svc.settings.tts
    base = generation_config(t, seed=t.seed)
    inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=1000)

    async def reader() -> None:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                await ws.send_json({"event": "error", "message": "send JSON text messages"})
                continue
            try:
                data = msg.json()
            except ValueError:
                await ws.send_json({"event": "error", "message": "invalid JSON"})
                continue
            if isinstance(data, dict) and data.get("type") == "pong":
                continue
            if isinstance(data, dict):
                await inbox.put(data)
        await inbox.put(None)

    async def pinger() -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            await ws.send_json({"event": "ping"})

    tasks = [asyncio.create_task(reader()), asyncio.create_task(pinger())]
    requests = 0
    try:
        while True:
            msg = await inbox.get()
            if msg is None:
                break
            if msg.get("type") != "tts":
                if msg.get("type") not in ("text", "close", "cancel"):
                    await ws.send_json({"event": "error", "message": f"unknown message type {msg.get('type')!r}"})
                continue
            requests += 1
            try:
                await _serve_request(ws, msg, inbox, worker, voices, base, requests, svc.settings.calls.max_word_chars)
            except RequestError as exc:
                await ws.send_json({"event": "error", "message": str(exc)})
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return ws


async def _serve_request(ws, msg, inbox, worker, voices, base, index, max_word_chars) -> None:  # type: ignore[no-untyped-def]
    text = msg.get("text", "")
    if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
        raise RequestError(f"'text' must be a string of at most {MAX_TEXT_CHARS} characters")
    streaming = bool(msg.get("stream", False))
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
    outbound = OutboundAudio() if fmt == "mulaw_8k" else None

    async def forward_text() -> None:
        while True:
            more = await inbox.get()
            if more is None:
                handle.cancel()
                return
            kind = more.get("type")
            if kind == "text" and isinstance(more.get("text"), str):
                nonlocal open_chars
                try:
                    open_chars = open_word_after(open_chars, more["text"], word_limit)
                except ValueError as exc:
                    await ws.send_json({"event": "error", "message": str(exc)})
                    handle.cancel()
                    return
                handle.push_text(more["text"])
            elif kind == "close":
                handle.close_text()
            elif kind == "cancel":
                handle.cancel()
                return

    forwarder = asyncio.create_task(forward_text())
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
        await ws.send_json({"event": "done", "chunks": chunks,
                           "cancelled": handle.status is StreamStatus.CANCELLED})
    except TurnFailed as exc:
        await ws.send_json({"event": "error", "message": f"generation failed: {exc}"})
    finally:
        forwarder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await forwarder
        handle.cancel()
