"""A voice clip's words: ``words.json`` read, checked, shifted and tidied, or heard by Whisper.

:func:`read_words_file`, :func:`shift_words` (source timings into the trimmed clip) and
:func:`tidy_words` (speaker marks and punctuation out), then :func:`load_whisper` and
:func:`transcribe_with` (openai-whisper word timestamps on CPU, imported lazily);
``callbridge.voices.build.transcribe`` loads a model and transcribes in one call.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dia2 import WordTiming

from .prompt_audio import SAMPLE_RATE, PreparedAudio, VoiceBuildError

WHISPER_RATE = 16000  # what openai-whisper's log-mel front end expects

DEFAULT_WHISPER_MODEL = "base.en"
DEFAULT_LANGUAGE = "en"
WHISPER_INSTALL = 'pip install "callbridge[voice]" (openai-whisper)'

WORD_LATE_TOLERANCE_S = 0.5  # a word may end this far past the audio (rounding), no further

_SPEAKER_TAG_RE = re.compile(r"\[S(\d+)\]")
_DASHES = ("-", "\u2013", "\u2014")  # hyphen, en and em dash


# ---------------------------------------------------------------------------- words


def words_to_json(words: Sequence[WordTiming]) -> list[dict[str, Any]]:
    """The ``words.json`` form, timings rounded to 1 ms."""
    return [{"word": w.word, "start": round(w.start_s, 3), "end": round(w.end_s, 3)} for w in words]


def read_words_file(path: str | Path) -> tuple[WordTiming, ...]:
    """A JSON list of ``{"word", "start", "end"}`` (seconds), or ``{"words": [...]}``; checked."""
    path = Path(path).expanduser()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VoiceBuildError(f"word timings file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VoiceBuildError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(raw, dict) and "words" in raw:
        raw = raw["words"]
    if not isinstance(raw, list):
        raise VoiceBuildError(f'{path}: expected a JSON list of {{"word", "start", "end"}} objects (seconds)')
    words: list[WordTiming] = []
    previous = 0.0
    for i, item in enumerate(raw):
        try:
            word = WordTiming(str(item["word"]), float(item["start"]), float(item["end"]))
        except (KeyError, TypeError, ValueError):
            raise VoiceBuildError(f"{path}: item {i} must have 'word', 'start' and 'end' (seconds)") from None
        where = f"{path}: item {i} ({word.word!r})"
        if not word.word.strip():
            raise VoiceBuildError(f"{where}: empty word")
        if not (math.isfinite(word.start_s) and math.isfinite(word.end_s)) or word.start_s < 0:
            raise VoiceBuildError(f"{where}: times must be finite and >= 0, got {word.start_s}..{word.end_s} s")
        if word.start_s > word.end_s:
            raise VoiceBuildError(f"{where}: starts after it ends ({word.start_s} > {word.end_s} s)")
        if word.start_s < previous:
            raise VoiceBuildError(f"{where}: starts at {word.start_s} s, before the previous word ({previous} s)")
        previous = word.start_s
        words.append(word)
    return tuple(words)


def shift_words(
    words: Sequence[WordTiming], prepared: PreparedAudio, *, source: str
) -> tuple[WordTiming, ...]:
    """Timings of the source file → timings of the trimmed clip (clamped into it).

    A word past the end of the source file means the timings are of another file or in
    another unit (ms?), which is an error rather than something to clamp away."""
    out: list[WordTiming] = []
    for i, w in enumerate(words):
        if w.end_s > prepared.source_duration_s + WORD_LATE_TOLERANCE_S:
            raise VoiceBuildError(
                f"{source}: word {i} ({w.word!r}) ends at {w.end_s:g} s but the audio is "
                f"{prepared.source_duration_s:.2f} s long (timings are seconds from the start of the audio file)"
            )
        start = min(max(w.start_s - prepared.trim_start_s, 0.0), prepared.duration_s)
        end = min(max(w.end_s - prepared.trim_start_s, start), prepared.duration_s)
        out.append(WordTiming(w.word, start, end))
    return tuple(out)


def tidy_words(words: Sequence[WordTiming], *, what: str, hint: str) -> tuple[tuple[WordTiming, ...], list[str]]:
    """Speaker tags and punctuation-only tokens out; a warning for marks of another speaker.

    Whisper writes a speaker change as a leading ``-`` (after a sentence end) or ``>>``; a
    transcript may carry ``[S2]``. None of them is speech, and each means the clip is not one
    speaker. ``[S1]`` is dropped quietly: the snapshot builder tags the S1 clip itself.
    Raises :class:`VoiceBuildError` when no word is left (``hint`` says where words come from).
    """
    marks: set[str] = set()
    kept: list[WordTiming] = []
    for w in words:
        text = w.word.strip()
        marks.update(f"[S{n}]" for n in _SPEAKER_TAG_RE.findall(text) if n != "1")
        text = _SPEAKER_TAG_RE.sub("", text).strip()
        if text.startswith(">>"):
            marks.add(">>")
            text = text.lstrip("> ")
        elif text.startswith(_DASHES):
            if kept and kept[-1].word.endswith((".", "?", "!")):
                marks.add("-")
            text = text.lstrip("".join(_DASHES) + " ")
        if not any(c.isalnum() for c in text):
            continue  # punctuation alone is not a spoken word
        kept.append(WordTiming(text, w.start_s, w.end_s))
    found: list[str] = []
    if marks:
        found.append(
            f"the {what} transcript has speaker-change marks ({' '.join(sorted(marks))}): the clip may hold "
            "more than one speaker"
        )
    if not kept:
        raise VoiceBuildError(f"no words in the {what}: {hint}")
    return tuple(kept), found


# ---------------------------------------------------------------------------- whisper


@dataclass(frozen=True)
class Transcript:
    """Words with timings (seconds from the clip start) and how sure whisper was of them."""

    words: tuple[WordTiming, ...]
    mean_probability: float | None
    model: str


def whisper_cache_dir() -> Path:
    """Where ``whisper.load_model(name)`` looks for ``<name>.pt`` (and downloads it to)."""
    base = os.getenv("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "whisper"


def _import_whisper() -> Any:
    try:
        import whisper
    except ImportError as exc:
        missing = f" (missing module: {exc.name})" if exc.name and exc.name != "whisper" else ""
        raise VoiceBuildError(
            f"openai-whisper is not installed{missing}; install it with: {WHISPER_INSTALL}; "
            "or give the word timings with --words words.json"
        ) from None
    return whisper


def load_whisper(name_or_path: str) -> Any:
    """A Whisper model on CPU, by name (cached or downloaded) or from a local checkpoint file.

    CPU on purpose: a prompt is a few seconds, and the GPU belongs to Dia2."""
    whisper = _import_whisper()
    names = whisper.available_models()
    if name_or_path in names:
        cached = whisper_cache_dir() / f"{name_or_path}.pt"
        try:
            return whisper.load_model(name_or_path, device="cpu")
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            raise VoiceBuildError(
                f"--whisper-model {name_or_path}: not in the cache (looked for {cached}) and it could not be "
                f"downloaded ({type(exc).__name__}: {exc}); download it where the network allows, pass a local "
                "checkpoint path with --whisper-model, or give the word timings with --words words.json"
            ) from None
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise VoiceBuildError(
            f"--whisper-model {name_or_path!r}: neither a Whisper model name ({', '.join(names)}) nor a "
            f"checkpoint file (looked for {path}); or give the word timings with --words words.json"
        )
    try:
        return whisper.load_model(str(path), device="cpu")
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError) as exc:
        raise VoiceBuildError(
            f"--whisper-model {path}: not a Whisper checkpoint ({type(exc).__name__}: {exc}); it must be a "
            'torch file {"dims": ..., "model_state_dict": ...} as openai-whisper saves'
        ) from None


def transcribe_with(model: Any, pcm24k: np.ndarray, *, language: str | None, model_name: str) -> Transcript:
    """Word timestamps of ``pcm24k`` (24 kHz mono float32 [N]) from a loaded Whisper model.

    Greedy decoding (temperature 0, no fallback): a prompt is short, clean speech, and the
    same clip then always gives the same words. Words from all segments are collected,
    stripped, empty ones skipped, times made monotonic and clamped into the clip.
    """
    import soxr

    audio16k = np.asarray(soxr.resample(pcm24k, SAMPLE_RATE, WHISPER_RATE, "HQ"), dtype=np.float32)
    with warnings.catch_warnings():
        # We run Whisper on CPU by choice even where CUDA exists (see load_whisper).
        warnings.filterwarnings("ignore", message="Performing inference on CPU when CUDA is available")
        result = model.transcribe(
            audio16k, word_timestamps=True, fp16=False, language=language, temperature=0.0, verbose=None
        )
    duration_s = pcm24k.size / SAMPLE_RATE
    words: list[WordTiming] = []
    probs: list[float] = []
    previous = 0.0
    for segment in result.get("segments", []):
        for item in segment.get("words") or []:
            text = str(item.get("word", "")).strip()
            if not text:
                continue
            start = min(max(float(item["start"]), previous), duration_s)
            end = min(max(float(item["end"]), start), duration_s)
            words.append(WordTiming(text, start, end))
            previous = start
            if "probability" in item:
                probs.append(float(item["probability"]))
    return Transcript(tuple(words), float(np.mean(probs)) if probs else None, model_name)
