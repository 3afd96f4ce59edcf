"""The one admission and call-directory interface, and its embedded (in-memory) implementation.

Every carrier admits through :class:`Admission`: the Twilio webhook with :meth:`Admission.place`
(which may hand the call to another instance), SIP with :meth:`Admission.admit_local` (a SIP
dialog cannot move: a trunk spreads calls itself, see README). The embedded implementation is
today's rule, one instance with everything in memory: at most ``calls.max_calls`` held TTS
reservations, each taken from the local worker. :class:`~.redis_admission.RedisAdmission` adds
the shared state of several instances (capacity with heartbeats, atomic reservations, the call
directory) behind the same methods.

A call counts from admission until its TTS reservation is released (its stream token expired
unused, or the call ended): the reservation is the one record of a live call here, so no
other registry can drift from it.
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Settings
from ..tts import Reservation, TtsWorker


class ClusterUnavailable(Exception):
    """The shared state (Redis) cannot be reached; the message says what was asked."""


@dataclass(frozen=True)
class Instance:
    """One callbridge process as the others see it."""

    id: str
    internal_url: str = ""  # where other instances forward control requests ("" when embedded)
    public_url: str = ""  # the base of the stream URL Twilio is sent to ("" = this request's own)
    capacity: int = 0
    used: int = 0
    ready: bool = False

    @property
    def room(self) -> int:
        return max(0, self.capacity - self.used) if self.ready else 0


@dataclass(frozen=True)
class Ticket:
    """What the instance that answers a webhook tells the one that will hold the call."""

    call_sid: str
    voice: str
    greeting: str
    from_number: str = ""  # the webhook's From and To, for the app's call_started: caller data, never logged
    to_number: str = ""


class Refused(enum.Enum):
    FULL = "full"  # no instance has room (answer <Reject reason="busy">)
    REPLAYED = "replayed"  # this CallSid was already answered, here or on another instance


@dataclass(frozen=True)
class Placement:
    """Where an admitted call goes. ``reservation`` is set when it stays here (the local TTS
    slot it holds); a call placed elsewhere holds a slot there, reserved in the shared state."""

    instance: Instance
    reservation: Reservation | None

    @property
    def local(self) -> bool:
        return self.reservation is not None


def default_instance_id(port: int) -> str:
    return f"{socket.gethostname()}-{port}"


class Admission:
    """Embedded admission: one instance, everything in memory (no Redis configured).

    ``worker`` gives the TTS worker once it exists; ``ready`` says whether calls are admitted
    now (the service's readiness rule); ``expire`` releases the reservations of admitted calls
    whose stream never came (the stream tokens' expiry), run before each count."""

    clustered = False

    def __init__(self, settings: Settings, worker: Callable[[], TtsWorker | None], ready: Callable[[], bool],
                 expire: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self._worker = worker
        self._ready = ready
        self._expire = expire
        c = settings.cluster
        self.me = Instance(id=c.instance_id or default_instance_id(settings.server.port),
                           internal_url=c.internal_url.rstrip("/"), public_url=c.public_url.rstrip("/"))
        self._held: dict[str, Reservation] = {}  # CallSid -> its TTS reservation, until released
        self._gone: list[str] = []  # released since the shared state last heard of it

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Nothing to start when embedded."""

    async def stop(self) -> None:
        """Nothing to stop when embedded."""

    @property
    def redis_reachable(self) -> bool:
        """Whether the shared state answered last time (always, when embedded)."""
        return True

    # ------------------------------------------------------------------ local slots

    @property
    def live(self) -> int:
        """Calls admitted here whose reservation is still held (stream pending, connecting, live)."""
        self._prune()
        return len(self._held)

    @property
    def capacity(self) -> int:
        worker = self._worker()
        return min(self.settings.calls.max_calls, worker.capacity) if worker is not None else 0

    def _prune(self) -> None:
        self._expire()
        for sid in [s for s, r in self._held.items() if r.released]:
            del self._held[sid]
            self._gone.append(sid)

    def _take_local(self, call_sid: str, others: int = 0) -> Reservation | None:
        """A TTS slot here for ``call_sid``, within ``calls.max_calls`` (``others``: slots
        promised here that this process does not hold yet), or None."""
        worker = self._worker()
        if worker is None or self.live + others >= self.settings.calls.max_calls:
            return None
        reservation = worker.reserve()  # None when the worker is full or not READY
        if reservation is not None:
            self._held[call_sid] = reservation
            self._changed()
        return reservation

    def _changed(self) -> None:
        """The set of held calls changed (the Redis implementation publishes it)."""

    def ended(self, call_sid: str) -> None:
        """A call left this instance (its reservation is released by the call itself)."""
        self._prune()
        self._changed()

    # ------------------------------------------------------------------ what carriers call

    def admit_local(self, call_sid: str) -> Reservation | None:
        """Admit a call that must stay here (SIP): a TTS slot, or None when this instance is full
        or not ready."""
        if not self._ready():
            return None
        return self._take_local(call_sid)

    async def place(self, call_sid: str, token: str, ticket: Ticket) -> Placement | Refused:
        """Admit a Twilio call: here when this instance has room, else (clustered) on the
        instance with the most room, reserved there atomically together with ``token``, which
        that instance's stream URL will carry. Embedded: here or :attr:`Refused.FULL`."""
        reservation = self.admit_local(call_sid)
        return Placement(self.me, reservation) if reservation is not None else Refused.FULL

    async def claim(self, token: str) -> tuple[Ticket, Reservation] | None:
        """The ticket another instance placed here under ``token`` (taken once) with the TTS slot
        it was promised, or None for a token this instance does not know. Embedded: always None."""
        return None

    async def owner_of(self, call_sid: str) -> Instance | None:
        """The live instance holding ``call_sid``, if it is another one. Embedded: None."""
        return None

    async def peers(self) -> list[Instance]:
        """The other live instances. Embedded: none."""
        return []
