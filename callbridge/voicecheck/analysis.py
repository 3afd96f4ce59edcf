"""The voice check's judgement: audio and text in, figures and failures out. No model, no I/O.

Every figure comes from what a turn produced (its 24 kHz audio, the 8 kHz audio a caller
hears, the words speech-to-text heard in it, its speaker embedding) and what it was asked to
say, so each rule is tested with audio whose answer is known (tests/callbridge/voicecheck).
Synthesis, transcription and embedding happen at the edge (:mod:`.run`).

Per turn: word error rate (:mod:`callbridge.speech.wer`, one normaliser), a **prompt leak**
(the turn opens with a run of the prompt's own words that the sentence does not hold),
non-silent audio before the first heard word, speech level, peak and clipping, speaking rate
(the sentence's words over the time the turn is audible), speaker similarity to the prompt
and to the other turns, and time to first audio. Thresholds are ``[voice_check]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import VoiceCheckSettings
from ..speech.transcriber import Word
from ..speech.wer import normalise, word_errors

__all__ = [
    "CheckResult",
    "Leak",
    "Level",
    "PromptInput",
    "TurnFigures",
    "TurnInput",
    "analyse",
    "cosine",
    "find_leak",
    "measure_level",
    "pre_speech_ms",
    "speech_span",
]

FRAME_MS = 20  # level frames
ACTIVE_DBFS = -45.0  # a 20 ms frame above this RMS is audible on a phone line (line noise is about -60)
CLIP_LEVEL = 0.999  # |sample| at or above this is at full scale
# Whisper's word starts are loose by up to about 0.2 s; audio this close before the first
# word counts as that word's onset, not as something said before it.
ONSET_SLACK_S = 0.2


@dataclass(frozen=True)
class TurnInput:
    """One synthesized turn, as the check's edge produced it."""

    text: str  # what the turn was asked to say
    pcm24k: np.ndarray  # float32 [N], 24 kHz: the TTS output
    pcm8k: np.ndarray  # float32 [M], 8 kHz: decoded from the mu-law chunks a call sends
    heard: tuple[Word, ...]  # speech-to-text words of pcm8k, seconds from the turn's start
    heard_text: str = ""  # the STT's text (its own spacing: "o'clock" is one word there, two in ``heard``)
    embedding: np.ndarray | None = None  # speaker embedding of pcm24k (None: no speaker model)
    ttfa_s: float | None = None  # open → first 8 kHz chunk ready to send
    first_frame_s: float | None = None  # open → first 80 ms frame on the worker
    parts: int = 1  # parts the TTS spoke the turn in


@dataclass(frozen=True)
class PromptInput:
    """The voice's own prompt: its transcript and its speaker embedding."""

    transcript: str
    embedding: np.ndarray | None = None


@dataclass(frozen=True)
class Leak:
    """Prompt words heard at the opening of a turn."""

    words: tuple[str, ...]
    at_s: float  # where the first of them starts in the turn
    end_s: float  # where the last of them ends

    def to_json(self) -> dict[str, Any]:
        return {"words": " ".join(self.words), "at_s": round(self.at_s, 3), "end_s": round(self.end_s, 3)}


@dataclass(frozen=True)
class Level:
    """Loudness of a turn: RMS of its audible frames, peak, and the share of samples at full scale."""

    rms_dbfs: float
    peak_dbfs: float
    clipped_fraction: float


@dataclass
class TurnFigures:
    index: int
    text: str
    heard_text: str
    reference_words: int
    errors: int
    wer: float
    leak: Leak | None
    pre_speech_ms: float | None  # None: no word heard
    level: Level
    speech_s: float  # first to last audible frame
    duration_s: float
    words_per_s: float | None
    chars_per_s: float | None
    prompt_similarity: float | None
    turn_similarity: float | None
    ttfa_s: float | None
    first_frame_s: float | None
    parts: int
    heard: tuple[Word, ...]
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def r(x: float | None, n: int = 3) -> float | None:
            return None if x is None or not math.isfinite(x) else round(x, n)

        return {
            "index": self.index,
            "text": self.text,
            "heard": self.heard_text,
            "wer": r(self.wer),
            "errors": self.errors,
            "reference_words": self.reference_words,
            "leak": self.leak.to_json() if self.leak else None,
            "pre_speech_ms": r(self.pre_speech_ms, 1),
            "rms_dbfs": r(self.level.rms_dbfs, 1),
            "peak_dbfs": r(self.level.peak_dbfs, 1),
            "clipped_fraction": r(self.level.clipped_fraction, 6),
            "speech_s": r(self.speech_s),
            "duration_s": r(self.duration_s),
            "words_per_s": r(self.words_per_s, 2),
            "chars_per_s": r(self.chars_per_s, 1),
            "prompt_similarity": r(self.prompt_similarity),
            "turn_similarity": r(self.turn_similarity),
            "ttfa_s": r(self.ttfa_s),
            "first_frame_s": r(self.first_frame_s),
            "parts": self.parts,
            "words": [w.to_json() for w in self.heard],
            "failures": self.failures,
        }


@dataclass
class CheckResult:
    turns: list[TurnFigures]
    wer: float
    leak_turns: int
    similarity: list[list[float]] | None  # turn × turn cosine matrix; None without a speaker model
    failures: list[str]
    thresholds: VoiceCheckSettings

    @property
    def passed(self) -> bool:
        return not self.failures


# ---------------------------------------------------------------------------- audio figures


def _frame_dbfs(pcm: np.ndarray, rate: int) -> np.ndarray:
    """RMS level (dBFS) of each 20 ms frame ``[F]``; digital silence is -inf."""
    n = rate * FRAME_MS // 1000
    frames = pcm[: pcm.size - pcm.size % n].astype(np.float64).reshape(-1, n)
    if frames.size == 0:
        return np.zeros(0)
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    with np.errstate(divide="ignore"):
        return 20.0 * np.log10(rms)


def speech_span(pcm: np.ndarray, rate: int) -> tuple[float, float] | None:
    """Start and end (s) of the audible part: first to last 20 ms frame above :data:`ACTIVE_DBFS`."""
    active = np.flatnonzero(_frame_dbfs(pcm, rate) > ACTIVE_DBFS)
    if active.size == 0:
        return None
    return active[0] * FRAME_MS / 1000, (active[-1] + 1) * FRAME_MS / 1000


def measure_level(pcm: np.ndarray, rate: int) -> Level:
    """RMS over the audible frames (all frames when none is audible), peak, clipped share."""
    db = _frame_dbfs(pcm, rate)
    n = rate * FRAME_MS // 1000
    frames = pcm[: db.size * n].astype(np.float64).reshape(-1, n) if db.size else pcm.reshape(1, -1)
    chosen = frames[db > ACTIVE_DBFS] if np.any(db > ACTIVE_DBFS) else frames
    rms = math.sqrt(float(np.mean(chosen * chosen))) if chosen.size else 0.0
    peak = float(np.max(np.abs(pcm))) if pcm.size else 0.0
    clipped = float(np.count_nonzero(np.abs(pcm) >= CLIP_LEVEL)) / pcm.size if pcm.size else 0.0
    return Level(_db(rms), _db(peak), clipped)


def _db(x: float) -> float:
    return 20.0 * math.log10(x) if x > 0 else -math.inf


def pre_speech_ms(pcm: np.ndarray, rate: int, first_word_s: float) -> float:
    """Audible time (ms) before the first heard word, less :data:`ONSET_SLACK_S` of onset.

    Silence or near-silence before a turn is fine (the pad steps); a breath is short; a
    mumble, a click train or a leaked prompt the STT did not turn into words is not."""
    db = _frame_dbfs(pcm, rate)
    limit = int(max(0.0, first_word_s - ONSET_SLACK_S) * 1000 // FRAME_MS)
    return float(np.count_nonzero(db[:limit] > ACTIVE_DBFS) * FRAME_MS)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


# ---------------------------------------------------------------------------- words


def _tokens(words: Sequence[Word]) -> list[tuple[str, Word]]:
    """Normalised tokens of heard words, each with its word ("4,729" gives several)."""
    return [(token, w) for w in words for token in normalise(w.word)]


def find_leak(heard: Sequence[Word], prompt_transcript: str, text: str, *, min_words: int) -> Leak | None:
    """The prompt's own words at the opening of a turn, or None.

    The opening is as many heard words as the prompt has, plus ``min_words``: a leaked prompt
    comes before the turn's own words. A leak is a run of at least ``min_words`` consecutive
    heard words that is also a run of the prompt and not of the sentence (a sentence may share
    a phrase with its prompt: "thank you for calling" is not a leak when the sentence says it).
    """
    prompt = normalise(prompt_transcript)
    expected = normalise(text)
    k = min(min_words, len(prompt))
    if k == 0:
        return None
    grams = {tuple(prompt[i : i + k]) for i in range(len(prompt) - k + 1)}
    own = {tuple(expected[i : i + k]) for i in range(len(expected) - k + 1)}
    tokens = _tokens(heard)
    opening = tokens[: len(prompt) + k]
    words = [t for t, _ in opening]
    for i in range(len(words) - k + 1):
        gram = tuple(words[i : i + k])
        if gram in grams and gram not in own:
            end = i + k
            while end < len(words) and tuple(words[end - k + 1 : end + 1]) in grams:
                end += 1
            return Leak(tuple(words[i:end]), opening[i][1].start, opening[end - 1][1].end)
    return None


# ---------------------------------------------------------------------------- the check


def _turn(index: int, turn: TurnInput, prompt: PromptInput, t: VoiceCheckSettings) -> TurnFigures:
    reference = normalise(turn.text)
    if not reference:
        raise ValueError(f"turn {index}: the sentence has no words: {turn.text!r}")
    heard_text = turn.heard_text or " ".join(w.word for w in turn.heard)
    errors = word_errors(reference, normalise(heard_text))
    span = speech_span(turn.pcm24k, 24000)
    speech_s = span[1] - span[0] if span else 0.0
    rate_ok = speech_s >= 0.3  # shorter is a click, not a rate
    return TurnFigures(
        index=index,
        text=turn.text,
        heard_text=heard_text,
        reference_words=len(reference),
        errors=errors,
        wer=errors / len(reference),
        leak=find_leak(turn.heard, prompt.transcript, turn.text, min_words=t.leak_words),
        pre_speech_ms=pre_speech_ms(turn.pcm24k, 24000, turn.heard[0].start) if turn.heard else None,
        level=measure_level(turn.pcm24k, 24000),
        speech_s=speech_s,
        duration_s=turn.pcm24k.size / 24000,
        words_per_s=len(reference) / speech_s if rate_ok else None,
        chars_per_s=len(turn.text) / speech_s if rate_ok else None,
        prompt_similarity=(cosine(turn.embedding, prompt.embedding)
                           if turn.embedding is not None and prompt.embedding is not None else None),
        turn_similarity=None,
        ttfa_s=turn.ttfa_s,
        first_frame_s=turn.first_frame_s,
        parts=turn.parts,
        heard=turn.heard,
    )


def _judge(f: TurnFigures, t: VoiceCheckSettings) -> list[str]:
    """What of this turn fails a threshold, one line each."""
    out: list[str] = []
    if f.wer > t.max_turn_wer:
        out.append(f"word error rate {f.wer:.2f} > {t.max_turn_wer:g} (heard: {f.heard_text!r})")
    if f.pre_speech_ms is not None and f.pre_speech_ms > t.max_pre_speech_ms:
        out.append(f"{f.pre_speech_ms:.0f} ms of sound before the first word > {t.max_pre_speech_ms} ms")
    if f.prompt_similarity is not None and f.prompt_similarity < t.min_prompt_similarity:
        out.append(f"speaker similarity to the prompt {f.prompt_similarity:.2f} < {t.min_prompt_similarity:g}")
    if f.turn_similarity is not None and f.turn_similarity < t.min_turn_similarity:
        out.append(f"speaker similarity to the other turns {f.turn_similarity:.2f} < {t.min_turn_similarity:g}")
    if f.level.clipped_fraction > t.max_clipped_fraction:
        out.append(f"{f.level.clipped_fraction:.2%} of samples at full scale > {t.max_clipped_fraction:.2%}")
    if f.level.rms_dbfs < t.min_level_dbfs:
        out.append(f"speech level {f.level.rms_dbfs:.1f} dBFS < {t.min_level_dbfs:g} dBFS")
    if f.words_per_s is None:
        out.append("no audible speech")
    elif not t.min_words_per_s <= f.words_per_s <= t.max_words_per_s:
        out.append(f"speaking rate {f.words_per_s:.1f} words/s outside {t.min_words_per_s:g}-{t.max_words_per_s:g}")
    if t.max_ttfa_s > 0 and f.ttfa_s is not None and f.ttfa_s > t.max_ttfa_s:
        out.append(f"time to first audio {f.ttfa_s:.2f} s > {t.max_ttfa_s:g} s")
    return out


def analyse(turns: Sequence[TurnInput], prompt: PromptInput, thresholds: VoiceCheckSettings) -> CheckResult:
    """Figures of every turn and of the whole check, and every threshold that failed."""
    if not turns:
        raise ValueError("a voice check needs at least one turn")
    figures = [_turn(i, turn, prompt, thresholds) for i, turn in enumerate(turns, 1)]
    similarity: list[list[float]] | None = None
    embeddings = [turn.embedding for turn in turns]
    if all(e is not None for e in embeddings):
        similarity = [[cosine(a, b) for b in embeddings] for a in embeddings]  # type: ignore[arg-type]
        if len(turns) > 1:
            for i, f in enumerate(figures):
                f.turn_similarity = float(np.mean([similarity[i][j] for j in range(len(turns)) if j != i]))
    failures: list[str] = []
    for f in figures:
        f.failures = _judge(f, thresholds)
        failures += [f"turn {f.index}: {why}" for why in f.failures]
    total = sum(f.reference_words for f in figures)
    wer = sum(f.errors for f in figures) / total
    if wer > thresholds.max_wer:
        failures.append(f"overall word error rate {wer:.2f} > {thresholds.max_wer:g}")
    leaks = sum(f.leak is not None for f in figures)
    if leaks > thresholds.max_leak_turns:
        for f in figures:
            if f.leak is not None:
                why = f"opens with the prompt's own words at {f.leak.at_s:.2f} s: {' '.join(f.leak.words)!r}"
                f.failures.append(why)
                failures.append(f"turn {f.index}: {why}")
        failures.append(f"{leaks} turn(s) open with the prompt's words (allowed: {thresholds.max_leak_turns})")
    return CheckResult(figures, wer, leaks, similarity, failures, thresholds)
