"""dia2: our own Dia2 streaming TTS runtime (loading, model, text front end, Mimi, generation)."""

from .errors import (
    CheckpointError,
    ConfigError,
    Dia2Error,
    PromptError,
    ScriptError,
    SnapshotError,
    StreamError,
)
from .runtime import Dia2, GenerationResult, PromptClip, VoicePrompt
from .sampling import GenerationConfig, SamplingParams

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Dia2",
    "Dia2Error",
    "GenerationConfig",
    "GenerationResult",
    "PromptClip",
    "PromptError",
    "SamplingParams",
    "ScriptError",
    "SnapshotError",
    "StreamError",
    "VoicePrompt",
]
