"""Caller speech: endpointing from the caller's audio, speech-to-text off the event loop, events out.

- :mod:`.endpoint`: sans-I/O endpointer (VAD-bounded utterances, pre-roll, max length);
- :mod:`.transcriber`: the one STT interface, decode rules and the guards against Whisper's
  phone-line failures; backends :mod:`.faster_backend` and :mod:`.openai_backend`;
- :mod:`.worker`: the thread that owns the model, a bounded queue, failures as outcomes;
- :mod:`.caller_speech`: one call's consumer of caller audio, emitting the app's events;
- :mod:`.factory`: ``[speech]`` settings → these objects; :mod:`.wer`: word error rate;
  :mod:`.ct2_convert`: faster-whisper model → openai-whisper checkpoint.

Backends are imported lazily (torch / CTranslate2 load only when a model is configured).
"""

from .caller_speech import CallerFrame, CallerSpeech
from .endpoint import Endpointer, EndpointerConfig, SpeechStarted, SpeechStopped
from .factory import endpointer_config, speech_worker
from .transcriber import DecodeOptions, Guards, Segment, Transcriber, TranscriberError, Transcript, Word
from .worker import Dropped, Failed, FailureKind, SpeechWorker

__all__ = [
    "CallerFrame",
    "CallerSpeech",
    "DecodeOptions",
    "Dropped",
    "Endpointer",
    "EndpointerConfig",
    "Failed",
    "FailureKind",
    "Guards",
    "Segment",
    "SpeechStarted",
    "SpeechStopped",
    "SpeechWorker",
    "Transcriber",
    "TranscriberError",
    "Transcript",
    "Word",
    "endpointer_config",
    "speech_worker",
]
