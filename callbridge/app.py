"""The aiohttp application: Twilio webhook and media streams, the control API, health, metrics.

App-wide objects hang on the app under typed keys and live in ``cleanup_ctx``: the Dia2
runtime, the TTS worker (its own thread), the voice registry, the call registry, the
one-time stream tokens and the metrics. Route handlers are thin: protocol logic lives in
``twilio``, per-call logic in ``call``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import secrets
import socket
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from dia2 import Dia2
from dia2.text import normalize_text

from .agent import Agent, AgentReply, load_agent, run_agent
from .call import Call, CallState, TurnRejected, load_fallback_audio
from .config import Settings
from .metrics import Metrics
from .tts import Reservation, TtsWorker
from .tts_socket import stream_tts_handler
from .twilio import (
    ProtocolError,
    Start,
    connect_stream_twiml,
    public_url,
    reject_twiml,
    say_hangup_twiml,
    validate_signature,
    websocket_url,
)
from .voices import VoiceError, VoiceRegistry

log = logging.getLogger(__name__)

STREAM_PATH = "/twilio/stream/"
#: A media socket's writer checks for back-pressure every this many bytes (aiohttp: 64 KiB),
#: and the transport pauses above this much unsent data, so a stalled reader blocks our send
#: (and trips ``audio.send_timeout_s``) after about a second of audio, not after minutes.
WS_WRITER_CHECK_BYTES = 4096
WS_WRITE_HIGH_WATER = 16 * 1024


@dataclass
class StreamBinding:
    call_sid: str
    voice: str
    greeting: str
    expires_at: float
    reservation: Reservation  # the TTS slot held for this call from admission to hang-up


@dataclass
class StreamTokens:
    """One-time tokens minted by the webhook, bound to a CallSid, put in the stream URL path."""

    ttl_s: float
    tokens: dict[str, StreamBinding] = field(default_factory=dict)
    seen_calls: dict[str, float] = field(default_factory=dict)  # CallSid -> first webhook time (replays)

    def mint(self, call_sid: str, voice: str, greeting: str, reservation: Reservation) -> str:
        self._prune()
        token = secrets.token_urlsafe(24)  # 192 bits
        self.tokens[token] = StreamBinding(call_sid, voice, greeting, time.monotonic() + self.ttl_s, reservation)
        self.seen_calls[call_sid] = time.monotonic()
        return token

    def seen(self, call_sid: str) -> bool:
        self._prune()
        return call_sid in self.seen_calls

    def peek(self, token: str) -> StreamBinding | None:
        binding = self.tokens.get(token)
        if binding is None or binding.expires_at < time.monotonic():
            return None
        return binding

    def consume(self, token: str) -> StreamBinding | None:
        """Take the token (single use); the caller now owns its reservation."""
        binding = self.peek(token)
        self.tokens.pop(token, None)
        return binding

    def discard(self, token: str) -> None:
        binding = self.tokens.pop(token, None)
        if binding is not None:
            binding.reservation.release()

    def _prune(self) -> None:
        now = time.monotonic()
        for token in [t for t, b in self.tokens.items() if b.expires_at < now]:
            self.discard(token)  # the stream never came: give its TTS slot back
        for sid in [s for s, t in self.seen_calls.items() if now - t > 3600]:
            del self.seen_calls[sid]


@dataclass
class Services:
    """Everything the handlers share; one per app."""

    settings: Settings
    metrics: Metrics
    runtime: Dia2 | None = None
    worker: TtsWorker | None = None
    voices: VoiceRegistry | None = None
    calls: dict[str, Call] = field(default_factory=dict)
    tokens: StreamTokens = field(default_factory=lambda: StreamTokens(30.0))
    sockets: weakref.WeakSet[web.WebSocketResponse] = field(default_factory=weakref.WeakSet)
    # Played when a turn fails (calls.fallback_audio, loaded at start-up); None: 300 ms silence.
    fallback_ulaw8k: bytes | None = None
    # Called with each call once it has ended and left the registry (diagnostics: bench/soak.py).
    call_observers: list[Callable[[Call], None]] = field(default_factory=list)
    agent: Agent | None = None
    ready: bool = False
    shutting_down: bool = False

    def require(self) -> tuple[Dia2, TtsWorker, VoiceRegistry]:
        if self.runtime is None or self.worker is None or self.voices is None:
            raise web.HTTPServiceUnavailable(text="starting up")
        return self.runtime, self.worker, self.voices


SERVICES = web.AppKey("services", Services)
# An in-process agent object given by the embedding app (takes precedence over [agent]).
AGENT = web.AppKey("agent", object)


# ---------------------------------------------------------------------------- helpers

# Secrets that travel in URLs: the API token as ``?token=`` (clients that cannot set headers)
# and the one-time stream token in the media stream's path.
_URL_SECRETS = re.compile(r"(?P<key>[?&]token=)[^&\s\"]*|(?P<path>/twilio/stream/)[^?\s\"/]+")


def redact_url(text: str) -> str:
    """``text`` with URL-borne tokens replaced by ``[redacted]`` (for log lines)."""
    return _URL_SECRETS.sub(lambda m: (m.group("key") or m.group("path")) + "[redacted]", text)


class RedactTokens(logging.Filter):
    """Keeps tokens out of aiohttp's access log (its request line includes path and query)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not record.args:
            record.msg = redact_url(record.msg)
        line = record.__dict__.get("first_request_line")  # the access log's `extra` for %r
        if isinstance(line, str):
            record.__dict__["first_request_line"] = redact_url(line)
        return True


def _install_log_redaction() -> None:
    access = logging.getLogger("aiohttp.access")
    if not any(isinstance(f, RedactTokens) for f in access.filters):
        access.addFilter(RedactTokens())


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def _public_base(request: web.Request, settings: Settings) -> str:
    """The configured public base URL; without one (local use), what the request says."""
    if settings.server.public_base_url:
        return settings.server.public_base_url.rstrip("/")
    return f"{request.scheme}://{request.host}"


def _route_of(request: web.Request) -> str:
    """The route template, not the path: a media stream's path carries its one-time token."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "?"


def _check_twilio_signature(request: web.Request, url: str, params: dict[str, Any]) -> None:
    settings = services(request).settings.twilio
    if not settings.validate_signatures and not settings.auth_token:
        return
    signature = request.headers.get("X-Twilio-Signature")
    ok = validate_signature(
        settings.auth_token, url, params, signature, request.headers.get("X-Twilio-Webhooks-Signature-Settings")
    )
    if not ok and not settings.validate_signatures:  # local development: say what would have failed
        log.warning("%s %s: %s Twilio signature (accepted: twilio.validate_signatures is off)", request.method,
                    _route_of(request), "missing" if not signature else "invalid")
        return
    if not ok:
        services(request).metrics.rejected_total.labels(reason="bad_signature").inc()
        log.warning("rejected %s %s: %s Twilio signature", request.method, _route_of(request),
                    "missing" if not signature else "invalid")
        raise web.HTTPForbidden(text="invalid Twilio signature")


def check_api_token(request: web.Request) -> None:
    """Bearer token (or ?token= for clients that cannot set headers), constant-time compare."""
    auth = services(request).settings.auth
    if not auth.enabled:
        return
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else request.query.get("token", "")
    if not given or not hmac.compare_digest(given.encode(), auth.api_token.encode()):
        services(request).metrics.rejected_total.labels(reason="bad_api_token").inc()
        raise web.HTTPUnauthorized(
            text='{"error": "missing or invalid API token"}',
            content_type="application/json",
            headers={"WWW-Authenticate": "Bearer"},
        )


class JsonError(web.HTTPError):
    """An HTTP error with a JSON body ``{"error": message}`` and any status."""

    def __init__(self, status: int, message: str) -> None:
        self.status_code = status
        super().__init__(text=json.dumps({"error": message}), content_type="application/json")


def _get_call(request: web.Request) -> Call:
    sid = request.match_info["call_sid"]
    call = services(request).calls.get(sid)
    if call is None:
        raise JsonError(404, "unknown call")
    return call


# ---------------------------------------------------------------------------- Twilio


async def twilio_voice(request: web.Request) -> web.Response:
    """The voice webhook: check the signature, admit or reject, answer <Connect><Stream>."""
    svc = services(request)
    form = await request.post()
    params: dict[str, Any] = {}
    for key in form:
        values = form.getall(key)
        params[key] = [str(v) for v in values] if len(values) > 1 else str(values[0])
    base = _public_base(request, svc.settings)
    _check_twilio_signature(request, public_url(base, request.rel_url.raw_path, request.rel_url.raw_query_string), params)
    call_sid = str(params.get("CallSid", ""))
    if not call_sid.startswith("CA") or len(call_sid) > 64:
        raise web.HTTPBadRequest(text="missing or malformed CallSid")
    if svc.tokens.seen(call_sid) or call_sid in svc.calls:
        svc.metrics.rejected_total.labels(reason="replayed_webhook").inc()
        log.warning("refused a repeated webhook for call %s", call_sid)
        raise web.HTTPForbidden(text="this call was already answered")
    _, worker, voices = svc.require()
    voice_name = request.query.get("voice") or voices.default
    try:
        voices.get(voice_name)
    except VoiceError:
        log.warning("call %s asked for an unknown voice %r", call_sid, voice_name[:64])
        svc.metrics.rejected_total.labels(reason="unknown_voice").inc()
        return web.Response(text=say_hangup_twiml("Sorry, this line is not configured correctly."),
                            content_type="text/xml")
    live = sum(1 for c in svc.calls.values() if c.state is not CallState.ENDED) + len(svc.tokens.tokens)
    reservation = worker.reserve() if live < svc.settings.calls.max_calls else None
    if reservation is None:
        svc.metrics.rejected_total.labels(reason="full").inc()
        log.warning("call %s rejected: %d calls live, worker free %d", call_sid, live, worker.free)
        return web.Response(text=reject_twiml("busy"), content_type="text/xml")
    greeting = request.query.get("greeting", svc.settings.twilio.greeting)
    token = svc.tokens.mint(call_sid, voice_name, greeting, reservation)
    stream_url = websocket_url(base, STREAM_PATH + token)
    status_cb = public_url(base, "/twilio/stream-status") if svc.settings.twilio.status_callback else None
    # The token (not these parameters) is what the stream is checked against; "greeting" only
    # tells a client that one will be spoken first.
    params = {"voice": voice_name, "greeting": "yes" if greeting else ""}
    twiml = connect_stream_twiml(stream_url, params, status_callback=status_cb)
    log.info("call %s admitted (voice %s)", call_sid, voice_name)
    return web.Response(text=twiml, content_type="text/xml")


async def twilio_stream_status(request: web.Request) -> web.Response:
    svc = services(request)
    form = await request.post()
    params = {k: str(v) for k, v in form.items()}
    _check_twilio_signature(request, public_url(_public_base(request, svc.settings), request.path,
                                                request.rel_url.raw_query_string), params)
    log.info("stream status %s for call %s: %s", params.get("StreamEvent"), params.get("CallSid"),
             params.get("StreamError", ""))
    return web.Response(status=204)


class _RateLimit:
    """At most ``per_s`` messages in any one-second window (Twilio sends ~50/s)."""

    def __init__(self, per_s: int) -> None:
        self.per_s = per_s
        self.window_start = time.monotonic()
        self.count = 0

    def hit(self) -> bool:
        now = time.monotonic()
        if now - self.window_start >= 1.0:
            self.window_start, self.count = now, 0
        self.count += 1
        return self.count <= self.per_s


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


def _limit_send_buffer(request: web.Request, send_buffer_bytes: int) -> asyncio.Transport | None:
    """Bound what a media socket can hold unsent (kernel and user space); see ``WS_WRITE_HIGH_WATER``."""
    transport = request.transport
    if transport is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # e.g. not a TCP socket: keep the defaults
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    transport.set_write_buffer_limits(high=WS_WRITE_HIGH_WATER)
    return transport


async def twilio_stream(request: web.Request) -> web.WebSocketResponse:
    """One call's media stream. This handler is the only reader of the socket.

    Outcomes (each is one WARNING line at most, and touches no other call): a bad signature
    or an unknown, expired or used token is refused with 403 before the upgrade; a frame or
    an event order that breaks the protocol, a flood, or no ``start`` within
    ``twilio.start_timeout_s`` closes with 1008; an internal failure (a send timeout on a
    stalled reader, a crashed speaker) closes with 1011; shutdown closes with 1001; ``stop``,
    a hang-up or ``calls.max_call_s`` closes with 1000. Unknown events are ignored (logged
    at debug).
    """
    svc = services(request)
    settings = svc.settings
    token = request.match_info["token"]
    base = _public_base(request, settings)
    _check_twilio_signature(request, websocket_url(base, request.path), {})
    binding = svc.tokens.peek(token)
    if binding is None:
        svc.metrics.rejected_total.labels(reason="bad_stream_token").inc()
        log.warning("refused a media stream with an unknown or expired token")
        raise web.HTTPForbidden(text="unknown or expired stream token")
    _, worker, voices = svc.require()
    ws = web.WebSocketResponse(max_msg_size=settings.twilio.max_message_bytes, autoping=True,
                               writer_limit=WS_WRITER_CHECK_BYTES)
    transport = _limit_send_buffer(request, settings.audio.send_buffer_bytes)
    await ws.prepare(request)
    svc.sockets.add(ws)
    call = Call(
        call_sid=binding.call_sid,
        voice=voices.get(binding.voice),
        settings=settings,
        worker=worker,
        metrics=svc.metrics,
        send_text=ws.send_str,
        greeting=binding.greeting,
        reservation=binding.reservation,
        fallback_ulaw8k=svc.fallback_ulaw8k,
    )

    async def close_when_ended() -> None:
        # The one place that closes this socket: whoever ends the call (this handler, the
        # call's own writer on a send timeout, a hang-up, shutdown), the peer gets the code
        # for the reason, and a receive() in progress returns at once.
        await call.ended.wait()
        await close_socket(ws, transport, close_code_for(call.end_reason), call.end_reason,
                           settings.audio.send_timeout_s)

    closer = asyncio.create_task(close_when_ended(), name=f"close-{call.call_sid}")
    reason = "hangup: caller"
    agent_task: asyncio.Task[None] | None = None
    limiter = _RateLimit(settings.twilio.max_messages_per_s)
    started_by = time.monotonic() + settings.twilio.start_timeout_s
    over_at = time.monotonic() + settings.calls.max_call_s
    try:
        while True:
            connecting = call.state is CallState.CONNECTING
            left = (started_by if connecting else over_at) - time.monotonic()
            msg = None
            if left > 0:
                with contextlib.suppress(TimeoutError):
                    msg = await ws.receive(timeout=left)
            if msg is None:  # a deadline passed
                if connecting:
                    raise ProtocolError("start_timeout", f"no start within {settings.twilio.start_timeout_s} s")
                reason = "hangup: max_call_s"
                call.log.warning("call reached calls.max_call_s = %.0f s: hanging up", settings.calls.max_call_s)
                break
            if call.state is CallState.ENDED:  # ended elsewhere while we waited
                reason = call.end_reason
                break
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                reason = "hangup: socket closed" if call.state is not CallState.CONNECTING else "error: closed before start"
                if svc.shutting_down:
                    reason = "shutdown"
                break
            if msg.type is WSMsgType.ERROR:
                if isinstance(ws.exception(), Exception) and "size" in str(ws.exception()).lower():
                    raise ProtocolError("too_large", str(ws.exception()))
                reason = f"error: socket {type(ws.exception()).__name__}"
                break
            if not limiter.hit():
                raise ProtocolError("flood", f"more than {settings.twilio.max_messages_per_s} messages in a second")
            data = msg.data if msg.type is WSMsgType.TEXT else bytes(msg.data)
            event = call.protocol.receive(data)
            if isinstance(event, Start):
                if svc.tokens.consume(token) is None or event.call_sid != binding.call_sid:
                    raise ProtocolError("call_mismatch", "start does not match the call this stream was issued for")
                if binding.call_sid in svc.calls:
                    raise ProtocolError("duplicate_call", "this call already has a media stream")
                svc.calls[call.call_sid] = call
                if svc.agent is not None:
                    agent_task = _start_agent(request.app, svc.agent, call)
                call.begin(event)
                continue
            if not call.on_event(event):
                reason = "hangup: stop"
                break
            if call.state is CallState.ENDED:
                reason = call.end_reason
                break
    except ProtocolError as exc:
        reason = f"protocol_error: {exc.code}"
        svc.metrics.protocol_errors_total.labels(code=exc.code).inc()
        call.log.warning("ending call on protocol error %s: %s", exc.code, exc.message)
    except asyncio.CancelledError:
        reason = "shutdown"
        raise
    finally:
        if agent_task is not None:
            agent_task.cancel()
        svc.tokens.discard(token)  # a stream that ended before `start` frees its slot at once
        await call.end(reason)  # no-op if it ended elsewhere; wakes the closer
        with contextlib.suppress(asyncio.CancelledError):
            await closer
        if svc.calls.get(call.call_sid) is call:
            del svc.calls[call.call_sid]
        for observe in svc.call_observers:
            observe(call)
    return ws


def _start_agent(app: web.Application, agent: Agent, call: Call) -> asyncio.Task[None]:
    """Subscribe the agent to the call's events (before ``begin``, so it sees call_started)."""
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
    call.listeners.add(events)

    async def act(reply: AgentReply) -> None:
        if call.state is not CallState.ACTIVE:
            return
        try:
            if reply.say:
                call.add_turn(reply.say, close=True, interrupt=reply.interrupt, source="agent")
            elif reply.interrupt:
                call.interrupt(reason="interrupted by the agent")
        except TurnRejected as exc:
            call.log.warning("agent turn refused: %s", exc)
        if reply.hangup:
            asyncio.get_running_loop().create_task(hang_up(app, call))

    return asyncio.create_task(run_agent(agent, events, call.view, act, call.call_sid), name=f"agent-{call.call_sid}")


# ---------------------------------------------------------------------------- control API


async def list_calls(request: web.Request) -> web.Response:
    check_api_token(request)
    return web.json_response({"calls": [c.view() for c in services(request).calls.values()]})


async def get_call(request: web.Request) -> web.Response:
    check_api_token(request)
    return web.json_response(_get_call(request).view())


async def _read_json(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > 256 * 1024:
        raise JsonError(413, "body too large")
    try:
        body = await request.json()
    except ValueError:
        raise JsonError(400, "body must be JSON") from None
    if not isinstance(body, dict):
        raise JsonError(400, "body must be a JSON object")
    return body


def _turn_text(text: object) -> str:
    """A whole turn's text, or :class:`TurnRejected` (400).

    Control, format and surrogate characters are dropped later by the TTS front end
    (``dia2.text.normalize_text``); a text with nothing left to speak after that is refused
    here instead of failing on the worker. Any script is accepted (the tokenizer is
    byte-level); markup errors such as ``[S3]`` fail the turn on the worker (a ``failed``
    turn, the fallback plays, the call goes on).
    """
    if not isinstance(text, str) or not text.strip():
        raise TurnRejected(400, "'text' must be a non-empty string")
    if not normalize_text(text):
        raise TurnRejected(400, "'text' has nothing to speak once control and format characters are removed")
    return text


async def post_turn(request: web.Request) -> web.Response:
    check_api_token(request)
    call = _get_call(request)
    body = await _read_json(request)
    interrupt = body.get("interrupt", False)
    if not isinstance(interrupt, bool):
        raise JsonError(400, "'interrupt' must be true or false")
    try:
        text = _turn_text(body.get("text"))
        turn = call.add_turn(text, close=True, interrupt=interrupt, source="api")
    except TurnRejected as exc:
        raise JsonError(exc.status, str(exc)) from None
    return web.json_response({"turn_id": turn.id, "queued": len(call.turns)}, status=202)


async def delete_turn(request: web.Request) -> web.Response:
    check_api_token(request)
    call = _get_call(request)
    if not call.cancel_turn(request.match_info["turn_id"]):
        raise JsonError(404, "no such queued or playing turn")
    return web.json_response({"cancelled": request.match_info["turn_id"]})


async def post_interrupt(request: web.Request) -> web.Response:
    check_api_token(request)
    heard = _get_call(request).interrupt(reason="interrupted by the API")
    return web.json_response({"heard": heard})


async def post_hangup(request: web.Request) -> web.Response:
    check_api_token(request)
    call = _get_call(request)
    asyncio.get_running_loop().create_task(hang_up(request.app, call))
    return web.json_response({"hanging_up": call.call_sid}, status=202)


async def hang_up(app: web.Application, call: Call) -> None:
    """Let the last audio play (bounded), then end the call through Twilio's REST API."""
    from .twilio_rest import complete_call

    svc = app[SERVICES]
    if call.state is CallState.ACTIVE:
        call.state = CallState.ENDING
    drained = await call.drain(svc.settings.calls.hangup_drain_timeout_s)
    if not drained:
        call.log.info("hang-up: audio still playing after %.1f s, hanging up anyway",
                      svc.settings.calls.hangup_drain_timeout_s)
    try:
        await complete_call(svc.settings.twilio, call.call_sid)
    except Exception as exc:  # the REST call failing must not leave the call open
        call.log.warning("REST hang-up failed (%s); closing the media stream instead", exc)
    await call.end("hangup: api")


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
                kind = data.get("type") if isinstance(data, dict) else None
            except ValueError:
                kind, data = None, {}
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
                    asyncio.get_running_loop().create_task(hang_up(request.app, call))
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


# ---------------------------------------------------------------------------- health


async def healthz(request: web.Request) -> web.Response:
    svc = services(request)
    body = {
        "status": "ok" if svc.ready else "starting",
        "calls": len(svc.calls),
        "tts_streams_active": svc.worker.active if svc.worker else 0,
        "tts_capacity": svc.worker.capacity if svc.worker else 0,
        "voices": svc.voices.names() if svc.voices else [],
    }
    return web.json_response(body, status=200 if svc.ready else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    svc = services(request)
    if svc.worker is not None:
        svc.metrics.tts_streams_active.set(svc.worker.active)
    return web.Response(body=svc.metrics.render(), content_type="text/plain")


# ---------------------------------------------------------------------------- app


def build_app(
    settings: Settings, *, runtime: Dia2 | None = None, say: Any = None, agent: Agent | None = None
) -> web.Application:
    """The service. ``runtime`` may be given (tests share one); else it is loaded at start-up.
    ``agent``: an in-process agent hook (else the ``[agent]`` settings decide)."""
    _install_log_redaction()
    app = web.Application(client_max_size=256 * 1024)
    if agent is not None:
        app[AGENT] = agent
    app[SERVICES] = Services(settings=settings, metrics=Metrics(),
                             tokens=StreamTokens(settings.twilio.stream_token_ttl_s))
    app.router.add_post("/twilio/voice", twilio_voice)
    app.router.add_post("/twilio/stream-status", twilio_stream_status)
    app.router.add_get(STREAM_PATH + "{token}", twilio_stream)
    app.router.add_get("/calls", list_calls)
    app.router.add_get("/calls/{call_sid}", get_call)
    app.router.add_post("/calls/{call_sid}/turns", post_turn)
    app.router.add_delete("/calls/{call_sid}/turns/{turn_id}", delete_turn)
    app.router.add_post("/calls/{call_sid}/interrupt", post_interrupt)
    app.router.add_post("/calls/{call_sid}/hangup", post_hangup)
    app.router.add_get("/calls/{call_sid}/text", call_text_socket)
    app.router.add_get("/ws/stream_tts", stream_tts_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    app.cleanup_ctx.append(_tts_context(runtime, say))
    app.on_shutdown.append(_close_sockets)
    return app


def _tts_context(runtime: Dia2 | None, say: Any):  # type: ignore[no-untyped-def]
    async def context(app: web.Application) -> AsyncIterator[None]:
        from .startup import load_runtime_and_voices

        svc = app[SERVICES]
        loop = asyncio.get_running_loop()
        # Model loading and the voice snapshot are heavy: keep them off the event loop.
        svc.fallback_ulaw8k = await loop.run_in_executor(None, load_fallback_audio, svc.settings.calls.fallback_audio)
        svc.runtime, svc.voices = await loop.run_in_executor(
            None, load_runtime_and_voices, svc.settings, runtime, say
        )
        svc.worker = TtsWorker(svc.runtime, svc.settings.tts.max_streams)
        await loop.run_in_executor(None, svc.worker.start)
        a = svc.settings.agent
        svc.agent = app.get(AGENT) or load_agent(a.callable, a.webhook_url, a.secret, a.timeout_s)
        svc.ready = True
        try:
            yield
        finally:
            svc.ready = False
            for call in list(svc.calls.values()):
                await call.end("shutdown")
            await svc.worker.stop()
            if svc.agent is not None:
                await svc.agent.close()

    return context


async def drain_calls(app: web.Application, timeout_s: float | None = None) -> None:
    """Graceful shutdown, first half: run it *before* ``AppRunner.cleanup()`` (on SIGTERM).

    No new call is admitted (``/healthz`` answers 503) and live calls take no new turns
    (409); queued turns play out until their marks echo, for up to ``timeout_s`` (default
    ``server.shutdown_timeout_s``); then every call ends and its socket closes with
    GOING_AWAY (1001). It must run while the sockets are still read: ``cleanup()`` first makes
    aiohttp ignore all incoming data (``Server.pre_shutdown``), so echoes would never arrive.
    """
    svc = app[SERVICES]
    svc.ready = False
    svc.shutting_down = True
    timeout = svc.settings.server.shutdown_timeout_s if timeout_s is None else timeout_s
    calls = list(svc.calls.values())
    for call in calls:
        if call.state is CallState.ACTIVE:
            call.state = CallState.ENDING  # new turns get 409; queued ones still play
    await asyncio.gather(*(c.drain(timeout) for c in calls), return_exceptions=True)
    # Ending a call closes its media socket with 1001 (see twilio_stream).
    await asyncio.gather(*(c.end("shutdown") for c in calls), return_exceptions=True)


async def _close_sockets(app: web.Application) -> None:
    """on_shutdown: calls still open (no :func:`drain_calls` before) send what they have queued,
    for up to ``server.shutdown_timeout_s`` (aiohttp reads nothing any more, so no echo can
    come), then end; every socket closes with GOING_AWAY (1001), each close bounded so a
    stalled peer cannot hold shutdown up."""
    svc = app[SERVICES]
    svc.ready = False
    svc.shutting_down = True
    calls = [c for c in svc.calls.values() if c.state is not CallState.ENDED]
    for call in calls:
        if call.state is CallState.ACTIVE:
            call.state = CallState.ENDING
    timeout = svc.settings.server.shutdown_timeout_s
    await asyncio.gather(*(c.drain(timeout, heard=False) for c in calls), return_exceptions=True)
    await asyncio.gather(*(c.end("shutdown") for c in calls), return_exceptions=True)
    close_s = svc.settings.audio.send_timeout_s
    await asyncio.gather(*(close_socket(ws, None, WSCloseCode.GOING_AWAY, "server shutdown", close_s)
                           for ws in list(svc.sockets)), return_exceptions=True)
