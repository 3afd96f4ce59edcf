"""dia2: our own Dia2 streaming TTS runtime (loading, model, text front end, Mimi, generation).

The public API is exactly the names in ``__all__`` below: callbridge (and any other user)
imports from ``dia2`` itself, never from its modules, so the modules can change freely behind
these names. A test (tests/test_layering.py) holds callbridge to it.

- Loading and whole utterances: :class:`Dia2` (``Dia2.load``), :class:`GenerationConfig`,
  :class:`SamplingParams`, :class:`GenerationResult`, :func:`resolve_checkpoint`,
  :func:`load_config`; random checkpoints of the official layout for tests and demos:
  :func:`write_random_checkpoint`, :func:`is_random_checkpoint`, :func:`resolve_random_model`
  (``random-tiny`` → its folder, written once); :data:`MAX_TOP_K`, the largest ``top_k`` /
  ``cfg_filter_k`` below the vocabulary that a step accepts (0 means no cut).
- Voices: :class:`VoicePrompt`, :class:`PromptClip`, :class:`WordTiming`; snapshots
  :class:`VoiceSnapshot`, :func:`build_snapshot`, :func:`load_snapshot`, :data:`LAYOUTS`,
  :data:`Layout`, :func:`identity_of`, :func:`weights_identity`.
- Streaming turns: :class:`StreamRunner` (many streams stepped together), :class:`Stream`,
  :class:`StreamStatus`, :class:`AudioFrame`.
- Text: :func:`normalize_text` (what the front end keeps of a text), :data:`FRAME_RATE_HZ`.
- Audio files: :func:`write_wav`, :func:`synthetic_speechlike` (a speech-like test signal).
- Errors: :class:`Dia2Error` and its subclasses; :class:`DeviceLost` (the CUDA context is
  gone: rebuild the runtime in a new process; :meth:`StreamRunner.step` raises it instead of
  failing streams one by one).
"""

from .audio_io import synthetic_speechlike, write_wav
from .checkpoint import resolve_checkpoint
from .config import load_config
from .errors import (
    CheckpointError,
    ConfigError,
    DeviceLost,
    Dia2Error,
    PromptError,
    ScriptError,
    SnapshotError,
    StreamError,
)
from .random_checkpoint import is_random_checkpoint, resolve_random_model, write_random_checkpoint
from .runtime import Dia2, GenerationResult, PromptClip, VoicePrompt
from .sampling import MAX_TOP_K, GenerationConfig, SamplingParams
from .snapshot import (
    LAYOUTS,
    Layout,
    VoiceSnapshot,
    build_snapshot,
    identity_of,
    load_snapshot,
    weights_identity,
)
from .stream import AudioFrame, Stream, StreamRunner, StreamStatus
from .text import FRAME_RATE_HZ, WordTiming, normalize_text

__all__ = [
    "FRAME_RATE_HZ",
    "LAYOUTS",
    "MAX_TOP_K",
    "AudioFrame",
    "CheckpointError",
    "ConfigError",
    "DeviceLost",
    "Dia2",
    "Dia2Error",
    "GenerationConfig",
    "GenerationResult",
    "Layout",
    "PromptClip",
    "PromptError",
    "SamplingParams",
    "ScriptError",
    "SnapshotError",
    "Stream",
    "StreamError",
    "StreamRunner",
    "StreamStatus",
    "VoicePrompt",
    "VoiceSnapshot",
    "WordTiming",
    "build_snapshot",
    "identity_of",
    "is_random_checkpoint",
    "load_config",
    "load_snapshot",
    "normalize_text",
    "resolve_random_model",
    "resolve_checkpoint",
    "synthetic_speechlike",
    "weights_identity",
    "write_random_checkpoint",
    "write_wav",
]
