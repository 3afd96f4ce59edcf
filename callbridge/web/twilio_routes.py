"""Twilio's routes: the voice webhook (admission, TwiML), the stream status callback, and the
media stream WebSocket of each call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

from aiohttp import WSMsgType, web

from ..calls.call import Call, CallState
from ..calls.leg import LegEnded
from ..cluster import Placement, Refused, Ticket
from ..transports.twilio import (
    ProtocolError,
    Start,
    connect_stream_twiml,
    public_url,
    reject_twiml,
    say_hangup_twiml,
    validate_signature,
    websocket_url,
)
from ..transports.twilio.leg import TwilioLeg
from ..voices import VoiceError
from .services import Services, _public_base, _stream_base, services
from .stream_tokens import StreamBinding

log = logging.getLogger(__name__)


STREAM_PATH = "/twilio/stream/"


#: A media socket's writer checks for back-pressure every this many bytes (aiohttp: 64 KiB),
#: and the transport pauses above this much unsent data, so a stalled reader blocks our send
#: (and trips ``audio.send_timeout_s``) after about a second of audio, not after minutes.
WS_WRITER_CHECK_BYTES = 4096


WS_WRITE_HIGH_WATER = 16 * 1024


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
        # The URL as checked, less its query and with a stream path's one-time token hidden.
        token = request.match_info.get("token")
        checked = url.split("?")[0].replace(token, "{token}") if token else url.split("?")[0]
        hint = ("CALLBRIDGE_PUBLIC_BASE_URL is not set: set it to the https:// URL Twilio calls"
                if not services(request).settings.server.public_base_url else
                "it must be the URL Twilio called, and TWILIO_AUTH_TOKEN this account's")
        log.warning("rejected %s %s: %s Twilio signature, checked against %s (%s)", request.method,
                    _route_of(request), "missing" if not signature else "invalid", checked, hint)
        raise web.HTTPForbidden(text="invalid Twilio signature")


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
    readiness = svc.readiness()
    admission = svc.admission
    assert admission is not None
    # Warming up, restarting after a fault, failed, or shutting down: refused, unless another
    # instance of a cluster can take the call (placement never picks an instance that is not ready).
    if not readiness.ready and not admission.clustered:
        svc.metrics.rejected_total.labels(reason=f"not_ready_{readiness.status}").inc()
        log.warning("call %s rejected: service %s (%s)", call_sid, readiness.status, readiness.reason)
        return web.Response(text=reject_twiml("busy"), content_type="text/xml")
    voice_name = request.query.get("voice") or voices.default
    try:
        voices.get(voice_name)
    except VoiceError:
        log.warning("call %s asked for an unknown voice %r", call_sid, voice_name[:64])
        svc.metrics.rejected_total.labels(reason="unknown_voice").inc()
        return web.Response(text=say_hangup_twiml("Sorry, this line is not configured correctly."),
                            content_type="text/xml")
    greeting = request.query.get("greeting", svc.settings.twilio.greeting)
    token = svc.tokens.new_token()
    from_number, to_number = str(params.get("From", ""))[:64], str(params.get("To", ""))[:64]
    placement = await admission.place(call_sid, token, Ticket(call_sid, voice_name, greeting, from_number, to_number))
    if placement is Refused.REPLAYED:  # answered by another instance (the shared seen-list)
        svc.metrics.rejected_total.labels(reason="replayed_webhook").inc()
        log.warning("refused a repeated webhook for call %s", call_sid)
        raise web.HTTPForbidden(text="this call was already answered")
    if not isinstance(placement, Placement):
        svc.metrics.rejected_total.labels(reason="full").inc()
        log.warning("call %s rejected: %d calls live here, worker free %d%s", call_sid, admission.live, worker.free,
                    ", no other instance has room" if admission.clustered else "")
        return web.Response(text=reject_twiml("busy"), content_type="text/xml")
    if placement.reservation is not None:
        svc.tokens.add(token, call_sid, voice_name, greeting, placement.reservation,
                       from_number=from_number, to_number=to_number)
        stream_base = _stream_base(request, svc.settings)
    else:  # reserved on another instance, with the token in the shared state: its URL
        svc.tokens.remember(call_sid)
        svc.metrics.placed_elsewhere_total.inc()
        stream_base = placement.instance.public_url
    stream_url = websocket_url(stream_base, STREAM_PATH + token)
    status_cb = public_url(base, "/twilio/stream-status") if svc.settings.twilio.status_callback else None
    # The token (not these parameters) is what the stream is checked against; "greeting" only
    # tells a client that one will be spoken first.
    params = {"voice": voice_name, "greeting": "yes" if greeting else ""}
    twiml = connect_stream_twiml(stream_url, params, status_callback=status_cb)
    log.info("call %s admitted (voice %s) on instance %s", call_sid, voice_name, placement.instance.id)
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

    The upgrade consumes the one-time token: exactly one upgrade gets the call and its TTS
    reservation; any other with the same signed URL is refused (403). Outcomes (each is one
    WARNING line at most, and touches no other call): a bad signature or an unknown, expired
    or used token is refused with 403 before the upgrade; a frame or an event order that
    breaks the protocol, a flood, or no ``start`` within ``twilio.start_timeout_s`` closes
    with 1008; an internal failure (a send timeout on a stalled reader, a crashed speaker)
    closes with 1011; shutdown closes with 1001; ``stop``, a hang-up or ``calls.max_call_s``
    closes with 1000. Unknown events are ignored (logged at debug).
    """
    svc = services(request)
    settings = svc.settings
    # Signed over the URL the TwiML named: this instance's own stream base.
    _check_twilio_signature(request, websocket_url(_stream_base(request, settings), request.path), {})
    _, worker, voices = svc.require()
    token = request.match_info["token"]
    binding = svc.tokens.consume(token)
    if binding is None and svc.admission is not None:  # placed here by another instance?
        claimed = await svc.admission.claim(token)
        if claimed is not None:
            ticket, reservation = claimed
            binding = StreamBinding(ticket.call_sid, ticket.voice, ticket.greeting, 0.0, reservation,
                                    ticket.from_number, ticket.to_number)
    if binding is None:
        svc.metrics.rejected_total.labels(reason="bad_stream_token").inc()
        log.warning("refused a media stream with an unknown, expired or used token")
        raise web.HTTPForbidden(text="unknown, expired or used stream token")
    # From here this handler owns the binding's reservation: the call releases it when it ends.
    try:
        voice = voices.get(binding.voice)
    except VoiceError:  # removed since the webhook admitted the call
        binding.reservation.release()
        log.warning("call %s: its voice is gone; refusing the media stream", binding.call_sid)
        raise web.HTTPServiceUnavailable(text="the call's voice is no longer available") from None
    ws = web.WebSocketResponse(max_msg_size=settings.twilio.max_message_bytes, autoping=True,
                               writer_limit=WS_WRITER_CHECK_BYTES)
    transport = _limit_send_buffer(request, settings.audio.send_buffer_bytes)
    leg = TwilioLeg(ws, call_sid=binding.call_sid, twilio=settings.twilio, lead_ms=settings.audio.lead_ms,
                    transport=transport, from_number=binding.from_number, to_number=binding.to_number)
    call = Call(leg=leg, voice=voice, settings=settings, worker=worker, metrics=svc.metrics,
                greeting=binding.greeting, reservation=binding.reservation, fallback_ulaw8k=svc.fallback_ulaw8k,
                agent=svc.agent, speech=svc.speech)
    svc.connecting.add(call)
    try:
        await ws.prepare(request)
    except BaseException:
        svc.connecting.discard(call)
        await call.end("error: upgrade failed")
        raise
    svc.sockets.add(ws)
    reason = "error: media stream handler failed"
    try:
        reason = await _read_media_stream(ws, leg, call, svc)
    except asyncio.CancelledError:  # the server is shutting down
        reason = "shutdown"
        raise
    finally:
        svc.connecting.discard(call)
        call.on_leg_event(LegEnded(reason))  # the call ends (a no-op if it ended elsewhere)...
        with contextlib.suppress(asyncio.CancelledError):
            await call.ended.wait()  # ...and has closed the socket with the code for its end reason
        svc.forget_call(call)
    return ws


async def _read_media_stream(ws: web.WebSocketResponse, leg: TwilioLeg, call: Call, svc: Services) -> str:
    """Read the socket until the leg ends; hand each event to the call. Returns the leg's end reason."""
    settings = svc.settings
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
                call.log.warning("call reached calls.max_call_s = %.0f s: hanging up", settings.calls.max_call_s)
                return "hangup: max_call_s"
            if call.state is CallState.ENDED:  # ended elsewhere while we waited
                return call.end_reason
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                if svc.shutting_down:
                    return "shutdown"
                return "hangup: socket closed" if call.state is not CallState.CONNECTING else "error: closed before start"
            if msg.type is WSMsgType.ERROR:
                if isinstance(ws.exception(), Exception) and "size" in str(ws.exception()).lower():
                    raise ProtocolError("too_large", str(ws.exception()))
                return f"error: socket {type(ws.exception()).__name__}"
            if not limiter.hit():
                raise ProtocolError("flood", f"more than {settings.twilio.max_messages_per_s} messages in a second")
            event = leg.receive(msg.data if msg.type is WSMsgType.TEXT else bytes(msg.data))
            if isinstance(event, Start):
                if call.call_sid in svc.calls:
                    raise ProtocolError("duplicate_call", "this call already has a media stream")
                svc.connecting.discard(call)
                svc.start_call(call)
            elif isinstance(event, LegEnded):
                return event.reason
            elif event is not None:
                call.on_leg_event(event)
            if call.state is CallState.ENDED:
                return call.end_reason
    except ProtocolError as exc:
        call.metrics.protocol_errors_total.labels(code=exc.code).inc()
        call.log.warning("ending call on protocol error %s: %s", exc.code, exc.message)
        return f"protocol_error: {exc.code}"
