"""SIP transactions over UDP (RFC 3261 §17, with RFC 6026's Accepted state), sans I/O.

UDP loses and repeats datagrams, so a SIP peer repeats each request until it hears an answer.
A *server transaction* remembers the last response it sent for one request; a repeat of that
request is answered again from here and never reaches the dialog layer. That is what keeps a
retransmitted INVITE from opening a second call and a repeated BYE from getting a 481.

Timers are absolute clock values driven by the caller (:meth:`TransactionTable.tick` with
``now``): nothing here sleeps, so tests step time by hand.

- INVITE, non-2xx final: resent on Timer G (T1, doubling to T2) until the ACK, for Timer H.
- INVITE, 2xx: resent on the same schedule until the dialog reports the ACK
  (:meth:`TransactionTable.acked`), for 64×T1; then ``no_ack`` and the dialog sends BYE.
- non-INVITE: the final response is kept for Timer J (64×T1) to answer repeats.
- our own requests (BYE): resent on Timer E until a final response, for Timer F.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from .message import Request, Response, TransactionKey, transaction_key

__all__ = [
    "T1",
    "T2",
    "ClientTransaction",
    "ServerTransaction",
    "TransactionTable",
    "TxState",
]

Addr = tuple[str, int]

T1: Final = 0.5  # s, RTT estimate
T2: Final = 4.0  # s, longest retransmit interval
T4: Final = 5.0  # s, how long a datagram may live in the network
TIMEOUT: Final = 64 * T1  # Timers B, F, H, J, L


class TxState(enum.Enum):
    PROCEEDING = "proceeding"  # request in; nothing final sent yet
    COMPLETED = "completed"  # final response sent (non-2xx for INVITE); answering repeats
    ACCEPTED = "accepted"  # INVITE answered 2xx; resending it until the dialog sees the ACK
    CONFIRMED = "confirmed"  # ACK in (INVITE); absorbing late repeats
    TERMINATED = "terminated"


_ALLOWED: Final[dict[TxState, frozenset[TxState]]] = {
    TxState.PROCEEDING: frozenset({TxState.PROCEEDING, TxState.COMPLETED, TxState.ACCEPTED, TxState.TERMINATED}),
    TxState.COMPLETED: frozenset({TxState.CONFIRMED, TxState.TERMINATED}),
    TxState.ACCEPTED: frozenset({TxState.CONFIRMED, TxState.TERMINATED}),
    TxState.CONFIRMED: frozenset({TxState.TERMINATED}),
    TxState.TERMINATED: frozenset(),
}


@dataclass
class ServerTransaction:
    key: TransactionKey
    request: Request
    source: Addr  # where the request came from; responses go back there (symmetric, RFC 3581)
    state: TxState = TxState.PROCEEDING
    last_response: bytes | None = None
    final_code: int | None = None
    resend_at: float | None = None  # Timer G (or 2xx resend)
    resend_every: float = T1
    expire_at: float | None = None  # Timer H / J / I / L

    def move(self, new: TxState) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(f"illegal transaction transition {self.state.value} -> {new.value}")
        self.state = new

    @property
    def is_invite(self) -> bool:
        return self.key.method == "INVITE"


@dataclass
class ClientTransaction:
    """A request we sent (BYE): resent on Timer E until a final response or Timer F."""

    branch: str
    data: bytes
    dest: Addr
    resend_at: float
    expire_at: float
    resend_every: float = T1
    final_code: int | None = None


@dataclass(frozen=True)
class Resend:
    data: bytes
    dest: Addr


@dataclass(frozen=True)
class NoAck:
    """A 2xx to an INVITE was resent for 64×T1 with no ACK: the dialog should end with BYE."""

    tx: ServerTransaction


@dataclass
class TransactionTable:
    server: dict[TransactionKey, ServerTransaction] = field(default_factory=dict)
    client: dict[str, ClientTransaction] = field(default_factory=dict)
    retransmissions_absorbed: int = 0

    # ------------------------------------------------------------------ server side

    def match(self, req: Request) -> ServerTransaction | None:
        return self.server.get(transaction_key(req))

    def create(self, req: Request, source: Addr) -> ServerTransaction:
        tx = ServerTransaction(key=transaction_key(req), request=req, source=source)
        self.server[tx.key] = tx
        return tx

    def absorb(self, tx: ServerTransaction, req: Request, now: float) -> list[Resend]:
        """A request that matched ``tx``: a repeat (answered again) or the ACK of a non-2xx final."""
        if req.method == "ACK":
            if tx.state is TxState.COMPLETED:
                tx.move(TxState.CONFIRMED)
                tx.resend_at = None
                tx.expire_at = now + T4  # Timer I
            return []
        self.retransmissions_absorbed += 1
        if tx.last_response is None:
            return []
        return [Resend(tx.last_response, tx.source)]

    def respond(self, tx: ServerTransaction, resp: Response, now: float) -> Resend:
        """Send ``resp`` on ``tx`` and set the timers its state calls for."""
        data = bytes(resp)
        tx.last_response = data
        if resp.code < 200:
            tx.move(TxState.PROCEEDING)
            return Resend(data, tx.source)
        tx.final_code = resp.code
        if not tx.is_invite:
            tx.move(TxState.COMPLETED)
            tx.expire_at = now + TIMEOUT  # Timer J
        else:
            tx.move(TxState.ACCEPTED if resp.code < 300 else TxState.COMPLETED)
            tx.resend_every = T1
            tx.resend_at = now + T1  # Timer G, or the 2xx resend of RFC 3261 §13.3.1.4
            tx.expire_at = now + TIMEOUT  # Timer H, or Timer L
        return Resend(data, tx.source)

    def acked(self, tx: ServerTransaction, now: float) -> None:
        """The dialog saw the ACK of a 2xx (a new transaction of its own): stop resending."""
        if tx.state is TxState.ACCEPTED:
            tx.move(TxState.CONFIRMED)
            tx.resend_at = None  # stay until Timer L to absorb late INVITE repeats

    # ------------------------------------------------------------------ client side

    def send_request(self, branch: str, data: bytes, dest: Addr, now: float) -> Resend:
        self.client[branch] = ClientTransaction(branch, data, dest, resend_at=now + T1, expire_at=now + TIMEOUT)
        return Resend(data, dest)

    def response_for(self, resp: Response) -> ClientTransaction | None:
        """The request of ours that ``resp`` answers (by the top Via branch), if any."""
        branch = resp.via[0].parameters.get("branch") or ""
        ctx = self.client.get(branch)
        if ctx is not None and resp.code >= 200:
            ctx.final_code = resp.code
            del self.client[branch]
        elif ctx is not None:
            ctx.resend_every = T2  # Timer E after a provisional: every T2
        return ctx

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> float | None:
        times = [t for tx in self.server.values() for t in (tx.resend_at, tx.expire_at) if t is not None]
        times += [t for c in self.client.values() for t in (c.resend_at, c.expire_at)]
        return min(times) if times else None

    def tick(self, now: float) -> list[Resend | NoAck]:
        out: list[Resend | NoAck] = []
        for key, tx in list(self.server.items()):
            if tx.expire_at is not None and now >= tx.expire_at:
                if tx.state is TxState.ACCEPTED:
                    out.append(NoAck(tx))
                tx.move(TxState.TERMINATED)
                del self.server[key]
                continue
            if tx.resend_at is not None and now >= tx.resend_at and tx.last_response is not None:
                out.append(Resend(tx.last_response, tx.source))
                tx.resend_every = min(tx.resend_every * 2, T2)
                tx.resend_at = now + tx.resend_every
        for branch, ctx in list(self.client.items()):
            if now >= ctx.expire_at:
                del self.client[branch]  # Timer F: the peer is gone; the call already ended here
                continue
            if now >= ctx.resend_at:
                out.append(Resend(ctx.data, ctx.dest))
                ctx.resend_every = min(ctx.resend_every * 2, T2)
                ctx.resend_at = now + ctx.resend_every
        return out
