"""Audio for the caller-speech tests: synthetic speech-like sound, silence, line noise, real speech.

The real speech is the committed fixture ``data/phone_speech.ulaw`` (espeak-ng through the
8 kHz mu-law phone path; ``make_fixture.py`` made it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from callbridge.audio import LINE_RATE, pcm16_to_ulaw, ulaw_to_pcm16
from dia2 import synthetic_speechlike

DATA = Path(__file__).resolve().parent / "data"
FRAME = LINE_RATE // 50  # 20 ms


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Voiced, speech-like int16 audio at 8 kHz (no pauses inside), through mu-law like a call."""
    pcm24k = synthetic_speechlike(seconds, seed=seed)
    pcm8k = soxr.resample(pcm24k, 24000, LINE_RATE, quality="HQ")[: round(seconds * LINE_RATE)]
    return phone(np.rint(np.clip(pcm8k, -1, 1) * 32767).astype(np.int16))


def silence(seconds: float) -> np.ndarray:
    """Digital silence as a call decodes it (mu-law 0xFF)."""
    return ulaw_to_pcm16(b"\xff" * round(seconds * LINE_RATE))


def line_noise(seconds: float, dbfs: float = -40.0, seed: int = 0) -> np.ndarray:
    """White noise at ``dbfs`` RMS through mu-law: a quiet phone line."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(round(seconds * LINE_RATE)) * 32768.0 * 10 ** (dbfs / 20)
    return phone(np.clip(np.rint(noise), -32768, 32767).astype(np.int16))


def phone(pcm16: np.ndarray) -> np.ndarray:
    """A round trip through G.711 mu-law."""
    return ulaw_to_pcm16(pcm16_to_ulaw(pcm16))


def fixture_pcm() -> np.ndarray:
    return ulaw_to_pcm16((DATA / "phone_speech.ulaw").read_bytes())


def fixture_meta() -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((DATA / "phone_speech.json").read_text())
    return meta
