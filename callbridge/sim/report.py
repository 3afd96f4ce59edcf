"""What a simulated call measured: per-turn stats, the call report, and summaries over calls."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

TurnKind = Literal["greeting", "text", "answer"]  # answer: a turn the service or its app queued


# ------------------------------------------------------------------------------- turns


@dataclass
class TurnStats:
    """One turn as the simulator saw it. Times are loop seconds; samples count from start."""

    index: int  # 0 = greeting, 1.. = text turns in order, then answers (turns we did not send)
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
    # What the service made of the caller's speech (--caller-wav), in order: one entry per
    # utterance, {"utterance_id", "outcome": "transcript" | "dropped" | "failed", "text",
    # "reason", "eos_to_final_ms", "during_bot"} (from the text socket's caller_transcript* events).
    transcripts: list[dict[str, Any]] = field(default_factory=list)
    service_errors: list[str] = field(default_factory=list)
    call_ended_event: bool = False
    error: str | None = None
    wav_path: str | None = None
    refusal: str | None = None  # when rejected: "busy" (<Reject>) or "not_configured" (<Say>, <Hangup/>)
    refusal_said: str | None = None  # what the service's <Say> told the caller

    @property
    def ok(self) -> bool:
        """No error, no protocol violation and no lost or reordered media or mark."""
        return self.error is None and not self.protocol_error_count and not self.lost_or_reordered

    @property
    def clean(self) -> bool:
        """``ok`` and the caller heard every turn without a gap: no underrun."""
        return self.ok and not self.underruns

    @property
    def interrupted_turns(self) -> int:
        """Turns the service reports interrupted, or that a ``clear`` cut."""
        return sum(1 for t in self.turns if t.get("state") == "interrupted" or t.get("interrupted") or t.get("cleared"))

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
        "clean": sum(r.clean and not r.rejected for r in reports),
        "with_underruns": sum(r.ok and not r.clean for r in reports),
        "failed": sum(not r.ok for r in reports),
        "interrupted_turns": sum(r.interrupted_turns for r in reports),
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
