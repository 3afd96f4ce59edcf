"""An app's WebSocket server for tests: checks the bridge's signature, records what arrives,
lets the test answer. Each accepted connection is one :class:`AppConnection`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from callbridge.sim.ports import free_tcp_port
from callbridge.web.app_link import verify_signature

SECRET = "app-secret-for-tests-0123456789"


@dataclass
class AppConnection:
    ws: web.WebSocketResponse
    call_id: str
    events: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    audio: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def next_event(self, name: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """The next event called ``name`` (earlier ones are skipped; a hang fails the test)."""
        async with asyncio.timeout(timeout_s):
            while True:
                event = await self.events.get()
                if event.get("event") == name:
                    return event

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_json(message)


class AppServer:
    """Listens on 127.0.0.1. ``refuse``: answer upgrades 403 (an app that is down for us)."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.port = free_tcp_port()
        self.url = f"ws://127.0.0.1:{self.port}/callbridge"
        self.connections: asyncio.Queue[AppConnection] = asyncio.Queue()
        self.refused = 0
        self.bad_signatures = 0
        self.refuse = False
        self._runner: web.AppRunner | None = None

    async def start(self) -> AppServer:
        app = web.Application()
        app.router.add_get("/callbridge", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def next_connection(self, timeout_s: float = 60.0) -> AppConnection:
        async with asyncio.timeout(timeout_s):
            return await self.connections.get()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not verify_signature(self.secret, request.headers):
            self.bad_signatures += 1
            raise web.HTTPUnauthorized()
        if self.refuse:
            self.refused += 1
            raise web.HTTPForbidden()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        conn = AppConnection(ws, request.headers["X-Callbridge-Call-Id"])
        await self.connections.put(conn)
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await conn.events.put(json.loads(msg.data))
                elif msg.type is WSMsgType.BINARY:
                    await conn.audio.put(bytes(msg.data))
        finally:
            conn.closed.set()
            with contextlib.suppress(Exception):
                await ws.close()
        return ws
