"""Closing a carrier's WebSocket: the close code for a call's end reason, and a bounded close."""

from __future__ import annotations

import asyncio

from aiohttp import WSCloseCode, web

__all__ = ["close_code_for", "close_socket"]


def close_code_for(reason: str) -> WSCloseCode:
    """The WebSocket close code for a call's end reason (``call.end_reason``)."""
    if reason.startswith("protocol_error"):
        return WSCloseCode.POLICY_VIOLATION  # 1008: bad input from the peer
    if reason.startswith("error"):
        return WSCloseCode.INTERNAL_ERROR  # 1011: our side failed (send timeout, speaker)
    if reason == "shutdown":
        return WSCloseCode.GOING_AWAY  # 1001
    return WSCloseCode.OK


async def close_socket(ws: web.WebSocketResponse, transport: asyncio.Transport | None, code: int,
                       message: str, timeout_s: float) -> None:
    """Close ``ws`` with ``code``, bounded: a peer that reads nothing cannot take the close
    frame, and a plain transport close would wait for it forever, so the connection is
    aborted instead (its socket and file descriptor are freed at once)."""
    if ws.closed:
        return
    try:
        async with asyncio.timeout(timeout_s):
            await ws.close(code=code, message=message.encode()[:120])
    except TimeoutError:
        if transport is not None:
            transport.abort()
    except asyncio.CancelledError:
        if transport is not None:
            transport.abort()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # Not our cancellation: aiohttp shares one drain future per connection, and a send
        # that timed out (a stalled peer) cancelled it; every later drain re-raises that.
    except ConnectionError:
        pass  # already gone
