"""SIP calls in the service: the SIP server's start-up and shutdown, and who gets which call.

:class:`SipCallRouter` is the SIP server's :class:`~callbridge.transports.sip.endpoint.CallRouter`:
it admits a call by the same rules as the Twilio webhook (``Services.readiness()``: 503 while
the TTS worker is not ready, where the webhook answers ``<Reject>``; ``Services.live_calls()``
against ``calls.max_calls`` and a TTS reservation: ``sip.full_status`` when full), answers 404
for a number ``[sip]`` rejects, picks the voice and greeting from the dialled-number map, and
once the caller's ACK arrives builds the :class:`~callbridge.calls.call.Call` on the
:class:`~callbridge.transports.sip.leg.SipLeg` exactly as the media stream handler does (agent
hook, caller speech, fallback audio), registers it for the control API (``GET /calls`` shows
``"carrier": "sip"``) and bounds it by ``calls.max_call_s``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from ..calls.call import Call
from ..config import SettingsError
from ..transports.sip import CallOffered
from ..transports.sip.endpoint import Accept, Reject, SipServer
from ..transports.sip.leg import SipLeg
from ..transports.sip.numbers import Route, route_call
from ..tts import Reservation
from ..voices import VoiceError
from .services import SERVICES, Services

log = logging.getLogger(__name__)

__all__ = ["SIP", "SipCallRouter", "SipService", "sip_context"]


@dataclass
class SipService:
    """The app's SIP server while it runs (None when ``sip.listen`` is unset)."""

    server: SipServer | None = None


SIP = web.AppKey("sip", SipService)


class _Admission:
    """A SIP call admitted and not yet connected: it holds its TTS reservation (which counts in
    ``Services.live_calls()``) until the call takes it, or it ends first (:meth:`release`,
    idempotent like the reservation's own release)."""

    def __init__(self, svc: Services, handle: str, route: Route, reservation: Reservation) -> None:
        self.svc, self.handle, self.route, self.reservation = svc, handle, route, reservation

    def release(self) -> None:  # the call ended before it connected, or the router failed to take it
        self.reservation.release()
        if self.svc.admission is not None:
            self.svc.admission.ended(self.handle)


class SipCallRouter:
    """Admission and call set-up for SIP; one per app."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc

    def decide(self, offer: CallOffered) -> Accept | Reject:
        svc = self.svc
        sip = svc.settings.sip
        # The same rule as the voice webhook's <Reject>: warming up, restarting after a fault,
        # failed or shutting down is 503 (with Retry-After: a carrier may try another route).
        readiness = svc.readiness()
        if not readiness.ready or svc.worker is None or svc.voices is None:
            svc.metrics.rejected_total.labels(reason=f"not_ready_{readiness.status}").inc()
            log.warning("SIP call %s refused: service %s (%s)", offer.handle, readiness.status, readiness.reason)
            return Reject(503, "not ready")
        route = route_call(sip, svc.voices.default, offer.to_user)
        if route is None:
            svc.metrics.rejected_total.labels(reason="unknown_number").inc()
            return Reject(404, "unknown number")
        # The one admission rule of every carrier (and, clustered, the shared capacity): a SIP
        # dialog cannot move to another instance, so it is admitted here or refused.
        assert svc.admission is not None
        reservation = svc.admission.admit_local(offer.handle)
        live = svc.live_calls()
        if reservation is None:
            svc.metrics.rejected_total.labels(reason="full").inc()
            log.warning("SIP call %s refused: full (%d calls live)", offer.handle, live)
            return Reject(sip.full_status, "full")
        admission = _Admission(svc, offer.handle, route, reservation)
        return Accept(context=admission, release=admission.release)

    async def connected(self, leg: SipLeg, accept: Accept) -> None:
        svc = self.svc
        admission = accept.context
        assert isinstance(admission, _Admission)
        assert svc.worker is not None and svc.voices is not None
        # A voice removed since the INVITE raises here: the endpoint releases the admission and
        # hangs up (BYE).
        call = Call(leg=leg, voice=svc.voices.get(admission.route.voice), settings=svc.settings,
                    worker=svc.worker, metrics=svc.metrics, greeting=admission.route.greeting,
                    reservation=admission.reservation, fallback_ulaw8k=svc.fallback_ulaw8k, agent=svc.agent,
                    speech=svc.speech)
        leg.attach(call)
        svc.start_call(call, admission.route.app_url)  # registered, its app connection opened ([app]), begun
        try:
            async with asyncio.timeout(svc.settings.calls.max_call_s):  # not wait_for: see design.md
                await call.ended.wait()
        except TimeoutError:
            call.log.warning("call reached calls.max_call_s = %.0f s: hanging up", svc.settings.calls.max_call_s)
            await call.end("hangup: max_call_s")
        finally:
            svc.forget_call(call)


def check_numbers(svc: Services) -> None:
    """Every voice the number map names must exist (a start-up error, not a caller's 404)."""
    assert svc.voices is not None
    for number, entry in svc.settings.sip.numbers.entries:
        if entry.voice:
            try:
                svc.voices.get(entry.voice)
            except VoiceError:
                raise SettingsError(f'sip.numbers."{number}".voice = {entry.voice!r}: no such voice '
                                    f"(known: {', '.join(svc.voices.names())})") from None


async def sip_context(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the SIP server runs while the app does (when ``sip.listen`` is set)."""
    svc = app[SERVICES]
    if not svc.settings.sip.enabled:
        yield
        return
    check_numbers(svc)
    server = SipServer.from_settings(svc.settings.sip, SipCallRouter(svc))
    await server.start()
    app[SIP].server = server
    try:
        yield
    finally:
        app[SIP].server = None
        await server.stop(svc.settings.audio.send_timeout_s)
