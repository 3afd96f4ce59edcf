"""Voices: the registry of built voices, and building them (prompt audio, word timings, snapshot, CLI)."""

from .registry import (
    DEMO_VOICE,
    MANIFEST_FILE,
    SNAPSHOT_FILE,
    Voice,
    VoiceError,
    VoiceRegistry,
    demo_voice_prompt,
)

__all__ = ["DEMO_VOICE", "MANIFEST_FILE", "SNAPSHOT_FILE", "Voice", "VoiceError", "VoiceRegistry", "demo_voice_prompt"]
