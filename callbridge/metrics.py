"""Prometheus metrics, one registry per app (so tests can run several apps in one process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFA_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.calls_total = Counter("callbridge_calls_total", "Calls by outcome", ["outcome"], registry=r)
        self.calls_active = Gauge("callbridge_calls_active", "Calls with an open media stream", registry=r)
        self.turns_total = Counter("callbridge_turns_total", "Turns by outcome", ["outcome"], registry=r)
        self.ttfa_seconds = Histogram(
            "callbridge_ttfa_seconds",
            "Server-side time to first audio: turn accepted -> first mu-law chunk handed to the socket",
            buckets=TTFA_BUCKETS,
            registry=r,
        )
        self.underruns_total = Counter(
            "callbridge_underruns_total", "Times a turn's audio was not ready when its send deadline came", registry=r
        )
        self.chunks_sent_total = Counter("callbridge_chunks_sent_total", "20 ms mu-law chunks sent", registry=r)
        self.marks_sent_total = Counter("callbridge_marks_sent_total", "Marks sent to Twilio", registry=r)
        self.marks_echoed_total = Counter("callbridge_marks_echoed_total", "Marks Twilio echoed back", registry=r)
        self.barge_ins_total = Counter("callbridge_barge_ins_total", "Caller interruptions", registry=r)
        self.protocol_errors_total = Counter(
            "callbridge_protocol_errors_total", "Calls ended by a protocol error", ["code"], registry=r
        )
        self.rejected_total = Counter("callbridge_rejected_total", "Requests refused", ["reason"], registry=r)
        self.tts_streams_active = Gauge("callbridge_tts_streams_active", "Streams the TTS worker is stepping", registry=r)
        self.tts_worker_ready = Gauge(
            "callbridge_tts_worker_ready", "1 when the TTS worker is warmed up and serving (calls are admitted)",
            registry=r,
        )
        self.tts_worker_faults_total = Counter(
            "callbridge_tts_worker_faults_total", "TTS worker faults (start-up failed, runner broken, thread died)",
            registry=r,
        )
        self.tts_worker_restarts_total = Counter(
            "callbridge_tts_worker_restarts_total", "TTS worker restarts after a fault", registry=r
        )

        self.placed_elsewhere_total = Counter(
            "callbridge_placed_elsewhere_total", "Webhooks answered here with a call placed on another instance",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
