"""Speech-to-text behind one interface, and the guards every backend's output passes through.

A backend (:class:`Transcriber`) turns one VAD-bounded utterance (16 kHz float32) into
:class:`Segment` values and nothing else; the rules that make Whisper usable on a phone line
live here, once, for every backend:

- **decode settings** (:class:`DecodeOptions`), which each backend must honour: temperature 0
  with no fallback loop (a fallback decodes up to 5 more times and is where invented text
  comes from), no conditioning on previous text (each utterance stands alone), English
  (``.en`` models), greedy by default;
- **guards** (:class:`Guards`, :func:`apply_guards`): a segment is dropped if its no-speech
  probability is high **or** its mean log-probability is low **or** it repeats itself.
  Whisper's own rule drops a segment only when no-speech is high *and* log-probability is
  low; on phone-line noise tiny.en gave "." with no_speech_prob 0.95 and avg_logprob -0.96,
  which passes Whisper's rule and fails ours (shared/docs/caller-speech.md). Text that is
  only punctuation is dropped too.
"""

from __future__ import annotations

import abc
import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "STT_RATE",
    "DecodeOptions",
    "DropReason",
    "Guards",
    "Segment",
    "Transcriber",
    "TranscriberError",
    "Transcript",
    "Word",
    "apply_guards",
]

STT_RATE = 16000  # Hz: what every Whisper takes


class TranscriberError(Exception):
    """A transcriber cannot be built (model missing, package missing); the message says what to do."""


@dataclass(frozen=True)
class Word:
    """One word with its time inside the utterance's audio (s) and its probability."""

    word: str
    start: float
    end: float
    p: float

    def to_json(self) -> dict[str, Any]:
        return {"word": self.word, "start": round(self.start, 3), "end": round(self.end, 3), "p": round(self.p, 4)}


@dataclass(frozen=True)
class Segment:
    """What a backend decoded for one stretch of the utterance, with Whisper's own confidence figures."""

    text: str
    start: float
    end: float
    no_speech_prob: float
    avg_logprob: float
    compression_ratio: float
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class DecodeOptions:
    """How every backend decodes. Not the place for temperature or conditioning: those are fixed."""

    language: str = "en"
    beam_size: int = 1  # greedy: the lowest latency; raise for accuracy
    word_timestamps: bool = True  # a second (alignment) pass; costs time on CPU

    def __post_init__(self) -> None:
        if not 1 <= self.beam_size <= 10:
            raise ValueError(f"beam_size must be 1…10, got {self.beam_size}")


class Transcriber(abc.ABC):
    """One loaded speech-to-text model. Blocking; used from the speech worker's thread only."""

    name: str  # backend name, e.g. "faster-whisper"

    def __init__(self, options: DecodeOptions | None = None) -> None:
        self.options = options or DecodeOptions()

    @abc.abstractmethod
    def decode(self, audio16k: np.ndarray) -> list[Segment]:
        """Decode one utterance: float32 ``[N]`` at :data:`STT_RATE`, in [-1, 1]; every segment, unfiltered.

        Implementations decode at temperature 0 with no fallback and no conditioning on
        previous text, and apply none of Whisper's own segment filters (:func:`apply_guards` does).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model (called once, on the worker thread, at shutdown)."""


class DropReason(enum.Enum):
    NO_SPEECH = "no_speech"  # the model thinks there is no speech
    LOW_LOGPROB = "low_logprob"  # the model is not confident in its words
    REPETITION = "repetition"  # compression ratio too high: a decoding loop
    EMPTY = "empty"  # nothing but punctuation or whitespace


@dataclass(frozen=True)
class Guards:
    """Thresholds a segment must pass. Whisper's defaults, applied with OR rather than AND."""

    no_speech_threshold: float = 0.6  # drop if no_speech_prob > this
    logprob_threshold: float = -1.0  # drop if avg_logprob < this
    compression_ratio_threshold: float = 2.4  # drop if compression_ratio > this

    def __post_init__(self) -> None:
        if not 0.0 <= self.no_speech_threshold <= 1.0:
            raise ValueError(f"no_speech_threshold must be 0…1, got {self.no_speech_threshold}")
        if self.logprob_threshold > 0.0:
            raise ValueError(f"logprob_threshold must be <= 0, got {self.logprob_threshold}")
        if self.compression_ratio_threshold <= 1.0:
            raise ValueError(f"compression_ratio_threshold must be > 1, got {self.compression_ratio_threshold}")

    def verdict(self, seg: Segment) -> DropReason | None:
        """Why ``seg`` is dropped, or None if it is kept."""
        if not _WORDY.search(seg.text):
            return DropReason.EMPTY
        if not seg.no_speech_prob <= self.no_speech_threshold:  # NaN is dropped too
            return DropReason.NO_SPEECH
        if not seg.avg_logprob >= self.logprob_threshold:
            return DropReason.LOW_LOGPROB
        if not seg.compression_ratio <= self.compression_ratio_threshold:
            return DropReason.REPETITION
        return None


_WORDY = re.compile(r"\w")


@dataclass(frozen=True)
class Transcript:
    """The final text of one utterance, after the guards. Caller data: never logged at INFO.

    ``words`` times are seconds inside the utterance's audio (which starts ``pre_roll_ms``
    before the caller's first voiced frame). ``no_speech_prob`` is the highest and
    ``avg_logprob`` the lowest among the kept segments (the figures the guards compared);
    ``stt_ms`` is the transcriber's own time, queueing excluded.
    """

    utterance_id: str
    text: str
    words: tuple[Word, ...]
    no_speech_prob: float
    avg_logprob: float
    stt_ms: float
    final: bool = True
    dropped: tuple[DropReason, ...] = field(default=())  # reasons of the segments left out

    def to_json(self) -> dict[str, Any]:
        return {
            "utterance_id": self.utterance_id,
            "text": self.text,
            "final": self.final,
            "words": [w.to_json() for w in self.words],
            "no_speech_prob": round(self.no_speech_prob, 4),
            "avg_logprob": round(self.avg_logprob, 4),
            "stt_ms": round(self.stt_ms, 1),
        }


def apply_guards(
    utterance_id: str, segments: list[Segment], guards: Guards, stt_ms: float
) -> Transcript | tuple[DropReason, ...]:
    """Keep the segments that pass; a :class:`Transcript` of them, or every drop reason if none passed."""
    kept: list[Segment] = []
    dropped: list[DropReason] = []
    for seg in segments:
        why = guards.verdict(seg)
        if why is None:
            kept.append(seg)
        else:
            dropped.append(why)
    if not kept:
        return tuple(dropped) or (DropReason.EMPTY,)
    text = " ".join(seg.text.strip() for seg in kept)
    return Transcript(
        utterance_id=utterance_id,
        text=text,
        words=tuple(w for seg in kept for w in seg.words),
        no_speech_prob=max(seg.no_speech_prob for seg in kept),
        avg_logprob=min(seg.avg_logprob for seg in kept),
        stt_ms=stt_ms,
        dropped=tuple(dropped),
    )


def finite_or(x: float, default: float) -> float:
    """``x`` if finite, else ``default``: a backend's NaN never reaches the guards or JSON (an
    infinite default fails the guards, so the segment is dropped)."""
    return x if math.isfinite(x) else default
