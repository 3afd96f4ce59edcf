"""A voice prompt's audio: read, checked and normalised, with no model and no transcription.

:func:`prepare_prompt_audio` mixes to mono, resamples to 24 kHz, refuses what cannot make a
voice (silent, too short or long, too low a rate), trims silence, sets the level and warns
about clipping and a second speaker (:func:`phrase_pitches`). :class:`VoiceBuildError`, the
one error of voice building, lives here at the bottom; ``callbridge.voices.build`` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 24000  # Dia2 / Mimi prompt rate
MIN_SOURCE_RATE = 8000  # phone audio; anything lower has lost the voice

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
