"""The per-call text WebSocket (``/calls/{CallSid}/text``): stream a turn's text as an LLM writes
it, send control messages, and receive every event of the call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import WSMsgType, web

from ..calls.turns import TurnRejected
from .control import _turn_text
from .services import _get_call, check_api_token, services

log = logging.getLogger(__name__)


async def call_text_socket(request: web.Request) -> web.WebSocketResponse:
    """Stream a turn's text as an LLM writes it; events of the call stream back."""
    check_api_token(request)
    call = _get_call(request)
    svc = services(request)
    ws = web.WebSocketResponse(max_msg_size=256 * 1024, heartbeat=20.0)
    await ws.prepare(request)
    svc.sockets.add(ws)
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
    call.listeners.add(events)

    async def pump() -> None:
        while True:
            event = await events.get()
            await ws.send_json(event)
            if event.get("event") == "call_ended":
                await ws.close()
                return

    pump_task = asyncio.create_task(pump())
    turn = None
    try:
        async for msg in ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                break
            if msg.type is not WSMsgType.TEXT:
                await ws.send_json({"event": "error", "message": "send JSON text messages"})
                continue
            try:
                data = msg.json()
            except ValueError:
                data = None
            if not isinstance(data, dict) or not isinstance(data.get("type"), str):
                await ws.send_json({"event": "error", "status": 400, "message": "not a JSON object with a string "
                                    '"type": send e.g. {"type": "text", "text": "Hello"}'})
                continue
            kind = data["type"]
            try:
                if kind == "text":
                    text = data.get("text")
                    if not isinstance(text, str):
                        raise TurnRejected(400, "'text' must be a string")
                    if turn is None or turn.text_closed:
                        turn = call.add_turn(None, close=False, interrupt=bool(data.get("interrupt")), source="stream")
                    call.push_text(turn, text)
                elif kind == "end_turn":
                    if turn is not None:
                        call.close_text(turn)
                        turn = None
                elif kind == "turn":
                    text = _turn_text(data.get("text"))
                    call.add_turn(text, close=True, interrupt=bool(data.get("interrupt")), source="stream")
                elif kind == "interrupt":
                    call.interrupt(reason="interrupted by the API")
                    turn = None
                elif kind == "hangup":
                    call.hang_up("text socket")
                elif kind == "ping":
                    await ws.send_json({"event": "pong"})
                else:
                    raise TurnRejected(400, f"unknown message type {kind!r}")
            except TurnRejected as exc:
                await ws.send_json({"event": "error", "status": exc.status, "message": str(exc)})
    finally:
        call.listeners.discard(events)
        pump_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump_task
        if turn is not None and not turn.text_closed:
            call.close_text(turn)  # the client left mid-turn: say what it sent
    return ws
