"""Several instances sharing a real Redis (Debian's redis-server): admission across instances, the
call directory, forwarding, a killed instance, a Redis outage.

Instances are separate in-process apps (each its own TTS worker, reservations and HTTP port on
loopback, sharing the tiny model's weights) that talk to each other only over HTTP and Redis.
The simulator is the caller; the stream URL of an instance is "resolved" to its loopback port
as DNS would resolve it for Twilio. Expiries are waited for by polling Redis, bounded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from callbridge.cluster import Placement, Refused, Ticket
from callbridge.cluster.redis_admission import RedisAdmission
from callbridge.config import Settings, SettingsError, load_settings
from callbridge.sim import FakeTwilioRest, SimConfig, simulate_call
from callbridge.sim.ports import free_tcp_port
from callbridge.transports.twilio import compute_signature
from callbridge.web.app import build_app
from callbridge.web.services import SERVICES, Services
from dia2 import Dia2

from .redis_server import REDIS_SERVER, RedisServer
from .test_service import ACCOUNT, API, AUTH, PUBLIC, WAIT_S, settings_for

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)")]

HEARTBEAT_S, TTL_S = 0.2, 1.0  # short, so an expiry is quick to wait for


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


_prefixes = iter(range(1, 10_000))


@pytest.fixture
def prefix() -> str:
    """Each test its own key space in the shared server."""
    return f"t{next(_prefixes)}:"


async def poll(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = WAIT_S) -> None:
    """Wait for a condition on Redis or the service (bounded: only a hang fails)."""
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------------- admission against Redis alone


class FakeReservation:
    def __init__(self, worker: FakeWorker) -> None:
        self.worker, self.released = worker, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.worker.held -= 1


class FakeWorker:
    """A TTS worker's admission surface: ``capacity`` slots, ``reserve()``."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.held = capacity, 0

    def reserve(self) -> FakeReservation | None:
        if self.held >= self.capacity:
            return None
        self.held += 1
        return FakeReservation(self)


def cluster_settings(redis_url: str, prefix: str, name: str, max_calls: int, port: int = 1) -> Settings:
    return Settings().with_(
        server={"port": port, "public_base_url": PUBLIC},
        calls={"max_calls": max_calls},
        cluster={"redis_url": redis_url, "key_prefix": prefix, "instance_id": name, "heartbeat_s": HEARTBEAT_S,
                 "ttl_s": TTL_S, "internal_url": f"http://127.0.0.1:{port}", "public_url": f"https://{name}.bridge.test"},
    )


def admission(redis_url: str, prefix: str, name: str, slots: int,
              ready: Callable[[], bool] = lambda: True) -> RedisAdmission:
    worker = FakeWorker(slots)
    return RedisAdmission(cluster_settings(redis_url, prefix, name, slots), worker=lambda: worker,  # type: ignore[arg-type,return-value]
                          ready=ready)


async def test_an_instance_not_ready_hands_calls_on_and_gets_none(redis_server: RedisServer, prefix: str) -> None:
    """Warming up or draining: the webhook that lands there places the call on a ready instance,
    and no other instance places a call there."""
    state = {"ready": False}
    a = admission(redis_server.url, prefix, "a", 2, ready=lambda: state["ready"])
    b = admission(redis_server.url, prefix, "b", 1)
    await a.start()
    await b.start()
    try:
        first = await a.place("CA" + "1" * 32, "t1", Ticket("CA" + "1" * 32, "v", ""))
        assert isinstance(first, Placement) and first.instance.id == "b"
        assert a.admit_local("CA" + "2" * 32) is None  # SIP too
        assert await b.place("CA" + "3" * 32, "t3", Ticket("CA" + "3" * 32, "v", "")) is Refused.FULL
        state["ready"] = True
        await a._publish()  # the next heartbeat, now
        here = await b.place("CA" + "4" * 32, "t4", Ticket("CA" + "4" * 32, "v", ""))
        assert isinstance(here, Placement) and here.instance.id == "a"
    finally:
        await a.stop()
        await b.stop()


async def test_concurrent_reservations_never_promise_a_slot_twice(redis_server: RedisServer, prefix: str) -> None:
    nodes = [admission(redis_server.url, prefix, name, 2) for name in ("a", "b", "c")]
    for node in nodes:
        await node.start()
    try:
        # 30 webhooks at once, spread over the three instances, for 6 slots in all.
        results = await asyncio.gather(*(nodes[i % 3].place(f"CA{i:032d}", f"token{i}", Ticket(f"CA{i:032d}", "v", ""))
                                         for i in range(30)))
        placed = {i: r for i, r in enumerate(results) if isinstance(r, Placement)}
        assert len(placed) == 6 and all(r is Refused.FULL for r in results if not isinstance(r, Placement))
        per_instance = {name: sum(1 for r in placed.values() if r.instance.id == name) for name in "abc"}
        assert per_instance == {"a": 2, "b": 2, "c": 2}
        redis = Redis.from_url(redis_server.url, decode_responses=True)
        for name in "abc":
            assert await redis.zcard(f"{prefix}slots:{name}") == 2
        # Calls placed on another instance are claimed there once, with a TTS slot of its own.
        by_name = {n.me.id: n for n in nodes}
        for i, placement in placed.items():
            if placement.local:
                assert placement.instance.id == nodes[i % 3].me.id
                continue
            target = by_name[placement.instance.id]
            claimed = await target.claim(f"token{i}")
            assert claimed is not None and claimed[0].call_sid == f"CA{i:032d}"
            assert await target.claim(f"token{i}") is None  # once
            assert await nodes[i % 3].claim(f"token{i}") is None
        assert all(n._worker().held == 2 for n in nodes)  # type: ignore[attr-defined]
        # A webhook Twilio repeats to another instance is refused there too.
        first = next(iter(placed))
        assert await nodes[(first + 1) % 3].place(f"CA{first:032d}", "again", Ticket(f"CA{first:032d}", "v", "")) \
            is Refused.REPLAYED
        await redis.aclose()
    finally:
        for node in nodes:
            await node.stop()


async def test_a_ticket_is_taken_once_and_only_by_the_instance_it_names(redis_server: RedisServer,
                                                                         prefix: str) -> None:
    a, b, c = (admission(redis_server.url, prefix, name, 1) for name in "abc")
    for node in (a, b, c):
        await node.start()
    try:
        here = await a.place("CA" + "1" * 32, "t1", Ticket("CA" + "1" * 32, "v", ""))
        there = await a.place("CA" + "2" * 32, "t2", Ticket("CA" + "2" * 32, "v", "hi", "+15550001", "+15550002"))
        assert isinstance(here, Placement) and here.local
        assert isinstance(there, Placement) and not there.local
        target = {"b": b, "c": c}[there.instance.id]
        other = c if target is b else b
        # A stream sent to the wrong instance (a or the other one) is refused there and leaves
        # the ticket for the instance it names.
        assert await a.claim("t2") is None
        assert await other.claim("t2") is None
        claimed = await target.claim("t2")
        # the holder learns From/To too (the app's call_started carries them on any instance)
        assert claimed is not None and claimed[0] == Ticket("CA" + "2" * 32, "v", "hi", "+15550001", "+15550002")
        assert await target.claim("t2") is None  # once
        assert target._worker().held == 1 and other._worker().held == 0  # type: ignore[attr-defined]
    finally:
        for node in (a, b, c):
            await node.stop()


async def test_a_local_admission_not_yet_published_never_takes_a_slot_promised_to_another(
        redis_server: RedisServer, prefix: str) -> None:
    """b placed a call on a (a's heartbeat counted it); a then admits a SIP call and, before its
    next heartbeat, gets a webhook: Redis still sees room on a, but a must not take the slot the
    call from b is coming for."""
    a, b = admission(redis_server.url, prefix, "a", 2), admission(redis_server.url, prefix, "b", 1)
    await a.start()
    await b.start()
    try:
        assert isinstance(await b.place("CA" + "1" * 32, "t1", Ticket("CA" + "1" * 32, "v", "")), Placement)
        from_b = await b.place("CA" + "2" * 32, "t2", Ticket("CA" + "2" * 32, "v", ""))
        assert isinstance(from_b, Placement) and from_b.instance.id == "a"
        await a._publish()  # a's heartbeat: one slot here promised by another instance
        await stop_beating(a)  # nothing published from here on
        assert a.admit_local("sip-1") is not None  # a SIP call: a's own second slot
        assert await a.place("CA" + "3" * 32, "t3", Ticket("CA" + "3" * 32, "v", "")) is Refused.FULL
        claimed = await a.claim("t2")
        assert claimed is not None and claimed[0].call_sid == "CA" + "2" * 32
    finally:
        await a.stop()
        await b.stop()


async def test_a_dead_instance_stops_counting_and_a_released_slot_is_free_again(redis_server: RedisServer,
                                                                                prefix: str) -> None:
    a, b = admission(redis_server.url, prefix, "a", 1), admission(redis_server.url, prefix, "b", 1)
    await a.start()
    await b.start()
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        here = await a.place("CA" + "1" * 32, "t1", Ticket("CA" + "1" * 32, "v", ""))
        assert isinstance(here, Placement) and here.local
        there = await a.place("CA" + "2" * 32, "t2", Ticket("CA" + "2" * 32, "v", ""))
        assert isinstance(there, Placement) and there.instance.id == "b"
        assert there.instance.public_url == "https://b.bridge.test"
        # The call ends on a: its slot is free again once a publishes it.
        assert here.reservation is not None
        here.reservation.release()
        a.ended("CA" + "1" * 32)
        await poll(lambda: _is(redis.zcard(f"{prefix}slots:a"), 0), "a's slot freed")
        assert await redis.get(f"{prefix}call:{'CA' + '1' * 32}") is None
        # b dies without leaving (its heartbeat stops): within ttl_s it counts no more.
        await stop_beating(b)
        await poll(lambda: _is(redis.exists(f"{prefix}inst:b"), 0), "b's heartbeat entry expired")
        assert (await a.owner_of("CA" + "2" * 32)) is None  # its call is gone with it
        assert {i.id for i in await a.instances()} == {"a"}
        third = await a.place("CA" + "3" * 32, "t3", Ticket("CA" + "3" * 32, "v", ""))
        fourth = await a.place("CA" + "4" * 32, "t4", Ticket("CA" + "4" * 32, "v", ""))
        assert isinstance(third, Placement) and third.local and fourth is Refused.FULL  # never sent to b
    finally:
        await redis.aclose()
        await a.stop()
        await b.stop()


async def _is(value: Awaitable[int], expected: int) -> bool:
    try:
        return await value == expected
    except RedisConnectionError:  # our own client's connection died with a restarted server: not yet
        return False


def test_cluster_settings_errors_are_one_line() -> None:
    env = {"CALLBRIDGE_REDIS_URL": "redis://127.0.0.1:6379/0", "CALLBRIDGE_PUBLIC_BASE_URL": "https://bridge.test"}
    with pytest.raises(SettingsError, match="CALLBRIDGE_INTERNAL_URL"):
        load_settings(env=env)
    with pytest.raises(SettingsError, match=r"starts with 'http'.*redis://"):
        load_settings(env={**env, "CALLBRIDGE_REDIS_URL": "http://secret@redis:6379"})
    with pytest.raises(SettingsError, match="at least twice"):
        load_settings(env={**env, "CALLBRIDGE_INTERNAL_URL": "http://a:8080", "CALLBRIDGE_CLUSTER_TTL_S": "1",
                           "CALLBRIDGE_CLUSTER_HEARTBEAT_S": "1"})
    with pytest.raises(SettingsError, match="CALLBRIDGE_CLUSTER_HEARTBEAT_S"):
        load_settings(env={**env, "CALLBRIDGE_INTERNAL_URL": "http://a:8080", "CALLBRIDGE_CLUSTER_HEARTBEAT_S": "x"})
    with pytest.raises(SettingsError, match="CALLBRIDGE_INSTANCE_PUBLIC_URL"):
        load_settings(env={"CALLBRIDGE_REDIS_URL": "redis://r:6379", "CALLBRIDGE_INTERNAL_URL": "http://a:8080"})
    s = load_settings(env={**env, "CALLBRIDGE_INTERNAL_URL": "http://a:8080", "CALLBRIDGE_INSTANCE_ID": "gpu1",
                           "CALLBRIDGE_INSTANCE_PUBLIC_URL": "https://bridge.test/i/gpu1"})
    assert s.cluster.enabled and s.cluster.instance_id == "gpu1" and "redis" not in repr(s.cluster)
    assert not load_settings(env={}).cluster.enabled  # the embedded default


# ---------------------------------------------------------------------- whole instances


@dataclass
class Node:
    name: str
    base: str
    public: str
    app: web.Application
    runner: web.AppRunner

    @property
    def svc(self) -> Services:
        return self.app[SERVICES]


@dataclass
class Cluster:
    rest: FakeTwilioRest
    nodes: dict[str, Node]
    redis: Redis

    def sim(self, via: str, **kw: Any) -> SimConfig:
        defaults: dict[str, Any] = dict(
            base_url=self.nodes[via].base, public_base_url=PUBLIC, twilio_auth_token=AUTH, account_sid=ACCOUNT,
            api_token=API, max_call_s=60.0, rest_server=self.rest,
            resolve={n.public: n.base for n in self.nodes.values()})
        defaults.update(kw)
        return SimConfig(**defaults)


HEADERS = {"Authorization": f"Bearer {API}"}


@contextlib.asynccontextmanager
async def cluster(tiny_runtime: Dia2, tmp: Path, redis_url: str, prefix: str,
                  max_calls: dict[str, int], twilio: dict[str, Any] | None = None,
                  **cluster_settings: Any) -> AsyncIterator[Cluster]:
    rest = FakeTwilioRest(account_sid=ACCOUNT, auth_token=AUTH)
    rest_url = await rest.start()
    nodes: dict[str, Node] = {}
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        for name, limit in max_calls.items():  # one after another: they share the voices folder
            port = free_tcp_port()
            public = f"https://{name}.bridge.test"
            settings = settings_for(
                port, tmp, rest_url, calls={"max_calls": limit, "hangup_drain_timeout_s": 1.0}, twilio=twilio or {},
                cluster={"redis_url": redis_url, "key_prefix": prefix, "instance_id": name,
                         "internal_url": f"http://127.0.0.1:{port}", "public_url": public,
                         "heartbeat_s": HEARTBEAT_S, "ttl_s": TTL_S, **cluster_settings})
            app = build_app(settings, runtime=tiny_runtime)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            nodes[name] = Node(name, f"http://127.0.0.1:{port}", public, app, runner)
        # Every instance is ready and published before a call comes.
        await poll(lambda: _ready_count(redis, prefix, len(nodes)), "all instances published")
        yield Cluster(rest, nodes, redis)
    finally:
        for node in nodes.values():
            await node.runner.cleanup()
        await redis.aclose()
        await rest.stop()


async def _ready_count(redis: Redis, prefix: str, n: int) -> bool:
    ids = await redis.smembers(f"{prefix}instances")
    return len(ids) == n and all([await redis.hget(f"{prefix}inst:{i}", "ready") == "1" for i in ids])


async def hold_slot(node: Node, call_sid: str) -> str:
    """A signed webhook to ``node`` whose stream never comes: the slot stays held for the token's life."""
    form = {"CallSid": call_sid, "AccountSid": ACCOUNT, "From": "+1", "To": "+2", "CallStatus": "ringing"}
    sig = compute_signature(AUTH, PUBLIC + "/twilio/voice", form)
    async with aiohttp.ClientSession() as http, http.post(f"{node.base}/twilio/voice", data=form,
                                                           headers={"X-Twilio-Signature": sig}) as resp:
        assert resp.status == 200
        return await resp.text()


async def played(node: Node, sid: str, turns: int) -> None:
    """Wait (through ``node``, forwarded if need be) until ``turns`` turns of the call have ended and
    every mark sent has been echoed: hanging up earlier would cut the audio (marks never echoed)."""
    async def done() -> bool:
        async with aiohttp.ClientSession() as http, http.get(f"{node.base}/calls/{sid}", headers=HEADERS) as resp:
            view = await resp.json()
        stats = view["stats"]
        return (view["current_turn"] is None and not view["queued_turns"] and len(view["recent_turns"]) >= turns
                and stats["marks_echoed"] == stats["marks_sent"])

    await poll(done, f"call {sid} played {turns} turns")


def clean(report: dict[str, Any]) -> None:
    assert report["error"] is None, report["error"]
    assert report["protocol_errors"] == [] and report["lost_or_reordered"] == 0
    assert report["marks_echoed"] == report["marks_sent"] > 0


class Held:
    """A simulated call kept open (``hold_s``) until the test ends it; ``live`` is set with its CallSid."""

    def __init__(self, cfg: SimConfig) -> None:
        self.live = asyncio.Event()
        self.call_sid = ""
        self.task = asyncio.create_task(simulate_call(
            SimConfig(**{**cfg.__dict__, "hold_s": 50.0, "announce": self._announce}), 0))

    def _announce(self, line: str) -> None:
        match = re.search(r"CA[0-9a-f]{32}", line)
        assert match is not None
        self.call_sid = match.group(0)
        self.live.set()

    async def started(self) -> str:
        async with asyncio.timeout(WAIT_S):
            done, _ = await asyncio.wait([asyncio.ensure_future(self.live.wait()), self.task],
                                         return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:  # ended before it was live: say why
            raise AssertionError(f"the held call ended early: {self.task.result().to_json()['error']}")
        return self.call_sid

    async def report(self) -> dict[str, Any]:
        async with asyncio.timeout(WAIT_S):
            return (await self.task).to_json()


async def test_a_call_through_a_full_instance_lands_on_another_and_a_drives_it(
        tiny_runtime: Dia2, tmp_path: Path, redis_server: RedisServer, prefix: str) -> None:
    async with cluster(tiny_runtime, tmp_path, redis_server.url, prefix, {"a": 1, "b": 1}) as c:
        a, b = c.nodes["a"], c.nodes["b"]
        await hold_slot(a, "CA" + "a" * 32)  # a is full (a stream token pending)
        # Through a: placed on b, whose stream URL the TwiML names; the text socket and the turns
        # go through a, forwarded to b.
        held = Held(c.sim("a", texts=["Hello there."], stream_text=True))
        sid = await held.started()
        assert sid in b.svc.calls and sid not in a.svc.calls
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{a.base}/calls", headers=HEADERS) as resp:
                listed = await resp.json()
            assert [(x["instance"], x["call_sid"]) for x in listed["calls"]] == [("b", sid)]
            assert listed["unreachable"] == []
            async with http.get(f"{a.base}/calls/{sid}", params={"token": API}) as resp:  # ?token= passes through
                assert resp.status == 200 and (await resp.json())["call_sid"] == sid
            async with http.get(f"{a.base}/calls/{sid}") as resp:
                assert resp.status == 401  # checked here, before anything is forwarded
            # Every instance is full now: a webhook anywhere is refused.
            assert "<Reject" in await hold_slot(a, "CA" + "c" * 32)
            # The control API on a drives the call on b.
            async with http.post(f"{a.base}/calls/{sid}/turns", json={"text": "One more thing."}, headers=HEADERS) as resp:
                assert resp.status == 202, await resp.text()
                turn_id = (await resp.json())["turn_id"]
            async with http.delete(f"{a.base}/calls/{sid}/turns/{turn_id}", headers=HEADERS) as resp:
                assert resp.status in (200, 404)  # cancelled, or already done: answered by b either way
            async with http.post(f"{a.base}/calls/{sid}/turns/x", headers=HEADERS) as resp:
                assert resp.status == 405
            async with http.post(f"{a.base}/calls/{sid}/hangup", headers=HEADERS) as resp:
                assert resp.status == 202
        report = await held.report()
        clean(report)
        assert report["stream_url"].startswith("wss://b.bridge.test/twilio/stream/")
        assert report["turns"][0]["heard"] == ["Hello", "there."]  # events came back through a's proxy
        assert report["ended_by"] == "rest"
        await poll(lambda: _is(c.redis.exists(f"{prefix}call:{sid}"), 0), "the call left the directory")
        async with aiohttp.ClientSession() as http, http.get(f"{a.base}/calls/{sid}", headers=HEADERS) as resp:
            assert resp.status == 404


async def test_a_stream_that_never_comes_frees_its_slot_without_another_webhook(
        tiny_runtime: Dia2, tmp_path: Path, redis_server: RedisServer, prefix: str) -> None:
    """Twilio got the TwiML but never connects: once the stream token expires, the heartbeat
    gives the slot back to the cluster (not only when the next webhook lands here)."""
    async with cluster(tiny_runtime, tmp_path, redis_server.url, prefix, {"a": 1},
                       twilio={"stream_token_ttl_s": 0.5}) as c:
        a = c.nodes["a"]
        assert "wss://a.bridge.test/twilio/stream/" in await hold_slot(a, "CA" + "a" * 32)
        assert await c.redis.zcard(f"{prefix}slots:a") == 1
        await poll(lambda: _is(c.redis.zcard(f"{prefix}slots:a"), 0), "the expired token's slot given back")
        assert await c.redis.get(f"{prefix}call:{'CA' + 'a' * 32}") is None
        assert a.svc.worker is not None and a.svc.worker.free == a.svc.worker.capacity


async def test_an_owner_that_hangs_or_is_gone_is_a_504_or_a_502_with_a_clear_body(
        tiny_runtime: Dia2, tmp_path: Path, redis_server: RedisServer, prefix: str) -> None:
    """The directory names an owner that accepts connections and never answers (hung), or one
    whose port is closed: a forwarded request and a text socket end with 504 / 502 and say so."""
    release = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    hung = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    hung_port = hung.sockets[0].getsockname()[1]
    try:
        async with cluster(tiny_runtime, tmp_path, redis_server.url, prefix, {"a": 1}, forward_timeout_s=1.0) as c:
            a = c.nodes["a"]
            for name, url in (("hung", f"http://127.0.0.1:{hung_port}"), ("gone", f"http://127.0.0.1:{free_tcp_port()}")):
                await c.redis.hset(f"{prefix}inst:{name}", mapping={"internal_url": url, "public_url": "", "capacity": 1,
                                                                    "ready": 1})
                await c.redis.set(f"{prefix}call:CA{name:0>32}", name)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{a.base}/calls/CA{'hung':0>32}", headers=HEADERS) as resp:
                    assert resp.status == 504
                    assert "instance hung, which holds this call, did not answer within 1 s" in (await resp.json())["error"]
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(f"{a.base}/calls/CA{'hung':0>32}/text", headers=HEADERS)
                assert refused.value.status == 504
                async with http.post(f"{a.base}/calls/CA{'gone':0>32}/hangup", headers=HEADERS) as resp:
                    assert resp.status == 502
                    assert "instance gone, which holds this call, could not be reached" in (await resp.json())["error"]
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(f"{a.base}/calls/CA{'gone':0>32}/text", headers=HEADERS)
                assert refused.value.status == 502
    finally:
        release.set()
        hung.close()
        await hung.wait_closed()


async def test_many_relayed_text_sockets_do_not_stall_forwarding(
        tiny_runtime: Dia2, tmp_path: Path, redis_server: RedisServer, prefix: str) -> None:
    """A relayed text socket holds its connection to the owner for the call's life: 100 of them
    (aiohttp's default connection limit) must not stop other requests from being forwarded."""
    async with cluster(tiny_runtime, tmp_path, redis_server.url, prefix, {"a": 1, "b": 1}) as c:
        a, b = c.nodes["a"], c.nodes["b"]
        await hold_slot(a, "CA" + "a" * 32)
        held = Held(c.sim("a"))
        sid = await held.started()
        assert sid in b.svc.calls
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            sockets = [await http.ws_connect(f"{a.base}/calls/{sid}/text", headers=HEADERS) for _ in range(100)]
            async with http.get(f"{a.base}/calls/{sid}", headers=HEADERS) as resp:
                assert resp.status == 200, await resp.text()
            await sockets[0].send_json({"type": "ping"})
            async with asyncio.timeout(WAIT_S):  # relayed both ways (call events may come first)
                while (await sockets[0].receive_json())["event"] != "pong":
                    pass
            async with http.post(f"{a.base}/calls/{sid}/hangup", headers=HEADERS) as resp:
                assert resp.status == 202
            for ws in sockets:
                await ws.close()
        assert (await held.report())["ended_by"] == "rest"


async def test_a_killed_instance_loses_only_its_calls_and_new_calls_go_elsewhere(
        tiny_runtime: Dia2, tmp_path: Path, redis_server: RedisServer, prefix: str) -> None:
    async with cluster(tiny_runtime, tmp_path, redis_server.url, prefix, {"a": 1, "b": 1, "c": 1}) as c:
        a, b = c.nodes["a"], c.nodes["b"]
        on_a = Held(c.sim("a"))
        sid_a = await on_a.started()
        on_b = Held(c.sim("a"))  # a is full: the one with the most room (b, first by name of equals)
        sid_b = await on_b.started()
        assert sid_a in a.svc.calls and sid_b in b.svc.calls
        # b dies: it stops beating without leaving the cluster, its sockets close.
        b_admission = b.svc.admission
        assert isinstance(b_admission, RedisAdmission)
        await stop_beating(b_admission)
        b_admission.stop = _stop_without_leaving(b_admission)  # type: ignore[method-assign]
        await b.runner.cleanup()
        await poll(lambda: _is(c.redis.exists(f"{prefix}inst:b", f"{prefix}call:{sid_b}"), 0), "b's entries expired")
        assert (await on_b.report())["ended_by"] == "service"  # its call was lost with it
        # a's call goes on: a turn through a plays on it.
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{a.base}/calls/{sid_a}/turns", json={"text": "Still here."}, headers=HEADERS) as resp:
                assert resp.status == 202
            async with http.get(f"{a.base}/calls/{sid_b}", headers=HEADERS) as resp:
                assert resp.status == 404  # nobody holds it any more
        # A new call through a (full) goes to c, never to the dead b.
        report = (await simulate_call(c.sim("a", texts=["Hello."]), 0)).to_json()
        clean(report)
        assert report["stream_url"].startswith("wss://c.bridge.test/")
        await played(a, sid_a, 1)
        async with aiohttp.ClientSession() as http, http.post(f"{a.base}/calls/{sid_a}/hangup", headers=HEADERS) as resp:
            assert resp.status == 202
        report_a = await on_a.report()
        assert report_a["error"] is None and report_a["ended_by"] == "rest"
        assert any(t["heard"] == ["Still", "here."] for t in report_a["turns"])


async def stop_beating(admission: RedisAdmission) -> None:
    """What a killed process looks like to Redis: its heartbeat stops, it never says goodbye."""
    assert admission._task is not None
    admission._stopping = True
    admission._wake.set()
    async with asyncio.timeout(WAIT_S):
        await asyncio.wait({admission._task})


def _stop_without_leaving(admission: RedisAdmission) -> Callable[[], Awaitable[None]]:
    async def stop() -> None:  # a killed process says nothing to Redis
        await admission.redis.aclose()

    return stop


async def test_redis_stopped_and_restarted_mid_call(tiny_runtime: Dia2, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        async with cluster(tiny_runtime, tmp_path, server.url, "r:", {"a": 1, "b": 2}) as c:
            a, b = c.nodes["a"], c.nodes["b"]
            on_a = Held(c.sim("a"))
            sid_a = await on_a.started()
            on_b = Held(c.sim("a"))  # placed on b
            sid_b = await on_b.started()
            assert sid_b in b.svc.calls
            caplog.set_level(logging.WARNING, logger="callbridge.cluster.redis_admission")
            server.stop()
            async with aiohttp.ClientSession() as http:
                # Calls in progress go on; what a holds is answered by a.
                async with http.post(f"{a.base}/calls/{sid_a}/turns", json={"text": "Still here."},
                                     headers=HEADERS) as resp:
                    assert resp.status == 202
                async with http.post(f"{a.base}/calls/{sid_b}/turns", json={"text": "Hi."}, headers=HEADERS) as resp:
                    assert resp.status == 503  # the directory is away: said, not guessed
                # b admits on its own while Redis is away, loudly.
                twiml = await hold_slot(b, "CA" + "d" * 32)
                assert "wss://b.bridge.test/twilio/stream/" in twiml
            assert any("Redis unreachable" in r.getMessage() for r in caplog.records)
            server.start()  # empty: the instances publish their calls again
            await poll(lambda: _is(c.redis.exists(f"{prefix_of(c)}call:{sid_a}", f"{prefix_of(c)}call:{sid_b}"), 2),
                       "both calls republished")
            assert any("Redis reachable again" in r.getMessage() for r in caplog.records)
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{a.base}/calls/{sid_b}/turns", json={"text": "Back again."},
                                     headers=HEADERS) as resp:
                    assert resp.status == 202  # forwarded to b again
                for sid in (sid_a, sid_b):
                    await played(a, sid, 1)
                    async with http.post(f"{a.base}/calls/{sid}/hangup", headers=HEADERS) as resp:
                        assert resp.status == 202
            report_a, report_b = await on_a.report(), await on_b.report()
            for report in (report_a, report_b):
                clean(report)
                assert report["ended_by"] == "rest"
            assert any(t["heard"] == ["Still", "here."] for t in report_a["turns"])
            assert any(t["heard"] == ["Back", "again."] for t in report_b["turns"])
    finally:
        server.stop()


def prefix_of(c: Cluster) -> str:
    return next(iter(c.nodes.values())).svc.settings.cluster.key_prefix


async def test_a_hung_redis_hangs_no_webhook_control_request_or_shutdown(tiny_runtime: Dia2, tmp_path: Path) -> None:
    """Redis stops answering without closing its connections (stopped with SIGSTOP, as a frozen
    host looks): every request that asks it is bounded by the client's socket timeout, falls back
    or says so, and the instance shuts down."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    assert server.proc is not None
    try:
        async with cluster(tiny_runtime, tmp_path, server.url, "h:", {"a": 1}) as c:
            a = c.nodes["a"]
            os.kill(server.proc.pid, signal.SIGSTOP)
            assert "wss://a.bridge.test/twilio/stream/" in await hold_slot(a, "CA" + "a" * 32)  # admitted here alone
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{a.base}/calls/CA{'b' * 32}", headers=HEADERS) as resp:
                    assert resp.status == 503
                async with http.get(f"{a.base}/calls", headers=HEADERS) as resp:
                    assert (await resp.json())["unreachable"] == ["redis"]
            await a.runner.cleanup()  # leaving the cluster is bounded too
    finally:
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
