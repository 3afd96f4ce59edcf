"""A scripted app for local runs: the WebSocket server a callbridge dials for every call.

``callbridge simulate --app-server PORT`` listens on 127.0.0.1:PORT (point the service at it:
``CALLBRIDGE_APP_WS_URL=ws://127.0.0.1:PORT/`` and the same ``CALLBRIDGE_APP_SECRET``). It
checks the bridge's signature (its own copy of the rule: the simulator imports nothing of the
service), prints every event of every call, and answers each ``caller_transcript`` with a
scripted turn (``--app-reply``, ``{text}`` replaced by what the caller said); with
``--app-hangup`` it hangs up once that answer has played.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import WSMsgType, web

__all__ = ["ScriptedApp", "app_signature_ok"]

DEFAULT_REPLY = "You said: {text}"
MAX_SKEW_S = 300.0


def app_signature_ok(secret: str, headers: Mapping[str, str], now: float | None = None) -> bool:
    """The bridge signs ``v1:{timestamp}:{call id}`` with HMAC-SHA256 (docs/security.md)."""
    call_id = headers.get("X-Callbridge-Call-Id", "")
    timestamp = headers.get("X-Callbridge-Timestamp", "")
    given = headers.get("X-Callbridge-Signature", "")
    if not call_id or not timestamp.isdigit() or not given.startswith("v1="):
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > MAX_SKEW_S:
        return False
    want = hmac.new(secret.encode(), f"v1:{timestamp}:{call_id}".encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(given[3:], want)


class ScriptedApp:
    """Serves app connections on 127.0.0.1:``port``; ``say`` prints one line per event."""

    def __init__(self, port: int, secret: str, *, reply: str = DEFAULT_REPLY, hang_up: bool = False,
                 say: Callable[[str], None] = print) -> None:
        self.port = port
        self.secret = secret
        self.reply = reply
        self.hang_up = hang_up  # hang up once an answer has played
        self.say = say
        self._answer_turns: set[str] = set()
        self.events: list[dict[str, Any]] = []
        self.answers: list[str] = []
        self.refused = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not app_signature_ok(self.secret, request.headers):
            self.refused += 1
            self.say("app: refused a connection with a bad or missing signature (check CALLBRIDGE_APP_SECRET)")
            raise web.HTTPUnauthorized()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        call_id = request.headers["X-Callbridge-Call-Id"]
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue  # caller audio, if subscribed: not used by this script
                with contextlib.suppress(ValueError):
                    await self._on_event(ws, call_id, json.loads(msg.data))
        finally:
            await ws.close()
        return ws

    async def _on_event(self, ws: web.WebSocketResponse, call_id: str, event: Any) -> None:
        if not isinstance(event, dict):
            return
        self.events.append(event)
        name = event.get("event")
        detail = {k: v for k, v in event.items() if k not in ("event", "call_sid")}
        self.say(f"app: {call_id} {name} {json.dumps(detail)[:300]}")
        if name == "turn_queued" and event.get("source") == "app":
            self._answer_turns.add(str(event.get("turn_id")))
        if name == "turn_done" and self.hang_up and event.get("turn_id") in self._answer_turns:
            self.say(f"app: {call_id} hangs up")
            await ws.send_json({"type": "hangup"})
        if name == "caller_transcript" and isinstance(event.get("text"), str) and event["text"].strip():
            answer = self.reply.replace("{text}", event["text"].strip())
            self.answers.append(answer)
            self.say(f"app: {call_id} answers {answer!r}")
            await ws.send_json({"type": "turn", "text": answer})
