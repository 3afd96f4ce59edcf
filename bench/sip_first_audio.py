"""First audio on a SIP call vs a Twilio call, in the same run, against the same service.

One service process (tiny random model unless ``--model``), SIP on 127.0.0.1. Each
carrier takes ``--turns`` text turns posted through the control API, one after the other:

- **Twilio**: the call simulator (signed webhook, Media Streams, Twilio's playback queue), one
  call per turn;
- **SIP**: a scripted carrier (INVITE/200/ACK over UDP, 20 ms RTP of silence from the caller)
  that timestamps every RTP packet the bridge sends.

Per turn: ``server_ttfa_ms`` (the service's own time to first audio: text in → first chunk
to the leg) and ``heard_ms`` (POST issued → the first audio reaches the caller: for SIP, the
first non-silent RTP packet; for Twilio, the simulator's ``ttfa_heard_ms``, when Twilio's
queue starts playing it). Usage: python bench/sip_first_audio.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402
from common import git_commit, write_json  # noqa: E402

from callbridge.calls.agent import AgentReply  # noqa: E402
from callbridge.config import Settings  # noqa: E402
from callbridge.sim import FakeTwilioRest, SimConfig, run_simulation  # noqa: E402
from callbridge.sim.ports import free_tcp_port, free_udp_range  # noqa: E402
from callbridge.web.app import build_app  # noqa: E402
from callbridge.web.services import SERVICES  # noqa: E402
from callbridge.web.sip_calls import SIP  # noqa: E402

TEXT = "Your order has shipped and will arrive on Tuesday."
API = "bench-api-token"
AUTH = "bench-twilio-auth-token"
ACCOUNT = "AC" + "0" * 32
PUBLIC = "https://bridge.bench"
SILENT = b"\xff" * 160


class Agent:
    """Tells the bench when a call has started and when each turn is done."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_event(self, call: dict[str, Any], event: dict[str, Any]) -> AgentReply | None:
        await self.events.put({**event, "carrier": call.get("carrier")})
        return None

    async def next(self, kind: str, carrier: str) -> dict[str, Any]:
        while True:
            event = await self.events.get()
            if event["event"] == kind and event["carrier"] == carrier:
                return event

    async def close(self) -> None:
        pass


class Carrier(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.ok: asyncio.Future[bytes] = loop.create_future()
        self.first_audio: asyncio.Future[float] | None = None
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data[:1] == b"\x80" and len(data) >= 172:
            if self.first_audio is not None and not self.first_audio.done() and data[12:172] != SILENT:
                self.first_audio.set_result(asyncio.get_running_loop().time())
        elif data.startswith(b"SIP/2.0 200") and b"INVITE" in data and not self.ok.done():
            self.ok.set_result(data)


def sip_request(method: str, port: int, bridge: int, *, to: str = "To: <sip:+15550100@127.0.0.1>",
                cseq: str = "1 INVITE", body: bytes = b"") -> bytes:
    head = (f"{method} sip:+15550100@127.0.0.1:{bridge} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-{method.lower()}\r\n"
            f"From: <sip:caller@127.0.0.1>;tag=bench\r\n{to}\r\nCall-ID: bench-first-audio\r\nCSeq: {cseq}\r\n"
            f"Contact: <sip:caller@127.0.0.1:{port}>\r\n"
            + ("Content-Type: application/sdp\r\n" if body else "") + f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def sip_call(base: str, bridge_port: int, agent: Agent, turns: int) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    transport, carrier = await loop.create_datagram_endpoint(Carrier, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    sdp = (f"v=0\r\no=c 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n").encode()
    transport.sendto(sip_request("INVITE", port, bridge_port, body=sdp), ("127.0.0.1", bridge_port))
    ok = (await carrier.ok).decode()
    to = next(line for line in ok.split("\r\n") if line.startswith("To:"))
    rtp_port = int(next(line for line in ok.split("\r\n") if line.startswith("m=audio")).split()[1])
    transport.sendto(sip_request("ACK", port, bridge_port, to=to, cseq="1 ACK"), ("127.0.0.1", bridge_port))
    started = await agent.next("call_started", "sip")
    sid = started["call_sid"]

    async def caller_silence() -> None:  # the caller's side of the media, as a phone would send it
        seq = 0
        t0 = loop.time()
        while True:
            transport.sendto(struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, seq * 160, 9) + SILENT,
                             ("127.0.0.1", rtp_port))
            seq += 1
            await asyncio.sleep(max(0.0, t0 + seq * 0.02 - loop.time()))

    media = asyncio.create_task(caller_silence())
    out = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API}"}) as http:
        for _ in range(turns):
            carrier.first_audio = loop.create_future()
            t0 = loop.time()
            async with http.post(f"{base}/calls/{sid}/turns", json={"text": TEXT}) as resp:
                assert resp.status == 202, await resp.text()
            heard_at = await carrier.first_audio
            await agent.next("turn_done", "sip")
            out.append({"heard_ms": (heard_at - t0) * 1000})
        async with http.post(f"{base}/calls/{sid}/hangup") as resp:
            assert resp.status in (200, 202)
    await agent.next("call_ended", "sip")
    media.cancel()
    transport.close()
    return out


async def twilio_calls(base: str, rest: FakeTwilioRest, turns: int) -> list[dict[str, Any]]:
    """One simulated call per turn, one after the other: the simulator posts a call's texts without
    waiting for the previous turn to end, so a later turn's figure would include its queueing."""
    out = []
    for _ in range(turns):
        cfg = SimConfig(base_url=base, public_base_url=PUBLIC, twilio_auth_token=AUTH, account_sid=ACCOUNT,
                        api_token=API, texts=[TEXT], rest_server=rest, max_call_s=300.0)
        [report] = [r.to_json() for r in await run_simulation(cfg)]
        out += [{"heard_ms": t["ttfa_heard_ms"], "sim_ttfa_ms": t["ttfa_ms"]}
                for t in report["turns"] if t["kind"] != "greeting"]
    return out


def summary(values: list[float | None]) -> dict[str, Any]:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return {"n": 0}
    return {"n": len(vals), "p50": statistics.median(vals), "max": vals[-1], "mean": statistics.fmean(vals)}


async def run(turns: int, model: str) -> dict[str, Any]:
    rest = FakeTwilioRest(account_sid=ACCOUNT, auth_token=AUTH)
    rest_url = await rest.start()
    port = free_tcp_port()
    low, high = free_udp_range(8)
    agent = Agent()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings().with_(
            server={"host": "127.0.0.1", "port": port, "public_base_url": PUBLIC},
            auth={"enabled": True, "api_token": API},
            twilio={"auth_token": AUTH, "account_sid": ACCOUNT, "api_base_url": rest_url},
            model={"model": model},
            voices={"dir": str(Path(tmp) / "voices")},
            sip={"listen": "127.0.0.1:0", "allow": "127.0.0.1/32", "rtp_ports": f"{low}-{high}"},
        )
        app = build_app(settings, agent=agent)  # type: ignore[arg-type]
        server_ttfa: dict[str, list[float | None]] = {"twilio": [], "sip": []}
        app[SERVICES].call_observers.append(  # the service's own time to first audio, per turn
            lambda call: server_ttfa[call.leg.info.carrier].extend(t.summary()["ttfa_ms"] for t in call.turns.history))
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{port}"
        try:
            server = app[SIP].server
            assert server is not None
            twilio = await twilio_calls(base, rest, turns)
            sip = await sip_call(base, server.port, agent, turns)
        finally:
            await runner.cleanup()
            await rest.stop()
    return {
        "turns": turns, "model": model,
        "twilio": {"per_turn": twilio, "heard_ms": summary([t["heard_ms"] for t in twilio]),
                   "sim_ttfa_ms": summary([t["sim_ttfa_ms"] for t in twilio]),
                   "server_ttfa_ms": summary(server_ttfa["twilio"])},
        "sip": {"per_turn": sip, "heard_ms": summary([t["heard_ms"] for t in sip]),
                "server_ttfa_ms": summary(server_ttfa["sip"])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 turns per carrier")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--model", default="random-tiny")
    parser.add_argument("--json", type=Path, default=ROOT / "out" / "sip_first_audio.json")
    args = parser.parse_args()
    result = asyncio.run(run(2 if args.quick else args.turns, args.model))
    for carrier in ("twilio", "sip"):
        heard = result[carrier]["heard_ms"]
        print(f"{carrier:6s}: first audio heard p50 {heard.get('p50', float('nan')):.0f} ms, "
              f"max {heard.get('max', float('nan')):.0f} ms over {heard['n']} turns")
    for carrier in ("twilio", "sip"):
        server = result[carrier]["server_ttfa_ms"]
        print(f"{carrier:6s}: server-side time to first audio p50 {server.get('p50', float('nan')):.0f} ms, "
              f"max {server.get('max', float('nan')):.0f} ms")
    write_json(args.json, {"bench": "sip_first_audio", "commit": git_commit(), **result})


if __name__ == "__main__":
    main()
