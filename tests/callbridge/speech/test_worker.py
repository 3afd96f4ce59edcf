"""callbridge.speech.worker and caller_speech: transcription off the loop, failures as events.

Plumbing with a random-weights openai-whisper model (no download) and fake transcribers
(fakes over mocks): one that answers a known text, one that fails, one that blocks until
the test lets it go (to fill the queue deterministically).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from callbridge.audio import LINE_RATE
from callbridge.speech import (
    CallerSpeech,
    DecodeOptions,
    Dropped,
    Failed,
    FailureKind,
    Guards,
    Segment,
    SpeechWorker,
    Transcriber,
    Transcript,
    Word,
)
from callbridge.speech.worker import Outcome, SpeechJob, to_stt_audio

from .samples import line_noise, silence, speechlike


def random_whisper(whisper: Any) -> Any:
    """A seeded 3.5 M-parameter Whisper; a 64-token text context caps a random decode at 32 tokens.

    openai-whisper allocates the decoder's positional embedding with ``torch.empty`` (a checkpoint
    always fills it): left alone it is whatever memory held before, NaN included."""
    import torch

    torch.manual_seed(0)
    model = whisper.model.Whisper(whisper.model.ModelDimensions(80, 1500, 64, 2, 1, 51864, 64, 64, 2, 1))
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(0, 0.02)
    return model


OPEN_GUARDS = Guards(no_speech_threshold=1.0, logprob_threshold=-1e9, compression_ratio_threshold=1e9)


class FakeTranscriber(Transcriber):
    """Answers ``text``, or raises ``error`` once; ``gate`` (if set) must open before each decode returns."""

    name = "fake"

    def __init__(self, text: str = " Hello there.", error: BaseException | None = None,
                 gate: threading.Event | None = None) -> None:
        super().__init__(DecodeOptions())
        self.text, self.error, self.gate = text, error, gate
        self.calls: list[tuple[int, str]] = []  # (samples, thread name)
        self.entered = threading.Event()

    def decode(self, audio16k: np.ndarray) -> list[Segment]:
        self.calls.append((audio16k.size, threading.current_thread().name))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "test never opened the gate"
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return [Segment(self.text, 0.0, 1.0, 0.05, -0.2, 1.1, (Word("Hello", 0.0, 0.4, 0.9),))]


class Outcomes:
    """Collects outcomes delivered on the loop; ``wait(n)`` returns once n have arrived."""

    def __init__(self) -> None:
        self.items: list[Outcome] = []
        self._changed = asyncio.Event()

    def __call__(self, outcome: Outcome) -> None:
        self.items.append(outcome)
        self._changed.set()

    async def wait(self, n: int) -> list[Outcome]:
        while len(self.items) < n:
            self._changed.clear()
            await self._changed.wait()
        return self.items


def started_worker(factory: Callable[[], Transcriber], **kw: Any) -> SpeechWorker:
    worker = SpeechWorker(factory, **kw)
    worker.start()
    assert worker.wait_ready(60)
    return worker


def gated_worker(**kw: Any) -> tuple[threading.Event, FakeTranscriber, SpeechWorker]:
    """A started worker whose every decode waits for the returned gate to open."""
    gate = threading.Event()
    fake = FakeTranscriber(gate=gate)
    return gate, fake, started_worker(lambda: fake, **kw)


def job(uid: str, sink: Outcomes, seconds: float = 1.0) -> SpeechJob:
    return SpeechJob(uid, speechlike(seconds), LINE_RATE, asyncio.get_running_loop(), sink)


# ------------------------------------------------------------------------------------ the worker


async def test_random_weights_openai_whisper_end_to_end() -> None:
    """The real backend's plumbing: 8 kHz utterance in, a Transcript with every field out, decoded on
    the worker thread. Random weights give near-flat logits; the final norm is set so that every
    text step says " hello", and the guards are opened to let it through. Word
    timestamps stay off: DTW over random alignment heads re-cuts segments unpredictably (words
    are checked on the real model in test_real_words.py)."""
    whisper = pytest.importorskip("whisper")
    import torch

    from callbridge.speech.openai_backend import OpenAIWhisper

    def build() -> Transcriber:
        model = random_whisper(whisper)
        hello = whisper.tokenizer.get_tokenizer(multilingual=False).encode(" hello")[0]
        with torch.no_grad():  # logits = ln(x) @ E^T: a zero gain and E[hello] as bias pick " hello"
            model.decoder.ln.weight.zero_()
            model.decoder.ln.bias.copy_(model.decoder.token_embedding.weight[hello] * 10)
        return OpenAIWhisper(model, options=DecodeOptions(word_timestamps=False))

    worker = started_worker(build, guards=OPEN_GUARDS)
    sink = Outcomes()
    try:
        assert worker.submit(job("u1", sink, 1.5)) is None
        (out,) = await sink.wait(1)
    finally:
        worker.stop()
    assert isinstance(out, Transcript), out
    assert out.utterance_id == "u1" and out.final and set(out.text.split()) == {"hello"}
    assert 0.0 <= out.no_speech_prob <= 1.0 and out.avg_logprob <= 0.0 and out.stt_ms > 0 and out.words == ()


async def test_the_default_guards_drop_a_random_models_output() -> None:
    """Random weights are as unsure as a model can be: with the real guards nothing comes out."""
    whisper = pytest.importorskip("whisper")

    from callbridge.speech.openai_backend import OpenAIWhisper

    def build() -> Transcriber:
        model = random_whisper(whisper)
        return OpenAIWhisper(model, options=DecodeOptions(word_timestamps=False))

    worker = started_worker(build)
    sink = Outcomes()
    try:
        worker.submit(job("u1", sink))
        (out,) = await sink.wait(1)
    finally:
        worker.stop()
    assert isinstance(out, Dropped) and out.reasons


async def test_decoding_runs_on_the_worker_thread_and_resamples_to_16k() -> None:
    fake = FakeTranscriber()
    worker = started_worker(lambda: fake)
    sink = Outcomes()
    try:
        worker.submit(job("u1", sink, 1.0))
        (out,) = await sink.wait(1)
    finally:
        worker.stop()
    assert isinstance(out, Transcript) and out.text == "Hello there."
    assert fake.calls == [(16000, "speech-worker")]


@pytest.mark.parametrize(("error", "kind"), [
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), FailureKind.OUT_OF_MEMORY),
    (MemoryError(), FailureKind.OUT_OF_MEMORY),
    (ValueError("bad"), FailureKind.ERROR),
])
async def test_a_failing_decode_fails_that_utterance_and_the_worker_goes_on(
    error: BaseException, kind: FailureKind
) -> None:
    fake = FakeTranscriber(error=error)
    worker = started_worker(lambda: fake)
    sink = Outcomes()
    try:
        worker.submit(job("u1", sink))
        worker.submit(job("u2", sink))
        first, second = await sink.wait(2)
    finally:
        worker.stop()
    assert first == Failed("u1", kind, type(error).__name__)
    assert isinstance(second, Transcript) and second.utterance_id == "u2"
    assert (worker.failed, worker.transcribed) == (1, 1)


async def test_a_model_that_does_not_load_makes_every_utterance_unavailable() -> None:
    def broken() -> Transcriber:
        raise FileNotFoundError("no such model: /nowhere/model.bin")

    worker = started_worker(broken)
    try:
        refused = worker.submit(job("u1", Outcomes()))
    finally:
        worker.stop()
    assert refused is not None and refused.kind is FailureKind.UNAVAILABLE
    assert "no such model" in refused.message and not worker.available


async def test_a_full_queue_refuses_the_new_utterance_and_keeps_the_earlier_ones() -> None:
    gate, fake, worker = gated_worker(queue_size=2)
    sink = Outcomes()
    try:
        assert worker.submit(job("u1", sink)) is None
        await asyncio.to_thread(fake.entered.wait, 30)  # u1 is being decoded: the queue is empty
        assert worker.submit(job("u2", sink)) is None
        assert worker.submit(job("u3", sink)) is None
        refused = worker.submit(job("u4", sink))
        assert refused is not None and refused.kind is FailureKind.OVERLOADED and worker.refused == 1
        gate.set()
        outs = await sink.wait(3)
    finally:
        gate.set()
        worker.stop()
    assert [o.utterance_id for o in outs] == ["u1", "u2", "u3"]


async def test_stop_fails_waiting_utterances_as_unavailable() -> None:
    gate, fake, worker = gated_worker(queue_size=4)
    sink = Outcomes()
    worker.submit(job("u1", sink))
    await asyncio.to_thread(fake.entered.wait, 30)
    worker.submit(job("u2", sink))
    stopper = asyncio.create_task(asyncio.to_thread(worker.stop))
    outs = await sink.wait(1)  # u2 fails at once; u1 is still in the decoder
    assert outs[0] == Failed("u2", FailureKind.UNAVAILABLE, "speech worker stopped")
    gate.set()
    await stopper
    outs = await sink.wait(2)
    assert outs[1].utterance_id == "u1"
    assert worker.submit(job("u3", sink)) == Failed("u3", FailureKind.UNAVAILABLE, "speech worker stopped")


def test_to_stt_audio_is_float_16k() -> None:
    out = to_stt_audio(speechlike(1.0), LINE_RATE)
    assert out.dtype == np.float32 and out.size == 16000 and np.abs(out).max() <= 1.0


# ------------------------------------------------------------------------------------ a call's caller speech


class Events:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def __call__(self, event: dict[str, Any]) -> None:
        self.items.append(event)
        self._changed.set()

    async def until(self, name: str, n: int = 1) -> list[dict[str, Any]]:
        while sum(e["event"] == name for e in self.items) < n:
            self._changed.clear()
            await self._changed.wait()
        return self.items

    def names(self) -> list[str]:
        return [e["event"] for e in self.items]


class Frame:
    def __init__(self, pcm16: np.ndarray, sample_rate: int = LINE_RATE) -> None:
        self.pcm16, self.sample_rate = pcm16, sample_rate


def feed(speech: CallerSpeech, pcm: np.ndarray) -> None:
    for start in range(0, pcm.size, 160):
        speech.on_caller_audio(Frame(pcm[start : start + 160]))


async def test_caller_speech_emits_started_stopped_then_the_transcript() -> None:
    worker = started_worker(FakeTranscriber)
    events = Events()
    bot = {"audible": True}
    speech = CallerSpeech(events, worker, bot_audible=lambda: bot["audible"])
    try:
        feed(speech, np.concatenate([silence(0.5), speechlike(1.0), silence(1.0)]))
        await events.until("caller_transcript")
    finally:
        worker.stop()
    started, stopped, transcript = events.items
    assert started == {"event": "caller_speech_started", "utterance_id": "u1", "t_ms": started["t_ms"],
                       "during_bot": True}
    assert stopped["event"] == "caller_speech_stopped" and stopped["reason"] == "silence"
    assert stopped["speech_ms"] > 800 and stopped["t_ms"] > started["t_ms"]
    assert transcript["event"] == "caller_transcript" and transcript["utterance_id"] == "u1"
    assert transcript["text"] == "Hello there." and transcript["final"] is True and transcript["during_bot"] is True
    assert transcript["words"] == [{"word": "Hello", "start": 0.0, "end": 0.4, "p": 0.9}]
    assert set(transcript) == {"event", "utterance_id", "text", "final", "words", "no_speech_prob", "avg_logprob",
                               "stt_ms", "eos_to_final_ms", "during_bot"}
    assert transcript["eos_to_final_ms"] >= 0 and speech.pending == 0


async def test_noise_and_silence_give_no_transcript() -> None:
    """Only VAD-bounded audio reaches the transcriber: silence and line noise never do."""
    fake = FakeTranscriber()
    worker = started_worker(lambda: fake)
    events = Events()
    speech = CallerSpeech(events, worker)
    try:
        feed(speech, np.concatenate([silence(3.0), line_noise(3.0, -40.0), line_noise(3.0, -50.0, seed=2)]))
        speech.close(flush=True)
    finally:
        worker.stop()
    assert events.items == [] and fake.calls == []


async def test_transcription_never_blocks_the_loop() -> None:
    """While the transcriber is busy, frames keep flowing and the next utterance is endpointed."""
    gate, fake, worker = gated_worker()
    events = Events()
    speech = CallerSpeech(events, worker)
    try:
        feed(speech, np.concatenate([speechlike(1.0), silence(0.8)]))
        await asyncio.to_thread(fake.entered.wait, 30)  # u1 is in the decoder, held there
        feed(speech, np.concatenate([speechlike(1.0, seed=1), silence(0.8)]))
        assert events.names() == ["caller_speech_started", "caller_speech_stopped"] * 2
        gate.set()
        await events.until("caller_transcript", 2)
    finally:
        gate.set()
        worker.stop()
    assert [e["utterance_id"] for e in events.items if e["event"] == "caller_transcript"] == ["u1", "u2"]


async def test_failures_and_drops_become_events_and_the_call_goes_on() -> None:
    fake = FakeTranscriber(error=RuntimeError("CUDA out of memory"))
    worker = started_worker(lambda: fake)
    events = Events()
    speech = CallerSpeech(events, worker)
    try:
        feed(speech, np.concatenate([speechlike(1.0), silence(0.8)]))
        await events.until("caller_transcript_failed")
        fake.text = " ..."
        feed(speech, np.concatenate([speechlike(1.0, seed=1), silence(0.8)]))
        await events.until("caller_transcript_dropped")
    finally:
        worker.stop()
    failed = next(e for e in events.items if e["event"] == "caller_transcript_failed")
    dropped = next(e for e in events.items if e["event"] == "caller_transcript_dropped")
    assert failed == {"event": "caller_transcript_failed", "utterance_id": "u1", "error": "out_of_memory",
                      "message": "RuntimeError"}
    assert dropped == {"event": "caller_transcript_dropped", "utterance_id": "u2", "reason": "empty"}


async def test_without_a_worker_speech_events_still_flow() -> None:
    events = Events()
    speech = CallerSpeech(events, None)
    feed(speech, np.concatenate([speechlike(1.0), silence(0.8)]))
    assert events.names() == ["caller_speech_started", "caller_speech_stopped", "caller_transcript_failed"]
    assert events.items[-1]["error"] == "unavailable"


async def test_an_outcome_after_close_is_not_emitted() -> None:
    gate, fake, worker = gated_worker()
    events = Events()
    speech = CallerSpeech(events, worker)
    try:
        feed(speech, np.concatenate([speechlike(1.0), silence(0.8)]))
        await asyncio.to_thread(fake.entered.wait, 30)
        speech.close()
        gate.set()
        # The worker hands the outcome to the loop before its thread ends, so by the time this
        # await resumes (itself a later callback on the same loop) the outcome has been handled.
        await asyncio.to_thread(worker.stop)
    finally:
        gate.set()
    assert events.names() == ["caller_speech_started", "caller_speech_stopped"]
    assert speech.late_outcomes == 1 and worker.transcribed == 1
