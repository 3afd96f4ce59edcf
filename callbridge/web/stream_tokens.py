"""One-time media stream tokens: minted by the webhook, bound to a CallSid and its TTS reservation."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field

from ..tts import Reservation

log = logging.getLogger(__name__)


@dataclass
class StreamBinding:
    call_sid: str
    voice: str
    greeting: str
    expires_at: float
    reservation: Reservation  # the TTS slot held for this call from admission to hang-up
    from_number: str = ""  # the webhook's From and To: caller data, for the app, never logged
    to_number: str = ""


@dataclass
class StreamTokens:
    """One-time tokens minted by the webhook, bound to a CallSid, put in the stream URL path."""

    ttl_s: float
    tokens: dict[str, StreamBinding] = field(default_factory=dict)
    seen_calls: dict[str, float] = field(default_factory=dict)  # CallSid -> first webhook time (replays)

    def mint(self, call_sid: str, voice: str, greeting: str, reservation: Reservation) -> str:
        token = self.new_token()
        self.add(token, call_sid, voice, greeting, reservation)
        return token

    @staticmethod
    def new_token() -> str:
        return secrets.token_urlsafe(24)  # 192 bits

    def add(self, token: str, call_sid: str, voice: str, greeting: str, reservation: Reservation, *,
            from_number: str = "", to_number: str = "") -> None:
        """Bind ``token`` (from :meth:`new_token`) to a call admitted here."""
        self.expire()
        self.tokens[token] = StreamBinding(call_sid, voice, greeting, time.monotonic() + self.ttl_s, reservation,
                                           from_number, to_number)
        self.remember(call_sid)

    def remember(self, call_sid: str) -> None:
        """This CallSid was answered (here or placed elsewhere): a repeat is refused."""
        self.seen_calls[call_sid] = time.monotonic()

    def seen(self, call_sid: str) -> bool:
        self.expire()
        return call_sid in self.seen_calls

    def consume(self, token: str) -> StreamBinding | None:
        """Take the token, once: the one upgrade that does owns its reservation from then on.

        None for an unknown, used or expired token (an expired one's reservation is released).
        """
        binding = self.tokens.pop(token, None)
        if binding is not None and binding.expires_at < time.monotonic():
            binding.reservation.release()
            return None
        return binding

    def discard(self, token: str) -> None:
        binding = self.tokens.pop(token, None)
        if binding is not None:
            binding.reservation.release()

    def expire(self) -> None:
        """Drop expired tokens, giving their TTS slots back, and forget old CallSids. Called by each
        webhook and by the admission whenever it counts calls (clustered: every heartbeat), so a
        stream that never comes frees its slot even when no other webhook arrives."""
        now = time.monotonic()
        for token in [t for t, b in self.tokens.items() if b.expires_at < now]:
            self.discard(token)  # the stream never came: give its TTS slot back
        for sid in [s for s, t in self.seen_calls.items() if now - t > 3600]:
            del self.seen_calls[sid]
