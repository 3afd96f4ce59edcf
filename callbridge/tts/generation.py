"""The ``[tts]`` settings as a turn's sampling: the one place they become a :class:`dia2.GenerationConfig`."""

from __future__ import annotations

from dia2 import GenerationConfig, SamplingParams

from ..config import TtsSettings


def generation_config(tts: TtsSettings, *, seed: int) -> GenerationConfig:
    """The sampling of a turn from the ``[tts]`` settings: the one place they become a
    :class:`dia2.GenerationConfig` (calls, ``/ws/stream_tts`` and the benches all use it)."""
    return GenerationConfig(
        text=SamplingParams(tts.text_temperature, tts.top_k),
        audio=SamplingParams(tts.temperature, tts.top_k),
        cfg_scale=tts.cfg_scale,
        initial_padding=tts.initial_padding,
        seed=seed,
    )


def warm_up_config() -> GenerationConfig:
    """The warm-up turn's sampling (never heard): the official defaults, seed 0."""
    return GenerationConfig(seed=0)
