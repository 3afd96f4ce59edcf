"""The app connection: a WebSocket the bridge opens to the app for every call it holds.

With ``[app] websocket_url`` set, each call that starts (any carrier: the handler that holds the
call calls :meth:`Services.start_call <callbridge.web.services.Services.start_call>`) dials the
app from this instance. The upgrade is signed (:func:`signature_headers`); the first event is
``call_started`` (call id, carrier, from/to, voice, custom parameters), then every event of the
call; the app sends the text socket's messages (one parser: :mod:`callbridge.calls.messages`).

Decided failures, each ending in words the caller hears, never a silent line:

- **unreachable at call start**: ``app.connect_attempts`` attempts of ``app.connect_timeout_s``
  each, with a short back-off; all failing, the call says ``app.unreachable_message`` and hangs
  up (``hangup: app unreachable``);
- **dropped mid-call**: the bridge redials for up to ``app.reconnect_grace_s``; the new
  connection starts with ``call_resumed`` (the same call; events of the gap follow, kept in the
  bounded outbox; audio subscriptions and an open streamed turn do not carry over), else the
  message and the hang-up as above. The caller hears whatever was queued meanwhile.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from ..calls.call import Call, CallState
from ..calls.client_outbox import ClientOutbox
from ..calls.messages import ControlSession
from ..config import AppSettings
from .call_channel import ChannelEnd, serve_channel

__all__ = ["AppLink", "LinkState", "signature_headers", "verify_signature"]

log = logging.getLogger(__name__)

SIGNATURE_VERSION = "v1"
MAX_SKEW_S = 300.0  # an app should refuse a signature older (or newer) than this
BACKOFF_S = (0.2, 0.5, 1.0, 2.0)  # between connection attempts (then 2 s each)


def _signed_text(timestamp: str, call_id: str) -> bytes:
    return f"{SIGNATURE_VERSION}:{timestamp}:{call_id}".encode()


def signature_headers(secret: str, call_id: str, now: float | None = None) -> dict[str, str]:
    """The headers of the upgrade: the call id, a timestamp, and HMAC-SHA256 over both."""
    timestamp = str(int(time.time() if now is None else now))
    digest = hmac.new(secret.encode(), _signed_text(timestamp, call_id), hashlib.sha256).hexdigest()
    return {"X-Callbridge-Call-Id": call_id, "X-Callbridge-Timestamp": timestamp,
            "X-Callbridge-Signature": f"{SIGNATURE_VERSION}={digest}"}


def verify_signature(secret: str, headers: Mapping[str, str], now: float | None = None,
                     max_skew_s: float = MAX_SKEW_S) -> bool:
    """What an app does with the upgrade's headers (a Python app may import this)."""
    call_id = headers.get("X-Callbridge-Call-Id", "")
    timestamp = headers.get("X-Callbridge-Timestamp", "")
    given = headers.get("X-Callbridge-Signature", "")
    if not call_id or not timestamp.isdigit() or not given.startswith(SIGNATURE_VERSION + "="):
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > max_skew_s:
        return False
    want = hmac.new(secret.encode(), _signed_text(timestamp, call_id), hashlib.sha256).hexdigest()
    return hmac.compare_digest(given.partition("=")[2], want)


class LinkState(enum.Enum):
    CONNECTING = "connecting"  # dialling at call start
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # the app dropped: redialling within the grace period
    GAVE_UP = "gave_up"  # the caller hears the message and the call hangs up
    DONE = "done"  # the call ended (call_ended sent when connected)


_TRANSITIONS: dict[LinkState, frozenset[LinkState]] = {
    LinkState.CONNECTING: frozenset({LinkState.CONNECTED, LinkState.GAVE_UP, LinkState.DONE}),
    LinkState.CONNECTED: frozenset({LinkState.RECONNECTING, LinkState.DONE}),
    LinkState.RECONNECTING: frozenset({LinkState.CONNECTED, LinkState.GAVE_UP, LinkState.DONE}),
    LinkState.GAVE_UP: frozenset({LinkState.DONE}),
    LinkState.DONE: frozenset(),
}


class AppLink:
    """One call's connection to the app. Build it *before* ``call.begin()`` (so it gets
    ``call_started``), then run :meth:`run` as a task; it returns when the call has ended."""

    def __init__(self, call: Call, settings: AppSettings) -> None:
        self.call = call
        self.settings = settings
        self.outbox = ClientOutbox(audio_frames=settings.audio_buffer_frames)
        call.listeners.add(self.outbox)
        self.session = ControlSession(call, self.outbox, name="app", source="app")
        self.state = LinkState.CONNECTING
        self.connections = 0  # successful upgrades (1 + resumes)
        self.failed_attempts = 0

    def _move(self, new: LinkState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"app link {self.call.call_sid}: illegal transition {self.state.value} -> {new.value}")
        self.state = new

    async def run(self) -> None:
        try:
            async with aiohttp.ClientSession() as http:
                await self._run(http)
        finally:
            self.call.listeners.discard(self.outbox)
            self.session.close()
            if self.state is not LinkState.DONE:
                self._move(LinkState.DONE)

    async def _run(self, http: aiohttp.ClientSession) -> None:
        while True:
            ws = await self._until_call_ends(self._dial(http))
            if ws is None:
                if self.call.state is not CallState.ENDED:
                    self._give_up()
                return
            self.connections += 1
            resumed = self.state is LinkState.RECONNECTING
            self._move(LinkState.CONNECTED)
            if resumed:
                lost = self.outbox not in self.call.listeners  # the gap overflowed the outbox
                self.call.listeners.add(self.outbox)
                self.outbox.reply({**self.call.started_event(), "event": "call_resumed", "events_lost": lost},
                                  first=True)
            try:
                end = await serve_channel(ws, self.session)
            finally:
                await ws.close()
            if end is ChannelEnd.CALL_ENDED or self.call.state is CallState.ENDED:
                return
            self.session.close()  # an open streamed turn is said as sent; audio stops
            self.call.log.warning("the app connection dropped mid-call: redialling for %.1f s",
                                  self.settings.reconnect_grace_s)
            self._move(LinkState.RECONNECTING)

    async def _until_call_ends(self, dial: Any) -> aiohttp.ClientWebSocketResponse | None:
        """``dial`` unless the call ends first (then None)."""
        dialling = asyncio.ensure_future(dial)
        ended = asyncio.ensure_future(self.call.ended.wait())
        try:
            await asyncio.wait({dialling, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            if not dialling.done():
                dialling.cancel()
                await asyncio.wait({dialling})
        if dialling.cancelled():
            return None
        ws: aiohttp.ClientWebSocketResponse | None = dialling.result()
        if ws is not None and self.call.state is CallState.ENDED:
            await ws.close()
            return None
        return ws

    async def _dial(self, http: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse | None:
        """Connection attempts: ``connect_attempts`` at call start, as many as fit the grace
        period after a drop. None when none succeeded."""
        s = self.settings
        loop = asyncio.get_running_loop()
        resuming = self.state is LinkState.RECONNECTING
        deadline = loop.time() + s.reconnect_grace_s
        attempt = 0
        while True:
            attempt += 1
            timeout_s = min(s.connect_timeout_s, deadline - loop.time()) if resuming else s.connect_timeout_s
            if timeout_s <= 0:
                return None
            try:
                async with asyncio.timeout(timeout_s):
                    return await http.ws_connect(
                        s.websocket_url, headers=signature_headers(s.secret, self.call.call_sid),
                        heartbeat=20.0, max_msg_size=256 * 1024)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.failed_attempts += 1
                self.call.log.warning("app connection attempt %d failed: %s", attempt, _why(exc))
            if not resuming and attempt >= s.connect_attempts:
                return None
            pause = BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)]
            if resuming:
                pause = min(pause, deadline - loop.time())
                if pause <= 0:
                    return None
            await asyncio.sleep(pause)  # retry back-off (the service's behaviour, not a test wait)

    def _give_up(self) -> None:
        phase = "reconnect" if self.state is LinkState.RECONNECTING else "start"
        self._move(LinkState.GAVE_UP)
        self.call.log.warning("the app cannot be reached (%s): the caller hears the unreachable message, then "
                              "a hang-up", phase)
        self.call.emit({"event": "app_unreachable", "phase": phase})
        self.call.say_and_hang_up(self.settings.unreachable_message, "app unreachable",
                                  self.settings.message_drain_timeout_s)


def _why(exc: BaseException) -> str:
    """An attempt's failure in a few words (no URL: it may carry the app's own secrets)."""
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"the app answered HTTP {exc.status}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__
