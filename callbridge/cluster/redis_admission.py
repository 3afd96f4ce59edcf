"""Admission and the call directory shared by several instances through Redis.

Keys (all under ``cluster.key_prefix``):

- ``inst:{id}`` hash (internal_url, public_url, capacity, ready) with a TTL of ``ttl_s``, and
  ``instances``, the set of ids: the owner's heartbeat rewrites both every ``heartbeat_s``, so a
  dead instance stops counting within ``ttl_s``;
- ``slots:{id}`` sorted set: one member per slot promised on that instance (its CallSid), scored
  by expiry (ms, Redis's clock); the owner refreshes its live calls' scores at each heartbeat and
  removes ended ones; a slot promised to a stream that never comes expires on its own;
- ``call:{sid}`` → owning instance id (the directory), TTL refreshed by the owner;
- ``ticket:{token}`` → the instance and the call a webhook on another instance placed there,
  consumed once by that instance's stream upgrade (read and deleted in one script, and only by
  the instance it names: a stream sent to the wrong one leaves it for the right one), expiring
  with the stream token;
- ``seen:{sid}`` for an hour: a replayed webhook is refused on every instance.

Every decision that counts slots runs inside one Lua script (Redis runs scripts one at a time),
so a slot is never promised twice. Redis unreachable: admission falls back to this instance
alone (a rate-limited WARNING says so) and the heartbeat republishes everything held here once
Redis answers again (a restarted Redis starts empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..config import Settings
from ..tts import Reservation, TtsWorker
from .admission import Admission, ClusterUnavailable, Instance, Placement, Refused, Ticket

log = logging.getLogger(__name__)

SEEN_TTL_S = 3600  # a CallSid answered once is refused for this long (as the embedded replay check)
WARN_EVERY_S = 10.0  # at most one "Redis unreachable" WARNING per this many seconds

# Milliseconds of Redis's own clock: every expiry is on it, so instances' clocks never matter.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# ARGV: prefix, me, avoid_me (0/1), call_sid, token, ticket, hold_ms, ticket_ms, seen_s, check_seen (0/1)
# -> {'seen'} | {'full'} | {'ok', id, public_url}
RESERVE = _NOW + """
local p, me, avoid_me, sid = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
if ARGV[10] == '1' and not redis.call('SET', p .. 'seen:' .. sid, me, 'NX', 'EX', ARGV[9]) then
  return {'seen'}
end
local best, best_room, best_url = nil, 0, nil
local ids = redis.call('SMEMBERS', p .. 'instances')
table.sort(ids)
for _, id in ipairs(ids) do
  local h = redis.call('HMGET', p .. 'inst:' .. id, 'capacity', 'ready', 'public_url')
  if not h[1] then  -- its heartbeat stopped: it counts no more
    redis.call('SREM', p .. 'instances', id)
    redis.call('DEL', p .. 'slots:' .. id)
  elseif h[2] == '1' and not (avoid_me and id == me) then
    local slots = p .. 'slots:' .. id
    redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
    local room = tonumber(h[1]) - redis.call('ZCARD', slots)
    if room > 0 and id == me then  -- the webhook landed here and here has room: stay
      best, best_room, best_url = id, room, h[3]
      break
    end
    if room > best_room then best, best_room, best_url = id, room, h[3] end
  end
end
if not best then return {'full'} end
redis.call('ZADD', p .. 'slots:' .. best, now + tonumber(ARGV[7]), sid)
redis.call('SET', p .. 'call:' .. sid, best, 'PX', ARGV[7])
if best ~= me then
  redis.call('SET', p .. 'ticket:' .. ARGV[5], best .. '\\n' .. ARGV[6], 'PX', ARGV[8])
end
return {'ok', best, best_url}
"""

# ARGV: prefix, me, token -> the ticket's payload when it names this instance (then deleted), else nil
CLAIM = """
local key = ARGV[1] .. 'ticket:' .. ARGV[3]
local raw = redis.call('GET', key)
if not raw then return false end
local nl = string.find(raw, '\\n', 1, true)
if not nl or string.sub(raw, 1, nl - 1) ~= ARGV[2] then return false end
redis.call('DEL', key)
return string.sub(raw, nl + 1)
"""

# ARGV: prefix, me, ttl_ms, internal_url, public_url, capacity, ready, n_live, live sids..., gone sids...
# -> the CallSids of slots promised here that the caller did not list (placed here by others and
#    their stream not come yet, or placed by this instance a moment ago: the caller tells them apart)
REFRESH = _NOW + """
local p, me, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local inst, slots = p .. 'inst:' .. me, p .. 'slots:' .. me
redis.call('HSET', inst, 'internal_url', ARGV[4], 'public_url', ARGV[5], 'capacity', ARGV[6], 'ready', ARGV[7])
redis.call('PEXPIRE', inst, ttl)
redis.call('SADD', p .. 'instances', me)
local n = tonumber(ARGV[8])
for i = 9, 8 + n do
  redis.call('ZADD', slots, now + ttl, ARGV[i])
  redis.call('SET', p .. 'call:' .. ARGV[i], me, 'PX', ttl)
end
for i = 9 + n, #ARGV do
  redis.call('ZREM', slots, ARGV[i])
  if redis.call('GET', p .. 'call:' .. ARGV[i]) == me then redis.call('DEL', p .. 'call:' .. ARGV[i]) end
end
redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
local live = {}
for i = 9, 8 + n do live[ARGV[i]] = true end
local out = {}
for _, sid in ipairs(redis.call('ZRANGE', slots, 0, -1)) do
  if not live[sid] then table.insert(out, sid) end
end
return out
"""

# ARGV: prefix, call_sid -> {} | {id, internal_url, public_url}
OWNER = """
local p = ARGV[1]
local id = redis.call('GET', p .. 'call:' .. ARGV[2])
if not id then return {} end
local h = redis.call('HMGET', p .. 'inst:' .. id, 'internal_url', 'public_url')
if not h[1] then return {} end  -- its owner is dead: so is the call
return {id, h[1], h[2]}
"""

# ARGV: prefix -> {id, internal_url, public_url, capacity, ready, used, ...} of live instances
INSTANCES = _NOW + """
local p, out = ARGV[1], {}
for _, id in ipairs(redis.call('SMEMBERS', p .. 'instances')) do
  local h = redis.call('HMGET', p .. 'inst:' .. id, 'internal_url', 'public_url', 'capacity', 'ready')
  if h[1] then
    local used = redis.call('ZCOUNT', p .. 'slots:' .. id, now, '+inf')
    for _, v in ipairs({id, h[1], h[2], h[3], h[4], tostring(used)}) do table.insert(out, v) end
  end
end
return out
"""

# ARGV: prefix, me, call_sid: give back a slot promised here that will not be used.
UNRESERVE = """
local p, me, sid = ARGV[1], ARGV[2], ARGV[3]
redis.call('ZREM', p .. 'slots:' .. me, sid)
if redis.call('GET', p .. 'call:' .. sid) == me then redis.call('DEL', p .. 'call:' .. sid) end
return 1
"""

# ARGV: prefix, me: this instance leaves (shutdown); its calls' entries expire with their TTL.
LEAVE = """
redis.call('DEL', ARGV[1] .. 'inst:' .. ARGV[2])
redis.call('SREM', ARGV[1] .. 'instances', ARGV[2])
return 1
"""


class RedisAdmission(Admission):
    """Admission across instances through Redis (``cluster.redis_url`` set)."""

    clustered = True

    def __init__(self, settings: Settings, worker: Callable[[], TtsWorker | None], ready: Callable[[], bool],
                 expire: Callable[[], None] = lambda: None) -> None:
        super().__init__(settings, worker, ready, expire)
        c = settings.cluster
        self.prefix = c.key_prefix
        self.ttl_ms = int(c.ttl_s * 1000)
        self.heartbeat_s = c.heartbeat_s
        self.public_url = (c.public_url or settings.server.public_base_url).rstrip("/")
        self.me = Instance(id=self.me.id, internal_url=self.me.internal_url, public_url=self.public_url)
        # No retries and short timeouts: while Redis is away, admission falls back at once.
        self.redis = Redis.from_url(c.redis_url, decode_responses=True, socket_connect_timeout=0.5,
                                    socket_timeout=max(0.5, min(2.0, c.heartbeat_s)),
                                    retry=Retry(NoBackoff(), 0))
        self._reserve = self.redis.register_script(RESERVE)
        self._refresh = self.redis.register_script(REFRESH)
        self._owner = self.redis.register_script(OWNER)
        self._instances = self.redis.register_script(INSTANCES)
        self._unreserve = self.redis.register_script(UNRESERVE)
        self._claim = self.redis.register_script(CLAIM)
        self._leave = self.redis.register_script(LEAVE)
        self._promised: set[str] = set()  # slots here this process did not hold (last heartbeat)
        self._placing: set[str] = set()  # CallSids this process is placing now (reserved, not yet taken)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._down_since: float | None = None
        self._last_warning = -WARN_EVERY_S
        self._quiet_failures = 0
        self.heartbeats = 0  # successful refreshes (tests and /healthz read it)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        with contextlib.suppress(RedisError, OSError):  # not there yet: the heartbeat says so and retries
            await self._publish()
        self._task = asyncio.create_task(self._heartbeat(), name="cluster heartbeat")

    async def stop(self) -> None:
        # A flag and a wake-up, not a cancel: a cancel of the heartbeat task was seen swallowed
        # inside redis-py's reads on Python 3.11 (the task's cancelling() count stays raised),
        # and stop() then waited forever. The beat in progress is bounded by the socket timeout.
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=self.heartbeat_s + 5.0)
            if not done:
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1.0)
        with contextlib.suppress(RedisError, OSError):
            await self._leave(args=[self.prefix, self.me.id])
        await self.redis.aclose()

    @property
    def redis_reachable(self) -> bool:
        return self._down_since is None

    async def _heartbeat(self) -> None:
        while not self._stopping:
            try:
                await self._publish()
            except (RedisError, OSError) as exc:
                self._unreachable("heartbeat", exc)
            except Exception:  # the top of a task: log it and keep beating
                log.exception("cluster heartbeat failed")
            # asyncio.wait, not asyncio.timeout: on Python 3.11 a cancel that lands while the
            # timeout is expiring is taken for the timeout and the loop went on (stop() hung).
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=self.heartbeat_s)
            finally:
                waiter.cancel()
            self._wake.clear()

    async def _publish(self) -> None:
        """One heartbeat: this instance's capacity and readiness, its live calls refreshed in the
        directory and in its slots, ended ones removed."""
        self._prune()
        live, gone = list(self._held), list(self._gone)
        ready = "1" if self._ready() else "0"
        self._promised = set(await self._refresh(args=[
            self.prefix, self.me.id, self.ttl_ms, self.me.internal_url, self.public_url, self.capacity, ready,
            len(live), *live, *gone]))
        del self._gone[:len(gone)]
        self.heartbeats += 1
        self._reachable()

    @property
    def _foreign(self) -> int:
        """Slots other instances promised here whose stream has not come (as of the last
        heartbeat), less those this process holds or is placing since: a slot is counted once."""
        return len(self._promised - self._held.keys() - self._placing)

    def _changed(self) -> None:
        self._wake.set()  # publish now, not at the next beat

    # ------------------------------------------------------------------ Redis away and back

    def _unreachable(self, doing: str, exc: BaseException) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        if now - self._last_warning >= WARN_EVERY_S:
            log.warning("Redis unreachable (%s: %s: %s): admitting calls on this instance alone, calls held "
                        "elsewhere cannot be reached from here; %d more failures since the last warning",
                        doing, type(exc).__name__, exc, self._quiet_failures)
            self._last_warning, self._quiet_failures = now, 0
        else:
            self._quiet_failures += 1

    def _reachable(self) -> None:
        if self._down_since is not None:
            log.warning("Redis reachable again after %.1f s: shared admission resumed, this instance's %d "
                        "calls republished", time.monotonic() - self._down_since, len(self._held))
            self._down_since, self._last_warning, self._quiet_failures = None, -WARN_EVERY_S, 0

    # ------------------------------------------------------------------ what carriers call

    def admit_local(self, call_sid: str) -> Reservation | None:
        # Slots other instances promised here count too (as of the last heartbeat).
        if not self._ready():
            return None
        return self._take_local(call_sid, others=self._foreign)

    async def place(self, call_sid: str, token: str, ticket: Ticket) -> Placement | Refused:
        self._placing.add(call_sid)
        try:
            return await self._place(call_sid, token, ticket)
        finally:
            self._placing.discard(call_sid)

    async def _place(self, call_sid: str, token: str, ticket: Ticket) -> Placement | Refused:
        if not self._ready():  # not ready here: others may be (a refused slot here means nothing)
            return await self._place_elsewhere(call_sid, token, ticket, check_seen=True)
        try:
            answer = await self._run_reserve(call_sid, token, ticket, avoid_me=False, check_seen=True)
        except (RedisError, OSError) as exc:
            self._unreachable("admission", exc)
            return self._fallback(call_sid)
        if not isinstance(answer, Instance):
            return answer
        if answer.id != self.me.id:
            return Placement(answer, None)
        # The same local rule as admit_local: slots others promised here count (Redis's view of
        # this instance may lack a SIP call admitted since the last heartbeat; taking the slot
        # anyway would leave a call placed here by another instance without one).
        reservation = self._take_local(call_sid, others=self._foreign)
        if reservation is not None:
            return Placement(self.me, reservation)
        # Redis counted a slot here that this instance cannot give (a SIP call admitted since the
        # last heartbeat, /ws/stream_tts turns): give it back and look elsewhere.
        with contextlib.suppress(RedisError, OSError):
            await self._unreserve(args=[self.prefix, self.me.id, call_sid])
        return await self._place_elsewhere(call_sid, token, ticket, check_seen=False)

    async def _place_elsewhere(self, call_sid: str, token: str, ticket: Ticket, *, check_seen: bool) -> Placement | Refused:
        try:
            answer = await self._run_reserve(call_sid, token, ticket, avoid_me=True, check_seen=check_seen)
        except (RedisError, OSError) as exc:
            self._unreachable("admission", exc)
            return self._fallback(call_sid)
        return Placement(answer, None) if isinstance(answer, Instance) else answer

    def _fallback(self, call_sid: str) -> Placement | Refused:
        reservation = self.admit_local(call_sid)
        return Placement(self.me, reservation) if reservation is not None else Refused.FULL

    async def _run_reserve(self, call_sid: str, token: str, ticket: Ticket, *, avoid_me: bool,
                           check_seen: bool) -> Instance | Refused:
        token_ms = int(self.settings.twilio.stream_token_ttl_s * 1000)
        payload = json.dumps(dataclasses.asdict(ticket))
        result = await self._reserve(args=[
            self.prefix, self.me.id, int(avoid_me), call_sid, token, payload, token_ms + self.ttl_ms, token_ms,
            SEEN_TTL_S, int(check_seen)])
        if result[0] == "seen":
            return Refused.REPLAYED
        if result[0] == "full":
            return Refused.FULL
        return Instance(id=result[1], public_url=result[2] or "")

    async def claim(self, token: str) -> tuple[Ticket, Reservation] | None:
        try:
            payload = await self._claim(args=[self.prefix, self.me.id, token])
        except (RedisError, OSError) as exc:
            self._unreachable("stream token look-up", exc)
            return None
        if payload is None:  # unknown, used, expired, or placed on another instance (left for it)
            return None
        data = json.loads(payload)
        ticket = Ticket(call_sid=data["call_sid"], voice=data["voice"], greeting=data["greeting"],
                        from_number=data.get("from_number", ""), to_number=data.get("to_number", ""))
        reservation = self._take_local(ticket.call_sid)
        if reservation is None:  # promised by Redis, but this worker cannot take it now
            with contextlib.suppress(RedisError, OSError):
                await self._unreserve(args=[self.prefix, self.me.id, ticket.call_sid])
            log.warning("call %s: placed here by another instance but no TTS slot is free", ticket.call_sid)
            return None
        return ticket, reservation

    async def owner_of(self, call_sid: str) -> Instance | None:
        try:
            row = await self._owner(args=[self.prefix, call_sid])
        except (RedisError, OSError) as exc:
            self._unreachable("call directory", exc)
            raise ClusterUnavailable("the call directory (Redis) cannot be reached") from exc
        if not row or row[0] == self.me.id:
            return None
        return Instance(id=row[0], internal_url=row[1], public_url=row[2])

    async def instances(self) -> list[Instance]:
        """Every live instance, this one included, with its capacity and slots in use."""
        try:
            flat = await self._instances(args=[self.prefix])
        except (RedisError, OSError) as exc:
            self._unreachable("instance list", exc)
            raise ClusterUnavailable("the instance list (Redis) cannot be reached") from exc
        rows = [flat[i:i + 6] for i in range(0, len(flat), 6)]
        return sorted((Instance(id=r[0], internal_url=r[1], public_url=r[2], capacity=int(r[3]),
                                ready=r[4] == "1", used=int(r[5])) for r in rows), key=lambda i: i.id)

    async def peers(self) -> list[Instance]:
        return [i for i in await self.instances() if i.id != self.me.id]
