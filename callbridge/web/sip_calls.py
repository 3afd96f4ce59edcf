"""SIP calls in the service: the SIP server's start-up and shutdown, and who gets which call.

:class:`SipCallRouter` is the SIP server's :class:`~callbridge.transports.sip.endpoint.CallRouter`:
it admits a call through the same TTS reservation as a Twilio webhook (or answers
``sip.full_status`` when full, 404 for a number ``[sip]`` rejects), picks the voice and
greeting from the dialled-number map, and once the caller's ACK arrives builds the
:class:`~callbridge.calls.call.Call` on the :class:`~callbridge.transports.sip.leg.SipLeg`, registers
it for the control API (``GET /calls`` shows ``"carrier": "sip"``) and bounds it by
``calls.max_call_s``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from ..calls.call import Call, CallState
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


class SipCallRouter:
    """Admission and call set-up for SIP; one per app."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.pending = 0  # admitted, not yet connected (their reservations are held)

    def live_calls(self) -> int:
        svc = self.svc
        return (sum(1 for c in svc.calls.values() if c.state is not CallState.ENDED) + len(svc.connecting)
                + len(svc.tokens.tokens) + self.pending)

    def decide(self, offer: CallOffered) -> Accept | Reject:
        svc = self.svc
        sip = svc.settings.sip
        if not svc.ready or svc.shutting_down or svc.worker is None or svc.voices is None:
            svc.metrics.rejected_total.labels(reason="not_ready").inc()
            return Reject(503, "not ready")
        route = route_call(sip, svc.voices.default, offer.to_user)
        if route is None:
            svc.metrics.rejected_total.labels(reason="unknown_number").inc()
            return Reject(404, "unknown number")
        reservation = svc.worker.reserve() if self.live_calls() < svc.settings.calls.max_calls else None
        if reservation is None:
            svc.metrics.rejected_total.labels(reason="full").inc()
            log.warning("SIP call %s refused: full (%d calls live)", offer.handle, self.live_calls())
            return Reject(sip.full_status, "full")
        self.pending += 1
        return Accept(context=(route, reservation), release=self._releaser(reservation))

    def _releaser(self, reservation: Reservation) -> Callable[[], None]:
        def release() -> None:  # the call ended before it connected
            self.pending -= 1
            reservation.release()

        return release

    async def connected(self, leg: SipLeg, accept: Accept) -> None:
        svc = self.svc
        route, reservation = accept.context
        assert isinstance(route, Route)
        self.pending -= 1
        assert svc.worker is not None and svc.voices is not None
        call = Call(leg=leg, voice=svc.voices.get(route.voice), settings=svc.settings, worker=svc.worker,
                    metrics=svc.metrics, greeting=route.greeting, reservation=reservation,
                    fallback_ulaw8k=svc.fallback_ulaw8k, agent=svc.agent)
        leg.attach(call)
        svc.calls[call.call_sid] = call
        call.begin()
        try:
            await asyncio.wait_for(call.ended.wait(), svc.settings.calls.max_call_s)
        except TimeoutError:
            call.log.warning("call reached calls.max_call_s = %.0f s: hanging up", svc.settings.calls.max_call_s)
            await call.end("hangup: max_call_s")
        finally:
            if svc.calls.get(call.call_sid) is call:
                del svc.calls[call.call_sid]
            for observe in svc.call_observers:
                observe(call)


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
