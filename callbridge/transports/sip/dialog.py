"""One SIP call as a dialog (RFC 3261 §12), sans I/O: its state, its identifiers, our SDP.

The state is an enum with checked transitions; :class:`SipCall` holds what the dialog needs
to answer in-dialog requests and to build its own (BYE): tags, the remote target and route
set, CSeq numbers, the agreed media, our SDP origin version and the session timer.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from typing import Final

from sipmessage import URI, Address, CSeq, Parameters, Request, Via

from .message import SERVER_NAME, new_branch
from .sdp import Answer, build_sdp
from .transactions import ServerTransaction

__all__ = ["CallState", "SessionTimer", "SipCall", "address_without_tag"]

Addr = tuple[str, int]


class CallState(enum.Enum):
    OFFERED = "offered"  # INVITE in, 100 sent; the application decides
    RINGING = "ringing"  # 180 sent
    ANSWERED = "answered"  # 200 sent; waiting for the ACK
    CONFIRMED = "confirmed"  # ACK in; media flows
    ENDED = "ended"  # BYE either way, CANCEL, rejection, or a timer


_TRANSITIONS: Final[dict[CallState, frozenset[CallState]]] = {
    CallState.OFFERED: frozenset({CallState.RINGING, CallState.ANSWERED, CallState.ENDED}),
    CallState.RINGING: frozenset({CallState.ANSWERED, CallState.ENDED}),
    CallState.ANSWERED: frozenset({CallState.CONFIRMED, CallState.ENDED}),
    CallState.CONFIRMED: frozenset({CallState.ENDED}),
    CallState.ENDED: frozenset(),
}


@dataclass
class SessionTimer:
    """RFC 4028 with the carrier as refresher: we only watch that refreshes keep coming."""

    interval_s: int
    expires_at: float  # when we give up and send BYE unless a refresh arrives first

    def refreshed(self, now: float, interval_s: int | None = None) -> None:
        if interval_s is not None:
            self.interval_s = interval_s
        # RFC 4028 §10: the non-refresher sends BYE at expiry minus min(32 s, interval/3).
        self.expires_at = now + self.interval_s - min(32.0, self.interval_s / 3)


@dataclass
class SipCall:
    """One inbound call. ``handle`` is our id for it; ``call_id`` is the carrier's SIP Call-ID."""

    handle: str
    call_id: str
    remote_tag: str
    local_tag: str
    invite: ServerTransaction  # the initial INVITE's transaction
    source: Addr  # where its signalling comes from
    remote_uri: URI  # Contact: Request-URI of our in-dialog requests
    route: tuple[str, ...]  # Record-Route, reversed for our requests (RFC 3261 §12.1.1)
    local_uri: str  # the To of the INVITE, as we are named in the dialog
    remote_uri_header: str  # the From of the INVITE
    remote_cseq: int
    answer: Answer
    from_user: str = ""
    to_user: str = ""
    state: CallState = CallState.OFFERED
    local_cseq: int = field(default_factory=lambda: secrets.randbelow(2**16) + 1)
    sdp_session_id: str = field(default_factory=lambda: str(secrets.randbelow(2**31) + 1))
    sdp_version: int = 1
    local_address: str = ""  # public IP in our SDP and Contact
    local_port: int = 0  # our RTP port
    awaiting_ack: ServerTransaction | None = None  # the INVITE whose 2xx has not been ACKed
    timer: SessionTimer | None = None
    end_reason: str = ""
    ended_at: float | None = None

    def move(self, new: CallState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"illegal call transition {self.state.value} -> {new.value}")
        self.state = new

    @property
    def live(self) -> bool:
        return self.state is not CallState.ENDED

    def sdp(self) -> bytes:
        return build_sdp(self.answer, address=self.local_address, port=self.local_port,
                         session_id=self.sdp_session_id, version=self.sdp_version)

    def update_answer(self, answer: Answer) -> bool:
        """Adopt a renegotiated answer; bump ``o=`` version when our SDP changes (RFC 3264 §8).

        Returns whether the media the leg uses (address, codec, direction) changed.
        """
        before = self.sdp()
        changed = answer != self.answer
        self.answer = answer
        if self.sdp() != before:
            self.sdp_version += 1
        return changed

    def next_request(self, method: str, *, contact: str, via_host: str, via_port: int) -> tuple[Request, str]:
        """An in-dialog request of ours (BYE) and its branch (RFC 3261 §12.2.1.1)."""
        self.local_cseq += 1
        branch = new_branch()
        req = Request(method, self.remote_uri)
        req.headers.set("Via", str(Via("UDP", via_host, via_port, Parameters(branch=branch, rport=None))))
        req.headers.set("Max-Forwards", "70")
        if self.route:
            req.headers.setlist("Route", list(self.route))
        req.headers.set("From", f"{self.local_uri};tag={self.local_tag}")
        req.headers.set("To", self.remote_uri_header)
        req.headers.set("Call-ID", self.call_id)
        req.headers.set("CSeq", str(CSeq(self.local_cseq, method)))
        req.headers.set("Contact", contact)
        req.headers.set("User-Agent", SERVER_NAME)
        req.headers.set("Content-Length", "0")
        return req, branch


def address_without_tag(header: str) -> str:
    """A From/To header value with its ``tag`` parameter removed (for our own From)."""
    addr = Address.parse(header)
    params = {k: v for k, v in addr.parameters.items() if k != "tag"}
    return str(Address(uri=addr.uri, name=addr.name, parameters=Parameters(**params)))
