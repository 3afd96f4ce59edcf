"""The per-call text WebSocket (``/calls/{CallSid}/text``): stream a turn's text as an LLM writes
it, send control messages, subscribe to the caller's audio, and receive every event of the call.

The messages are the app connection's (:mod:`callbridge.calls.messages`, one parser for both);
this module only authenticates and serves the socket (:func:`.call_channel.serve_channel`)."""

from __future__ import annotations

import logging

from aiohttp import web

from ..calls.client_outbox import ClientOutbox
from ..calls.messages import ControlSession
from .call_channel import serve_channel
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
    outbox = ClientOutbox(audio_frames=svc.settings.app.audio_buffer_frames)
    call.listeners.add(outbox)
    session = ControlSession(call, outbox, name="text socket", source="stream")
    try:
        await serve_channel(ws, session)
    finally:
        call.listeners.discard(outbox)
        session.close()  # the client left mid-turn: say what it sent
    return ws
