"""A local stand-in for Twilio: places calls into callbridge and measures what the caller hears.

The simulator plays Twilio's part over real loopback sockets, written from the JSON shapes in
shared/docs/twilio-media-streams.md and never from ``callbridge.twilio`` (it exists to check
that module):

1. POST the signed voice webhook and read ``<Connect><Stream>`` and its ``<Parameter>``s
   out of the TwiML (``<Reject>`` or a bare ``<Say>…<Hangup/>`` means the service is full);
2. open the media WebSocket with ``x-twilio-signature`` over the ``wss://`` URL as written,
   send ``connected`` and ``start``, then caller audio every 20 ms on a real-time clock,
   ``dtmf`` on cue and ``stop`` at the end (or drop the connection with no ``stop``);
3. model Twilio's playback queue: inbound ``media`` of any size is queued and played at
   8000 bytes/s on our own clock, ``mark`` is echoed when the playout cursor passes it (at
   once on an empty queue), ``clear`` empties the queue and echoes every pending mark;
4. count protocol violations with Twilio's codes (31950 binary frame, 31951 invalid message,
   31931 queue over 10 min) and record the audio as heard, silence included, to a WAV;
5. send text turns through the control API (HTTP or the streaming text WebSocket) and
   report time to first audio, underruns, gaps, pacing, queue depth and mark bookkeeping.

:class:`FakeTwilioRest` serves Twilio's call-update endpoint on loopback so the service's
REST hang-up runs against it. Only loopback hosts are contacted unless ``allow_remote``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import secrets
import sys
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode

import aiohttp
import numpy as np
import soundfile as sf
import soxr
from aiohttp import web
from twilio.request_validator import RequestValidator
from yarl import URL

__all__ = [
    "CallReport",
    "CallerTrack",
    "FakeTwilioRest",
    "PlayoutQueue",
    "ServiceMessage",
    "SimConfig",
    "SimulatorError",
    "TwimlAnswer",
    "is_loopback_url",
    "main_simulate",
    "parse_twiml",
    "run_simulation",
    "simulate_call",
    "summarize",
    "summarize_reports",
    "ulaw_decode",
    "ulaw_encode",
    "validate_service_message",
    "voiced_speech",
]

log = logging.getLogger(__name__)

SAMPLE_RATE = 8000  # mu-law bytes (= samples) per second, both directions
CHUNK_BYTES = 160  # one Twilio chunk: 20 ms of mu-law
CHUNK_S = CHUNK_BYTES / SAMPLE_RATE
SILENCE_BYTE = 0xFF  # mu-law code of PCM 0
MAX_QUEUE_BYTES = 10 * 60 * SAMPLE_RATE  # Twilio keeps about 10 min, then discards (31931)
MIN_GAP_SAMPLES = 8  # a dry queue shorter than 1 ms is clock rounding, not an underrun
VOICE_RMS = 330.0  # about -40 dBFS: the first frame above it is where caller speech starts
MAX_ERRORS_KEPT = 200  # protocol_errors keeps this many strings; the rest are only counted
OUTBOX_MAX = 4096  # messages waiting for the socket writer; more means the socket is stuck
POLL_S = 0.01  # how often waits look at the call's state
CUE_TAIL_S = 0.3  # after the last dtmf or caller speech, time left for the service to react
CLOSE_TIMEOUT_S = 2.0  # bound on each closing step (stop flush, close handshake)
HTTP_TIMEOUT_S = 10.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
MAX_WS_MSG = 16 * 1024 * 1024  # Twilio takes media of any size; do not cap it at 4 MiB
DEFAULT_ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
DTMF_DIGITS = frozenset("0123456789*#")
TWILIO_EVENTS_IN = ("media", "mark", "clear")  # the only events a service may send

TurnKind = Literal["greeting", "text"]


class SimulatorError(Exception):
    """A simulator setting is unusable (bad URL, non-loopback host, bad cue)."""


# ------------------------------------------------------------------------------- mu-law


def _build_ulaw_decode_table() -> np.ndarray:
    """G.711 mu-law byte → int16, the table every implementation (audioop included) shares."""
    codes = np.arange(256, dtype=np.int32) ^ 0xFF  # all bits are inverted on the wire
    segment = (codes >> 4) & 0x07
    magnitude = (((codes & 0x0F) << 3) + 0x84) << segment
    return np.where(codes & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


ULAW_DECODE = _build_ulaw_decode_table()
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)


def ulaw_decode(data: bytes) -> np.ndarray:
    """Mu-law bytes → int16 PCM at the same rate, shape [T]."""
    return ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """int16 PCM [T] → mu-law bytes, in audioop's 14-bit form (shift by 2, clip 8159, bias 33).

    Byte for byte what ``audioop.lin2ulaw(pcm, 2)`` returns (doc §13), without importing it.
    """
    x = pcm.astype(np.int32) >> 2
    negative = x < 0
    mask = np.where(negative, 0x7F, 0xFF)
    x = np.minimum(np.abs(x), 8159) + 33
    segment = np.searchsorted(_ULAW_SEG_END, x, side="left")  # first end >= x
    code = (np.minimum(segment, 7) << 4) | ((x >> (np.minimum(segment, 7) + 1)) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)
    return ((code ^ mask) & 0xFF).astype(np.uint8).tobytes()


# ------------------------------------------------------------------------------- config


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
    caller_wav: Path | None = None
    barge_in_at_s: float | None = None
    dtmf: list[tuple[float, str]] = field(default_factory=list)
    calls: int = 1
    max_call_s: float = 60.0
    webhook_query: dict[str, str] = field(default_factory=dict)
    drop_network: bool = False
    out_wav: Path | None = None
    report_path: Path | None = None
    allow_remote: bool = False
    # The REST stand-in the calls register with (same as passing ``rest=`` to run_simulation).
    rest_server: FakeTwilioRest | None = field(default=None, compare=False, repr=False)
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
        if self.barge_in_at_s is not None and self.barge_in_at_s < 0:
            raise SimulatorError(f"barge_in_at_s={self.barge_in_at_s}: expected >= 0")

    @property
    def public_base(self) -> str:
        return (self.public_base_url or self.base_url).rstrip("/")


def _new_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


# ------------------------------------------------------------------------------- TwiML


@dataclass(frozen=True)
class TwimlAnswer:
    """What the webhook answered: the stream to open, or a refusal."""

    stream_url: str | None
    parameters: dict[str, str]
    verbs: list[str]  # top-level verbs in order, e.g. ["Connect"] or ["Say", "Hangup"]
    one_way: bool  # <Start><Stream>: Twilio would never play our audio

    @property
    def rejected(self) -> bool:
        return self.stream_url is None and not self.one_way


def parse_twiml(body: bytes) -> TwimlAnswer:
    """Parse a TwiML ``<Response>``; raises ValueError when it is not one."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise ValueError(f"TwiML is not XML: {exc}") from exc
    if root.tag != "Response":
        raise ValueError(f"TwiML root is <{root.tag}>, expected <Response>")
    stream = root.find("Connect/Stream")
    one_way = stream is None and root.find("Start/Stream") is not None
    params: dict[str, str] = {}
    if stream is not None:
        for p in stream.findall("Parameter"):
            params[p.get("name", "")] = p.get("value", "")
    url = stream.get("url") if stream is not None else None
    return TwimlAnswer(stream_url=url, parameters=params, verbs=[c.tag for c in root], one_way=one_way)


# ---------------------------------------------------------------- messages from the service


@dataclass(frozen=True)
class ServiceMessage:
    """One valid message the service sent to "Twilio"."""

    event: Literal["media", "mark", "clear"]
    payload: bytes = b""  # media: raw mu-law
    name: str = ""  # mark


_BODY_KEYS: dict[str, frozenset[str]] = {"media": frozenset({"payload"}), "mark": frozenset({"name"})}


def validate_service_message(text: str, stream_sid: str) -> tuple[ServiceMessage | None, str | None]:
    """Check one text frame against Twilio's rules; returns (message, None) or (None, error).

    Errors carry Twilio's code: 31951 for bad JSON, unknown events, missing or extra fields,
    a missing ``mark.name``, a wrong ``streamSid`` or a payload that is not base64.
    """
    try:
        obj = json.loads(text)
    except ValueError:
        return None, f"31951 invalid JSON: {text[:60]!r}"
    if not isinstance(obj, dict):
        return None, "31951 message is not a JSON object"
    event = obj.get("event")
    if event not in TWILIO_EVENTS_IN:
        return None, f"31951 unknown event {event!r}"
    required = {"event", "streamSid"} | ({event} if event != "clear" else set())
    missing, extra = sorted(required - obj.keys()), sorted(obj.keys() - required)
    if event == "mark" and "mark" in missing:
        return None, "31951 mark without mark.name"
    if missing:
        return None, f"31951 {event}: missing field(s) {missing}"
    if extra:
        return None, f"31951 {event}: extra field(s) {extra}"
    if obj["streamSid"] != stream_sid:
        return None, f"31951 {event}: wrong streamSid {str(obj['streamSid'])[:40]!r}"
    if event == "clear":
        return ServiceMessage("clear"), None
    body = obj[event]
    if not isinstance(body, dict):
        return None, f"31951 {event}: '{event}' is not an object"
    keys = _BODY_KEYS[event]
    if event == "mark" and not isinstance(body.get("name"), str):
        return None, "31951 mark without mark.name"
    if not keys <= body.keys():
        return None, f"31951 {event}: missing field(s) {sorted(keys - body.keys())} in '{event}'"
    if body.keys() - keys:
        return None, f"31951 {event}: extra field(s) {sorted(body.keys() - keys)} in '{event}'"
    if event == "mark":
        return ServiceMessage("mark", name=body["name"]), None
    payload = body["payload"]
    if not isinstance(payload, str):
        return None, "31951 media: payload is not a string"
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None, "31951 media: payload is not base64"
    return ServiceMessage("media", payload=raw), None


# ------------------------------------------------------------------------- playback queue


@dataclass
class TurnStats:
    """One turn as the simulator saw it. Times are loop seconds; samples count from start."""

    index: int  # 0 = greeting, 1.. = text turns in order
    kind: TurnKind
    text: str | None
    sent_t: float  # text sent (first chunk when streamed); stream start for a greeting
    turn_id: str | None = None
    text_done_t: float | None = None
    first_media_t: float | None = None
    last_media_t: float | None = None
    chunks: int = 0
    audio_bytes: int = 0
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, bytes) per media
    first_sample: int | None = None  # first sample of this turn played
    end_sample: int | None = None  # one past the last sample played
    played_bytes: int = 0
    max_queue_bytes: int = 0
    cleared: bool = False
    media_after_clear: int = 0  # media of this turn that came after its clear: leaked audio
    done_t: float | None = None
    timed_out: bool = False
    state: str | None = None  # turn_done.state from the service, when it says
    interrupted: bool | None = None
    heard: list[str] = field(default_factory=list)
    barge_in_heard: list[str] | None = None
    service_first_audio_t: float | None = None
    error: str | None = None

    def on_played(self, at_sample: int, n: int) -> None:
        if self.first_sample is None:
            self.first_sample = at_sample
        self.end_sample = at_sample + n
        self.played_bytes += n


class PlayoutQueue:
    """Twilio's playback queue on a sample clock, with no I/O.

    ``advance(to)`` plays the timeline up to sample ``to`` (8000 per second since ``start``):
    queued audio first, digital silence once the queue is dry. Marks sit at the byte position
    where they were queued and come out of ``advance`` as the cursor passes them, of
    ``push_mark`` at once when nothing is queued, and of ``clear`` all together.
    """

    def __init__(self, cap_bytes: int = MAX_QUEUE_BYTES) -> None:
        self.cap_bytes = cap_bytes
        self.clock = 0  # samples of timeline produced
        self.out = bytearray()  # the timeline as heard, mu-law
        self.queued = 0  # bytes waiting
        self.enqueued_total = 0  # bytes ever accepted: the absolute end of the queue
        self.consumed_total = 0  # bytes ever played or cleared: the absolute cursor
        self.played_audio = 0
        self.cleared_bytes = 0
        self.discarded_bytes = 0
        self.empty_since: int | None = 0  # clock when the queue last became empty
        self.gaps: list[tuple[int, int]] = []  # (dry from, audio again at) in samples
        self._dry_since: int | None = None  # set only after audio played: a gap candidate
        self._chunks: deque[tuple[bytes, TurnStats | None]] = deque()
        self._head = 0  # bytes of _chunks[0] already played
        self._marks: deque[tuple[int, str]] = deque()  # (absolute position, name)

    @property
    def pending_marks(self) -> list[str]:
        return [name for _, name in self._marks]

    def samples_to_next_mark(self) -> int | None:
        """Samples of playback until the next mark is due (None when none is pending)."""
        return self._marks[0][0] - self.consumed_total if self._marks else None

    def advance(self, to_sample: int) -> list[str]:
        """Play up to ``to_sample``; returns the names of marks passed, in order."""
        due: list[str] = []
        remaining = to_sample - self.clock
        while remaining > 0 and self._chunks:
            data, turn = self._chunks[0]
            take = min(remaining, len(data) - self._head)
            self.out += data[self._head : self._head + take]
            if turn is not None:
                turn.on_played(self.clock, take)
            self.clock += take
            self.consumed_total += take
            self.played_audio += take
            self.queued -= take
            remaining -= take
            self._head += take
            if self._head == len(data):
                self._chunks.popleft()
                self._head = 0
            while self._marks and self._marks[0][0] <= self.consumed_total:
                due.append(self._marks.popleft()[1])
            if self.queued == 0:
                self._dry_since = self.empty_since = self.clock
        if remaining > 0:
            self.out += bytes([SILENCE_BYTE]) * remaining
            self.clock += remaining
        return due

    def push_media(self, payload: bytes, turn: TurnStats | None) -> bool:
        """Queue a payload of any size; False when it would pass the cap (Twilio: 31931)."""
        if self.queued + len(payload) > self.cap_bytes:
            self.discarded_bytes += len(payload)
            return False
        if not payload:
            return True
        if self.queued == 0 and self._dry_since is not None and self.clock > self._dry_since:
            self.gaps.append((self._dry_since, self.clock))
        self._dry_since = self.empty_since = None
        self._chunks.append((payload, turn))
        self.queued += len(payload)
        self.enqueued_total += len(payload)
        return True

    def push_mark(self, name: str) -> list[str]:
        """Place a mark at the end of the queue; echoed at once if nothing is queued."""
        if self.queued == 0:
            return [name]
        self._marks.append((self.enqueued_total, name))
        return []

    def clear(self) -> list[str]:
        """Drop everything queued; returns every pending mark, in order."""
        self.cleared_bytes += self.queued
        self.consumed_total += self.queued
        self.queued = 0
        self._chunks.clear()
        self._head = 0
        self._dry_since = None  # silence after a clear is wanted, not an underrun
        self.empty_since = self.clock
        names = [name for _, name in self._marks]
        self._marks.clear()
        return names


# --------------------------------------------------------------------------------- reports


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"per_turn": [...], "n", "min", "p50", "p95", "max", "mean"}`` in ms; None skipped."""
    clean = np.array([v for v in values if v is not None], dtype=np.float64)
    out: dict[str, Any] = {"per_turn": [None if v is None else round(v, 1) for v in values], "n": int(clean.size)}
    for key in ("min", "p50", "p95", "max", "mean"):
        out[key] = None
    if clean.size:
        out.update(
            min=round(float(clean.min()), 1),
            p50=round(float(np.percentile(clean, 50)), 1),
            p95=round(float(np.percentile(clean, 95)), 1),
            max=round(float(clean.max()), 1),
            mean=round(float(clean.mean()), 1),
        )
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000.0 * seconds, 1)


@dataclass
class CallReport:
    """What one simulated call measured. Times in ms; "audio" excludes digital silence we fill in.

    - ``ttfa_ms``: per text turn, text sent (POST issued, or first streamed word) → first
      ``media`` received after it; ``{"per_turn": [...], "n", "min", "p50", "p95", "max", "mean"}``.
    - ``ttfa_heard_ms``: the same, up to the moment that audio started playing in the queue.
    - ``chunks``: valid ``media`` messages received (any size). ``marks_sent``: valid ``mark``
      messages received; ``marks_echoed``: echoes we sent (played or flushed by ``clear``).
    - ``underruns`` / ``gaps_ms`` ``{"max", "total"}``: times the queue ran dry (>= 1 ms) between
      two pieces of audio of the same turn (greeting included), and how long.
    - ``lost_or_reordered``: marks never echoed by the end + echoes out of order (a self-check,
      always 0) + media messages discarded over the 10-minute cap.
    - ``barge_in_to_clear_ms``: caller speech start (first chunk over -40 dBFS) → first ``clear``.
    - ``protocol_errors``: violations with Twilio's codes (first 200; ``protocol_error_count``).
    - ``pacing_jitter_ms``: spacing of media arrivals within each turn: ``n``, ``mean``, ``std``,
      ``p95``, ``max`` of the intervals and ``mean_abs_dev`` from the previous message's length.
    - ``max_queue_ms``: the most audio ever waiting in the queue right after a ``media`` arrived.
    - ``turns``: one dict per turn (greeting first as index 0), same measures per turn.
    """

    call_sid: str
    index: int
    rejected: bool = False
    ttfa_ms: dict[str, Any] = field(default_factory=lambda: summarize([]))
    ttfa_heard_ms: dict[str, Any] = field(default_factory=lambda: summarize([]))
    chunks: int = 0
    underruns: int = 0
    gaps_ms: dict[str, float] = field(default_factory=lambda: {"max": 0.0, "total": 0.0})
    lost_or_reordered: int = 0
    marks_sent: int = 0
    marks_echoed: int = 0
    barge_in_to_clear_ms: float | None = None
    protocol_errors: list[str] = field(default_factory=list)
    pacing_jitter_ms: dict[str, float | int | None] = field(default_factory=dict)
    max_queue_ms: float = 0.0
    turns: list[dict[str, Any]] = field(default_factory=list)
    # Extras.
    protocol_error_count: int = 0
    stream_sid: str | None = None
    stream_url: str | None = None
    custom_parameters: dict[str, str] = field(default_factory=dict)
    ended_by: str | None = None  # simulator, network_drop, rest, service, timeout, error
    duration_s: float = 0.0
    played_samples: int = 0
    audio_ms_received: float = 0.0
    audio_ms_played: float = 0.0
    audio_ms_cleared: float = 0.0
    audio_ms_unplayed: float = 0.0
    audio_ms_discarded: float = 0.0
    marks_cleared: int = 0
    marks_unechoed: int = 0
    marks_out_of_order: int = 0
    clears: int = 0
    media_after_clear: int = 0
    dtmf_sent: list[str] = field(default_factory=list)
    dtmf_events: list[str] = field(default_factory=list)
    service_events: dict[str, int] = field(default_factory=dict)
    service_errors: list[str] = field(default_factory=list)
    call_ended_event: bool = False
    error: str | None = None
    wav_path: str | None = None

    @property
    def ok(self) -> bool:
        """No error, no protocol violation and no lost or reordered media or mark."""
        return self.error is None and not self.protocol_error_count and not self.lost_or_reordered

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize_reports(reports: Sequence[CallReport]) -> dict[str, Any]:
    """Totals and percentiles over all calls (text turns only for time to first audio)."""
    ttfa = [v for r in reports for v in r.ttfa_ms["per_turn"]]
    heard = [v for r in reports for v in r.ttfa_heard_ms["per_turn"]]
    barge = [r.barge_in_to_clear_ms for r in reports if r.barge_in_to_clear_ms is not None]
    stats = {k: v for k, v in summarize(ttfa).items() if k != "per_turn"}
    return {
        "calls": len(reports),
        "ok": sum(r.ok for r in reports),
        "rejected": sum(r.rejected for r in reports),
        "errors": [f"{r.call_sid}: {r.error}" for r in reports if r.error],
        "ttfa_ms": stats,
        "ttfa_heard_ms": {k: v for k, v in summarize(heard).items() if k != "per_turn"},
        "chunks": sum(r.chunks for r in reports),
        "underruns": sum(r.underruns for r in reports),
        "gaps_ms": {
            "max": max((r.gaps_ms["max"] for r in reports), default=0.0),
            "total": round(sum(r.gaps_ms["total"] for r in reports), 1),
        },
        "lost_or_reordered": sum(r.lost_or_reordered for r in reports),
        "marks_sent": sum(r.marks_sent for r in reports),
        "marks_echoed": sum(r.marks_echoed for r in reports),
        "barge_in_to_clear_ms": {k: v for k, v in summarize(barge).items() if k != "per_turn"},
        "protocol_errors": sum(r.protocol_error_count for r in reports),
        "max_queue_ms": max((r.max_queue_ms for r in reports), default=0.0),
        "pacing_jitter_ms_max_std": max(
            (float(r.pacing_jitter_ms.get("std") or 0.0) for r in reports), default=0.0
        ),
    }


# ----------------------------------------------------------------------------- caller audio


def load_caller_wav(path: Path) -> bytes:
    """Any WAV (any rate, any channels) → 8 kHz mono mu-law bytes."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    pcm = (np.clip(mono, -1.0, 1.0) * 32767.0).astype(np.int16)
    return ulaw_encode(pcm)


def voiced_speech(duration_s: float, f0_hz: float = 140.0) -> bytes:
    """A vowel-like voiced signal as 8 kHz mu-law: harmonics of a wobbling f0 shaped by three
    formants, in syllable-rate bursts at about -16 dBFS. Loud and periodic enough for any VAD."""
    t = np.arange(int(duration_s * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = f0_hz * (1.0 + 0.05 * np.sin(2 * np.pi * 3.0 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    sig = np.zeros_like(t)
    for k in range(1, int(3400 // f0_hz) + 1):
        f = k * f0_hz
        weight = (
            np.exp(-(((f - 700) / 250) ** 2))
            + 0.6 * np.exp(-(((f - 1200) / 350) ** 2))
            + 0.3 * np.exp(-(((f - 2500) / 500) ** 2))
            + 0.03
        )
        sig += weight * np.sin(k * phase)
    sig *= 0.65 + 0.35 * np.sin(2 * np.pi * 4.0 * t)  # syllables, never below a VAD threshold
    sig *= 0.15 / max(float(np.sqrt(np.mean(sig**2))), 1e-9)
    fade = min(80, t.size // 2)  # 10 ms ramps: no click at the edges
    if fade:
        ramp = np.linspace(0.0, 1.0, fade)
        sig[:fade] *= ramp
        sig[-fade:] *= ramp[::-1]
    return ulaw_encode((np.clip(sig, -1.0, 1.0) * 32767.0).astype(np.int16))


@dataclass(frozen=True)
class CallerTrack:
    """The caller's side: ``audio`` (mu-law) starts at chunk ``start_chunk``, silence elsewhere.

    ``voice_chunk`` is the first chunk whose level passes about -40 dBFS (None if never): its
    send time is where barge-in timing starts.
    """

    audio: bytes = b""
    start_chunk: int = 0

    @property
    def voice_chunk(self) -> int | None:
        for i in range(0, len(self.audio), CHUNK_BYTES):
            pcm = ulaw_decode(self.audio[i : i + CHUNK_BYTES]).astype(np.float64)
            if pcm.size and float(np.sqrt(np.mean(pcm**2))) > VOICE_RMS:
                return self.start_chunk + i // CHUNK_BYTES
        return None

    @property
    def end_s(self) -> float:
        return self.start_chunk * CHUNK_S + len(self.audio) / SAMPLE_RATE

    def chunk(self, n: int) -> bytes:
        """The 160 bytes of chunk ``n`` (0-based)."""
        offset = (n - self.start_chunk) * CHUNK_BYTES
        if offset < 0 or offset >= len(self.audio):
            return bytes([SILENCE_BYTE]) * CHUNK_BYTES
        data = self.audio[offset : offset + CHUNK_BYTES]
        return data + bytes([SILENCE_BYTE]) * (CHUNK_BYTES - len(data))


def _caller_track(cfg: SimConfig) -> CallerTrack:
    wav = load_caller_wav(cfg.caller_wav) if cfg.caller_wav is not None else b""
    if cfg.barge_in_at_s is not None:
        return CallerTrack(wav or voiced_speech(cfg.speech_s), round(cfg.barge_in_at_s / CHUNK_S))
    return CallerTrack(wav, 0)


# ------------------------------------------------------------------------ REST stand-in


@dataclass(frozen=True)
class RestRequest:
    """One call-update request FakeTwilioRest answered."""

    call_sid: str
    params: dict[str, str]
    http_status: int


class FakeTwilioRest:
    """Twilio's ``POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`` on loopback.

    ``Status=completed`` (or a new ``Twiml``/``Url``) on a live call answers 200 and ends its
    stream like Twilio: ``stop``, then the socket closes. An unknown or ended call answers 404
    with code 20404; wrong Basic auth 401 with 20003. Point the service's Twilio API base URL at
    :attr:`base_url`.
    """

    def __init__(self, account_sid: str, auth_token: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.host = host
        self.port = port
        self.requests: list[RestRequest] = []
        self._live: dict[str, Callable[[], bool]] = {}
        self._ended: set[str] = set()
        self._runner: web.AppRunner | None = None
        self.base_url: str | None = None

    @property
    def live_calls(self) -> frozenset[str]:
        return frozenset(self._live)

    def register(self, call_sid: str, hang_up: Callable[[], bool]) -> None:
        """A call went live; ``hang_up()`` ends its stream and says whether it was still live."""
        self._live[call_sid] = hang_up

    def unregister(self, call_sid: str) -> None:
        if self._live.pop(call_sid, None) is not None:
            self._ended.add(call_sid)

    async def start(self) -> str:
        """Listen on loopback; returns the base URL (``http://127.0.0.1:PORT``)."""
        app = web.Application()
        path = "/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json"
        app.router.add_post(path, self._update)
        app.router.add_get(path, self._fetch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://{self.host}:{port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _error(self, status: int, code: int, message: str) -> web.Response:
        body = {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status}
        return web.json_response(body, status=status)

    def _authorized(self, request: web.Request) -> bool:
        # Decoded by hand: aiohttp 3.14 deprecates BasicAuth (a warning is an error in tests).
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        try:
            login, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            return False
        return (
            scheme.lower() == "basic"
            and login == self.account_sid
            and secrets.compare_digest(password.encode(), self.auth_token.encode())
            and request.match_info["account_sid"] == self.account_sid
        )

    def _resource(self, call_sid: str, status: str) -> dict[str, Any]:
        uri = f"/2010-04-01/Accounts/{self.account_sid}/Calls/{call_sid}.json"
        return {"sid": call_sid, "account_sid": self.account_sid, "status": status, "direction": "inbound",
                "api_version": "2010-04-01", "uri": uri}

    async def _fetch(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, 20003, "Authenticate")
        sid = request.match_info["call_sid"]
        if sid in self._live:
            return web.json_response(self._resource(sid, "in-progress"))
        if sid in self._ended:
            return web.json_response(self._resource(sid, "completed"))
        return self._error(404, 20404, f"The requested resource {request.path} was not found")

    async def _update(self, request: web.Request) -> web.Response:
        sid = request.match_info["call_sid"]
        params = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        response = await self._answer_update(request, sid, params)
        self.requests.append(RestRequest(sid, params, response.status))
        return response

    async def _answer_update(self, request: web.Request, sid: str, params: dict[str, str]) -> web.Response:
        if not self._authorized(request):
            return self._error(401, 20003, "Authenticate")
        status = params.get("Status")
        if status not in (None, "completed", "canceled"):
            return self._error(400, 21218, f"Invalid Status {status!r}")
        # completed, or new TwiML/Url, ends the stream; "canceled" only touches ringing calls.
        ends = status == "completed" or "Twiml" in params or "Url" in params
        if not ends and status is None:
            return self._error(400, 21218, "Nothing to update: pass Status, Twiml or Url")
        if sid not in self._live:
            return self._error(404, 20404, f"The requested resource {request.path} was not found")
        if not ends:  # "canceled" only affects queued or ringing calls; this one is in progress
            return web.json_response(self._resource(sid, "in-progress"))
        hang_up = self._live.pop(sid)
        self._ended.add(sid)
        if not hang_up():
            return self._error(404, 20404, f"The requested resource {request.path} was not found")
        return web.json_response(self._resource(sid, "completed"))


# ---------------------------------------------------------------------------------- a call


def _ws_url(base_url: str, path: str) -> URL:
    base = URL(base_url)
    scheme = "wss" if base.scheme == "https" else "ws"
    return URL(f"{scheme}://{base.raw_authority}{base.raw_path.rstrip('/')}{path}", encoded=True)


def _split_words(text: str) -> list[str]:
    """Chunks an LLM might stream: each word with its trailing space; they join back to text."""
    return re.findall(r"\S+\s*", text) or [text]


class _CallRun:
    """One simulated call: the state, the socket tasks and the scenario. Built per call."""

    def __init__(self, cfg: SimConfig, index: int, rest: FakeTwilioRest | None, caller: CallerTrack) -> None:
        self.cfg = cfg
        self.index = index
        self.rest = rest
        self.caller = caller
        self.loop = asyncio.get_running_loop()
        self.call_sid = _new_sid("CA")
        self.stream_sid = _new_sid("MZ")
        self.report = CallReport(call_sid=self.call_sid, index=index)
        self.queue = PlayoutQueue()
        self.turns: list[TurnStats] = []
        self.turns_by_id: dict[str, TurnStats] = {}
        self.pending_ws_turn: TurnStats | None = None  # sent over the socket, id not yet known
        self.active_ids: set[str] = set()
        self.custom_parameters: dict[str, str] = {}
        self.t0 = 0.0  # loop time `start` was sent: sample 0 of the played timeline
        self.started = False  # `start` queued: the clock runs
        self.start_on_wire = False  # `start` written to the socket
        self.ending = False
        self.end_t: float | None = None
        self.stop_sent = False
        self.seq = 0
        self.outbox: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(maxsize=OUTBOX_MAX)
        self.expected_echoes: deque[str] = deque()
        self.speech_start_t: float | None = None
        self.clear_times: list[float] = []
        self.discarded_msgs = 0
        self.http: aiohttp.ClientSession | None = None
        self.media_http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.text_ws: aiohttp.ClientWebSocketResponse | None = None
        self.writer: asyncio.Task[None] | None = None
        self.background: list[asyncio.Task[None]] = []
        self.end_tasks: list[asyncio.Task[None]] = []

    # ---------------------------------------------------------------- small helpers

    def _now(self) -> float:
        return self.loop.time()

    def _clock(self, now: float) -> int:
        return max(0, int((now - self.t0) * SAMPLE_RATE))

    def _error(self, message: str) -> None:
        self.report.protocol_error_count += 1
        if len(self.report.protocol_errors) < MAX_ERRORS_KEPT:
            self.report.protocol_errors.append(message)
        log.debug("call %s: %s", self.call_sid, message)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.api_token}"}

    @property
    def greeting(self) -> TurnStats | None:
        return next((t for t in self.turns if t.kind == "greeting"), None)

    def _greeting_turn(self) -> TurnStats:
        turn = self.greeting
        if turn is None:
            turn = TurnStats(index=0, kind="greeting", text=None, sent_t=self.t0)
            self.turns.insert(0, turn)
        return turn

    def _emit(self, event: str, body: dict[str, Any]) -> bool:
        """Queue one message for the socket writer; numbers it (``connected`` has no number)."""
        if self.stop_sent or self.ws is None:
            return False
        if event == "connected":
            msg: dict[str, Any] = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        else:
            self.seq += 1
            msg = {"event": event, "sequenceNumber": str(self.seq), **body, "streamSid": self.stream_sid}
        try:
            self.outbox.put_nowait((event, json.dumps(msg)))
        except asyncio.QueueFull:
            self._error("simulator: outbox full (the service stopped reading); message dropped")
            return False
        return True

    def _echo(self, names: list[str]) -> None:
        for name in names:
            expected = self.expected_echoes.popleft() if self.expected_echoes else None
            if expected != name:  # a self-check of the queue model: echoes leave in arrival order
                self.report.marks_out_of_order += 1
            if self._emit("mark", {"mark": {"name": name}}):
                self.report.marks_echoed += 1

    # ---------------------------------------------------------------- socket tasks

    async def _writer(self) -> None:
        """The only task that writes the media socket, so numbering order is sending order."""
        assert self.ws is not None
        while True:
            item = await self.outbox.get()
            if item is None:
                return
            try:
                await self.ws.send_str(item[1])
            except (ConnectionError, aiohttp.ClientError):
                self._socket_closed()
                return
            if item[0] == "start":
                self.start_on_wire = True

    async def _reader(self) -> None:
        """The only task that reads the media socket; ends when the socket closes."""
        assert self.ws is not None
        async for msg in self.ws:
            if self.ending:
                continue  # after stop Twilio acts on nothing; keep reading for the close
            now = self._now()
            if msg.type is aiohttp.WSMsgType.TEXT:
                self._on_message(msg.data, now)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                self._error("31950 binary frame (Twilio takes JSON text frames only)")
            elif msg.type is aiohttp.WSMsgType.ERROR:
                break
        self._socket_closed()

    def _socket_closed(self) -> None:
        if not self.ending:
            self.ending = True
            self.report.ended_by = "service"
            self.end_t = self._now()
            if self.started:
                self.queue.advance(self._clock(self.end_t))

    def _on_message(self, text: str, now: float) -> None:
        if not self.start_on_wire:
            self._error(f"31951 message before start: {text[:60]!r}")
            return
        self._echo(self.queue.advance(self._clock(now)))
        msg, problem = validate_service_message(text, self.stream_sid)
        if msg is None:
            self._error(problem or "31951 invalid message")
            return
        if msg.event == "media":
            turn = self.turns[-1] if self.turns else self._greeting_turn()
            turn.chunks += 1
            turn.media_after_clear += turn.cleared
            turn.audio_bytes += len(msg.payload)
            turn.arrivals.append((now, len(msg.payload)))
            turn.last_media_t = now
            if turn.first_media_t is None:
                turn.first_media_t = now
            self.report.chunks += 1
            self.report.audio_ms_received += 1000.0 * len(msg.payload) / SAMPLE_RATE
            if not self.queue.push_media(msg.payload, turn):
                self.discarded_msgs += 1
                if self.discarded_msgs == 1:
                    self._error("31931 playback queue over 10 min: media discarded")
            turn.max_queue_bytes = max(turn.max_queue_bytes, self.queue.queued)
        elif msg.event == "mark":
            self.report.marks_sent += 1
            self.expected_echoes.append(msg.name)
            self._echo(self.queue.push_mark(msg.name))
        else:  # clear
            self.report.clears += 1
            self.clear_times.append(now)
            if self.turns:
                self.turns[-1].cleared = True
            names = self.queue.clear()
            self.report.marks_cleared += len(names)
            self._echo(names)

    async def _ticker(self) -> None:
        """Plays the queue on the clock; wakes every chunk, or sooner when a mark is due."""
        for _ in range(int(self.cfg.max_call_s / 0.001) + 10):  # sleeps >= 1 ms: a hard bound
            if self.ending:
                return
            self._echo(self.queue.advance(self._clock(self._now())))
            wait = CHUNK_S
            due = self.queue.samples_to_next_mark()
            if due is not None:
                wait = min(wait, max(due / SAMPLE_RATE, 0.001))
            await asyncio.sleep(wait)

    async def _caller_audio(self) -> None:
        """Caller media every 20 ms at absolute deadlines, dtmf on cue; late wake-ups burst."""
        cues = deque(sorted(self.cfg.dtmf))
        voice_chunk = self.caller.voice_chunk if self.cfg.barge_in_at_s is not None else None
        for n in range(int(self.cfg.max_call_s / CHUNK_S) + 1):
            delay = self.t0 + n * CHUNK_S - self._now()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.ending:
                return
            while cues and cues[0][0] <= n * CHUNK_S + 1e-9:
                digit = cues.popleft()[1]
                if self._emit("dtmf", {"dtmf": {"track": "inbound_track", "digit": digit}}):
                    self.report.dtmf_sent.append(digit)
            if n == voice_chunk:
                self.speech_start_t = self._now()
            payload = base64.b64encode(self.caller.chunk(n)).decode("ascii")
            self._emit("media", {"media": {"track": "inbound", "chunk": str(n + 1),
                                           "timestamp": str(n * 20), "payload": payload}})

    async def _text_events(self) -> None:
        assert self.text_ws is not None
        async for msg in self.text_ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            try:
                event = json.loads(msg.data)
            except ValueError:
                self.report.service_errors.append(f"text socket sent invalid JSON: {msg.data[:60]!r}")
                continue
            if isinstance(event, dict):
                self._on_service_event(event, self._now())

    def _turn_for_event(self, turn_id: Any) -> TurnStats | None:
        if not isinstance(turn_id, str):
            return None
        turn = self.turns_by_id.get(turn_id)
        if turn is None:
            if self.pending_ws_turn is not None:
                turn, self.pending_ws_turn = self.pending_ws_turn, None
            elif not any(t.kind == "text" for t in self.turns) or (
                self.greeting is not None and self.greeting.turn_id is None
            ):
                turn = self._greeting_turn()  # a turn we did not send: the greeting
            else:
                return None
            turn.turn_id = turn_id
            self.turns_by_id[turn_id] = turn
        return turn

    def _on_service_event(self, event: dict[str, Any], now: float) -> None:
        kind = str(event.get("event"))
        self.report.service_events[kind] = self.report.service_events.get(kind, 0) + 1
        if kind == "dtmf":
            self.report.dtmf_events.append(str(event.get("digit")))
            return
        if kind == "call_ended":
            self.report.call_ended_event = True
            return
        if kind == "error":
            self.report.service_errors.append(str(event.get("message"))[:200])
            return
        turn = self._turn_for_event(event.get("turn_id"))
        if turn is None:
            return
        words = event.get("words") if kind == "heard" else event.get("heard")
        words = [str(w) for w in words] if isinstance(words, list) else None
        if kind in ("turn_queued", "turn_started"):
            if turn.done_t is None:
                self.active_ids.add(str(turn.turn_id))
        elif kind == "first_audio":
            turn.service_first_audio_t = now
        elif kind == "heard" and words:
            turn.heard.extend(words)
        elif kind == "barge_in":
            turn.barge_in_heard = words
        elif kind == "turn_done":
            turn.done_t = now
            turn.interrupted = bool(event.get("interrupted"))
            turn.state = str(event["state"]) if "state" in event else None
            if words is not None:
                turn.heard = words
            self.active_ids.discard(str(turn.turn_id))

    # ---------------------------------------------------------------- waiting

    async def _wait_for(self, ready: Callable[[], bool], timeout_s: float, *, after_end: bool = False) -> bool:
        """Poll ``ready`` until true, ``timeout_s`` passes or (unless ``after_end``) the call ends."""
        deadline = self._now() + timeout_s
        for _ in range(int(timeout_s / POLL_S) + 2):
            if ready():
                return True
            left = deadline - self._now()
            if (self.ending and not after_end) or left <= 0:
                break
            await asyncio.sleep(min(POLL_S, left))
        return ready()

    def _quiet(self) -> bool:
        since = self.queue.empty_since
        return since is not None and self.queue.clock - since >= self.cfg.quiet_s * SAMPLE_RATE

    def _drained(self) -> bool:
        return self.queue.queued == 0

    # ---------------------------------------------------------------- the scenario

    async def run(self) -> CallReport:
        """The whole call, within max_call_s: the scenario, then a bounded close."""
        reserve_s = min(2 * CLOSE_TIMEOUT_S, 0.2 * self.cfg.max_call_s)  # kept for closing
        reason = "error"
        budget = asyncio.timeout(self.cfg.max_call_s - reserve_s)
        try:
            async with budget:
                await self._scenario()
        except TimeoutError as exc:
            if budget.expired():
                reason = "timeout"
                self.report.error = f"call still running after max_call_s={self.cfg.max_call_s}"
            else:
                self.report.error = f"timed out: {exc!r}"
        except Exception as exc:  # top of the call's task: one call's failure is its report
            log.exception("simulated call %s failed", self.call_sid)
            self.report.error = f"{type(exc).__name__}: {exc}"
        finally:
            try:
                async with asyncio.timeout(reserve_s):
                    await self._close(reason)
            except TimeoutError:
                log.warning("call %s: closing took over %.1f s", self.call_sid, reserve_s)
            finally:
                await self._release()
                self._fill_report()
        return self.report

    async def _scenario(self) -> None:
        cfg = self.cfg
        # No total timeout on the sessions: it would also cut the long-lived sockets.
        connect_only = aiohttp.ClientTimeout(total=None, connect=HTTP_TIMEOUT_S)
        self.http = aiohttp.ClientSession(timeout=connect_only)
        self.media_http = aiohttp.ClientSession(timeout=connect_only)
        twiml = await self._post_webhook()
        if twiml is None or not await self._open_stream(twiml):
            return
        if self.rest is not None:
            self.rest.register(self.call_sid, self._rest_hang_up)
        self.writer = asyncio.create_task(self._writer())
        self.background += [self.writer, asyncio.create_task(self._reader())]
        self._emit("connected", {})
        self.t0 = self._now()
        self._emit("start", {"start": {
            "accountSid": cfg.account_sid,
            "streamSid": self.stream_sid,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "customParameters": dict(self.custom_parameters),
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE, "channels": 1},
        }})
        self.started = True
        self.background += [asyncio.create_task(self._ticker()), asyncio.create_task(self._caller_audio())]
        if cfg.stream_text and cfg.texts:
            await self._open_text_socket()
        await self._wait_greeting()
        for i, text in enumerate(cfg.texts, start=1):
            if self.ending:
                break
            await self._wait_for(lambda: not self.active_ids and self._drained(), cfg.turn_timeout_s)
            if self.ending:
                break
            if self.text_ws is not None and not self.text_ws.closed:
                await self._turn_streamed(i, text)
            else:
                await self._turn_posted(i, text)
        await self._wait_cues()
        await self._wait_for(self._drained, cfg.turn_timeout_s)
        await self._wait_for(lambda: False, cfg.linger_s)
        await self._end("network_drop" if cfg.drop_network else "simulator")

    async def _post_webhook(self) -> TwimlAnswer | None:
        cfg = self.cfg
        assert self.http is not None
        query = urlencode(cfg.webhook_query, quote_via=quote)
        path = cfg.webhook_path + (f"?{query}" if query else "")
        params = {
            "CallSid": self.call_sid, "AccountSid": cfg.account_sid, "From": cfg.from_number,
            "To": cfg.to_number, "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01",
            # Twilio sends more than a service reads; all of them are signed.
            "Caller": cfg.from_number, "Called": cfg.to_number,
        }
        if cfg.caller_name is not None:
            params["CallerName"] = cfg.caller_name
        signature = RequestValidator(cfg.twilio_auth_token).compute_signature(cfg.public_base + path, params)
        headers = {"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1"}
        # encoded=True: the bytes on the wire are exactly the query string that was signed
        url = URL(cfg.base_url.rstrip("/") + path, encoded=True)
        try:
            async with self.http.post(url, data=params, headers=headers, timeout=REQUEST_TIMEOUT) as resp:
                body, status = await resp.read(), resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:  # service down: a report, not a traceback
            self.report.error = f"webhook {cfg.base_url}{cfg.webhook_path} unreachable: {exc}"
            return None
        if status != 200:
            self.report.error = f"webhook answered HTTP {status}: {body[:200].decode(errors='replace')}"
            return None
        try:
            twiml = parse_twiml(body)
        except ValueError as exc:
            self.report.error = f"webhook: {exc}"
            return None
        self.custom_parameters = twiml.parameters
        self.report.custom_parameters = twiml.parameters
        if twiml.one_way:
            self.report.error = "webhook answered <Start><Stream>: one-way, Twilio would never play our audio"
            return None
        if twiml.rejected:
            self.report.rejected = True
            self.report.ended_by = "rejected"
            return None
        return twiml

    async def _open_stream(self, twiml: TwimlAnswer) -> bool:
        cfg = self.cfg
        assert twiml.stream_url is not None and self.media_http is not None
        stream_url = twiml.stream_url
        target = URL(stream_url, encoded=True)
        if not target.is_absolute():  # relative: Twilio resolves it against the webhook's host
            stream_url = f"wss://{URL(cfg.public_base).raw_authority}/{stream_url.lstrip('/')}"
            target = URL(stream_url, encoded=True)
        self.report.stream_url = stream_url
        if target.scheme != "wss":
            self._error(f"31920 <Stream url> scheme is {target.scheme!r}; Twilio connects to wss:// only")
        if target.raw_query_string:
            self._error("twiml: <Stream url> has a query string; Twilio drops it (use <Parameter>)")
        public_path = URL(cfg.public_base).raw_path.rstrip("/")
        path = target.raw_path
        if public_path and path.startswith(public_path + "/"):
            path = path[len(public_path) :]
        signature = RequestValidator(cfg.twilio_auth_token).compute_signature(stream_url, {})
        try:
            self.ws = await self.media_http.ws_connect(
                _ws_url(cfg.base_url, path),
                headers={"x-twilio-signature": signature, "User-Agent": "Twilio.TmeWs/1.0"},
                max_msg_size=MAX_WS_MSG,
                timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S),
            )
        except aiohttp.WSServerHandshakeError as exc:
            self._error(f"31920 stream handshake answered HTTP {exc.status}")
            self.report.error = f"media stream refused: HTTP {exc.status}"
            return False
        except (aiohttp.ClientError, OSError) as exc:
            self._error(f"31902 could not connect the media stream: {exc}")
            self.report.error = f"media stream: {exc}"
            return False
        self.report.stream_sid = self.stream_sid
        return True

    async def _open_text_socket(self) -> None:
        assert self.http is not None
        url = _ws_url(self.cfg.base_url, f"/calls/{self.call_sid}/text")
        for attempt in range(20):  # the call may register a moment after `start`
            try:
                self.text_ws = await self.http.ws_connect(url, headers=self._auth(),
                                                          timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S))
                break
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status not in (404, 409) or attempt == 19 or self.ending:
                    self.report.service_errors.append(f"text socket refused: HTTP {exc.status}; using POST turns")
                    return
                await asyncio.sleep(0.1)
        if self.text_ws is not None:
            self.background.append(asyncio.create_task(self._text_events()))

    def _expects_greeting(self) -> bool:
        if self.cfg.expect_greeting is not None:
            return self.cfg.expect_greeting
        return bool(self.cfg.webhook_query.get("greeting") or self.custom_parameters.get("greeting"))

    async def _wait_greeting(self) -> None:
        """Let a greeting the service starts by itself finish before the first turn."""
        timeout_s = self.cfg.turn_timeout_s
        if self._expects_greeting():
            await self._wait_for(lambda: self.greeting is not None and self.greeting.first_media_t is not None,
                                 timeout_s)
        greeting = self.greeting
        if greeting is None:
            return
        if greeting.turn_id is not None and self.text_ws is not None:
            await self._wait_for(lambda: greeting.done_t is not None, timeout_s)
        await self._wait_for(self._quiet, timeout_s)
        if greeting.done_t is None:
            greeting.done_t = self._now()

    async def _turn_posted(self, index: int, text: str) -> None:
        """POST the turn; it is over once its audio arrived and the queue stayed empty quiet_s."""
        assert self.http is not None
        turn = TurnStats(index=index, kind="text", text=text, sent_t=self._now())
        self.turns.append(turn)  # before sending: audio that races the answer belongs to it
        try:
            async with self.http.post(f"{self.cfg.base_url.rstrip('/')}/calls/{self.call_sid}/turns",
                                      json={"text": text, "interrupt": False}, headers=self._auth(),
                                      timeout=REQUEST_TIMEOUT) as resp:
                status, body = resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            turn.error = f"POST turns failed: {exc}"
            return
        turn.text_done_t = self._now()
        if status != 202:
            turn.error = f"POST turns answered HTTP {status}: {body[:200]}"
            return
        with contextlib.suppress(ValueError):
            answer = json.loads(body)
            if isinstance(answer, dict) and isinstance(answer.get("turn_id"), str):
                turn.turn_id = answer["turn_id"]
                self.turns_by_id[turn.turn_id] = turn
        if not await self._wait_for(lambda: turn.first_media_t is not None, self.cfg.turn_timeout_s):
            turn.timed_out = not self.ending
        await self._wait_for(self._quiet, self.cfg.turn_timeout_s)
        turn.done_t = self._now()

    async def _turn_streamed(self, index: int, text: str) -> None:
        """Stream the turn word by word; it is over at turn_done and a drained queue."""
        ws = self.text_ws
        assert ws is not None
        turn = TurnStats(index=index, kind="text", text=text, sent_t=self._now())
        self.turns.append(turn)
        self.pending_ws_turn = turn
        try:
            for j, chunk in enumerate(_split_words(text)):
                if j:
                    await asyncio.sleep(self.cfg.word_delay_s)
                if self.ending:
                    return
                await ws.send_json({"type": "text", "text": chunk})
            await ws.send_json({"type": "end_turn"})
        except (ConnectionError, aiohttp.ClientError) as exc:
            turn.error = f"text socket: {exc}"
            return
        turn.text_done_t = self._now()
        if not await self._wait_for(lambda: turn.done_t is not None, self.cfg.turn_timeout_s):
            turn.timed_out = not self.ending
        await self._wait_for(self._drained, self.cfg.turn_timeout_s)
        if turn.done_t is None:
            turn.done_t = self._now()

    async def _wait_cues(self) -> None:
        """Hold the call until every dtmf cue and the caller's barge-in speech went out."""
        last_s = max((at for at, _ in self.cfg.dtmf), default=-1.0)
        if self.cfg.barge_in_at_s is not None:
            last_s = max(last_s, self.caller.end_s)
        if last_s >= 0:
            end_t = self.t0 + last_s + CUE_TAIL_S
            await self._wait_for(lambda: self._now() >= end_t, max(0.0, end_t - self._now()) + 0.1)

    def _rest_hang_up(self) -> bool:
        """FakeTwilioRest ends the call: stop and close happen in a task, the answer is now."""
        if self.ending:
            return False
        self.end_tasks.append(asyncio.create_task(self._end("rest")))
        return True

    async def _end(self, reason: str) -> None:
        """End the stream once: ``stop`` then close, or (network drop) cut the connection."""
        if self.ending or self.ws is None:
            if self.report.ended_by is None:
                self.report.ended_by = reason
            return
        self.ending = True
        self.report.ended_by = reason
        self.end_t = self._now()
        if self.started:
            self._echo(self.queue.advance(self._clock(self.end_t)))
        if reason == "network_drop":
            self.stop_sent = True  # nothing more goes out
            assert self.media_http is not None
            await self.media_http.close()  # drops the TCP connection: no stop, no close frame
            return
        self._emit("stop", {"stop": {"accountSid": self.cfg.account_sid, "callSid": self.call_sid}})
        self.stop_sent = True
        with contextlib.suppress(asyncio.QueueFull):
            self.outbox.put_nowait(None)
        if self.writer is not None:
            await asyncio.wait({self.writer}, timeout=CLOSE_TIMEOUT_S)
        with contextlib.suppress(TimeoutError, ConnectionError, aiohttp.ClientError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.ws.close()

    async def _close(self, reason: str) -> None:
        """End the stream if the scenario did not, then close the text socket politely."""
        if self.end_tasks:
            await asyncio.wait(self.end_tasks, timeout=CLOSE_TIMEOUT_S)
        if not self.ending and self.ws is not None:
            await self._end(reason)
        if self.text_ws is not None and not self.text_ws.closed:
            # A moment for the service's call_ended, then close our side.
            await self._wait_for(lambda: self.report.call_ended_event, 1.0, after_end=True)
            with contextlib.suppress(TimeoutError, ConnectionError, aiohttp.ClientError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self.text_ws.close()

    async def _release(self) -> None:
        """Cancel the call's tasks and close its sessions; waits on nothing the peer controls."""
        for task in self.background + self.end_tasks:
            task.cancel()
        results = await asyncio.gather(*self.background, *self.end_tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("call %s: task failed: %r", self.call_sid, result)
        if self.rest is not None:
            self.rest.unregister(self.call_sid)
        for session in (self.http, self.media_http):
            if session is not None and not session.closed:
                await session.close()

    # ---------------------------------------------------------------- the report

    def _fill_report(self) -> None:
        r, q = self.report, self.queue
        if self.started:
            end_t = self.end_t if self.end_t is not None else self._now()
            r.duration_s = round(end_t - self.t0, 3)
        r.played_samples = len(q.out)
        r.audio_ms_played = round(1000.0 * q.played_audio / SAMPLE_RATE, 1)
        r.audio_ms_cleared = round(1000.0 * q.cleared_bytes / SAMPLE_RATE, 1)
        r.audio_ms_unplayed = round(1000.0 * q.queued / SAMPLE_RATE, 1)
        r.audio_ms_discarded = round(1000.0 * q.discarded_bytes / SAMPLE_RATE, 1)
        r.audio_ms_received = round(r.audio_ms_received, 1)
        r.marks_unechoed = len(q.pending_marks)
        r.lost_or_reordered = r.marks_unechoed + r.marks_out_of_order + self.discarded_msgs
        gaps = [(a, b) for a, b in q.gaps if b - a >= MIN_GAP_SAMPLES]
        turn_gaps = {id(t): self._turn_gaps(t, gaps) for t in self.turns}
        all_gaps = [g for gs in turn_gaps.values() for g in gs]
        r.underruns = len(all_gaps)
        r.gaps_ms = {"max": round(max(all_gaps, default=0.0), 1), "total": round(sum(all_gaps), 1)}
        text_turns = [t for t in self.turns if t.kind == "text"]
        r.ttfa_ms = summarize([self._ttfa(t) for t in text_turns])
        r.ttfa_heard_ms = summarize([self._ttfa_heard(t) for t in text_turns])
        r.max_queue_ms = round(1000.0 * max((t.max_queue_bytes for t in self.turns), default=0) / SAMPLE_RATE, 1)
        r.pacing_jitter_ms = self._pacing()
        if self.speech_start_t is not None:
            after = [t for t in self.clear_times if t >= self.speech_start_t]
            r.barge_in_to_clear_ms = _ms(after[0] - self.speech_start_t) if after else None
        r.media_after_clear = sum(t.media_after_clear for t in self.turns)
        r.turns = [self._turn_json(t, turn_gaps[id(t)]) for t in sorted(self.turns, key=lambda t: t.index)]

    @staticmethod
    def _turn_gaps(turn: TurnStats, gaps: list[tuple[int, int]]) -> list[float]:
        """Dry spells between two pieces of this turn's audio, in ms."""
        if turn.first_sample is None or turn.end_sample is None:
            return []
        return [1000.0 * (b - a) / SAMPLE_RATE for a, b in gaps if turn.first_sample <= a and b < turn.end_sample]

    @staticmethod
    def _ttfa(turn: TurnStats) -> float | None:
        return _ms(turn.first_media_t - turn.sent_t) if turn.first_media_t is not None else None

    def _ttfa_heard(self, turn: TurnStats) -> float | None:
        if turn.first_sample is None or turn.first_media_t is None:
            return None
        # Sample arithmetic floors by up to 1/8 ms: never report hearing before arrival.
        heard_t = max(self.t0 + turn.first_sample / SAMPLE_RATE, turn.first_media_t)
        return _ms(heard_t - turn.sent_t)

    def _pacing(self) -> dict[str, float | int | None]:
        """Spacing of media arrivals within each turn: interval stats, and the mean distance
        of each interval from the audio length of the message before it."""
        intervals: list[float] = []
        deviations: list[float] = []
        for turn in self.turns:
            for (t_prev, n_prev), (t_next, _) in zip(turn.arrivals, turn.arrivals[1:]):
                gap = 1000.0 * (t_next - t_prev)
                intervals.append(gap)
                deviations.append(abs(gap - 1000.0 * n_prev / SAMPLE_RATE))
        if not intervals:
            return {"n": 0, "mean": None, "std": None, "p95": None, "max": None, "mean_abs_dev": None}
        arr = np.array(intervals)
        return {
            "n": len(intervals),
            "mean": round(float(arr.mean()), 2),
            "std": round(float(arr.std()), 2),
            "p95": round(float(np.percentile(arr, 95)), 2),
            "max": round(float(arr.max()), 2),
            "mean_abs_dev": round(float(np.mean(deviations)), 2),
        }

    def _turn_json(self, turn: TurnStats, gaps: list[float]) -> dict[str, Any]:
        def rel(t: float | None) -> float | None:
            return None if t is None else _ms(t - self.t0)

        return {
            "index": turn.index,
            "kind": turn.kind,
            "text": turn.text,
            "turn_id": turn.turn_id,
            "sent_ms": rel(turn.sent_t),
            "text_done_ms": rel(turn.text_done_t),
            "done_ms": rel(turn.done_t),
            "ttfa_ms": self._ttfa(turn),
            "ttfa_heard_ms": self._ttfa_heard(turn),
            "service_first_audio_ms": rel(turn.service_first_audio_t),
            "chunks": turn.chunks,
            "audio_ms": round(1000.0 * turn.audio_bytes / SAMPLE_RATE, 1),
            "played_ms": round(1000.0 * turn.played_bytes / SAMPLE_RATE, 1),
            "underruns": len(gaps),
            "gaps_ms": {"max": round(max(gaps, default=0.0), 1), "total": round(sum(gaps), 1)},
            "max_queue_ms": round(1000.0 * turn.max_queue_bytes / SAMPLE_RATE, 1),
            "cleared": turn.cleared,
            "media_after_clear": turn.media_after_clear,
            "interrupted": turn.interrupted,
            "state": turn.state,
            "heard": turn.heard,
            "barge_in_heard": turn.barge_in_heard,
            "timed_out": turn.timed_out,
            "error": turn.error,
        }


# ------------------------------------------------------------------------------ entry points


def _wav_path(cfg: SimConfig, index: int) -> Path | None:
    if cfg.out_wav is None:
        return None
    if cfg.calls == 1:
        return cfg.out_wav
    return cfg.out_wav.with_name(f"{cfg.out_wav.stem}-{index + 1}{cfg.out_wav.suffix}")


def _write_wav(path: Path, ulaw: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), ulaw_decode(ulaw), SAMPLE_RATE, subtype="PCM_16")


async def simulate_call(cfg: SimConfig, index: int = 0, *, rest: FakeTwilioRest | None = None) -> CallReport:
    """Place one call (``index`` 0-based) and return what it measured; never raises for a
    failing service (the report's ``error`` says what went wrong). Ends within ``max_call_s``.

    With ``rest`` (or ``cfg.rest_server``), the call is registered there while live so a REST hang-up can end it. With
    ``cfg.out_wav``, the played audio is written (8 kHz 16-bit; ``stem-<index+1>`` when
    ``cfg.calls > 1``).
    """
    if not cfg.allow_remote and not is_loopback_url(cfg.base_url):
        raise SimulatorError(f"base_url={cfg.base_url!r} is not a loopback address")
    rest = rest if rest is not None else cfg.rest_server
    caller = await asyncio.to_thread(_caller_track, cfg)  # file I/O and resampling off the loop
    run = _CallRun(cfg, index, rest, caller)
    report = await run.run()
    path = _wav_path(cfg, index)
    if path is not None and run.started:
        await asyncio.to_thread(_write_wav, path, bytes(run.queue.out))
        report.wav_path = str(path)
    return report


async def run_simulation(cfg: SimConfig, *, rest: FakeTwilioRest | None = None) -> list[CallReport]:
    """Place ``cfg.calls`` concurrent calls; writes ``cfg.report_path`` as
    ``{"calls": [...], "summary": {...}}`` when set."""

    async def one(i: int) -> CallReport:
        if cfg.stagger_s > 0:
            await asyncio.sleep(i * cfg.stagger_s)
        return await simulate_call(cfg, i, rest=rest)

    rest = rest if rest is not None else cfg.rest_server
    reports = list(await asyncio.gather(*(one(i) for i in range(cfg.calls))))
    if cfg.report_path is not None:
        doc = {"calls": [r.to_json() for r in reports], "summary": summarize_reports(reports)}
        path = cfg.report_path

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=2) + "\n")

        await asyncio.to_thread(write)
    return reports


# ------------------------------------------------------------------------------------- CLI


def _parse_dtmf(value: str) -> tuple[float, str]:
    at, sep, digit = value.partition(":")
    try:
        if not sep:
            raise ValueError
        return float(at), digit
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dtmf {value!r}: expected SECONDS:DIGIT, e.g. 1.5:7") from None


def _parse_query(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--query {value!r}: expected KEY=VALUE")
    return key, val


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="callbridge simulate", description="Call a local callbridge as Twilio would.")
    p.add_argument("--base-url", required=True, help="where the service listens, e.g. http://127.0.0.1:8080")
    p.add_argument("--public-base-url", help="the URL Twilio would use (signed over; default: --base-url)")
    p.add_argument("--text", action="append", default=[], help="a turn to speak (repeatable)")
    p.add_argument("--stream-text", action="store_true", help="stream turns word by word over the text socket")
    p.add_argument("--word-delay-ms", type=float, default=50.0, help="pause between streamed words")
    p.add_argument("--caller-wav", type=Path, help="caller audio (any WAV; converted to 8 kHz mu-law)")
    p.add_argument("--barge-in-at", type=float, help="seconds after start to start talking over the bot")
    p.add_argument("--dtmf", type=_parse_dtmf, action="append", default=[], help="SECONDS:DIGIT (repeatable)")
    p.add_argument("--calls", type=int, default=1, help="concurrent calls")
    p.add_argument("--stagger-s", type=float, default=0.0, help="delay between call starts")
    p.add_argument("--query", type=_parse_query, action="append", default=[],
                   help="KEY=VALUE added to the webhook URL, e.g. greeting=Hello (repeatable)")
    p.add_argument("--greeting", action=argparse.BooleanOptionalAction, default=None,
                   help="wait for a greeting before the first turn (default: if one is passed)")
    p.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN", ""),
                   help="Twilio auth token to sign with (env TWILIO_AUTH_TOKEN)")
    p.add_argument("--api-token", default=os.environ.get("CALLBRIDGE_API_TOKEN", ""),
                   help="control API bearer token (env CALLBRIDGE_API_TOKEN)")
    p.add_argument("--account-sid", default=os.environ.get("TWILIO_ACCOUNT_SID", DEFAULT_ACCOUNT_SID))
    p.add_argument("--rest-port", type=int, help="also serve Twilio's REST hang-up on 127.0.0.1:PORT")
    p.add_argument("--drop-network", action="store_true", help="end by cutting the connection, no stop")
    p.add_argument("--max-call-s", type=float, default=60.0)
    p.add_argument("--turn-timeout-s", type=float, default=30.0)
    p.add_argument("--out", type=Path, help="WAV of what the caller heard (heard-N.wav per call if several)")
    p.add_argument("--report", type=Path, help="JSON report")
    p.add_argument("--allow-remote", action="store_true", help="allow a base URL that is not loopback")
    return p


async def _cli_run(cfg: SimConfig, rest_port: int | None) -> list[CallReport]:
    rest: FakeTwilioRest | None = None
    if rest_port is not None:
        rest = FakeTwilioRest(cfg.account_sid, cfg.twilio_auth_token, port=rest_port)
        print(f"Twilio REST stand-in at {await rest.start()}", flush=True)
    try:
        return await run_simulation(cfg, rest=rest)
    finally:
        if rest is not None:
            await rest.stop()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_report(report: CallReport) -> str:
    """One human line per call, plus its protocol errors."""
    r = report
    head = f"call {r.index + 1} {r.call_sid}"
    if r.rejected:
        return f"{head}: rejected by the service (full)"
    lines = [
        f"{head}: ended by {r.ended_by} after {r.duration_s:.1f} s; {r.ttfa_ms['n']} turns, "
        f"ttfa p50 {_fmt(r.ttfa_ms['p50'])} ms (heard {_fmt(r.ttfa_heard_ms['p50'])} ms), "
        f"{r.chunks} chunks, underruns {r.underruns} (max gap {r.gaps_ms['max']:.0f} ms), "
        f"marks {r.marks_echoed}/{r.marks_sent}, lost/reordered {r.lost_or_reordered}, "
        f"protocol errors {r.protocol_error_count}"
        + (f", barge-in->clear {_fmt(r.barge_in_to_clear_ms)} ms" if r.barge_in_to_clear_ms is not None else "")
    ]
    lines += [f"  protocol error: {e}" for e in r.protocol_errors[:10]]
    if r.error:
        lines.append(f"  error: {r.error}")
    return "\n".join(lines)


def main_simulate(argv: Sequence[str] | None = None) -> int:
    """``callbridge simulate …``: 0 when every call is clean, 1 when any had an error, a
    protocol violation or a lost mark, 2 for bad arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["simulate"]:
        args = args[1:]
    try:
        ns = _parser().parse_args(args)
    except SystemExit as exc:  # --help, or argparse's own usage error
        return exc.code if isinstance(exc.code, int) else 2
    try:
        cfg = SimConfig(
            base_url=ns.base_url, public_base_url=ns.public_base_url, twilio_auth_token=ns.auth_token,
            account_sid=ns.account_sid, api_token=ns.api_token, texts=ns.text, stream_text=ns.stream_text,
            caller_wav=ns.caller_wav, barge_in_at_s=ns.barge_in_at, dtmf=ns.dtmf, calls=ns.calls,
            max_call_s=ns.max_call_s, webhook_query=dict(ns.query), drop_network=ns.drop_network,
            out_wav=ns.out, report_path=ns.report, allow_remote=ns.allow_remote, expect_greeting=ns.greeting,
            word_delay_s=ns.word_delay_ms / 1000.0, turn_timeout_s=ns.turn_timeout_s, stagger_s=ns.stagger_s,
        )
    except SimulatorError as exc:
        print(f"callbridge simulate: {exc}", file=sys.stderr)
        return 2
    if ns.caller_wav is not None and not ns.caller_wav.is_file():
        print(f"callbridge simulate: --caller-wav {ns.caller_wav}: no such file", file=sys.stderr)
        return 2
    started = time.monotonic()
    reports = asyncio.run(_cli_run(cfg, ns.rest_port))
    for report in reports:
        print(format_report(report))
    s = summarize_reports(reports)
    print(
        f"{s['calls']} call(s) in {time.monotonic() - started:.1f} s: {s['ok']} clean, {s['rejected']} rejected; "
        f"ttfa p50/p95 {_fmt(s['ttfa_ms']['p50'])}/{_fmt(s['ttfa_ms']['p95'])} ms; "
        f"underruns {s['underruns']}; lost/reordered {s['lost_or_reordered']}; "
        f"protocol errors {s['protocol_errors']}"
    )
    written = [r.wav_path for r in reports if r.wav_path] + ([str(cfg.report_path)] if cfg.report_path else [])
    if written:
        print("wrote " + ", ".join(written))
    return 0 if all(r.ok for r in reports) else 1
