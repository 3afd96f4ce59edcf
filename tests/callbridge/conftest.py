"""Fixtures for callbridge tests: a voice snapshot of the tiny random checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from dia2 import Dia2, PromptClip, VoicePrompt
from dia2.snapshot import VoiceSnapshot, build_snapshot
from dia2.text import WordTiming

S1_WORDS = (WordTiming("Hello", 0.1, 0.5), WordTiming("my", 0.6, 0.8), WordTiming("friend.", 0.9, 1.6))
S2_WORDS = (WordTiming("Hi", 0.1, 0.4), WordTiming("there.", 0.5, 0.9))


def synthetic_speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """A 24 kHz float32 test signal with some structure (harmonics + noise), not real speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 24000)) / 24000
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 24000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    return (0.2 * voiced * envelope + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_snapshot(tiny_runtime: Dia2) -> VoiceSnapshot:
    """An ``s1_s2`` voice snapshot (2 s S1 prompt + 1 s S2 clip) of the tiny runtime."""
    prompt = VoicePrompt(
        s1=PromptClip(synthetic_speechlike(2.0, seed=1), S1_WORDS),
        s2=PromptClip(synthetic_speechlike(1.0, seed=2), S2_WORDS),
    )
    return build_snapshot(tiny_runtime, prompt)
