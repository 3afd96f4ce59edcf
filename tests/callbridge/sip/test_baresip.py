"""The SIP server against a real SIP client (baresip) on 127.0.0.1: signalling, media, DTMF, access.

Each scenario starts our :class:`SipServer` in-process and one headless baresip, and waits on
events from both sides (baresip's ctrl_tcp events, our server's call events, the leg's caller
events), never on a clock. Skipped where baresip is not installed (``scripts/test.sh``
installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from callbridge.audio import CHUNK_BYTES, pcm16_to_ulaw
from callbridge.calls.leg import CallerAudio, CallerDigit, LegEnded, LegEvent, MarkerPlayed
from callbridge.sim.ports import free_udp_range
from callbridge.transports.sip import AllowList, CallEnded, CallOffered, DigestAuth, MediaUpdated
from callbridge.transports.sip.endpoint import Accept, Reject, SipServer
from callbridge.transports.sip.leg import SipLeg

from .baresip import BARESIP, Baresip

pytestmark = [pytest.mark.slow, pytest.mark.skipif(BARESIP is None, reason="baresip is not installed")]

CALLER_HZ = 440.0
BRIDGE_HZ = 1000.0


def tone(hz: float, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(8000 * seconds)) / 8000
    return (amplitude * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def dominant_hz(pcm: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / 8000)[int(np.argmax(spectrum))])


@pytest.fixture
def caller_wav(tmp_path: Path) -> Path:
    path = tmp_path / "caller.wav"
    sf.write(path, tone(CALLER_HZ, 20.0), 8000, subtype="PCM_16")
    return path


class FakeCall:
    """Stands in for the call core: records what the leg delivers."""

    def __init__(self, leg: SipLeg) -> None:
        self.leg = leg
        self.events: asyncio.Queue[LegEvent] = asyncio.Queue()
        self.audio: list[np.ndarray] = []
        self.loud_frames = 0
        self.heard_enough = asyncio.Event()

    def on_leg_event(self, event: LegEvent) -> None:
        if isinstance(event, CallerAudio):
            self.audio.append(event.pcm16)
            if np.abs(event.pcm16.astype(np.int32)).max() > 1000:
                self.loud_frames += 1
                if self.loud_frames >= 50:
                    self.heard_enough.set()
            return
        self.events.put_nowait(event)

    async def next(self, kind: type) -> Any:
        while True:
            event = await self.events.get()
            if isinstance(event, kind):
                return event

    async def play(self, pcm: np.ndarray, marker: str) -> None:
        ulaw = pcm16_to_ulaw(pcm)
        for i in range(0, len(ulaw) - CHUNK_BYTES + 1, CHUNK_BYTES):
            await self.leg.send_audio(ulaw[i:i + CHUNK_BYTES])
        await self.leg.send_marker(marker)


class Router:
    def __init__(self, *, reject: int | None = None, ring_s: float = 0.0) -> None:
        self.reject = reject
        self.ring_s = ring_s
        self.calls: asyncio.Queue[FakeCall] = asyncio.Queue()
        self.released = 0

    def decide(self, offer: CallOffered) -> Accept | Reject:
        if self.reject is not None:
            return Reject(self.reject)
        return Accept(context=offer.to_user, release=self._release, ring_s=self.ring_s)

    def _release(self) -> None:
        self.released += 1

    async def connected(self, leg: SipLeg, accept: Accept) -> None:
        call = FakeCall(leg)
        leg.attach(call)
        await self.calls.put(call)


class Observed:
    """Our server's call events, in order."""

    def __init__(self, server: SipServer) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        server.observers.append(self.queue.put_nowait)

    async def next(self, kind: type) -> Any:
        while True:
            event = await self.queue.get()
            if isinstance(event, kind):
                return event


@contextlib.asynccontextmanager
async def sip_server(router: Router, *, allow: str = "127.0.0.1/32",
                     digest: DigestAuth | None = None) -> AsyncIterator[SipServer]:
    server = SipServer(listen=("127.0.0.1", 0), public_address="127.0.0.1", router=router,
                       allow=AllowList.of(allow), rtp_ports=free_udp_range(10), digest=digest,
                       media_timeout_s=10.0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def dial(phone: Baresip, server: SipServer, number: str = "+15550100") -> None:
    response = await phone.command("dial", f"sip:{number}@127.0.0.1:{server.port}")
    assert response.get("ok"), response


async def test_call_audio_both_ways_then_caller_hangs_up(tmp_path: Path, caller_wav: Path) -> None:
    router = Router()
    async with sip_server(router) as server, Baresip(tmp_path / "phone", caller_wav=caller_wav) as phone:
        seen = Observed(server)
        await dial(phone, server)
        offered = await seen.next(CallOffered)
        assert offered.to_user == "+15550100" and offered.media.codec == "PCMU"
        await phone.wait_event("CALL_ESTABLISHED")
        call = await router.calls.get()
        assert call.leg.info.carrier == "sip" and call.leg.info.carrier_call_id == offered.handle
        assert call.leg.info.media_id == offered.call_id
        await call.play(tone(BRIDGE_HZ, 1.0), "end")
        assert (await call.next(MarkerPlayed)).name == "end"
        await call.heard_enough.wait()  # the caller's tone reached us
        heard_in = np.concatenate(call.audio)
        assert abs(dominant_hz(heard_in[-4000:]) - CALLER_HZ) < 20
        await phone.command("hangup")
        assert (await seen.next(CallEnded)).reason == "hangup: caller"
        assert (await call.next(LegEnded)).reason == "hangup: caller"
        await phone.wait_event("CALL_CLOSED")
        await call.leg.close("hangup: caller", 1.0)
        sender = call.leg.sender
        assert sender.audio_chunks_sent == 50 and sender.slots_skipped == 0
    # What baresip heard (its decoder's output): the bridge's tone, one second of it, not silence.
    files = phone.heard_files()
    assert files, phone.log[-20:]
    heard, rate = sf.read(files[0], dtype="int16")
    assert rate == 8000
    loud = np.flatnonzero(np.abs(heard.astype(np.int32)) > 2000)
    assert loud.size, "baresip heard only silence"
    burst = heard[loud[0]:loud[-1] + 1]
    assert 0.9 * 8000 <= len(burst) <= 1.1 * 8000
    assert abs(dominant_hz(burst) - BRIDGE_HZ) < 20


async def test_dtmf_digits_arrive_as_events(tmp_path: Path, caller_wav: Path) -> None:
    router = Router()
    async with sip_server(router) as server, Baresip(tmp_path / "phone", caller_wav=caller_wav) as phone:
        await dial(phone, server)
        await phone.wait_event("CALL_ESTABLISHED")
        call = await router.calls.get()
        digits = []
        for digit in "19*#":
            await phone.command("sndcode", digit)
            digits.append((await call.next(CallerDigit)).digit)
        assert digits == list("19*#")
        await phone.command("hangup")
        await call.next(LegEnded)


async def test_bridge_hang_up_sends_bye(tmp_path: Path, caller_wav: Path) -> None:
    router = Router()
    async with sip_server(router) as server, Baresip(tmp_path / "phone", caller_wav=caller_wav) as phone:
        await dial(phone, server)
        await phone.wait_event("CALL_ESTABLISHED")
        call = await router.calls.get()
        await call.leg.hang_up()
        assert (await call.next(LegEnded)).reason == "hangup: bridge"
        closed = await phone.wait_event("CALL_CLOSED")
        assert closed["param"] == "Connection reset by peer"  # baresip's words for a BYE from the far end
        await call.leg.close("hangup: bridge", 1.0)
        assert not server.legs


async def test_cancel_while_ringing(tmp_path: Path, caller_wav: Path) -> None:
    router = Router(ring_s=60.0)
    async with sip_server(router) as server, Baresip(tmp_path / "phone", caller_wav=caller_wav) as phone:
        seen = Observed(server)
        await dial(phone, server)
        await phone.wait_event("CALL_RINGING")
        await phone.command("hangup")  # before the answer: a CANCEL
        assert (await seen.next(CallEnded)).reason == "hangup: cancelled"
        await phone.wait_event("CALL_CLOSED")
        assert router.released == 1 and router.calls.empty()


async def test_hold_and_resume_are_answered_with_mirrored_direction(tmp_path: Path, caller_wav: Path) -> None:
    router = Router()
    async with sip_server(router) as server, Baresip(tmp_path / "phone", caller_wav=caller_wav) as phone:
        seen = Observed(server)
        await dial(phone, server)
        await phone.wait_event("CALL_ESTABLISHED")
        call = await router.calls.get()
        await phone.command("hold")
        held = await seen.next(MediaUpdated)
        assert held.media.direction == "recvonly" and not call.leg.sender.sending
        await phone.command("resume")
        resumed = await seen.next(MediaUpdated)
        assert resumed.media.direction == "sendrecv" and call.leg.sender.sending
        await call.play(tone(BRIDGE_HZ, 0.2), "after-resume")
        assert (await call.next(MarkerPlayed)).name == "after-resume"
        await phone.command("hangup")
        await call.next(LegEnded)


async def test_digest_challenge_then_call(tmp_path: Path, caller_wav: Path) -> None:
    router = Router()
    auth = DigestAuth(username="trunk", password="pw-from-env")
    async with sip_server(router, digest=auth) as server, \
            Baresip(tmp_path / "phone", caller_wav=caller_wav, auth=("trunk", "pw-from-env")) as phone:
        await dial(phone, server)
        await phone.wait_event("CALL_ESTABLISHED")
        assert server.uas is not None and server.uas.counters.get("auth_missing") == 1
        call = await router.calls.get()
        await phone.command("hangup")
        await call.next(LegEnded)


async def test_wrong_digest_password_never_connects(tmp_path: Path, caller_wav: Path) -> None:
    router = Router()
    auth = DigestAuth(username="trunk", password="right")
    async with sip_server(router, digest=auth) as server, \
            Baresip(tmp_path / "phone", caller_wav=caller_wav, auth=("trunk", "wrong")) as phone:
        await dial(phone, server)
        await phone.wait_event("CALL_CLOSED")
        assert server.uas is not None and server.uas.counters.get("auth_bad_response", 0) >= 1
        assert router.calls.empty()


@pytest.mark.parametrize("status", [404, 486, 503])
async def test_rejected_call_is_closed_with_the_status(tmp_path: Path, caller_wav: Path, status: int) -> None:
    router = Router(reject=status)
    async with sip_server(router) as server, Baresip(tmp_path / "phone", caller_wav=caller_wav) as phone:
        await dial(phone, server)
        closed = await phone.wait_event("CALL_CLOSED")
        assert str(status) in str(closed.get("param", "")), closed


async def test_stranger_is_dropped_without_an_answer(tmp_path: Path, caller_wav: Path) -> None:
    router = Router()
    async with sip_server(router, allow="10.0.0.0/8") as server, \
            Baresip(tmp_path / "phone", caller_wav=caller_wav) as phone:
        second = asyncio.Event()
        server.datagram_observers.append(lambda data, src: server.datagrams_in >= 2 and second.set())
        await dial(phone, server)
        await second.wait()  # the INVITE and its retransmission (it heard nothing back)
        assert server.datagrams_out == 0
        assert server.uas is not None and server.uas.counters["dropped_stranger"] >= 2
        await phone.command("hangup")


class LossyRelay(asyncio.DatagramProtocol):
    """A UDP relay between baresip and the bridge that loses chosen SIP datagrams, once each.

    baresip dials the relay; the relay forwards to the bridge, and the bridge's answers back to
    baresip. ``lose`` holds predicates on the datagram's first line (and CSeq) to drop once.
    """

    def __init__(self, bridge: tuple[str, int], lose: list[Any]) -> None:
        self.bridge = bridge
        self.lose = list(lose)
        self.lost: list[str] = []
        self.phone: tuple[str, int] | None = None
        self.transport: Any = None
        self.seen: asyncio.Queue[str] = asyncio.Queue()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        text = data.decode(errors="replace")
        first = text.split("\r\n", 1)[0]
        cseq = next((line[5:].strip() for line in text.split("\r\n") if line.lower().startswith("cseq:")), "")
        summary = f"{first} | {cseq}"
        self.seen.put_nowait(summary)
        for rule in self.lose:
            if rule(first, cseq):
                self.lose.remove(rule)
                self.lost.append(summary)
                return
        if addr == self.bridge:
            assert self.phone is not None
            # Our Contact names the bridge; point it at the relay so in-dialog requests (ACK, BYE)
            # come through here too, as they would through a proxy that Record-Routes.
            head, sep, body = data.partition(b"\r\n\r\n")
            here = self.transport.get_extra_info("sockname")[1]
            head = head.replace(f"127.0.0.1:{self.bridge[1]}".encode(), f"127.0.0.1:{here}".encode())
            self.transport.sendto(head + sep + body, self.phone)
        else:
            self.phone = addr
            self.transport.sendto(data, self.bridge)

    async def wait_for(self, match: Any) -> None:
        """Until a datagram whose ``first line | CSeq`` satisfies ``match`` has passed (or been lost)."""
        while not match(await self.seen.get()):
            pass


async def test_lost_200_ack_and_bye_answer_are_recovered_by_retransmission(tmp_path: Path, caller_wav: Path) -> None:
    router = Router()
    async with sip_server(router) as server, Baresip(tmp_path / "phone", caller_wav=caller_wav) as phone:
        loop = asyncio.get_running_loop()
        rules = [
            lambda first, cseq: first.startswith("SIP/2.0 200") and cseq.endswith("INVITE"),  # our 200 is lost
            lambda first, cseq: first.startswith("ACK"),  # then baresip's first ACK is lost
            lambda first, cseq: first.startswith("SIP/2.0 200") and cseq.endswith("BYE"),  # our answer to BYE
        ]
        transport, relay = await loop.create_datagram_endpoint(
            lambda: LossyRelay(("127.0.0.1", server.port), rules), local_addr=("127.0.0.1", 0))
        try:
            relay_port = transport.get_extra_info("sockname")[1]
            assert (await phone.command("dial", f"sip:+15550100@127.0.0.1:{relay_port}")).get("ok")
            await phone.wait_event("CALL_ESTABLISHED")  # it took our resent 200
            call = await router.calls.get()  # and we took its resent ACK
            await phone.command("hangup")
            assert (await call.next(LegEnded)).reason == "hangup: caller"
            def bye_ok(line: str) -> bool:
                return line.startswith("SIP/2.0 200") and line.endswith("BYE")

            await relay.wait_for(bye_ok)  # our answer to the BYE, lost
            await relay.wait_for(bye_ok)  # the BYE came again and was answered again, from the transaction
            await phone.wait_event("CALL_CLOSED")
            assert len(relay.lost) == 3 and router.calls.empty()
            assert server.uas is not None and server.uas.transactions.retransmissions_absorbed >= 1
        finally:
            transport.close()
