"""Building a voice folder: prompt audio checked and normalised, word timings, snapshot, manifest.

``voices/NAME/`` holds ``prompt.wav`` (24 kHz mono 16-bit, trimmed and level-normalised),
``words.json`` (``[{"word", "start", "end"}]``, seconds from the start of ``prompt.wav``),
optionally the other-speaker clip ``s2.wav`` + ``s2_words.json``, the snapshot
(``snapshot.safetensors``) and ``manifest.json``. The snapshot is always built from the files
as written (16-bit audio, rounded timings), so ``rebuild_all`` on the same model reproduces
it exactly and a rebuild for a new model needs nothing but the folder.

The pieces are plain functions so each can be tested alone: :func:`check_prompt_audio`
(mono, 24 kHz, limits, silence, clipping, one-speaker hint, trim, level), :func:`transcribe`
(openai-whisper word timestamps, imported lazily), :func:`read_words_file`,
:func:`write_voice_folder`, :func:`build_voice` and :func:`rebuild_all`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import urllib.error
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from dia2 import Dia2, PromptClip, VoicePrompt
from dia2.errors import Dia2Error
from dia2.snapshot import LAYOUTS, Layout, VoiceSnapshot, build_snapshot, identity_of
from dia2.text import WordTiming

from .voices import MANIFEST_FILE, SNAPSHOT_FILE

Say = Callable[[str], None]

SAMPLE_RATE = 24000  # Dia2 / Mimi prompt rate
WHISPER_RATE = 16000  # what openai-whisper's log-mel front end expects
MIN_SOURCE_RATE = 8000  # phone audio; anything lower has lost the voice

PROMPT_FILE = "prompt.wav"
WORDS_FILE = "words.json"
S2_FILE = "s2.wav"
S2_WORDS_FILE = "s2_words.json"
VOICE_FORMAT = 1  # version of manifest.json (the snapshot file has its own)

DEFAULT_WHISPER_MODEL = "base.en"
DEFAULT_LANGUAGE = "en"
WHISPER_INSTALL = (
    "pip install --no-deps openai-whisper && pip install numba tiktoken more-itertools "
    "(its triton dependency is ~1 GB and only used on CUDA)"
)

# Level checks, on float samples in [-1, 1].
SILENCE_RMS = 1e-3  # the whole clip below this is silence (the same floor dia2.snapshot uses)
TRIM_FLOOR_DB = -40.0  # 20 ms windows this far below the loudest one count as silence
TRIM_WINDOW_S = 0.02
TRIM_MARGIN_S = 0.1  # kept on each side so a soft onset or release is not cut
CLIP_TOLERANCE = 1.5e-5  # "at the peak": within half an LSB of 16-bit audio
CLIP_MIN_RUN = 3  # a real peak touches the top for 1-2 samples; clipping sits there flat
CLIP_WARN_SHARE = 1e-3  # share of samples in flat runs at the peak that we report
TARGET_RMS = 0.1  # -20 dBFS: every voice prompt at one level
PEAK_LIMIT = 0.95  # never push a peak past this when raising the level

# One-speaker hint: median pitch per phrase; phrases far apart suggest two voices.
PITCH_MIN_HZ = 60.0
PITCH_MAX_HZ = 400.0
PHRASE_GAP_S = 0.3  # unvoiced this long separates phrases (a turn change has at least this)
PHRASE_MIN_VOICED_S = 0.5
PITCH_RATIO_WARN = 1.5  # e.g. 120 Hz vs 180 Hz; one speaker's phrases rarely differ this much

WORD_LATE_TOLERANCE_S = 0.5  # a word may end this far past the audio (rounding), no further
LOW_CONFIDENCE = 0.5  # mean whisper word probability below this is reported
MAX_WORDS_PER_S = 6.0  # fast speech is about 4 words/s; more means the words do not fit the clip

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SPEAKER_TAG_RE = re.compile(r"\[S(\d+)\]")
_DASHES = ("-", "\u2013", "\u2014")  # hyphen, en and em dash


class VoiceBuildError(Exception):
    """The input cannot make a voice (unreadable, silent, too short, no words, bad timings…);
    the message says what was wrong and what to do."""


@dataclass(frozen=True)
class AudioLimits:
    """Allowed speech length of one clip after trimming silence, in seconds."""

    min_s: float
    max_s: float


S1_LIMITS = AudioLimits(3.0, 30.0)  # enough of the voice to clone, and room left for the turn
S2_LIMITS = AudioLimits(0.5, 15.0)  # a short line of the other side


def check_voice_name(name: str) -> str:
    """A voice name is a plain folder name: letters, digits, ``_ . -``; no path separators."""
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise VoiceBuildError(
            f"invalid voice name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a "
            "letter or digit (no path separators)"
        )
    return name


# ---------------------------------------------------------------------------- audio


@dataclass(frozen=True)
class SourceAudio:
    """An audio file as read: float32 samples [N, C] at its own rate."""

    samples: np.ndarray
    sample_rate: int
    path: Path
    format: str  # e.g. "WAV PCM_16"

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_s(self) -> float:
        return self.samples.shape[0] / self.sample_rate


def read_source_audio(path: str | Path) -> SourceAudio:
    """Read any format libsndfile knows (WAV, FLAC, OGG/Vorbis/Opus, MP3 with libsndfile >= 1.1)."""
    import soundfile as sf

    path = Path(path).expanduser()
    if not path.is_file():
        raise VoiceBuildError(f"audio file not found: {path}")
    try:
        info = sf.info(str(path))
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        formats = ", ".join(sorted(set(sf.available_formats()) & {"WAV", "FLAC", "OGG", "MP3", "AIFF"}))
        raise VoiceBuildError(
            f"{path}: cannot read audio ({exc}); use a file libsndfile reads here: {formats}"
        ) from None
    if data.shape[0] == 0:
        raise VoiceBuildError(f"{path}: the audio file holds no samples")
    return SourceAudio(data, int(rate), path, f"{info.format} {info.subtype}")


@dataclass(frozen=True)
class PreparedAudio:
    """A clip after :func:`prepare_prompt_audio`: mono 24 kHz float32 [N], trimmed, level-normalised."""

    pcm24k: np.ndarray
    warnings: tuple[str, ...]
    trim_start_s: float  # seconds cut from the start of the source (word timings shift by this)
    source_duration_s: float
    source_rate: int
    source_channels: int

    @property
    def duration_s(self) -> float:
        return self.pcm24k.size / SAMPLE_RATE


def _as_float_frames(samples: np.ndarray) -> np.ndarray:
    """Any [N] or [N, C] int or float array as float32 [N, C] in [-1, 1] full scale."""
    x = np.asarray(samples)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise VoiceBuildError(f"audio must be [N] or [N, channels], got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    return x.astype(np.float32, copy=False)


def clipped_share(frames: np.ndarray) -> float:
    """Share of samples [N, C] that sit in flat runs (>= 3 samples) at the channel's peak.

    A clean peak touches the top for one or two samples; a clipped one stays there, so flat
    runs find clipping at any level (also audio clipped and then turned down)."""
    worst = 0.0
    for ch in frames.T:
        mag = np.abs(ch)
        peak = float(mag.max())
        if peak == 0.0:
            continue
        at_top = np.concatenate(([False], mag >= peak - CLIP_TOLERANCE, [False]))
        edges = np.flatnonzero(np.diff(at_top.astype(np.int8)))
        lengths = edges[1::2] - edges[0::2]
        worst = max(worst, float(lengths[lengths >= CLIP_MIN_RUN].sum()) / ch.size)
    return worst


def _window_rms(pcm: np.ndarray, window: int) -> np.ndarray:
    """RMS of consecutive windows [F] (the tail shorter than a window is its own window)."""
    pad = (-pcm.size) % window
    padded = np.concatenate([pcm, np.zeros(pad, dtype=pcm.dtype)]) if pad else pcm
    return np.sqrt(np.mean(np.square(padded.reshape(-1, window), dtype=np.float64), axis=1))


def trim_silence(pcm24k: np.ndarray) -> tuple[int, int]:
    """Sample range [start, end) of ``pcm24k`` [N] without leading/trailing silence (plus a margin)."""
    window = int(TRIM_WINDOW_S * SAMPLE_RATE)
    rms = _window_rms(pcm24k, window)
    threshold = max(float(rms.max()) * 10 ** (TRIM_FLOOR_DB / 20), SILENCE_RMS)
    loud = np.flatnonzero(rms >= threshold)
    if loud.size == 0:
        return 0, pcm24k.size
    margin = int(TRIM_MARGIN_S * SAMPLE_RATE)
    start = max(0, int(loud[0]) * window - margin)
    end = min(pcm24k.size, (int(loud[-1]) + 1) * window + margin)
    return start, end


def phrase_pitches(pcm24k: np.ndarray) -> list[float]:
    """Median pitch (Hz) of each phrase of ``pcm24k`` [N] with enough voiced speech.

    Autocorrelation pitch per 40 ms window (20 ms hop); a window is voiced when it is loud
    (within 20 dB of the loudest) and periodic. The smallest lag near the best peak is taken,
    which avoids the usual octave-down error. Phrases are split at unvoiced gaps >= 0.3 s.
    """
    win, hop, nfft = 960, 480, 2048
    if pcm24k.size < win:
        return []
    frames = np.lib.stride_tricks.sliding_window_view(pcm24k.astype(np.float64), win)[::hop]  # [F, win]
    frames = frames - frames.mean(axis=1, keepdims=True)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    spec = np.fft.rfft(frames * np.hanning(win), n=nfft)
    ac = np.fft.irfft(np.abs(spec) ** 2, n=nfft)
    ac = ac / np.maximum(ac[:, :1], 1e-12)
    lo, hi = int(SAMPLE_RATE / PITCH_MAX_HZ), int(SAMPLE_RATE / PITCH_MIN_HZ)
    seg = ac[:, lo - 1 : hi + 2]  # one lag each side so every lag in [lo, hi] can be a local max
    inner = seg[:, 1:-1]
    best = inner.max(axis=1)
    peaks = (inner >= seg[:, :-2]) & (inner >= seg[:, 2:]) & (inner >= 0.9 * best[:, None])
    lag = lo + peaks.argmax(axis=1)
    voiced = (rms >= 0.1 * rms.max()) & (best >= 0.3) & peaks.any(axis=1)
    f0 = SAMPLE_RATE / lag

    gap_hops = int(PHRASE_GAP_S * SAMPLE_RATE / hop)
    min_voiced = int(PHRASE_MIN_VOICED_S * SAMPLE_RATE / hop)
    medians: list[float] = []
    current: list[float] = []
    unvoiced_run = 0
    for is_voiced, hz in zip(voiced, f0):
        if is_voiced:
            current.append(float(hz))
            unvoiced_run = 0
            continue
        unvoiced_run += 1
        if unvoiced_run == gap_hops and current:
            if len(current) >= min_voiced:
                medians.append(float(np.median(current)))
            current = []
    if len(current) >= min_voiced:
        medians.append(float(np.median(current)))
    return medians


def prepare_prompt_audio(
    samples: np.ndarray, sample_rate: int, *, limits: AudioLimits = S1_LIMITS, what: str = "S1 prompt"
) -> PreparedAudio:
    """Mix to mono, resample to 24 kHz (soxr), check, trim silence and set the level.

    ``samples`` is [N] or [N, C] (int or float) at ``sample_rate`` Hz. Raises
    :class:`VoiceBuildError` for audio that cannot make a voice (silent, too short or long,
    too low a rate); returns warnings for audio that can but may sound worse (clipped, maybe
    more than one speaker).
    """
    import soxr

    if sample_rate < MIN_SOURCE_RATE:
        raise VoiceBuildError(f"{what}: sample rate {sample_rate} Hz is too low; use at least {MIN_SOURCE_RATE} Hz")
    frames = _as_float_frames(samples)
    found: list[str] = []
    share = clipped_share(frames)  # before mixing: one clipped channel is still clipped
    if share >= CLIP_WARN_SHARE:
        found.append(
            f"{what} is clipped ({share:.1%} of samples sit flat at the peak): the clone copies the "
            "distortion; record again at a lower level if you can"
        )
    mono = frames.mean(axis=1)
    source_s = mono.size / sample_rate
    if mono.size == 0 or float(np.sqrt(np.mean(np.square(mono, dtype=np.float64)))) < SILENCE_RMS:
        raise VoiceBuildError(f"{what} is silent ({source_s:.1f} s with no sound above {SILENCE_RMS:g} RMS)")
    pcm = mono if sample_rate == SAMPLE_RATE else soxr.resample(mono, sample_rate, SAMPLE_RATE, "HQ")
    pcm = np.asarray(pcm, dtype=np.float32)
    start, end = trim_silence(pcm)
    pcm = pcm[start:end]
    seconds = pcm.size / SAMPLE_RATE
    span = f"the {what} must be {limits.min_s:g}-{limits.max_s:g} s of one speaker"
    if seconds < limits.min_s:
        raise VoiceBuildError(
            f"{what} is too short: {seconds:.1f} s of sound after trimming silence ({source_s:.1f} s in the "
            f"file); {span}"
        )
    if seconds > limits.max_s:
        raise VoiceBuildError(
            f"{what} is too long: {seconds:.1f} s of sound after trimming silence; {span} (cut out the best "
            f"{limits.max_s:g} s: a longer prompt takes model context from every turn)"
        )
    pitches = phrase_pitches(pcm)
    if len(pitches) >= 2 and max(pitches) / min(pitches) >= PITCH_RATIO_WARN:
        found.append(
            f"{what} may hold more than one speaker: its phrases have median pitch from {min(pitches):.0f} to "
            f"{max(pitches):.0f} Hz; the prompt should be the one voice to clone"
        )
    rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64))))
    peak = float(np.abs(pcm).max())
    gain = min(TARGET_RMS / rms, PEAK_LIMIT / peak)
    return PreparedAudio(
        pcm24k=(pcm * gain).astype(np.float32),
        warnings=tuple(found),
        trim_start_s=start / SAMPLE_RATE,
        source_duration_s=source_s,
        source_rate=sample_rate,
        source_channels=frames.shape[1],
    )


def check_prompt_audio(samples: np.ndarray, sample_rate: int) -> tuple[np.ndarray, list[str]]:
    """An S1 prompt's samples ([N] or [N, C] at ``sample_rate`` Hz) → (24 kHz mono float32 [N]
    normalised, warnings). Raises :class:`VoiceBuildError` with the reason when unusable."""
    prepared = prepare_prompt_audio(samples, sample_rate)
    return prepared.pcm24k, list(prepared.warnings)


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


def transcribe(pcm24k: np.ndarray, whisper_model: str, *, language: str | None = DEFAULT_LANGUAGE) -> Transcript:
    """Load ``whisper_model`` (a name such as ``base.en`` or a checkpoint path) and transcribe."""
    return transcribe_with(load_whisper(whisper_model), pcm24k, language=language, model_name=whisper_model)


# ---------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ModelIdentity:
    """The model a snapshot was built for: what the user named and the ids snapshots check."""

    source: str
    model_id: str
    config_hash: str
    mimi_id: str


@dataclass(frozen=True)
class ClipInfo:
    """One clip of a voice folder and where it came from (durations in seconds)."""

    file: str
    words_file: str
    duration_s: float
    transcript: str
    words_source: str  # "whisper", "file" (--words) or "stored" (a folder built by hand)
    source: str  # the audio file it was made from
    source_sample_rate: int
    source_channels: int
    trimmed_start_s: float


@dataclass(frozen=True)
class VoiceManifest:
    """``manifest.json`` of a voice folder."""

    format_version: int
    name: str
    model: ModelIdentity
    layout: str
    transcript: str  # the S1 words, joined
    prompt: ClipInfo
    s2: ClipInfo | None
    whisper_model: str | None  # None when no clip was transcribed
    language: str | None
    prompt_frames: int  # Mimi frames (80 ms) the snapshot holds, S1 + S2
    s1_frames: int
    s2_frames: int
    dropped_prompt_words: int
    snapshot_file: str
    built_at: str  # ISO 8601 UTC
    warnings: list[str] = field(default_factory=list)

    @property
    def prompt_s(self) -> float:
        return self.prompt.duration_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VoiceManifest:
        version = raw.get("format_version")
        if version != VOICE_FORMAT:
            raise VoiceBuildError(
                f"{MANIFEST_FILE}: voice format {version!r}, this version reads {VOICE_FORMAT}; build the voice again"
            )
        try:
            values = dict(raw)
            values["model"] = ModelIdentity(**raw["model"])
            values["prompt"] = ClipInfo(**raw["prompt"])
            values["s2"] = ClipInfo(**raw["s2"]) if raw.get("s2") else None
            return cls(**values)
        except (KeyError, TypeError) as exc:
            raise VoiceBuildError(f"{MANIFEST_FILE}: not a voice manifest ({type(exc).__name__}: {exc})") from None

    def write(self, folder: Path) -> Path:
        path = folder / MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)  # a reader never sees half a manifest
        return path

    @classmethod
    def read(cls, folder: Path) -> VoiceManifest:
        path = folder / MANIFEST_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VoiceBuildError(f"{folder}: no {MANIFEST_FILE}") from None
        except json.JSONDecodeError as exc:
            raise VoiceBuildError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise VoiceBuildError(f"{path}: not a voice manifest (expected a JSON object)")
        return cls.from_dict(raw)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------- building


@dataclass(frozen=True)
class VoiceRequest:
    """What ``callbridge voice build NAME`` was asked for."""

    name: str
    audio: Path
    words: Path | None = None
    whisper_model: str = DEFAULT_WHISPER_MODEL
    language: str | None = DEFAULT_LANGUAGE
    s2_audio: Path | None = None
    s2_words: Path | None = None
    layout: str | None = None  # None: s1_s2 with an S2 clip, else s1_only


@dataclass(frozen=True)
class PreparedClip:
    """A clip ready to write: normalised audio, its words and where it came from."""

    pcm24k: np.ndarray
    words: tuple[WordTiming, ...]
    info: ClipInfo


@dataclass(frozen=True)
class PreparedVoice:
    """Everything of a voice but the snapshot (no model needed to get here)."""

    name: str
    layout: str
    s1: PreparedClip
    s2: PreparedClip | None
    whisper_model: str | None
    language: str | None
    warnings: tuple[str, ...]


def _prepare_clip(
    audio: Path,
    words_path: Path | None,
    *,
    what: str,
    limits: AudioLimits,
    files: tuple[str, str],
    words_flag: str,
    whisper_model: str,
    language: str | None,
    say: Say,
) -> tuple[PreparedClip, list[str]]:
    source = read_source_audio(audio)
    layout = "mono" if source.channels == 1 else f"{source.channels} channels, mixed to mono"
    say(f"{what}: read {source.path} ({source.format}, {source.sample_rate} Hz, {layout}, {source.duration_s:.2f} s)")
    prepared = prepare_prompt_audio(source.samples, source.sample_rate, limits=limits, what=what)
    resampled = "" if source.sample_rate == SAMPLE_RATE else f", resampled {source.sample_rate} -> {SAMPLE_RATE} Hz"
    say(f"{what}: {prepared.duration_s:.2f} s after trimming silence "
        f"({prepared.trim_start_s:.2f} s cut at the start{resampled}), level normalised")
    found = list(prepared.warnings)
    if words_path is not None:
        raw_words = shift_words(read_words_file(words_path), prepared, source=str(words_path))
        words_source = "file"
        hint = f"{words_path} holds no speech words"
        say(f"{what}: {len(raw_words)} word timings from {words_path}")
    else:
        say(f"{what}: transcribing with whisper {whisper_model} (CPU)")
        transcript = transcribe(prepared.pcm24k, whisper_model, language=language)
        raw_words = transcript.words
        words_source = "whisper"
        hint = (f"whisper ({whisper_model}) heard none in {prepared.duration_s:.1f} s; check that the clip holds "
                f"speech, try a larger --whisper-model, or give the word timings with {words_flag} words.json")
        if transcript.mean_probability is not None and transcript.mean_probability < LOW_CONFIDENCE:
            found.append(
                f"whisper is unsure of the {what} transcript (mean word probability "
                f"{transcript.mean_probability:.2f}); check {files[1]} or pass {words_flag}"
            )
    words, marks = tidy_words(raw_words, what=what, hint=hint)
    found += marks
    if len(words) / prepared.duration_s > MAX_WORDS_PER_S:
        found.append(
            f"the {what} transcript has {len(words)} words for {prepared.duration_s:.1f} s of audio (more than "
            f"{MAX_WORDS_PER_S:g} words/s): the words do not look like this clip's; check {files[1]}"
        )
    text = " ".join(w.word for w in words)
    say(f"{what}: {len(words)} words: {text[:200]}{'…' if len(text) > 200 else ''}")
    info = ClipInfo(
        file=files[0],
        words_file=files[1],
        duration_s=round(prepared.duration_s, 3),
        transcript=text,
        words_source=words_source,
        source=str(source.path.resolve()),
        source_sample_rate=source.sample_rate,
        source_channels=source.channels,
        trimmed_start_s=round(prepared.trim_start_s, 3),
    )
    return PreparedClip(prepared.pcm24k, words, info), found


def prepare_voice(request: VoiceRequest, say: Say = lambda _msg: None) -> PreparedVoice:
    """Read, check and normalise the clip(s) and get their words; no model is loaded.

    Raises :class:`VoiceBuildError` for unusable input. Warnings are said as they are found
    and kept for the manifest."""
    name = check_voice_name(request.name)
    layout = request.layout or ("s1_s2" if request.s2_audio is not None else "s1_only")
    if layout not in LAYOUTS:
        raise VoiceBuildError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if layout == "s1_only" and request.s2_audio is not None:
        raise VoiceBuildError("--layout s1_only places nothing after the S1 prompt: drop --s2-audio or use s1_s2")
    if request.s2_words is not None and request.s2_audio is None:
        raise VoiceBuildError("--s2-words needs --s2-audio (the other speaker's clip)")
    s1, found = _prepare_clip(
        request.audio, request.words, what="S1 prompt", limits=S1_LIMITS, files=(PROMPT_FILE, WORDS_FILE),
        words_flag="--words", whisper_model=request.whisper_model, language=request.language, say=say,
    )
    s2: PreparedClip | None = None
    if request.s2_audio is not None:
        s2, more = _prepare_clip(
            request.s2_audio, request.s2_words, what="S2 clip", limits=S2_LIMITS, files=(S2_FILE, S2_WORDS_FILE),
            words_flag="--s2-words", whisper_model=request.whisper_model, language=request.language, say=say,
        )
        found += more
    else:
        found.append(
            "no --s2-audio: the snapshot holds the S1 prompt alone, which reportedly clones the voice less "
            "reliably (Dia2 may drift to a random voice); add a short clip of another speaker with --s2-audio"
        )
    for message in found:
        say(f"warning: {message}")
    transcribed = s1.info.words_source == "whisper" or (s2 is not None and s2.info.words_source == "whisper")
    return PreparedVoice(
        name=name,
        layout=layout,
        s1=s1,
        s2=s2,
        whisper_model=request.whisper_model if transcribed else None,
        language=request.language if transcribed else None,
        warnings=tuple(found),
    )


def _read_clip(folder: Path, audio_file: str, words_file: str) -> PromptClip:
    """A stored clip (24 kHz mono, as ``write_voice_folder`` writes it) and its words."""
    import soundfile as sf

    path = folder / audio_file
    try:
        pcm, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise VoiceBuildError(f"{path}: cannot read ({exc})") from None
    if rate != SAMPLE_RATE or pcm.shape[1] != 1:
        raise VoiceBuildError(f"{path}: expected {SAMPLE_RATE} Hz mono, found {rate} Hz with {pcm.shape[1]} channels")
    return PromptClip(np.ascontiguousarray(pcm[:, 0]), read_words_file(folder / words_file))


def snapshot_from_folder(folder: Path, runtime: Dia2, layout: str) -> VoiceSnapshot:
    """Build the snapshot of a voice folder's stored clip(s) for ``runtime``."""
    s1 = _read_clip(folder, PROMPT_FILE, WORDS_FILE)
    s2 = None
    if layout == "s1_s2" and (folder / S2_FILE).exists():
        s2 = _read_clip(folder, S2_FILE, S2_WORDS_FILE)
    try:
        return build_snapshot(runtime, VoicePrompt(s1=s1, s2=s2), layout=cast(Layout, layout))
    except Dia2Error as exc:
        raise VoiceBuildError(f"{folder.name}: the model refused the prompt: {exc}") from None


def _model_identity(runtime: Dia2, source: str) -> ModelIdentity:
    model_id, config_hash, mimi_id = identity_of(runtime)
    return ModelIdentity(source=source, model_id=model_id, config_hash=config_hash, mimi_id=mimi_id)


def _with_snapshot(manifest: VoiceManifest, snap: VoiceSnapshot, identity: ModelIdentity) -> VoiceManifest:
    m = snap.manifest
    return replace(
        manifest,
        model=identity,
        layout=m.layout,
        prompt_frames=m.prompt_frames,
        s1_frames=m.s1_frames,
        s2_frames=m.s2_frames,
        dropped_prompt_words=m.dropped_prompt_words,
        built_at=_now(),
    )


def write_voice_folder(voices_dir: Path, voice: PreparedVoice, runtime: Dia2, *, model_source: str, say: Say) -> Path:
    """Write ``voices_dir/NAME/`` (clips, words, snapshot, manifest); returns the folder.

    Everything is written to a hidden staging folder first and swapped in at the end, so a
    failed build leaves an existing voice of that name as it was."""
    from dia2.audio_io import write_wav

    voices_dir.mkdir(parents=True, exist_ok=True)
    final = voices_dir / voice.name
    staging = voices_dir / f".{voice.name}.building"
    shutil.rmtree(staging, ignore_errors=True)  # a previous build that died half-way
    staging.mkdir()
    try:
        clips = [voice.s1] + ([voice.s2] if voice.s2 is not None else [])
        for clip in clips:
            write_wav(staging / clip.info.file, clip.pcm24k, SAMPLE_RATE)
            text = json.dumps(words_to_json(clip.words), indent=1, ensure_ascii=False)
            (staging / clip.info.words_file).write_text(text + "\n", encoding="utf-8")
        say(f"snapshot: building for {model_source} (layout {voice.layout})")
        # From the files as written (16-bit, 1 ms timings): a rebuild for the same model then
        # reproduces this snapshot exactly.
        snap = snapshot_from_folder(staging, runtime, voice.layout)
        snap.save(staging / SNAPSHOT_FILE)
        m = snap.manifest
        found = list(voice.warnings)
        if m.dropped_prompt_words:
            # Each word needs at least one 80 ms frame per token; words that do not fit were
            # never fed, so the prompt's text and audio part ways at the end.
            found.append(
                f"{m.dropped_prompt_words} word(s) at the end of the transcript did not fit the prompt audio "
                f"({m.prompt_frames} frames): check {WORDS_FILE} (too many words for the clip?)"
            )
            say(f"warning: {found[-1]}")
        VoiceManifest(
            format_version=VOICE_FORMAT,
            name=voice.name,
            model=_model_identity(runtime, model_source),
            layout=m.layout,
            transcript=voice.s1.info.transcript,
            prompt=voice.s1.info,
            s2=voice.s2.info if voice.s2 is not None else None,
            whisper_model=voice.whisper_model,
            language=voice.language,
            prompt_frames=m.prompt_frames,
            s1_frames=m.s1_frames,
            s2_frames=m.s2_frames,
            dropped_prompt_words=m.dropped_prompt_words,
            snapshot_file=SNAPSHOT_FILE,
            built_at=_now(),
            warnings=found,
        ).write(staging)
        if final.exists():
            old = voices_dir / f".{voice.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            say(f"replaced the earlier voice {voice.name!r}")
        else:
            staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"wrote {final}/ ({m.prompt_frames} frames = {m.prompt_frames / runtime.frame_rate:.2f} s of prompt)")
    return final


def build_voice(
    request: VoiceRequest,
    runtime: Dia2,
    voices_dir: Path,
    *,
    model_source: str,
    say: Say = lambda _msg: None,
) -> Path:
    """:func:`prepare_voice` then :func:`write_voice_folder`; returns ``voices_dir/NAME``."""
    return write_voice_folder(voices_dir, prepare_voice(request, say), runtime, model_source=model_source, say=say)


# ---------------------------------------------------------------------------- rebuild


@dataclass
class RebuildReport:
    """Which voice folders ``rebuild_all`` rebuilt, skipped (not a voice) or failed (why)."""

    rebuilt: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def voice_folders(voices_dir: Path) -> list[Path]:
    """Voice folders: visible sub-folders with a manifest, a snapshot or a prompt."""
    if not voices_dir.is_dir():
        return []
    marks = (MANIFEST_FILE, SNAPSHOT_FILE, PROMPT_FILE)
    return sorted(
        p for p in voices_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any((p / m).exists() for m in marks)
    )


def _manifest_for_stored(folder: Path) -> VoiceManifest:
    """The manifest of a folder built by hand (prompt + words, no manifest): a fresh one."""
    import soundfile as sf

    def clip(audio_file: str, words_file: str) -> ClipInfo:
        info = sf.info(str(folder / audio_file))
        words = read_words_file(folder / words_file)
        return ClipInfo(audio_file, words_file, round(info.duration, 3), " ".join(w.word for w in words),
                        "stored", str(folder / audio_file), info.samplerate, info.channels, 0.0)

    s1 = clip(PROMPT_FILE, WORDS_FILE)
    s2 = clip(S2_FILE, S2_WORDS_FILE) if (folder / S2_FILE).exists() else None
    return VoiceManifest(
        format_version=VOICE_FORMAT, name=folder.name, model=ModelIdentity("", "", "", ""),
        layout="s1_s2" if s2 is not None else "s1_only", transcript=s1.transcript, prompt=s1, s2=s2,
        whisper_model=None, language=None, prompt_frames=0, s1_frames=0, s2_frames=0, dropped_prompt_words=0,
        snapshot_file=SNAPSHOT_FILE, built_at="",
    )


def rebuild_voice(folder: Path, runtime: Dia2, *, model_source: str) -> VoiceManifest:
    """Rebuild one folder's snapshot from its stored clip(s) and words (no transcription)."""
    if not (folder / PROMPT_FILE).exists() or not (folder / WORDS_FILE).exists():
        raise VoiceBuildError(f"{folder}: no {PROMPT_FILE} + {WORDS_FILE} to rebuild from; build it again with --audio")
    manifest = VoiceManifest.read(folder) if (folder / MANIFEST_FILE).exists() else _manifest_for_stored(folder)
    if manifest.layout == "s1_s2" and manifest.s2 is not None and not (folder / S2_FILE).exists():
        raise VoiceBuildError(f"{folder}: the manifest names an S2 clip but {S2_FILE} is missing")
    snap = snapshot_from_folder(folder, runtime, manifest.layout)
    snap.save(folder / SNAPSHOT_FILE)
    updated = _with_snapshot(manifest, snap, _model_identity(runtime, model_source))
    updated.write(folder)
    return updated


def rebuild_all(runtime: Dia2, voices_dir: Path, *, model_source: str, say: Say = lambda _msg: None) -> RebuildReport:
    """Rebuild every voice folder in ``voices_dir`` for ``runtime``; one failure does not stop the rest."""
    report = RebuildReport()
    folders = voice_folders(voices_dir)
    if not folders:
        say(f"no voice folders in {voices_dir}/")
    for folder in folders:
        if not (folder / PROMPT_FILE).exists():
            report.skipped.append(folder.name)
            say(f"{folder.name}: skipped (no {PROMPT_FILE} to rebuild from)")
            continue
        try:
            m = rebuild_voice(folder, runtime, model_source=model_source)
        except VoiceBuildError as exc:
            report.failed[folder.name] = str(exc)
            say(f"{folder.name}: FAILED: {exc}")
            continue
        report.rebuilt.append(folder.name)
        say(f"{folder.name}: rebuilt ({m.prompt_s:.2f} s prompt, layout {m.layout})")
    return report
