"""SIP media path: RTP send jitter and CPU per call, with K calls at once on 127.0.0.1.

For each K, K scripted carriers call our SipServer (INVITE/200/ACK over real UDP), stream
20 ms of mu-law caller audio every 20 ms, and timestamp every RTP packet the bridge sends
them; each bridge leg is fed audio as fast as its send queue takes it (the call core's
pacing is not in this measurement). Figures:

- ``send_jitter_ms``: |arrival − (first arrival + RTP time)| per packet, the RTP time being the
  packet's timestamp since the first (on loopback, arrival ≈ send time: this is the bridge's
  send clock error; slots skipped after a stall move the timestamp, so they do not count twice),
  p50/p99/max;
- ``interval_ms``: gaps between consecutive packets, p1/p50/p99;
- ``cpu_ms_per_call_s``: process CPU time per second of call, *including* the scripted
  carriers in the same process (an upper bound on the bridge's own cost);
- ``lost``: packets missing by sequence number.

Usage: python bench/sip_rtp.py [--quick] [--json out/sip_rtp.json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import git_commit, write_json  # noqa: E402

from callbridge.calls.leg import LegEvent  # noqa: E402
from callbridge.sim.ports import free_udp_range  # noqa: E402
from callbridge.transports.sip import AllowList, CallOffered  # noqa: E402
from callbridge.transports.sip.endpoint import Accept, SipServer  # noqa: E402
from callbridge.transports.sip.leg import SipLeg  # noqa: E402

CHUNK = b"\x7f" * 160


class Feeder:
    """Stands in for the call core: keeps the leg's send queue full."""

    def __init__(self, leg: SipLeg, seconds: float) -> None:
        self.leg = leg
        self.task = asyncio.create_task(self.run(seconds))

    def on_leg_event(self, event: LegEvent) -> None:
        pass

    async def run(self, seconds: float) -> None:
        for _ in range(int(seconds * 50)):
            await self.leg.send_audio(CHUNK)


class Router:
    def __init__(self, seconds: float, k: int) -> None:
        self.seconds = seconds
        self.k = k
        self.feeders: list[Feeder] = []
        self.all_connected = asyncio.Event()

    def decide(self, offer: CallOffered) -> Accept:
        return Accept()

    async def connected(self, leg: SipLeg, accept: Accept) -> None:
        feeder = Feeder(leg, self.seconds)
        leg.attach(feeder)
        self.feeders.append(feeder)
        if len(self.feeders) == self.k:
            self.all_connected.set()


class Carrier(asyncio.DatagramProtocol):
    """One scripted caller: signalling and media on one socket, every RTP arrival timestamped."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[int, int, float]] = []  # (sequence, RTP timestamp, loop time)
        self.ok: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data[:1] == b"\x80" and len(data) >= 12:
            seq, ts = struct.unpack_from("!HI", data, 2)
            self.arrivals.append((seq, ts, asyncio.get_running_loop().time()))
        elif data.startswith(b"SIP/2.0 200") and not self.ok.done():
            self.ok.set_result(data)


def invite(n: int, port: int, bridge_port: int) -> bytes:
    body = (f"v=0\r\no=c {n} 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n").encode()
    head = (f"INVITE sip:bench@127.0.0.1:{bridge_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-{n}\r\nFrom: <sip:c@127.0.0.1>;tag=f{n}\r\n"
            f"To: <sip:bench@127.0.0.1>\r\nCall-ID: bench-{n}\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:c@127.0.0.1:{port}>\r\nContent-Type: application/sdp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def ack(n: int, port: int, bridge_port: int, ok: bytes) -> bytes:
    to = next(line for line in ok.decode().split("\r\n") if line.startswith("To:"))
    return (f"ACK sip:bench@127.0.0.1:{bridge_port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-a{n}\r\n"
            f"From: <sip:c@127.0.0.1>;tag=f{n}\r\n{to}\r\nCall-ID: bench-{n}\r\nCSeq: 1 ACK\r\n"
            f"Content-Length: 0\r\n\r\n").encode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


async def run_calls(k: int, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    router = Router(seconds, k)
    server = SipServer(listen=("127.0.0.1", 0), public_address="127.0.0.1", router=router,
                       allow=AllowList.of("127.0.0.1/32"), rtp_ports=free_udp_range(2 * k + 4), rate_per_s=1000,
                       rate_burst=1000)
    await server.start()
    carriers = []
    for n in range(k):
        transport, carrier = await loop.create_datagram_endpoint(Carrier, local_addr=("127.0.0.1", 0))
        carriers.append(carrier)
        port = transport.get_extra_info("sockname")[1]
        transport.sendto(invite(n, port, server.port), ("127.0.0.1", server.port))
        ok = await carrier.ok
        transport.sendto(ack(n, port, server.port, ok), ("127.0.0.1", server.port))
    await router.all_connected.wait()
    rtp_ports = [leg.port for leg in server.legs]

    async def caller_audio(i: int) -> None:
        carrier, dest = carriers[i], ("127.0.0.1", rtp_ports[i])
        start = loop.time()
        for seq in range(int(seconds * 50)):
            carrier.transport.sendto(struct.pack("!BBHII", 0x80, 0, seq, seq * 160, 7) + CHUNK, dest)
            await asyncio.sleep(max(0.0, start + (seq + 1) * 0.02 - loop.time()))

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller_audio(i) for i in range(k)), *(f.task for f in router.feeders))
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    await server.stop()
    jitter, intervals, lost = [], [], 0
    for carrier in carriers:
        arrivals = carrier.arrivals
        if not arrivals:
            continue
        seq0, ts0, t0 = arrivals[0]
        for _, ts, t in arrivals:
            jitter.append(abs(t - (t0 + ((ts - ts0) & 0xFFFFFFFF) / 8000)) * 1000)
        intervals += [(b[2] - a[2]) * 1000 for a, b in zip(arrivals, arrivals[1:])]
        lost += ((arrivals[-1][0] - seq0) & 0xFFFF) + 1 - len(arrivals)
    return {
        "calls": k, "seconds": seconds, "packets": sum(len(c.arrivals) for c in carriers), "lost": lost,
        "send_jitter_ms": {"p50": percentile(jitter, 50), "p99": percentile(jitter, 99), "max": max(jitter)},
        "interval_ms": {"p1": percentile(intervals, 1), "p50": percentile(intervals, 50),
                        "p99": percentile(intervals, 99), "mean": statistics.fmean(intervals)},
        "cpu_ms_per_call_s": cpu * 1000 / (k * wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 calls for 2 s (a smoke run)")
    parser.add_argument("--json", type=Path, default=ROOT / "out" / "sip_rtp.json")
    args = parser.parse_args()
    plan = [(2, 2.0)] if args.quick else [(1, 10.0), (10, 10.0), (50, 10.0)]
    results = [asyncio.run(run_calls(k, seconds)) for k, seconds in plan]
    for r in results:
        print(f"{r['calls']:3d} calls: send jitter p50 {r['send_jitter_ms']['p50']:.2f} ms, "
              f"p99 {r['send_jitter_ms']['p99']:.2f} ms, max {r['send_jitter_ms']['max']:.2f} ms; "
              f"interval p1/p50/p99 {r['interval_ms']['p1']:.1f}/{r['interval_ms']['p50']:.1f}/"
              f"{r['interval_ms']['p99']:.1f} ms; lost {r['lost']}; CPU {r['cpu_ms_per_call_s']:.2f} ms per call-second")
    write_json(args.json, {"bench": "sip_rtp", "commit": git_commit(), "results": results})


if __name__ == "__main__":
    main()
