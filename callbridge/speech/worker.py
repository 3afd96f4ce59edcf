"""The speech worker: one thread that owns the transcriber; calls hand it utterances.

The event loop never runs a model (style.md): :meth:`SpeechWorker.submit` puts a job on a
bounded queue and returns at once; the worker thread resamples, decodes, applies the guards
and hands the :data:`Outcome` back on the job's loop with ``call_soon_threadsafe``. The
TTS worker is another thread, so a long transcription never delays a TTS step (on CPU they
still share cores: faster-whisper's ``cpu_threads`` bounds what STT takes).

Decided, not accidental:
- **queue full**: the new utterance is refused at once (``overloaded``) and its call is told;
  earlier utterances keep their place (a transcript that arrives late is still in order);
- **a failing decode** (any exception, out of memory included) fails that utterance only;
  the worker goes on with the next one;
- **the model fails to load**: every utterance fails with ``unavailable`` (the service keeps
  taking calls; speech events still flow, transcripts do not), logged once with the cause.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import soxr

from .transcriber import STT_RATE, DropReason, Guards, Transcriber, Transcript, apply_guards

__all__ = ["Dropped", "Failed", "FailureKind", "Outcome", "SpeechJob", "SpeechWorker"]

log = logging.getLogger(__name__)


class FailureKind(enum.Enum):
    OVERLOADED = "overloaded"  # the queue was full
    OUT_OF_MEMORY = "out_of_memory"
    ERROR = "error"  # the transcriber raised
    UNAVAILABLE = "unavailable"  # the model did not load, or the worker has stopped


@dataclass(frozen=True)
class Dropped:
    """The guards left nothing (silence, line noise, an unsure or looping decode): no transcript."""

    utterance_id: str
    reasons: tuple[DropReason, ...]
    stt_ms: float


@dataclass(frozen=True)
class Failed:
    """No transcript for this utterance; ``message`` names the error type, never caller data."""

    utterance_id: str
    kind: FailureKind
    message: str


Outcome = Transcript | Dropped | Failed


@dataclass
class SpeechJob:
    """One utterance to transcribe. ``deliver`` is called on ``loop`` with the outcome."""

    utterance_id: str
    pcm16: np.ndarray = field(repr=False)  # int16 [N] at sample_rate
    sample_rate: int
    loop: asyncio.AbstractEventLoop
    deliver: Callable[[Outcome], None]


_STOP = object()


class SpeechWorker:
    """Owns one transcriber on its own thread. ``factory`` builds it there (model loading is slow).

    ``queue_size``: utterances waiting, all calls together; one more is refused (``overloaded``).
    """

    def __init__(self, factory: Callable[[], Transcriber], guards: Guards | None = None, *, queue_size: int = 8) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.guards = guards or Guards()
        self._factory = factory
        self._queue: queue.Queue[SpeechJob | object] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="speech-worker", daemon=True)
        self._ready = threading.Event()
        self.transcriber: Transcriber | None = None
        self.load_error: str = ""
        self._stopping = False
        # Counters (read by metrics and benches; written on one thread each).
        self.transcribed = 0
        self.dropped = 0
        self.failed = 0
        self.refused = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until the model has loaded or failed to (for start-up and tests, not the loop)."""
        return self._ready.wait(timeout_s)

    @property
    def available(self) -> bool:
        return self._ready.is_set() and self.transcriber is not None and not self._stopping

    def stop(self, timeout_s: float = 5.0) -> None:
        """Finish the utterance in hand, fail those waiting (``unavailable``), release the model."""
        self._stopping = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, SpeechJob):
                self._deliver(job, Failed(job.utterance_id, FailureKind.UNAVAILABLE, "speech worker stopped"))
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------ submitting (event loop)

    def submit(self, job: SpeechJob) -> Failed | None:
        """Queue ``job``; None if queued, else the failure to report now (nothing is delivered later)."""
        if self._stopping:
            return Failed(job.utterance_id, FailureKind.UNAVAILABLE, "speech worker stopped")
        if self._ready.is_set() and self.transcriber is None:
            return Failed(job.utterance_id, FailureKind.UNAVAILABLE, self.load_error)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.refused += 1
            return Failed(job.utterance_id, FailureKind.OVERLOADED, f"{self._queue.maxsize} utterances already waiting")
        return None

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self.transcriber = self._factory()
        except Exception as exc:  # top of the thread: reported, and every job fails
            self.load_error = f"speech model did not load: {exc}"
            log.error("speech model did not load; caller transcripts are off", exc_info=True)
        finally:
            self._ready.set()
        while True:
            job = self._queue.get()
            if job is _STOP:
                break
            assert isinstance(job, SpeechJob)
            self._deliver(job, self._transcribe(job))
        if self.transcriber is not None:
            self.transcriber.close()
            self.transcriber = None

    def _transcribe(self, job: SpeechJob) -> Outcome:
        if self.transcriber is None:
            return Failed(job.utterance_id, FailureKind.UNAVAILABLE, self.load_error)
        t0 = time.perf_counter()
        try:
            audio = to_stt_audio(job.pcm16, job.sample_rate)
            segments = self.transcriber.decode(audio)
        except Exception as exc:  # one utterance fails; the worker and every call go on
            kind = FailureKind.OUT_OF_MEMORY if is_out_of_memory(exc) else FailureKind.ERROR
            self.failed += 1
            log.warning("transcription failed (%s: %s)", type(exc).__name__, kind.value,
                        exc_info=log.isEnabledFor(logging.DEBUG))
            if kind is FailureKind.OUT_OF_MEMORY:
                _free_device_memory()
            return Failed(job.utterance_id, kind, type(exc).__name__)
        stt_ms = (time.perf_counter() - t0) * 1000.0
        outcome = apply_guards(job.utterance_id, segments, self.guards, stt_ms)
        if isinstance(outcome, Transcript):
            self.transcribed += 1
            return outcome
        self.dropped += 1
        return Dropped(job.utterance_id, outcome, stt_ms)

    def _deliver(self, job: SpeechJob, outcome: Outcome) -> None:
        try:
            job.loop.call_soon_threadsafe(job.deliver, outcome)
        except RuntimeError:  # the call's loop has closed: nobody is left to tell
            log.debug("speech outcome for a closed loop discarded")


def to_stt_audio(pcm16: np.ndarray, sample_rate: int) -> np.ndarray:
    """int16 ``[N]`` at ``sample_rate`` → float32 ``[M]`` at 16 kHz in [-1, 1] (soxr, one shot)."""
    audio = pcm16.astype(np.float32) / 32768.0
    if sample_rate != STT_RATE:
        audio = soxr.resample(audio, sample_rate, STT_RATE, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, Python's MemoryError, or CTranslate2's "out of memory" RuntimeError."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _free_device_memory() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
