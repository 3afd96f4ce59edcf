"""WAV/FLAC reading and writing for prompts and outputs (soundfile), with explicit rate checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import PromptError

SAMPLE_RATE = 24000


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read any format libsndfile knows. Returns (float32 samples [N] mixed to mono, sample rate)."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise PromptError(f"audio file not found: {path}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile's errors are RuntimeError/LibsndfileError
        raise PromptError(f"{path}: cannot read audio ({exc})") from None
    return data.mean(axis=1).astype(np.float32), int(rate)


def read_prompt_wav(path: str | Path) -> np.ndarray:
    """A voice prompt must already be 24 kHz: we refuse to guess a resampling here."""
    samples, rate = read_audio(path)
    if rate != SAMPLE_RATE:
        raise PromptError(
            f"{path}: prompt audio is {rate} Hz; Dia2 prompts must be {SAMPLE_RATE} Hz mono "
            "(convert it, or build a voice with `callbridge voice build`, which resamples)"
        )
    if samples.size == 0:
        raise PromptError(f"{path}: audio file is empty")
    return samples


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Clip to [-1, 1] and write 16-bit PCM mono."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16")
    return path


def synthetic_speechlike(seconds: float, seed: int = 0, f0_hz: float = 140.0) -> np.ndarray:
    """A 24 kHz float32 signal with speech-like structure (gliding voiced harmonics under a
    syllable envelope, plus breath noise), so Mimi codes are not those of silence. Not real
    speech: for tests, benchmarks and the random-model demo voice."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = f0_hz + 0.2 * f0_hz * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    return (0.2 * voiced * envelope + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
