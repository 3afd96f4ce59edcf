"""Fixtures for callbridge tests: a voice snapshot of the tiny random checkpoint."""

from __future__ import annotations

import pytest

from dia2 import Dia2, PromptClip, VoicePrompt
from dia2.audio_io import synthetic_speechlike
from dia2.snapshot import VoiceSnapshot, build_snapshot
from dia2.text import WordTiming

S1_WORDS = (WordTiming("Hello", 0.1, 0.5), WordTiming("my", 0.6, 0.8), WordTiming("friend.", 0.9, 1.6))
S2_WORDS = (WordTiming("Hi", 0.1, 0.4), WordTiming("there.", 0.5, 0.9))


@pytest.fixture(scope="session")
def tiny_snapshot(tiny_runtime: Dia2) -> VoiceSnapshot:
    """An ``s1_s2`` voice snapshot (2 s S1 prompt + 1 s S2 clip) of the tiny runtime."""
    prompt = VoicePrompt(
        s1=PromptClip(synthetic_speechlike(2.0, seed=1), S1_WORDS),
        s2=PromptClip(synthetic_speechlike(1.0, seed=2), S2_WORDS),
    )
    return build_snapshot(tiny_runtime, prompt)
