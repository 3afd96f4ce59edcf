"""What to simulate: :class:`SimConfig`, checked when it is built, and the settings error."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from yarl import URL

from .rest import FakeTwilioRest

DEFAULT_ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
DTMF_DIGITS = frozenset("0123456789*#")


class SimulatorError(Exception):
    """A simulator setting is unusable (bad URL, non-loopback host, bad cue)."""


def is_loopback_url(url: str) -> bool:
    """True when the URL's host is localhost, 127.0.0.0/8 or ::1."""
    host = URL(url).host
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SimConfig:
    """What to simulate. Times are seconds from the moment ``start`` is sent.

    ``base_url`` is where the service listens (contacted); ``public_base_url`` is what Twilio
    would have used (only signed over, never contacted). ``expect_greeting`` None means: expect
    one when the webhook query or the stream parameters carry a non-empty ``greeting``.
    """

    base_url: str
    public_base_url: str | None = None
    twilio_auth_token: str = ""
    account_sid: str = DEFAULT_ACCOUNT_SID
    api_token: str = ""
    texts: list[str] = field(default_factory=list)
    stream_text: bool = False
    caller_wav: Path | None = None  # played after the bot's last turn, or at barge_in_at_s over the bot
    barge_in_at_s: float | None = None
    dtmf: list[tuple[float, str]] = field(default_factory=list)
    calls: int = 1
    max_call_s: float = 60.0
    webhook_query: dict[str, str] = field(default_factory=dict)
    drop_network: bool = False
    out_wav: Path | None = None
    report_path: Path | None = None
    allow_remote: bool = False
    hold_s: float = 0.0  # keep the call open this long after its turns (for curl experiments)
    # After the caller's reply (caller_wav): wait for the service's transcript of it and for the
    # answer (a turn the app or agent queues) to play, each within turn_timeout_s.
    await_answer: bool = False
    # Told one line when a held call is live (its CallSid, how to reach it); None = nobody.
    announce: Callable[[str], None] | None = field(default=None, compare=False, repr=False)
    # The REST stand-in the calls register with (same as passing ``rest=`` to run_simulation).
    rest_server: FakeTwilioRest | None = field(default=None, compare=False, repr=False)
    # Public base URL of a service instance -> the loopback base URL contacted for it: where a
    # <Stream url> names another instance (a cluster), as DNS would resolve it for Twilio.
    resolve: dict[str, str] = field(default_factory=dict)
    # Finer knobs, with defaults that suit the real service.
    webhook_path: str = "/twilio/voice"
    from_number: str = "+15005550006"
    to_number: str = "+15005550001"
    caller_name: str | None = None
    expect_greeting: bool | None = None
    word_delay_s: float = 0.05  # between streamed words, about an LLM's pace
    quiet_s: float = 0.5  # POST turns end when the queue stays empty this long
    turn_timeout_s: float = 30.0  # per turn, on top of the call's max_call_s
    speech_s: float = 1.2  # length of the generated caller speech for barge-in
    linger_s: float = 0.2  # held after the last turn, before stop
    stagger_s: float = 0.0  # call i starts i × stagger_s after call 0

    def __post_init__(self) -> None:
        for name in ("base_url", "public_base_url"):
            url = getattr(self, name)
            if url is not None and URL(url).scheme not in ("http", "https"):
                raise SimulatorError(f"{name}={url!r}: expected an http:// or https:// URL")
        for public, local in self.resolve.items():
            if URL(public).scheme not in ("http", "https") or (not self.allow_remote and not is_loopback_url(local)):
                raise SimulatorError(f"resolve {public!r} -> {local!r}: expected an http(s) public URL and a "
                                     "loopback base URL")
        if not self.allow_remote and not is_loopback_url(self.base_url):
            raise SimulatorError(
                f"base_url={self.base_url!r} is not a loopback address; the simulator only calls "
                "127.0.0.0/8, ::1 or localhost unless allow_remote=True (--allow-remote)"
            )
        if not 1 <= self.calls <= 1000:
            raise SimulatorError(f"calls={self.calls}: expected 1..1000")
        if not 0 < self.max_call_s <= 3600:
            raise SimulatorError(f"max_call_s={self.max_call_s}: expected 0 < s <= 3600")
        if not (self.account_sid.startswith("AC") and len(self.account_sid) == 34):
            raise SimulatorError(f"account_sid={self.account_sid!r}: expected 'AC' + 32 characters")
        for at_s, digit in self.dtmf:
            if digit not in DTMF_DIGITS or at_s < 0:
                raise SimulatorError(f"dtmf cue ({at_s}, {digit!r}): expected time >= 0 and one of 0-9 * #")
        if not 0 <= self.hold_s < self.max_call_s:
            raise SimulatorError(f"hold_s={self.hold_s}: expected 0 <= s < max_call_s ({self.max_call_s})")
        if self.barge_in_at_s is not None and self.barge_in_at_s < 0:
            raise SimulatorError(f"barge_in_at_s={self.barge_in_at_s}: expected >= 0")

    @property
    def public_base(self) -> str:
        return (self.public_base_url or self.base_url).rstrip("/")
