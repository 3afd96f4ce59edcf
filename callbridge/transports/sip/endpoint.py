"""The SIP server's I/O edge: one asyncio UDP socket for signalling, one per call for RTP.

Everything that decides lives in :class:`~.uas.UserAgentServer`; this module feeds it datagrams
and the loop's clock, sends what it returns, and turns its call events into
:class:`~.leg.SipLeg` objects. Which calls to take is the application's
(:class:`CallRouter`): ``decide`` answers each offered call with :class:`Accept` or
:class:`Reject` (404 unknown number, 486/503 full) and ``connected`` receives the leg once the
caller's ACK arrives.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ...calls.leg import LegInfo
from ...config import SipSettings
from .access import AllowList, RateLimiter
from .digest import DigestAuth
from .leg import SipLeg, _RtpProtocol
from .numbers import allow_list
from .uas import (
    Action,
    CallConfirmed,
    CallEnded,
    CallOffered,
    DigitReceived,
    MediaUpdated,
    Send,
    UasSettings,
    UserAgentServer,
)

log = logging.getLogger(__name__)

__all__ = ["Accept", "CallRouter", "Reject", "RtpPorts", "SipServer"]

Addr = tuple[str, int]


@dataclass(frozen=True)
class Accept:
    """Take the call. ``context`` travels to :meth:`CallRouter.connected` (voice, greeting...);
    ``release`` is called if the call ends before it connects (a reservation to give back)."""

    context: Any = None
    release: Callable[[], None] | None = None
    ring_s: float = 0.0  # ring this long before answering (0: answer at once)


@dataclass(frozen=True)
class Reject:
    status: int  # 404, 486, 503, 480
    reason: str = ""


class CallRouter(Protocol):
    def decide(self, offer: CallOffered) -> Accept | Reject: ...

    async def connected(self, leg: SipLeg, accept: Accept) -> None: ...


@dataclass
class RtpPorts:
    """The RTP port range: even ports only (RFC 3550 §11: RTCP would take the odd one above)."""

    low: int
    high: int
    _next: int = field(default=0)
    in_use: set[int] = field(default_factory=set)

    def candidates(self) -> list[int]:
        start = self.low + (self.low % 2)
        ports = list(range(start, self.high + 1, 2))
        if not ports:
            return []
        k = self._next % len(ports)
        self._next += 1  # rotate: a port just freed is not reused at once (late packets)
        return [p for p in ports[k:] + ports[:k] if p not in self.in_use]


class _SipProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: SipServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.server._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("SIP socket error: %s", exc)


@dataclass
class _Pending:
    accept: Accept
    leg: SipLeg | None = None
    connected: bool = False


class SipServer:
    """The SIP listener. ``start()`` binds; ``stop()`` ends every call (BYE) and closes sockets."""

    def __init__(self, *, listen: Addr, public_address: str, router: CallRouter, allow: AllowList,
                 rtp_ports: tuple[int, int], digest: DigestAuth | None = None, codecs: tuple[str, ...] = ("PCMU", "PCMA"),
                 media_timeout_s: float = 30.0, rate_per_s: float = 20.0, rate_burst: float = 40.0,
                 max_message_bytes: int = 8192) -> None:
        self.listen = listen
        self.public_address = public_address
        self.router = router
        self.rtp_ports = RtpPorts(*rtp_ports)
        self.media_timeout_s = media_timeout_s
        self._uas_args = dict(allow=allow, limiter=RateLimiter(rate_per_s=rate_per_s, burst=rate_burst),
                              digest=digest)
        self._codecs = codecs
        self._max_message_bytes = max_message_bytes
        self.uas: UserAgentServer | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._calls: dict[str, _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.observers: list[Callable[[Action], None]] = []  # see every call event (tests, metrics)
        self.datagram_observers: list[Callable[[bytes, Addr], None]] = []  # after each datagram is handled
        self.datagrams_in = 0
        self.datagrams_out = 0

    @classmethod
    def from_settings(cls, sip: SipSettings, router: CallRouter) -> SipServer:
        """The server ``[sip]`` describes (validated at load: see :func:`callbridge.config.load_settings`)."""
        host, port = sip.listen_addr()
        digest = DigestAuth(sip.digest_user, sip.digest_password) if sip.digest_password else None
        return cls(listen=(host, port), public_address=sip.public_ip or host, router=router,
                   allow=allow_list(sip), rtp_ports=sip.rtp_range(), digest=digest, codecs=sip.codec_list(),
                   media_timeout_s=sip.media_timeout_s, rate_per_s=sip.max_messages_per_s,
                   rate_burst=2 * sip.max_messages_per_s, max_message_bytes=sip.max_message_bytes)

    @property
    def port(self) -> int:
        assert self._transport is not None, "start() first"
        return int(self._transport.get_extra_info("sockname")[1])

    @property
    def legs(self) -> list[SipLeg]:
        return [p.leg for p in self._calls.values() if p.leg is not None]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _SipProtocol(self), local_addr=self.listen)
        self._transport = transport
        port = int(transport.get_extra_info("sockname")[1])
        settings = UasSettings(public_address=self.public_address, port=port, codecs=self._codecs,
                               max_message_bytes=self._max_message_bytes)
        self.uas = UserAgentServer(settings=settings, **self._uas_args)  # type: ignore[arg-type]
        log.info("SIP listening on %s:%d (UDP), RTP %d-%d", self.listen[0], port, self.rtp_ports.low,
                 self.rtp_ports.high)

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Shutdown: every call gets BYE (480 if not answered yet) and its leg LegEnded, then sockets close."""
        for handle in list(self._calls):
            self.hang_up(handle, "hangup: shutdown")
        for pending in list(self._calls.values()):
            if pending.leg is not None:
                await pending.leg.close("hangup: shutdown", timeout_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._transport.close()

    # ------------------------------------------------------------------ the core, fed

    def _uas(self) -> UserAgentServer:
        assert self.uas is not None, "start() first"
        return self.uas

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _on_datagram(self, data: bytes, source: Addr) -> None:
        self.datagrams_in += 1
        try:
            self._run(self._uas().receive(data, source, self._now()))
        except Exception:  # the top of a callback: one bad datagram must not touch other calls
            log.exception("SIP datagram handling failed (dropped)")
        for observe in self.datagram_observers:
            observe(data, source)

    def _on_timer(self) -> None:
        self._timer = None
        self._run(self._uas().tick(self._now()))

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                if self._transport is not None:
                    self.datagrams_out += 1
                    self._transport.sendto(action.data, action.dest)
                continue
            for observe in self.observers:
                observe(action)
            if isinstance(action, CallOffered):
                self._offered(action)
            elif isinstance(action, CallConfirmed):
                self._confirmed(action.handle)
            elif isinstance(action, MediaUpdated):
                pending = self._calls.get(action.handle)
                if pending is not None and pending.leg is not None:
                    pending.leg.media_updated(action.media)
            elif isinstance(action, DigitReceived):
                pending = self._calls.get(action.handle)
                if pending is not None and pending.leg is not None:
                    pending.leg.digit(action.digit)
            elif isinstance(action, CallEnded):
                self._ended(action.handle, action.reason)
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = self._uas().next_deadline()
        if self._timer is not None:
            if deadline is not None and abs(self._timer.when() - deadline) < 1e-6:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)

    # ------------------------------------------------------------------ calls

    def _offered(self, offer: CallOffered) -> None:
        try:
            decision = self.router.decide(offer)
        except Exception:
            log.exception("the SIP call router failed; answering 500", extra={"call_id": offer.handle})
            decision = Reject(500, "error: router")
        if isinstance(decision, Reject):
            log.info("SIP call %s refused with %d (%s)", offer.handle, decision.status, decision.reason or "router",
                     extra={"call_id": offer.handle})
            self._run(self._uas().reject(offer.handle, decision.status, self._now(), decision.reason))
            return
        log.info("SIP call %s accepted: trunk %s, %s, SIP Call-ID %s", offer.handle, offer.trunk, offer.media.codec,
                 offer.call_id[:64], extra={"call_id": offer.handle})
        self._calls[offer.handle] = _Pending(decision)
        self._spawn(self._answer(offer, decision), f"sip-answer-{offer.handle}")

    async def _answer(self, offer: CallOffered, accept: Accept) -> None:
        uas = self._uas()
        self._run(uas.ring(offer.handle, self._now()))
        try:
            transport, port = await self._bind_rtp(offer.handle)
        except OSError as exc:
            log.warning("no free RTP port (%s); answering 503", exc, extra={"call_id": offer.handle})
            self._run(uas.reject(offer.handle, 503, self._now(), "error: no RTP port"))
            self._release(offer.handle)
            self._calls.pop(offer.handle, None)
            return
        call = uas.calls.get(offer.handle)
        pending = self._calls.get(offer.handle)
        if call is None or not call.live or pending is None:
            transport.close()  # cancelled while we bound the port
            self.rtp_ports.in_use.discard(port)
            return
        # Our own id for the call (a SIP Call-ID may hold characters a URL path cannot); the
        # carrier's Call-ID stays visible as the leg's media id.
        info = LegInfo(carrier="sip", carrier_call_id=offer.handle, from_number=offer.from_user,
                       to_number=offer.to_user, media_id=offer.call_id, custom={"trunk": offer.trunk})
        leg = SipLeg(self, offer.handle, info, offer.media, signalling_host=offer.source[0], transport=transport,
                     port=port, media_timeout_s=self.media_timeout_s)
        transport.get_protocol().on_datagram = leg.on_datagram  # type: ignore[attr-defined]
        pending.leg = leg
        if accept.ring_s > 0:
            await asyncio.sleep(accept.ring_s)  # a configured ring; CANCEL may end the call meanwhile
            if not call.live:
                return
        self._run(uas.answer(offer.handle, port, self._now()))
        leg.start_media()  # RTP may flow right after our 200 (the caller often sends before its ACK)

    async def _bind_rtp(self, handle: str) -> tuple[asyncio.DatagramTransport, int]:
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for port in self.rtp_ports.candidates():
            try:
                transport, _ = await loop.create_datagram_endpoint(lambda: _RtpProtocol(lambda d, a: None),
                                                                   local_addr=(self.listen[0], port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                last = exc
                continue
            self.rtp_ports.in_use.add(port)
            return transport, port
        raise last or OSError(errno.EADDRINUSE, "RTP port range exhausted")

    def _confirmed(self, handle: str) -> None:
        pending = self._calls.get(handle)
        if pending is None or pending.leg is None or pending.connected:
            return
        pending.connected = True
        self._spawn(self._connect(pending.leg, pending.accept), f"sip-connected-{handle}")

    async def _connect(self, leg: SipLeg, accept: Accept) -> None:
        try:
            await self.router.connected(leg, accept)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A call nobody drives would stay up as long as the caller's RTP flows: end it.
            log.exception("the SIP call router failed to take the call; hanging up", extra={"call_id": leg.handle})
            if accept.release is not None:
                accept.release()
            self.hang_up(leg.handle, "error: router")
            await leg.close("error: router", 1.0)

    def _ended(self, handle: str, reason: str) -> None:
        pending = self._calls.get(handle)
        if pending is None:
            return
        log.info("SIP call %s ended by the network: %s", handle, reason, extra={"call_id": handle})
        if pending.leg is not None:
            pending.leg.ended_by_carrier(reason)
        if not pending.connected:
            self._release(handle)
            if pending.leg is not None:
                self._spawn(pending.leg.close(reason, 1.0), f"sip-close-{handle}")
            else:
                self._calls.pop(handle, None)

    def _release(self, handle: str) -> None:
        pending = self._calls.get(handle)
        if pending is not None and pending.accept.release is not None and not pending.connected:
            release, pending.accept = pending.accept.release, Accept(pending.accept.context)
            release()

    def hang_up(self, handle: str, reason: str) -> None:
        """End a call from our side (BYE, or 480 before the answer); the leg hears LegEnded."""
        call = self._uas().calls.get(handle)
        if call is not None and call.live:
            log.info("SIP call %s ended by us: %s", handle, reason, extra={"call_id": handle})
        self._run(self._uas().hang_up(handle, self._now(), reason))
        pending = self._calls.get(handle)
        if pending is not None and pending.leg is not None:
            pending.leg.ended_by_carrier(reason)
        if pending is not None and not pending.connected:
            self._release(handle)

    def release(self, leg: SipLeg) -> None:
        """The leg closed: its port is free and the call is forgotten here."""
        self.rtp_ports.in_use.discard(leg.port)
        self._calls.pop(leg.handle, None)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("SIP task %s failed", task.get_name(), exc_info=task.exception())
