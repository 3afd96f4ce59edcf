"""The SIP user-agent server, sans I/O: datagrams and decisions in, actions out.

:class:`UserAgentServer` is fed every datagram (:meth:`~UserAgentServer.receive`), the clock
(:meth:`~UserAgentServer.tick` at :meth:`~UserAgentServer.next_deadline`) and the
application's decisions about each offered call (:meth:`~UserAgentServer.ring`,
:meth:`~UserAgentServer.answer`, :meth:`~UserAgentServer.reject`,
:meth:`~UserAgentServer.hang_up`). It returns actions: datagrams to send and call events. It
never touches a socket, so every rule below is tested by feeding it bytes.

Order of checks for a datagram: size and rate per source, then the allow-list (strangers
get nothing back), then parsing, then the transaction layer (repeats answered from there),
then the dialog. A new INVITE then meets digest auth (407), the Require check (420), the
session-timer floor (422) and SDP negotiation (488/400) before the application is asked.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Final

from sipmessage import URI, Address, Via

from .access import AllowList, RateLimiter, Trunk
from .dialog import CallState, SessionTimer, SipCall, address_without_tag
from .digest import DigestAuth
from .message import (
    MAX_MESSAGE_BYTES,
    Request,
    Response,
    SipParseError,
    TransactionKey,
    build_response,
    parse_message,
    transaction_key,
)
from .sdp import CODECS, Answer, SdpError, negotiate, parse_sdp
from .transactions import TIMEOUT, NoAck, Resend, ServerTransaction, TransactionTable

log = logging.getLogger(__name__)

__all__ = [
    "Action",
    "CallConfirmed",
    "CallEnded",
    "CallOffered",
    "DigitReceived",
    "MediaUpdated",
    "Send",
    "UasSettings",
    "UserAgentServer",
]

Addr = tuple[str, int]
ALLOW: Final = "INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, INFO"
SUPPORTED_EXTENSIONS: Final = frozenset({"timer"})
MIN_SE_S: Final = 90  # RFC 4028 floor on Session-Expires


@dataclass(frozen=True)
class UasSettings:
    public_address: str  # the IP in our Contact and SDP (NAT: the public one)
    port: int  # our SIP port
    codecs: tuple[str, ...] = CODECS
    max_message_bytes: int = MAX_MESSAGE_BYTES


# ------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Send:
    data: bytes
    dest: Addr


@dataclass(frozen=True)
class CallOffered:
    """A new call passed every check; answer with ring/answer/reject on ``handle``."""

    handle: str
    call_id: str  # SIP Call-ID
    to_user: str  # the dialled number (Request-URI user part). Caller data.
    from_user: str  # caller data
    source: Addr
    media: Answer
    trunk: str = ""  # the allow-list entry the call came in by


@dataclass(frozen=True)
class CallConfirmed:
    """The ACK of our 200 arrived: the dialog is up."""

    handle: str


@dataclass(frozen=True)
class MediaUpdated:
    """A re-INVITE or UPDATE changed the media (remote address, codec or direction: hold/resume)."""

    handle: str
    media: Answer


@dataclass(frozen=True)
class DigitReceived:
    """A digit sent as SIP INFO (application/dtmf-relay) rather than RTP. Caller data."""

    handle: str
    digit: str


@dataclass(frozen=True)
class CallEnded:
    handle: str
    reason: str  # "hangup: caller", "hangup: cancelled", "hangup: bridge", "error: no ACK", ...


Action = Send | CallOffered | CallConfirmed | MediaUpdated | DigitReceived | CallEnded

_DTMF_INFO_DIGITS: Final = frozenset("0123456789*#ABCD")


@dataclass
class UserAgentServer:
    settings: UasSettings
    allow: AllowList
    limiter: RateLimiter
    digest: DigestAuth | None = None
    transactions: TransactionTable = field(default_factory=TransactionTable)
    calls: dict[str, SipCall] = field(default_factory=dict)  # by handle
    counters: dict[str, int] = field(default_factory=dict)
    _by_dialog: dict[tuple[str, str], str] = field(default_factory=dict)  # (Call-ID, remote tag) -> handle
    _by_invite: dict[int, str] = field(default_factory=dict)  # id(invite tx) -> handle

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    @property
    def contact(self) -> str:
        return f"<sip:{self.settings.public_address}:{self.settings.port};transport=udp>"

    # ------------------------------------------------------------------ input

    def receive(self, data: bytes, source: Addr, now: float) -> list[Action]:
        """One datagram from ``source``."""
        trunk = self.allow.match(source[0])
        if trunk is None:
            self._count("dropped_stranger")
            return []
        if not self.limiter.allow(source[0], now):
            self._count("dropped_rate")
            return []
        try:
            msg = parse_message(data, max_bytes=self.settings.max_message_bytes)
        except SipParseError as exc:
            self._count(f"dropped_{exc.reason}")
            log.debug("dropping a bad SIP datagram: %s", exc)
            return []
        if msg is None:
            return []  # CRLF keep-alive
        if isinstance(msg, Response):
            return self._on_response(msg)
        _mark_received(msg, source)
        tx = self.transactions.match(msg)
        if tx is not None:
            out: list[Action] = [Send(r.data, r.dest) for r in self.transactions.absorb(tx, msg, now)]
            if msg.method == "ACK" and tx.final_code is not None and tx.final_code < 300:
                out += self._on_ack(msg, now)  # RFC 2543 peers: their 2xx ACK shares the INVITE's key
            return out
        if msg.method == "ACK":
            return self._on_ack(msg, now)
        if msg.method == "CANCEL":
            return self._on_cancel(msg, source, now)
        handle = self._dialog_of(msg)
        if msg.to_address.parameters.get("tag") is not None:
            if handle is None:
                return self._reply_once(msg, source, 481, now)
            return self._in_dialog(self.calls[handle], msg, source, now)
        if msg.method == "INVITE":
            return self._on_invite(msg, source, trunk, now)
        if msg.method == "OPTIONS":
            return self._reply_once(msg, source, 200, now, headers={"Allow": ALLOW, "Accept": "application/sdp"})
        if msg.method == "BYE":
            return self._reply_once(msg, source, 481, now)
        return self._reply_once(msg, source, 405, now, headers={"Allow": ALLOW})

    def _dialog_of(self, msg: Request) -> str | None:
        tag = msg.from_address.parameters.get("tag") or ""
        return self._by_dialog.get((msg.call_id, tag))

    def _reply_once(self, req: Request, source: Addr, code: int, now: float, *,
                    headers: dict[str, str] | None = None, to_tag: str | None = None) -> list[Action]:
        tx = self.transactions.create(req, source)
        resp = build_response(req, code, to_tag=to_tag or secrets.token_hex(8), headers=headers)
        sent = self.transactions.respond(tx, resp, now)
        return [Send(sent.data, sent.dest)]

    # ------------------------------------------------------------------ new calls

    def _on_invite(self, req: Request, source: Addr, trunk: Trunk, now: float) -> list[Action]:
        if self.digest is not None and trunk.digest:
            header = req.headers.get("Proxy-Authorization") or req.headers.get("Authorization")
            result = self.digest.check(header, "INVITE", now)
            if not result.ok:
                self._count(f"auth_{result.reason}")
                challenge = self.digest.challenge(now, stale=result.reason == "stale")
                return self._reply_once(req, source, 407, now, headers={"Proxy-Authenticate": challenge})
        unsupported = [opt for opt in req.require if opt not in SUPPORTED_EXTENSIONS]
        if unsupported:
            return self._reply_once(req, source, 420, now, headers={"Unsupported": ", ".join(unsupported)})
        session_s = _session_expires(req)
        if session_s is not None and session_s < MIN_SE_S:
            return self._reply_once(req, source, 422, now, headers={"Min-SE": str(MIN_SE_S)})
        if not req.body:
            # We only answer offers; an offerless INVITE would need our offer in the 200.
            self._count("rejected_no_offer")
            return self._reply_once(req, source, 488, now, headers={"Warning": '399 callbridge "SDP offer required"'})
        try:
            answer = negotiate(parse_sdp(req.body), self.settings.codecs)
        except SdpError as exc:
            self._count("rejected_sdp")
            return self._reply_once(req, source, exc.status, now,
                                    headers={"Warning": f'399 callbridge "{_quote_safe(str(exc))}"'})
        try:
            contact = req.contact[0].uri if req.contact else req.from_address.uri
            route = tuple(str(a) for a in reversed(req.record_route))
        except ValueError:
            return self._reply_once(req, source, 400, now)
        tx = self.transactions.create(req, source)
        call = SipCall(
            handle=f"sip-{secrets.token_hex(8)}",
            call_id=req.call_id,
            remote_tag=req.from_address.parameters.get("tag") or "",
            local_tag=secrets.token_hex(8),
            invite=tx,
            source=source,
            remote_uri=contact,
            route=route,
            local_uri=address_without_tag(req.headers["To"]),
            remote_uri_header=req.headers["From"],
            remote_cseq=req.cseq.sequence,
            answer=answer,
            from_user=req.from_address.uri.user or "",
            to_user=req.uri.user or req.to_address.uri.user or "",
            local_address=self.settings.public_address,
        )
        if session_s is not None and _supports_timer(req):
            call.timer = SessionTimer(interval_s=session_s, expires_at=0.0)
        self.calls[call.handle] = call
        self._by_dialog[(call.call_id, call.remote_tag)] = call.handle
        self._by_invite[id(tx)] = call.handle
        self._count("calls_offered")
        sent = self.transactions.respond(tx, build_response(req, 100), now)
        return [Send(sent.data, sent.dest), CallOffered(call.handle, call.call_id, call.to_user,
                                                        call.from_user, source, answer, trunk.name)]

    def ring(self, handle: str, now: float) -> list[Action]:
        """Send 180 Ringing (the caller hears ringback until :meth:`answer`)."""
        call = self.calls[handle]
        if call.state is not CallState.OFFERED:
            return []
        call.move(CallState.RINGING)
        sent = self.transactions.respond(call.invite, self._invite_response(call, 180), now)
        return [Send(sent.data, sent.dest)]

    def answer(self, handle: str, rtp_port: int, now: float) -> list[Action]:
        """Send 200 OK with our SDP (RTP at ``rtp_port``); resent until the ACK."""
        call = self.calls[handle]
        if call.state not in (CallState.OFFERED, CallState.RINGING):
            return []
        call.local_port = rtp_port
        call.move(CallState.ANSWERED)
        call.awaiting_ack = call.invite
        sent = self.transactions.respond(call.invite, self._invite_response(call, 200, sdp=True), now)
        if call.timer is not None:
            call.timer.refreshed(now)
        return [Send(sent.data, sent.dest)]

    def reject(self, handle: str, status: int, now: float, reason: str = "") -> list[Action]:
        """Refuse an offered call: 404 unknown number, 486/503 full, 480 not ready."""
        call = self.calls[handle]
        if call.state not in (CallState.OFFERED, CallState.RINGING):
            return []
        headers = {"Retry-After": "30"} if status == 503 else None
        sent = self.transactions.respond(call.invite, self._invite_response(call, status, headers=headers), now)
        self._end(call, reason or f"rejected: {status}", now)
        return [Send(sent.data, sent.dest)]

    def _invite_response(self, call: SipCall, code: int, *, sdp: bool = False,
                         headers: dict[str, str] | None = None) -> Response:
        extra = {"Contact": self.contact, "Allow": ALLOW} if code < 300 else {}
        if code == 200 and call.timer is not None:
            extra["Session-Expires"] = f"{call.timer.interval_s};refresher=uac"
            extra["Require"] = "timer"
        extra.update(headers or {})
        return build_response(call.invite.request, code, to_tag=call.local_tag, headers=extra,
                              body=call.sdp() if sdp else b"")

    # ------------------------------------------------------------------ in dialog

    def _on_ack(self, req: Request, now: float) -> list[Action]:
        handle = self._dialog_of(req)
        if handle is None:
            return []  # an ACK for a call we no longer have: nothing to answer
        call = self.calls[handle]
        pending = call.awaiting_ack
        if pending is None or pending.request.cseq.sequence != req.cseq.sequence:
            return []  # a repeated ACK
        self.transactions.acked(pending, now)
        call.awaiting_ack = None
        out: list[Action] = []
        if req.body:  # the answer to an offer we made in a 200 to an offerless re-INVITE
            try:
                if call.update_answer(negotiate(parse_sdp(req.body), self.settings.codecs)):
                    out.append(MediaUpdated(call.handle, call.answer))
            except SdpError:
                self._count("bad_ack_sdp")
        if call.state is CallState.ANSWERED:
            call.move(CallState.CONFIRMED)
            out.insert(0, CallConfirmed(call.handle))
        return out

    def _in_dialog(self, call: SipCall, req: Request, source: Addr, now: float) -> list[Action]:
        if req.cseq.sequence <= call.remote_cseq:
            return self._reply_once(req, source, 500, now)  # out of order (RFC 3261 §12.2.2)
        call.remote_cseq = req.cseq.sequence
        if req.method == "BYE":
            out = self._reply_once(req, source, 200, now)
            if call.live:
                self._end(call, "hangup: caller", now)
                out.append(CallEnded(call.handle, "hangup: caller"))
            return out
        if not call.live:
            return self._reply_once(req, source, 481, now)
        if req.method in ("INVITE", "UPDATE"):
            return self._renegotiate(call, req, source, now)
        if req.method == "INFO":
            out = self._reply_once(req, source, 200, now)
            digit = _dtmf_relay_digit(req)
            if digit is not None:
                out.append(DigitReceived(call.handle, digit))
            return out
        if req.method == "OPTIONS":
            return self._reply_once(req, source, 200, now, headers={"Allow": ALLOW})
        return self._reply_once(req, source, 405, now, headers={"Allow": ALLOW})

    def _renegotiate(self, call: SipCall, req: Request, source: Addr, now: float) -> list[Action]:
        """re-INVITE or UPDATE: hold/resume, a new media address, a session refresh."""
        if req.method == "INVITE" and call.awaiting_ack is not None:
            return self._reply_once(req, source, 491, now)  # RFC 3261 §14.2: one INVITE at a time
        session_s = _session_expires(req)
        if session_s is not None and session_s < MIN_SE_S:
            return self._reply_once(req, source, 422, now, headers={"Min-SE": str(MIN_SE_S)})
        out: list[Action] = []
        if req.body:
            try:
                answer = negotiate(parse_sdp(req.body), self.settings.codecs)
            except SdpError as exc:
                return self._reply_once(req, source, exc.status, now)  # the old media stays (RFC 3261 §14.2)
            if answer.codec != call.answer.codec or answer.payload_type != call.answer.payload_type:
                # The media path converts one codec per call; a mid-call switch would need a new leg.
                return self._reply_once(req, source, 488, now)
            if call.update_answer(answer):
                out.append(MediaUpdated(call.handle, answer))
        if call.timer is not None:
            call.timer.refreshed(now, session_s)
        headers = {"Contact": self.contact, "Allow": ALLOW}
        if call.timer is not None:
            headers["Session-Expires"] = f"{call.timer.interval_s};refresher=uac"
            headers["Require"] = "timer"
        # An UPDATE without SDP is answered without; an offerless re-INVITE gets our SDP as the offer.
        body = call.sdp() if (req.body or req.method == "INVITE") else b""
        tx = self.transactions.create(req, source)
        sent = self.transactions.respond(tx, build_response(req, 200, headers=headers, body=body), now)
        if req.method == "INVITE":
            call.awaiting_ack = tx
        self._count(f"renegotiated_{req.method.lower()}")
        return [Send(sent.data, sent.dest), *out]

    def _on_cancel(self, req: Request, source: Addr, now: float) -> list[Action]:
        key = transaction_key(req)
        target = self.transactions.server.get(TransactionKey(key.branch, key.sent_by, "INVITE"))
        if target is None:
            return self._reply_once(req, source, 481, now)
        handle = self._by_invite.get(id(target))
        call = self.calls.get(handle) if handle is not None else None
        out = self._reply_once(req, source, 200, now, to_tag=call.local_tag if call else None)
        if call is None or target.final_code is not None:
            return out  # already answered: the CANCEL has no effect (RFC 3261 §9.2)
        sent = self.transactions.respond(target, self._invite_response(call, 487), now)
        out.append(Send(sent.data, sent.dest))
        self._end(call, "hangup: cancelled", now)
        out.append(CallEnded(call.handle, "hangup: cancelled"))
        return out

    def _on_response(self, resp: Response) -> list[Action]:
        ctx = self.transactions.response_for(resp)
        if ctx is None:
            self._count("stray_response")
        return []

    # ------------------------------------------------------------------ ending

    def hang_up(self, handle: str, now: float, reason: str = "hangup: bridge") -> list[Action]:
        """End a call from our side: BYE once confirmed (or answered), 480 before that. Idempotent."""
        call = self.calls.get(handle)
        if call is None or not call.live:
            return []
        if call.state in (CallState.OFFERED, CallState.RINGING):
            return self.reject(handle, 480, now, reason)
        req, branch = call.next_request("BYE", contact=self.contact, via_host=self.settings.public_address,
                                        via_port=self.settings.port)
        dest = _route_dest(call)
        sent = self.transactions.send_request(branch, bytes(req), dest, now)
        self._end(call, reason, now)
        return [Send(sent.data, sent.dest)]

    def _end(self, call: SipCall, reason: str, now: float) -> None:
        call.end_reason = reason
        call.ended_at = now
        call.move(CallState.ENDED)
        call.awaiting_ack = None
        call.timer = None
        self._count("calls_ended")

    def forget(self, handle: str) -> None:
        """Drop an ended call's record (its transactions still absorb late repeats)."""
        call = self.calls.pop(handle, None)
        if call is not None:
            self._by_dialog.pop((call.call_id, call.remote_tag), None)
            self._by_invite.pop(id(call.invite), None)

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> float | None:
        times = [c.timer.expires_at for c in self.calls.values() if c.timer is not None and c.live]
        times += [c.ended_at + TIMEOUT for c in self.calls.values() if c.ended_at is not None]
        tx_time = self.transactions.next_deadline()
        if tx_time is not None:
            times.append(tx_time)
        return min(times) if times else None

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        for item in self.transactions.tick(now):
            if isinstance(item, Resend):
                out.append(Send(item.data, item.dest))
            elif isinstance(item, NoAck):
                out += self._no_ack(item.tx, now)
        for call in list(self.calls.values()):
            if call.ended_at is not None and now >= call.ended_at + TIMEOUT:
                self.forget(call.handle)  # late repeats are past; later requests get 481
                continue
            if call.live and call.timer is not None and now >= call.timer.expires_at:
                out += self.hang_up(call.handle, now, "error: session expired")
                out.append(CallEnded(call.handle, "error: session expired"))
        return out

    def _no_ack(self, tx: ServerTransaction, now: float) -> list[Action]:
        for call in self.calls.values():
            if call.awaiting_ack is tx and call.live:
                call.awaiting_ack = None
                out = self.hang_up(call.handle, now, "error: no ACK")
                return [*out, CallEnded(call.handle, "error: no ACK")]
        return []


def _mark_received(req: Request, source: Addr) -> None:
    """RFC 3581 / RFC 3261 §18.2.1: note on the top Via where the request really came from.

    Our responses go back to that source address and port in any case (symmetric signalling,
    what NATed trunks need); these parameters tell the client so.
    """
    vias = req.via
    top = vias[0]
    params = top.parameters
    if "rport" in params:
        params = params.replace(rport=str(source[1]), received=source[0])
    elif top.host != source[0]:
        params = params.replace(received=source[0])
    else:
        return
    vias[0] = Via(top.transport, top.host, top.port, params)
    req.headers.setlist("Via", [str(v) for v in vias])


def _route_dest(call: SipCall) -> Addr:
    """Where our in-dialog requests go: the first Route if any, else back to the signalling source.

    The source, not the Contact: behind NAT the Contact names a private address, while the
    trunk's packets arrive from its public one (what ``rport``/symmetric signalling relies on).
    """
    if call.route:
        try:
            uri: URI = Address.parse(call.route[0]).uri
            return (uri.host, uri.port or 5060)
        except ValueError:
            pass
    return call.source


def _session_expires(req: Request) -> int | None:
    value = req.headers.get("Session-Expires")
    if value is None:
        return None
    try:
        return int(value.split(";")[0].strip())
    except ValueError:
        return None


def _supports_timer(req: Request) -> bool:
    return "timer" in req.supported or "timer" in req.require


def _dtmf_relay_digit(req: Request) -> str | None:
    ctype = req.headers.get("Content-Type") or ""
    if "dtmf-relay" not in ctype.lower():
        return None
    for line in req.body.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip().lower() == "signal":
            digit = value.strip().upper()
            if digit in _DTMF_INFO_DIGITS:
                return digit
    return None


def _quote_safe(text: str) -> str:
    return text.replace('"', "'").replace("\\", "/")[:100]
