"""Build the speech pieces from ``[speech]`` settings: one rule for how settings map to objects."""

from __future__ import annotations

from collections.abc import Callable

from ..config import SpeechSettings
from .endpoint import EndpointerConfig
from .transcriber import DecodeOptions, Guards, Transcriber
from .worker import SpeechWorker

__all__ = ["endpointer_config", "guards", "speech_worker", "transcriber_factory"]


def endpointer_config(s: SpeechSettings) -> EndpointerConfig:
    return EndpointerConfig(
        silence_ms=s.silence_ms,
        max_utterance_s=s.max_utterance_s,
        pre_roll_ms=s.pre_roll_ms,
        tail_ms=min(200, s.silence_ms),
        min_speech_ms=s.min_speech_ms,
        aggressiveness=s.aggressiveness,
    )


def guards(s: SpeechSettings) -> Guards:
    return Guards(s.no_speech_threshold, s.logprob_threshold, s.compression_ratio_threshold)


def transcriber_factory(s: SpeechSettings) -> Callable[[], Transcriber]:
    """A function that loads the configured model (called on the worker's thread: loading is slow)."""
    options = DecodeOptions(beam_size=s.beam_size, word_timestamps=s.word_timestamps)

    def build() -> Transcriber:
        if s.backend == "faster-whisper":
            from .faster_backend import FasterWhisper

            return FasterWhisper(s.model, device=s.device, compute_type=s.compute_type,
                                 cpu_threads=s.cpu_threads, options=options)
        from .openai_backend import OpenAIWhisper

        return OpenAIWhisper(s.model, device=s.device, options=options)

    return build


def speech_worker(s: SpeechSettings) -> SpeechWorker:
    """A worker for these settings, not yet started."""
    return SpeechWorker(transcriber_factory(s), guards(s), queue_size=s.queue_size)
