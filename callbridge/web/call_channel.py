"""One call's message channel over a WebSocket, either side of the upgrade.

The text socket (``/calls/{id}/text``, the app dials us) and the app connection (the bridge
dials the app) are the same channel: this socket's :class:`~callbridge.calls.client_outbox.ClientOutbox`
drained by one sender task (events as JSON, caller audio as binary frames), and every text
frame read handed to the one :class:`~callbridge.calls.messages.ControlSession`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum

from aiohttp import ClientWebSocketResponse, WSMsgType, web

from ..calls.client_outbox import ClientOutbox
from ..calls.messages import ControlSession

__all__ = ["ChannelEnd", "serve_channel"]

Socket = web.WebSocketResponse | ClientWebSocketResponse


class ChannelEnd(enum.Enum):
    CALL_ENDED = "call_ended"  # call_ended was sent; the socket is closed (1000)
    CLIENT_LEFT = "client_left"  # the peer closed or the connection broke first


async def _send(ws: Socket, outbox: ClientOutbox) -> None:
    """The socket's only sender; returns once ``call_ended`` has been sent."""
    while True:
        items = await outbox.take()
        for i, item in enumerate(items):
            try:
                if isinstance(item, bytes):
                    await ws.send_bytes(item)
                else:
                    await ws.send_json(item)
            except (ConnectionError, RuntimeError, asyncio.CancelledError):
                # Closed under us, or the peer left while we sent: keep what was not sent for a
                # reconnection (the app link resumes; the item being sent may arrive twice).
                for rest in reversed(items[i:]):
                    outbox.unget(rest)
                raise
            if isinstance(item, dict) and item.get("event") == "call_ended":
                return


async def serve_channel(ws: Socket, session: ControlSession) -> ChannelEnd:
    """Read ``ws`` into ``session`` and send its outbox, until the call ends or the peer leaves."""
    outbox = session.outbox
    sender = asyncio.create_task(_send(ws, outbox))
    reader = asyncio.create_task(_read(ws, session))
    try:
        done, _ = await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
        if sender in done and sender.exception() is None:
            with contextlib.suppress(Exception):
                await ws.close()
            return ChannelEnd.CALL_ENDED
        return ChannelEnd.CLIENT_LEFT
    finally:
        for task in (sender, reader):
            task.cancel()
        await asyncio.wait({sender, reader})


async def _read(ws: Socket, session: ControlSession) -> None:
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            session.handle_text(msg.data)
        elif msg.type is WSMsgType.BINARY:
            session.handle_binary()
        else:  # close, closing, error: the peer is gone
            return
