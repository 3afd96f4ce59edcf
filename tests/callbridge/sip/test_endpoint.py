"""The SIP server's UDP edge with a scripted carrier on 127.0.0.1: exact retransmissions, NAT latching,
the media timeout. (baresip, a real client, cannot be told to repeat a datagram or to lie in its SDP.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sipmessage import Message, Request, Response

from callbridge.calls.leg import CallerAudio, LegEnded, LegEvent
from callbridge.sim.ports import free_udp_range
from callbridge.transports.sip import AllowList, CallEnded, CallOffered
from callbridge.transports.sip.endpoint import Accept, Reject, SipServer
from callbridge.transports.sip.leg import SipLeg
from callbridge.transports.sip.rtp import build_packet, parse_packet

from . import sipmsg


class Peer(asyncio.DatagramProtocol):
    """A UDP socket on 127.0.0.1 that queues what it receives."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.inbox.put_nowait((data, addr))

    @property
    def addr(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def send(self, data: bytes, dest: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, dest)

    async def response(self, code: int | None = None) -> Response:
        while True:
            data, _ = await self.inbox.get()
            msg = Message.parse(data)
            if isinstance(msg, Response) and (code is None or msg.code == code):
                return msg

    async def request(self, method: str) -> Request:
        while True:
            data, _ = await self.inbox.get()
            msg = Message.parse(data)
            if isinstance(msg, Request) and msg.method == method:
                return msg


@contextlib.asynccontextmanager
async def peer() -> AsyncIterator[Peer]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    try:
        yield protocol
    finally:
        transport.close()


class Sink:
    def __init__(self) -> None:
        self.events: asyncio.Queue[LegEvent] = asyncio.Queue()

    def on_leg_event(self, event: LegEvent) -> None:
        self.events.put_nowait(event)


class Router:
    def __init__(self) -> None:
        self.legs: asyncio.Queue[tuple[SipLeg, Sink]] = asyncio.Queue()
        self.offers = 0

    def decide(self, offer: CallOffered) -> Accept | Reject:
        self.offers += 1
        return Accept()

    async def connected(self, leg: SipLeg, accept: Accept) -> None:
        sink = Sink()
        leg.attach(sink)
        await self.legs.put((leg, sink))


@contextlib.asynccontextmanager
async def server(router: Router, **kw: Any) -> AsyncIterator[SipServer]:
    srv = SipServer(listen=("127.0.0.1", 0), public_address="127.0.0.1", router=router,
                    allow=AllowList.of("127.0.0.1/32"), rtp_ports=free_udp_range(6), **kw)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def bridge_rtp_port(ok: Response) -> int:
    line = next(x for x in ok.body.decode().splitlines() if x.startswith("m=audio"))
    return int(line.split()[1])


async def connect(carrier: Peer, srv: SipServer, router: Router, *, sdp_addr: str = "127.0.0.1",
                  rtp_port: int = 40000) -> tuple[SipLeg, Sink, Response]:
    dest = ("127.0.0.1", srv.port)
    carrier.send(invite(carrier, sdp_addr=sdp_addr, rtp_port=rtp_port), dest)
    ok = await carrier.response(200)
    carrier.send(with_via(carrier, sipmsg.request("ACK", branch="z9hG4bK-ack", to_tag=ok.to_address.parameters["tag"])),
                 dest)
    leg, sink = await router.legs.get()
    return leg, sink, ok


def with_via(carrier: Peer, data: bytes) -> bytes:
    """sipmsg's requests name 127.0.0.1:5062; point Via and Contact at the carrier's real port."""
    return data.replace(b"127.0.0.1:5062", f"127.0.0.1:{carrier.addr[1]}".encode())


def invite(carrier: Peer, *, sdp_addr: str = "127.0.0.1", rtp_port: int = 40000) -> bytes:
    return with_via(carrier, sipmsg.invite(body=sipmsg.offer(address=sdp_addr, port=rtp_port)))


async def test_repeated_invite_and_bye_get_the_same_answers_and_one_call() -> None:
    router = Router()
    async with server(router) as srv, peer() as carrier:
        dest = ("127.0.0.1", srv.port)
        data = invite(carrier)
        carrier.send(data, dest)
        carrier.send(data, dest)  # the network repeated it
        ok = await carrier.response(200)
        carrier.send(data, dest)  # a repeat after the answer: the same 200 again
        again = await carrier.response(200)
        assert again.to_address.parameters["tag"] == ok.to_address.parameters["tag"] and again.body == ok.body
        tag = ok.to_address.parameters["tag"]
        carrier.send(with_via(carrier, sipmsg.request("ACK", branch="z9hG4bK-ack", to_tag=tag)), dest)
        leg, sink = await router.legs.get()
        bye = with_via(carrier, sipmsg.request("BYE", branch="z9hG4bK-bye", cseq=2, to_tag=tag))
        carrier.send(bye, dest)
        carrier.send(bye, dest)
        first, second = await carrier.response(), await carrier.response()
        while first.cseq.method != "BYE":  # skip 100/200 repeats of the INVITE still in flight
            first, second = second, await carrier.response()
        assert (first.code, second.code) == (200, 200) and second.cseq.method == "BYE"
        assert isinstance(await sink.events.get(), LegEnded)
        assert router.offers == 1 and len(srv.legs) == 1
        await leg.close("hangup: caller", 1.0)


async def test_nat_private_sdp_address_latches_onto_the_signalling_source() -> None:
    router = Router()
    async with server(router) as srv, peer() as carrier, peer() as media:
        leg, sink, ok = await connect(carrier, srv, router, sdp_addr="10.1.2.3", rtp_port=4000)
        bridge_rtp = ("127.0.0.1", bridge_rtp_port(ok))
        media.send(build_packet(payload_type=0, sequence=1, timestamp=0, ssrc=5, payload=b"\x00" * 160), bridge_rtp)
        event = await sink.events.get()
        assert isinstance(event, CallerAudio)
        # From now on the bridge sends to the latched source, not to the private SDP address.
        data, src = await media.inbox.get()
        assert src == bridge_rtp and parse_packet(data).payload_type == 0
        assert leg.receiver.latched == media.addr
        await leg.hang_up()
        assert (await carrier.request("BYE")).call_id == "call-1@carrier"
        await leg.close("hangup: bridge", 1.0)


async def test_media_timeout_ends_the_call_with_bye() -> None:
    router = Router()
    async with server(router, media_timeout_s=0.2) as srv, peer() as carrier:
        leg, sink, _ = await connect(carrier, srv, router)
        bye = await carrier.request("BYE")  # no RTP ever came
        ended = await sink.events.get()
        assert isinstance(ended, LegEnded) and ended.reason == "error: media timeout"
        assert bye.call_id == "call-1@carrier"
        await leg.close(ended.reason, 1.0)


async def test_rtp_port_range_exhausted_is_503() -> None:
    router = Router()
    async with server(router) as srv, peer() as carrier:
        srv.rtp_ports.in_use.update(range(srv.rtp_ports.low, srv.rtp_ports.high + 1))
        carrier.send(invite(carrier), ("127.0.0.1", srv.port))
        resp = await carrier.response(503)
        assert resp.headers.get("Retry-After") == "30"


async def test_stop_ends_live_calls_with_bye() -> None:
    router = Router()
    async with peer() as carrier:
        async with server(router) as srv:
            _, sink, _ = await connect(carrier, srv, router)
            ended_events: list[Any] = []
            srv.observers.append(ended_events.append)
        bye = await carrier.request("BYE")
        assert bye.call_id == "call-1@carrier"
        assert isinstance(await sink.events.get(), LegEnded)
        assert not [e for e in ended_events if isinstance(e, CallEnded)]  # our hang-up, not the network's


async def test_a_router_that_fails_to_take_the_call_hangs_up() -> None:
    class Broken(Router):
        async def connected(self, leg: SipLeg, accept: Accept) -> None:
            raise RuntimeError("boom")

    router = Broken()
    async with server(router) as srv, peer() as carrier:
        dest = ("127.0.0.1", srv.port)
        carrier.send(invite(carrier), dest)
        ok = await carrier.response(200)
        carrier.send(with_via(carrier, sipmsg.request("ACK", branch="z9hG4bK-ack",
                                                      to_tag=ok.to_address.parameters["tag"])), dest)
        assert (await carrier.request("BYE")).call_id == "call-1@carrier"
