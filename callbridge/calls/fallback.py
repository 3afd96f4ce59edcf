"""What a call plays when a turn fails: the configured clip, or a short silence."""

from __future__ import annotations

import numpy as np

from ..audio import CHUNK_BYTES, CHUNK_MS, LINE_RATE, ULAW_SILENCE, pcm16_to_ulaw
from ..config import SettingsError

__all__ = ["FALLBACK_SILENCE_MS", "MAX_FALLBACK_S", "load_fallback_audio"]

FALLBACK_SILENCE_MS = 300  # what a failed turn plays when no fallback clip is configured
MAX_FALLBACK_S = 5.0


def load_fallback_audio(path: str) -> bytes:
    """The fallback clip as 8 kHz mu-law, padded with silence to whole 20 ms chunks.

    ``path`` is ``calls.fallback_audio``: a WAV of any rate and channel count, at most
    :data:`MAX_FALLBACK_S` long; empty gives :data:`FALLBACK_SILENCE_MS` of silence. Blocking
    (file I/O, resampling): call it at start-up, off the event loop. Raises
    :class:`SettingsError` naming the key and the file.
    """
    if not path:
        return bytes([ULAW_SILENCE]) * (FALLBACK_SILENCE_MS * CHUNK_BYTES // CHUNK_MS)
    import soundfile as sf
    import soxr

    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as exc:  # LibsndfileError is a RuntimeError
        raise SettingsError(f"calls.fallback_audio = {path!r}: cannot read it as audio ({exc})") from None
    if data.shape[0] == 0 or data.shape[0] > MAX_FALLBACK_S * rate:
        raise SettingsError(f"calls.fallback_audio = {path!r}: {data.shape[0] / rate:.2f} s long; "
                            f"expected a short clip (0 < length <= {MAX_FALLBACK_S:g} s)")
    mono = data.mean(axis=1)
    pcm8k = soxr.resample(mono, rate, LINE_RATE, quality="HQ") if rate != LINE_RATE else mono
    ulaw = pcm16_to_ulaw(np.rint(np.clip(pcm8k, -1.0, 1.0) * 32767.0).astype(np.int16))
    return ulaw + bytes([ULAW_SILENCE]) * (-len(ulaw) % CHUNK_BYTES)
