"""The voice check's judgement on audio and words whose answer is known (no model), and its report."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from callbridge.config import SettingsError, VoiceCheckSettings, load_settings
from callbridge.speech.transcriber import Word
from callbridge.speech.wer import normalise, ordinal_words
from callbridge.voicecheck.analysis import (
    ACTIVE_DBFS,
    PromptInput,
    TurnInput,
    analyse,
    find_leak,
    measure_level,
    pre_speech_ms,
    speech_span,
)
from callbridge.voicecheck.report import PAGE_FILE, REPORT_FILE, write_report
from callbridge.voicecheck.sentences import DEFAULT_SENTENCES, SentenceError, choose_sentences, read_sentences

RATE = 24000


def tone(seconds: float, amplitude: float = 0.3, f_hz: float = 220.0) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * f_hz * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), dtype=np.float32)


def words(text: str, start: float = 0.5, step: float = 0.3) -> tuple[Word, ...]:
    return tuple(Word(w, start + i * step, start + (i + 0.8) * step, 0.9) for i, w in enumerate(text.split()))


def turn(text: str, heard: str, pcm: np.ndarray | None = None, *, start: float = 0.5,
         embedding: np.ndarray | None = None) -> TurnInput:
    pcm = pcm if pcm is not None else np.concatenate([silence(start), tone(len(text.split()) * 0.3)])
    return TurnInput(text=text, pcm24k=pcm, pcm8k=pcm[::3], heard=words(heard, start), heard_text=heard,
                     embedding=embedding, ttfa_s=0.2)


PROMPT = "Good morning, you are through to the front desk of the riverside hotel."


# ---------------------------------------------------------------------------- normaliser


def test_normaliser_speaks_ordinals_times_and_amounts_like_the_sentences_say_them() -> None:
    assert normalise("March 14th at 3:30") == normalise("march fourteenth at three thirty")
    assert normalise("at 9:00") == ["at", "nine"] and normalise("9:05") == ["nine", "oh", "five"]
    assert normalise("$45.20") == normalise("forty five dollars and twenty cents")
    assert normalise("$1") == ["one", "dollar"]
    assert [ordinal_words(n) for n in (1, 2, 3, 12, 20, 21, 100)] == [
        ["first"], ["second"], ["third"], ["twelfth"], ["twentieth"], ["twenty", "first"], ["one", "hundredth"]]
    assert normalise("22 Baker Street") == ["twenty", "two", "baker", "street"]  # not an ordinal


# ---------------------------------------------------------------------------- audio figures


def test_level_peak_and_clipping_are_measured_on_the_audible_part() -> None:
    quiet_gap = np.concatenate([silence(1.0), tone(1.0, 0.5)])
    level = measure_level(quiet_gap, RATE)
    assert level.rms_dbfs == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.2)  # silence not averaged in
    assert level.peak_dbfs == pytest.approx(20 * math.log10(0.5), abs=0.01)
    assert level.clipped_fraction == 0.0
    clipped = np.clip(tone(1.0, 2.0), -1.0, 1.0)
    assert measure_level(clipped, RATE).clipped_fraction > 0.3
    assert measure_level(silence(1.0), RATE).rms_dbfs == -math.inf


def test_speech_span_and_sound_before_the_first_word() -> None:
    pcm = np.concatenate([silence(0.5), tone(0.4, 0.1), silence(0.3), tone(1.0)])  # a 0.4 s mumble, then speech
    assert speech_span(pcm, RATE) == pytest.approx((0.5, 2.2), abs=0.021)
    assert pre_speech_ms(pcm, RATE, first_word_s=1.2) == pytest.approx(400, abs=20)
    # Silence before the first word, or a word whose timing starts a little late, is not flagged.
    assert pre_speech_ms(np.concatenate([silence(1.0), tone(1.0)]), RATE, first_word_s=1.0) == 0
    assert pre_speech_ms(np.concatenate([silence(1.0), tone(1.0)]), RATE, first_word_s=1.15) == 0
    assert speech_span(silence(1.0) + 10 ** (ACTIVE_DBFS / 20) / 4, RATE) is None


# ---------------------------------------------------------------------------- prompt leak


def test_a_turn_that_opens_with_the_prompt_leaks() -> None:
    heard = words("Good morning you are through to the front desk. Your order ships on Friday.")
    leak = find_leak(heard, PROMPT, "Your order ships on Friday.", min_words=3)
    assert leak is not None and leak.words[:3] == ("good", "morning", "you") and leak.at_s == pytest.approx(0.5)
    assert len(leak.words) == 9  # the whole run, not only the first three
    assert leak.end_s == pytest.approx(0.5 + 8.8 * 0.3)


def test_prompt_words_said_by_the_sentence_itself_or_too_few_are_no_leak() -> None:
    own = "Good morning, how can I help?"
    assert find_leak(words("Good morning, how can I help?"), PROMPT, own, min_words=2) is None
    assert find_leak(words("The front desk is open."), PROMPT, "The front desk is open.", min_words=3) is None
    assert find_leak(words("Riverside is lovely."), PROMPT, "Riverside is lovely.", min_words=3) is None
    # The prompt's words late in a long turn are not its opening.
    late = words(" ".join(["word"] * 20) + " good morning you are through")
    assert find_leak(late, PROMPT, "unrelated", min_words=3) is None


# ---------------------------------------------------------------------------- the verdict


def test_a_good_turn_passes_and_each_bad_figure_fails_with_its_reason() -> None:
    t = VoiceCheckSettings()
    a = np.ones(4, dtype=np.float32)
    good = turn("Your order ships on Friday.", "Your order ships on Friday.", embedding=a)
    result = analyse([good, good], PromptInput(PROMPT, a), t)
    assert result.passed and result.wer == 0 and result.leak_turns == 0, result.failures
    assert result.turns[0].prompt_similarity == pytest.approx(1.0) and result.turns[0].turn_similarity == 1.0
    assert result.turns[0].words_per_s == pytest.approx(5 / 1.5, rel=0.05)

    other = np.array([1, -1, 1, -1], dtype=np.float32)
    cases = {
        "word error rate": turn("Your order ships on Friday.", "Hello there.", embedding=a),
        "prompt's own words": turn("Your order ships on Friday.",
                                   "Good morning you are through Your order ships on Friday.", embedding=a),
        "similarity to the prompt": turn("Your order ships on Friday.", "Your order ships on Friday.",
                                         embedding=other),
        "before the first word": turn("Your order ships on Friday.", "Your order ships on Friday.",
                                      np.concatenate([tone(1.0, 0.1), tone(1.5)]), start=1.0, embedding=a),
        "full scale": turn("Your order ships on Friday.", "Your order ships on Friday.",
                           np.concatenate([silence(0.5), np.clip(tone(1.5, 2.0), -1, 1)]), embedding=a),
        "speech level": turn("Your order ships on Friday.", "Your order ships on Friday.",
                             np.concatenate([silence(0.5), tone(1.5, 0.01)]), embedding=a),
        "speaking rate": turn("Your order ships on Friday.", "Your order ships on Friday.",
                              np.concatenate([silence(0.5), tone(6.0)]), embedding=a),
    }
    for reason, bad in cases.items():
        result = analyse([good, bad], PromptInput(PROMPT, a), t)
        assert not result.passed, reason
        assert any(reason in f for f in result.turns[1].failures), (reason, result.failures)
        assert not result.turns[0].failures or reason == "similarity to the prompt", (reason, result.turns[0].failures)

    # Thresholds come from the settings: the same leak passes when one leaking turn is allowed.
    leak = cases["prompt's own words"]
    assert analyse([good, leak], PromptInput(PROMPT, a), replace(t, max_leak_turns=1, max_turn_wer=1.0,
                                                               max_wer=1.0)).passed


def test_time_to_first_audio_is_reported_and_judged_only_when_a_bound_is_set() -> None:
    slow = replace(turn("Hello there.", "Hello there."), ttfa_s=3.0)
    assert analyse([slow], PromptInput(PROMPT), VoiceCheckSettings()).passed
    failed = analyse([slow], PromptInput(PROMPT), VoiceCheckSettings(max_ttfa_s=1.0))
    assert any("time to first audio 3.00 s" in f for f in failed.failures)


def test_voice_check_settings_are_validated_with_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[voice_check]\nmin_prompt_similarity = 1.5\n")
    with pytest.raises(SettingsError, match=r"voice_check.min_prompt_similarity = 1.5"):
        load_settings(config, env={})
    config.write_text("[voice_check]\nmax_wer = 0.1\nstt_model = '/m'\n")
    vc = load_settings(config, env={}).voice_check
    assert vc.max_wer == 0.1 and vc.stt_model == "/m"


# ---------------------------------------------------------------------------- sentences and report


def test_sentences_file_and_turns(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_text("# mine\nHello there.\n\nIs it nine?\n")
    assert read_sentences(path) == ("Hello there.", "Is it nine?")
    assert choose_sentences(("a", "b"), 5) == ("a", "b", "a", "b", "a")
    path.write_text("# nothing\n...\n")
    with pytest.raises(SentenceError, match=r"s.txt:2: no words"):
        read_sentences(path)
    with pytest.raises(SentenceError, match="no such file"):
        read_sentences(tmp_path / "missing.txt")
    assert any("?" in s for s in DEFAULT_SENTENCES) and any(len(s) > 200 for s in DEFAULT_SENTENCES)


def test_report_json_and_page_hold_every_turn_its_words_and_the_verdict(tmp_path: Path) -> None:
    a = np.ones(4, dtype=np.float32)
    turns = [turn("Your order ships on Friday.", "Your order ships on Friday.", embedding=a),
             turn("Hello.", "Good morning you are through Hello.", embedding=a)]
    result = analyse(turns, PromptInput(PROMPT, a), VoiceCheckSettings())
    page = write_report(tmp_path / "r", result, voice="amy", turns_pcm24k=[t.pcm24k for t in turns],
                        turns_pcm8k=[t.pcm8k for t in turns], meta={"model": "m", "stt_model": "s"})
    data = json.loads((tmp_path / "r" / REPORT_FILE).read_text())
    assert data["passed"] is False and data["leak_turns"] == 1 and len(data["turns"]) == 2
    assert data["turns"][1]["leak"]["words"].startswith("good morning you")
    assert data["turns"][0]["words"][0] == {"word": "Your", "start": 0.5, "end": 0.74, "p": 0.9}
    assert data["similarity"] == [[1.0, 1.0], [1.0, 1.0]] and data["thresholds"]["max_wer"] == VoiceCheckSettings().max_wer
    text = page.read_text()
    assert page.name == PAGE_FILE and "FAIL" in text and text.count("<svg") == 2 and ">Friday.<" in text
    assert "prompt leak" in text and 'src="turn2_8k.wav"' in text
    assert (tmp_path / "r" / "turn1_24k.wav").is_file() and (tmp_path / "r" / "turn2_8k.wav").is_file()
