"""Audio for the phone line: G.711 and framing, TTS↔line conversion, pacing, voice activity.

Stateless of calls: every stateful object here (a converter, a pacer, a detector) is built
once per call and direction and never shared.
"""

from .convert import TTS_RATE, InboundAudio, OutboundAudio, Quality, fade_out_chunk
from .g711 import (
    ALAW_SILENCE,
    CHUNK_BYTES,
    CHUNK_MS,
    LINE_RATE,
    ULAW_SILENCE,
    alaw_to_pcm16,
    pcm16_to_alaw_numpy,
    pcm16_to_ulaw,
    pcm16_to_ulaw_numpy,
    ulaw_to_alaw,
    ulaw_to_pcm16,
    ulaw_to_pcm16_numpy,
)
from .pacing import Pacer
from .vad import BargeInDetector

__all__ = [
    "ALAW_SILENCE",
    "CHUNK_BYTES",
    "CHUNK_MS",
    "LINE_RATE",
    "TTS_RATE",
    "ULAW_SILENCE",
    "BargeInDetector",
    "InboundAudio",
    "OutboundAudio",
    "Pacer",
    "Quality",
    "alaw_to_pcm16",
    "fade_out_chunk",
    "pcm16_to_alaw_numpy",
    "pcm16_to_ulaw",
    "pcm16_to_ulaw_numpy",
    "ulaw_to_alaw",
    "ulaw_to_pcm16",
    "ulaw_to_pcm16_numpy",
]
