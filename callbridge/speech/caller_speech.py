"""One call's caller speech: endpointing, transcription through the shared worker, events out.

A :class:`CallerSpeech` is a caller-audio consumer: the call hands it every caller frame
(:meth:`on_caller_audio`, on the event loop) and gets back, through ``emit``, the events an
app sees (docs in README "Caller speech"):

- ``caller_speech_started {utterance_id, t_ms, during_bot}``
- ``caller_speech_stopped {utterance_id, t_ms, speech_ms, reason}``
- ``caller_transcript {utterance_id, text, final, words, no_speech_prob, avg_logprob, stt_ms,
  eos_to_final_ms, during_bot}``
- ``caller_transcript_dropped {utterance_id, reason}`` when the guards found no speech (noise,
  silence, an unsure decode); ``caller_transcript_failed {utterance_id, error, message}`` when
  the transcriber failed, ran out of memory, was overloaded or is unavailable.

Every ``caller_speech_stopped`` is followed by exactly one of the last three, in utterance
order for a given worker. ``eos_to_final_ms``: from the moment the endpointer decided the
utterance had ended (when ``caller_speech_stopped`` went out) to the transcript's emission,
on the monotonic clock; it includes queueing and the hop back to the loop, not the
``silence_ms`` the endpointer waited first. Nothing here logs caller data above DEBUG.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from .endpoint import Endpointer, EndpointerConfig, SpeechStarted, SpeechStopped
from .transcriber import Transcript
from .worker import Dropped, Failed, FailureKind, Outcome, SpeechJob, SpeechWorker

__all__ = ["CallerFrame", "CallerSpeech"]

log = logging.getLogger(__name__)


class CallerFrame(Protocol):
    """What a call hands its caller-audio consumers (``calls.leg.CallerAudio`` fits)."""

    @property
    def pcm16(self) -> np.ndarray: ...

    @property
    def sample_rate(self) -> int: ...


class CallerSpeech:
    """Per call. ``bot_audible()`` says whether the bot's audio is playing to the caller now.

    ``worker`` None: speech events only, no transcripts (``speech.enabled`` with no model is
    refused at start-up; this is for apps that want endpointing alone and for tests).
    """

    def __init__(
        self,
        emit: Callable[[dict[str, Any]], None],
        worker: SpeechWorker | None,
        config: EndpointerConfig | None = None,
        *,
        bot_audible: Callable[[], bool] = lambda: False,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self._worker = worker
        self._config = config or EndpointerConfig()
        self._bot_audible = bot_audible
        self._log = logger or log
        self._clock = clock
        self._endpointer: Endpointer | None = None  # built on the first frame, at its rate
        self._pending: dict[str, tuple[float, bool]] = {}  # utterance id → (stopped at, during_bot)
        self._closed = False
        self.late_outcomes = 0  # outcomes that arrived after close (not emitted)

    @property
    def pending(self) -> int:
        """Utterances stopped whose outcome has not come back yet."""
        return len(self._pending)

    def on_caller_audio(self, frame: CallerFrame) -> None:
        """One caller frame, as the carrier delivered it (speech or not)."""
        if self._closed:
            return
        ep = self._endpointer
        if ep is None or ep.sample_rate != frame.sample_rate:
            if ep is not None:
                self._handle(ep.flush())
            ep = self._endpointer = Endpointer(self._config, frame.sample_rate)
        self._handle(ep.feed(frame.pcm16, bot_audible=self._bot_audible()))

    def close(self, *, flush: bool = False) -> None:
        """The call is ending. ``flush``: an utterance in progress is stopped and transcribed first."""
        if self._closed:
            return
        if flush and self._endpointer is not None:
            self._handle(self._endpointer.flush())
        self._closed = True

    # ------------------------------------------------------------------ events

    def _handle(self, events: list[SpeechStarted | SpeechStopped]) -> None:
        for ev in events:
            if isinstance(ev, SpeechStarted):
                self._emit({"event": "caller_speech_started", "utterance_id": ev.utterance_id,
                            "t_ms": ev.t_ms, "during_bot": ev.during_bot})
            else:
                self._emit({"event": "caller_speech_stopped", "utterance_id": ev.utterance_id,
                            "t_ms": ev.t_ms, "speech_ms": ev.speech_ms, "reason": ev.reason})
                self._transcribe(ev)

    def _transcribe(self, ev: SpeechStopped) -> None:
        self._pending[ev.utterance_id] = (self._clock(), ev.during_bot)
        if self._worker is None:
            self._on_outcome(Failed(ev.utterance_id, FailureKind.UNAVAILABLE, "no transcriber configured"))
            return
        job = SpeechJob(ev.utterance_id, ev.audio, ev.sample_rate, asyncio.get_running_loop(), self._on_outcome)
        refused = self._worker.submit(job)
        if refused is not None:
            self._on_outcome(refused)

    def _on_outcome(self, outcome: Outcome) -> None:
        """On the loop: turn a worker outcome into the event that closes its utterance."""
        entry = self._pending.pop(outcome.utterance_id, None)
        if self._closed or entry is None:
            self.late_outcomes += 1
            self._log.debug("speech outcome after the call ended: not emitted")
            return
        stopped_at, during_bot = entry
        if isinstance(outcome, Transcript):
            event = outcome.to_json()
            event["eos_to_final_ms"] = round((self._clock() - stopped_at) * 1000.0, 1)
            event["during_bot"] = during_bot
            self._emit({"event": "caller_transcript", **event})
            if self._log.isEnabledFor(logging.DEBUG):
                self._log.debug("caller transcript %s: %d words", outcome.utterance_id, len(outcome.words))
        elif isinstance(outcome, Dropped):
            self._emit({"event": "caller_transcript_dropped", "utterance_id": outcome.utterance_id,
                        "reason": outcome.reasons[0].value})
        else:
            self._emit({"event": "caller_transcript_failed", "utterance_id": outcome.utterance_id,
                        "error": outcome.kind.value, "message": outcome.message})
