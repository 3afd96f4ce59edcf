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
import secrets
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from dia2 import Dia2

from .call import Call, CallState, TurnRejected
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
    ready: bool = False

    def require(self) -> tuple[Dia2, TtsWorker, VoiceRegistry]:
        if self.runtime is None or self.worker is None or self.voices is None:
            raise web.HTTPServiceUnavailable(text="starting up")
        return self.runtime, self.worker, self.voices


SERVICES = web.AppKey("services", Services)


# ---------------------------------------------------------------------------- helpers


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def _public_base(request: web.Request, settings: Settings) -> str:
    """The configured public base URL; without one (local use), what the request says."""
    if settings.server.public_base_url:
        return settings.server.public_base_url.rstrip("/")
    return f"{request.scheme}://{request.host}"


def _check_twilio_signature(request: web.Request, url: str, params: dict[str, Any]) -> None:
    settings = services(request).settings.twilio
    if not settings.validate_signatures:
        return
    signature = request.headers.get("X-Twilio-Signature")
    ok = validate_signature(
        settings.auth_token, url, params, signature, request.headers.get("X-Twilio-Webhooks-Signature-Settings")
    )
    if not ok:
        services(request).metrics.rejected_total.labels(reason="bad_signature").inc()
        log.warning("rejected %s %s: %s Twilio signature", request.method, request.path,
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
    except VoiceError as exc:
        log.warning("call %s asked for %s", call_sid, exc)
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


async def twilio_stream(request: web.Request) -> web.WebSocketResponse:
    """One call's media stream. This handler is the only reader of the socket."""
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
    ws = web.WebSocketResponse(max_msg_size=settings.twilio.max_message_bytes, autoping=True)
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
    )
    reason = "hangup: caller"
    close_code = WSCloseCode.OK
    limiter = _RateLimit(settings.twilio.max_messages_per_s)
    started_by = time.monotonic() + settings.twilio.start_timeout_s
    try:
        while True:
            timeout = None if call.state is not CallState.CONNECTING else max(0.01, started_by - time.monotonic())
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                raise ProtocolError("start_timeout", f"no start within {settings.twilio.start_timeout_s} s") from None
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                reason = "hangup: socket closed" if call.state is not CallState.CONNECTING else "error: closed before start"
                break
            if msg.type is WSMsgType.ERROR:
                if isinstance(ws.exception(), Exception) and "size" in str(ws.exception()).lower():
                    raise ProtocolError("too_large", str(ws.exception()))
                reason = f"error: socket {ws.exception()}"
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
                call.begin(event)
                continue
            if not call.on_event(event):
                reason = "hangup: stop"
                break
            if call.state is CallState.ENDED:
                break
    except ProtocolError as exc:
        reason = f"protocol_error: {exc.code}"
        close_code = WSCloseCode.POLICY_VIOLATION
        svc.metrics.protocol_errors_total.labels(code=exc.code).inc()
        call.log.warning("ending call on protocol error %s: %s", exc.code, exc)
    except asyncio.CancelledError:
        reason = "shutdown"
        raise
    finally:
        svc.tokens.discard(token)  # a stream that ended before `start` frees its slot at once
        await call.end(reason)
        if svc.calls.get(call.call_sid) is call:
            del svc.calls[call.call_sid]
        if not ws.closed:
            with contextlib.suppress(Exception):
                await ws.close(code=close_code, message=reason.encode()[:120])
    return ws


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


async def post_turn(request: web.Request) -> web.Response:
    check_api_token(request)
    call = _get_call(request)
    body = await _read_json(request)
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise JsonError(400, "'text' must be a non-empty string")
    interrupt = body.get("interrupt", False)
    if not isinstance(interrupt, bool):
        raise JsonError(400, "'interrupt' must be true or false")
    try:
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
                    text = data.get("text")
                    if not isinstance(text, str) or not text.strip():
                        raise TurnRejected(400, "'text' must be a non-empty string")
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


def build_app(settings: Settings, *, runtime: Dia2 | None = None, say: Any = None) -> web.Application:
    """The service. ``runtime`` may be given (tests share one); else it is loaded at start-up."""
    app = web.Application(client_max_size=256 * 1024)
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
        svc.runtime, svc.voices = await loop.run_in_executor(
            None, load_runtime_and_voices, svc.settings, runtime, say
        )
        svc.worker = TtsWorker(svc.runtime, svc.settings.tts.max_streams)
        await loop.run_in_executor(None, svc.worker.start)
        svc.ready = True
        try:
            yield
        finally:
            svc.ready = False
            for call in list(svc.calls.values()):
                await call.end("shutdown")
            await svc.worker.stop()

    return context


async def _close_sockets(app: web.Application) -> None:
    """Graceful shutdown: let calls drain briefly, then close every socket with GOING_AWAY."""
    svc = app[SERVICES]
    svc.ready = False
    timeout = svc.settings.server.shutdown_timeout_s
    await asyncio.gather(*(c.drain(timeout) for c in list(svc.calls.values())), return_exceptions=True)
    for ws in list(svc.sockets):
        with contextlib.suppress(Exception):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


def voices_dir(settings: Settings) -> Path:
    return Path(settings.voices.dir)
