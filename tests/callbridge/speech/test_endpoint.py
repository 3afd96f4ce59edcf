"""callbridge.speech.endpoint: utterances start and stop where speech does, in any chunking."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callbridge.speech import Endpointer, EndpointerConfig, SpeechStarted, SpeechStopped
from callbridge.speech.endpoint import EndpointState

from .samples import FRAME, LINE_RATE, fixture_meta, fixture_pcm, line_noise, silence, speechlike

Event = SpeechStarted | SpeechStopped


def run(ep: Endpointer, pcm: np.ndarray, piece: int = FRAME, *, flush: bool = True) -> list[Event]:
    events: list[Event] = []
    for start in range(0, pcm.size, piece):
        events += ep.feed(pcm[start : start + piece])
    return events + (ep.flush() if flush else [])


def utterances(events: list[Event]) -> list[tuple[SpeechStarted, SpeechStopped]]:
    """Pairs (started, stopped); fails unless events alternate with matching ids."""
    pairs = []
    for i in range(0, len(events), 2):
        started, stopped = events[i], events[i + 1]
        assert isinstance(started, SpeechStarted) and isinstance(stopped, SpeechStopped), events
        assert started.utterance_id == stopped.utterance_id
        pairs.append((started, stopped))
    assert len(events) % 2 == 0, events
    return pairs


def test_silence_and_line_noise_start_nothing() -> None:
    ep = Endpointer()
    pcm = np.concatenate([silence(5.0), line_noise(5.0, -40.0), line_noise(5.0, -50.0, seed=1), silence(1.0)])
    assert run(ep, pcm) == []
    assert ep.utterances == 0 and ep.state is EndpointState.IDLE


def test_one_burst_gives_one_utterance_with_pre_roll_and_tail() -> None:
    cfg = EndpointerConfig(silence_ms=500, pre_roll_ms=300, tail_ms=200)
    pcm = np.concatenate([silence(1.0), speechlike(2.0), silence(1.0)])
    (started, stopped), = utterances(run(Endpointer(cfg), pcm))
    assert started.t_ms == pytest.approx(1000, abs=60)  # the first voiced frame
    assert stopped.t_ms == pytest.approx(3000, abs=60)  # the end of the last voiced frame
    assert stopped.reason == "silence" and not started.during_bot
    assert stopped.speech_ms == pytest.approx(2000, abs=100)
    # Audio: pre-roll + speech + tail, cut from the stream at the right place.
    assert stopped.audio_ms == (stopped.t_ms - started.t_ms) + 300 + 200
    first = (started.t_ms - 300) * LINE_RATE // 1000
    assert np.array_equal(stopped.audio, pcm[first : first + stopped.audio.size])


@pytest.mark.parametrize("silence_ms", [300, 500, 800])
def test_a_pause_shorter_than_silence_ms_does_not_split(silence_ms: int) -> None:
    short, long = (silence_ms - 100) / 1000, (silence_ms + 100) / 1000
    pcm = np.concatenate([speechlike(1.0), silence(short), speechlike(1.0, seed=1), silence(long),
                          speechlike(1.0, seed=2), silence(1.0)])
    pairs = utterances(run(Endpointer(EndpointerConfig(silence_ms=silence_ms)), pcm))
    assert len(pairs) == 2
    assert pairs[0][1].speech_ms == pytest.approx(2000, abs=100)


def test_the_stop_comes_silence_ms_after_the_last_voiced_frame() -> None:
    """The stopped event is returned by the feed that completes silence_ms of silence, not before."""
    cfg = EndpointerConfig(silence_ms=400)
    ep = Endpointer(cfg)
    events = run(ep, np.concatenate([silence(0.5), speechlike(1.0)]), flush=False)
    assert [type(e) for e in events] == [SpeechStarted]
    fed_ms = 0
    while True:
        out = ep.feed(silence(0.02))
        fed_ms += 20
        if out:
            break
    (stopped,) = out
    assert isinstance(stopped, SpeechStopped)
    # The synthetic signal's last frames may be unvoiced: the stop is silence_ms after the last voiced one.
    assert 1500 + fed_ms - stopped.t_ms == 400


def test_short_clicks_and_coughs_do_not_start_an_utterance() -> None:
    cfg = EndpointerConfig(min_speech_ms=100)
    pieces = []
    for seed in range(5):
        pieces += [silence(0.5), speechlike(0.06, seed=seed)]  # 60 ms: three frames
    assert run(Endpointer(cfg), np.concatenate(pieces + [silence(1.0)])) == []


def test_max_utterance_cuts_long_speech_without_overlap() -> None:
    cfg = EndpointerConfig(max_utterance_s=3.0, pre_roll_ms=300)
    pcm = np.concatenate([silence(0.5), speechlike(10.0), silence(1.0)])
    pairs = utterances(run(Endpointer(cfg), pcm))
    assert [stopped.reason for _, stopped in pairs] == ["max_length"] * 3 + ["silence"]
    assert all(stopped.audio_ms <= 3000 for _, stopped in pairs)
    # The pieces tile the speech: each later one starts where the last was cut (give or take the
    # few frames that reopen an utterance), and there is no pre-roll to repeat audio.
    for (_, prev), (nxt, _) in zip(pairs, pairs[1:]):
        assert 0 <= nxt.t_ms - prev.t_ms <= 100
    total_speech = sum(stopped.speech_ms for _, stopped in pairs)
    assert total_speech == pytest.approx(10000, abs=200)


def test_during_bot_is_whether_the_bot_was_audible_at_the_start() -> None:
    ep = Endpointer()
    events = ep.feed(silence(0.5), bot_audible=True) + ep.feed(speechlike(1.0), bot_audible=True)
    events += ep.feed(silence(1.0), bot_audible=False)
    (started, stopped), = utterances(events)
    assert started.during_bot and stopped.during_bot


def test_flush_closes_an_utterance_in_progress() -> None:
    ep = Endpointer(EndpointerConfig(tail_ms=200))
    events = run(ep, np.concatenate([silence(0.5), speechlike(1.0), silence(0.3)]), flush=False)
    assert [type(e) for e in events] == [SpeechStarted]
    (stopped,) = ep.flush()
    assert isinstance(stopped, SpeechStopped) and stopped.reason == "flush"
    assert stopped.audio_ms == 300 + (stopped.t_ms - events[0].t_ms) + 200
    assert ep.flush() == [] and ep.state is EndpointState.IDLE


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=2000), min_size=1, max_size=60))
def test_chunked_equals_whole(cuts: list[int]) -> None:
    pcm = np.concatenate([silence(0.4), speechlike(1.2), silence(0.6), speechlike(0.8, seed=3), silence(0.7)])
    whole = run(Endpointer(EndpointerConfig(silence_ms=300)), pcm, piece=pcm.size)
    ep = Endpointer(EndpointerConfig(silence_ms=300))
    events: list[Event] = []
    pos, i = 0, 0
    while pos < pcm.size:
        n = cuts[i % len(cuts)]
        events += ep.feed(pcm[pos : pos + n])
        pos, i = pos + n, i + 1
    events += ep.flush()
    assert len(events) == len(whole) == 4
    for a, b in zip(events, whole):
        assert type(a) is type(b)
        if isinstance(a, SpeechStopped) and isinstance(b, SpeechStopped):
            assert (a.utterance_id, a.t_ms, a.speech_ms, a.reason) == (b.utterance_id, b.t_ms, b.speech_ms, b.reason)
            assert np.array_equal(a.audio, b.audio)
        else:
            assert a == b


def test_real_speech_fixture_gives_one_utterance_per_sentence() -> None:
    meta = fixture_meta()
    pairs = utterances(run(Endpointer(), fixture_pcm()))
    assert len(pairs) == len(meta["utterances"])
    for (started, stopped), span in zip(pairs, meta["utterances"]):
        assert span["start_ms"] - 20 <= started.t_ms <= span["start_ms"] + 200
        assert started.t_ms < stopped.t_ms <= span["end_ms"] + 20


def test_reset_forgets_an_utterance_in_progress() -> None:
    ep = Endpointer()
    assert [type(e) for e in run(ep, speechlike(1.0), flush=False)] == [SpeechStarted]
    ep.reset()
    assert ep.state is EndpointState.IDLE and run(ep, silence(2.0)) == []


@pytest.mark.parametrize("kwargs", [{"silence_ms": 50}, {"max_utterance_s": 31.0}, {"pre_roll_ms": -1},
                                    {"tail_ms": 900, "silence_ms": 500}, {"min_speech_ms": 0}])
def test_bad_config_is_refused_with_the_key(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        EndpointerConfig(**kwargs)  # type: ignore[arg-type]


def test_utterance_audio_does_not_change_when_the_caller_buffer_is_reused() -> None:
    """A carrier may decode into one reused buffer: the endpointer keeps its own copy."""
    pcm = np.concatenate([silence(0.4), speechlike(1.0), silence(0.8)])
    expected = utterances(run(Endpointer(), pcm.copy()))[0][1].audio
    ep, events, buf = Endpointer(), [], np.zeros(FRAME, dtype=np.int16)
    for start in range(0, pcm.size, FRAME):
        buf[:] = pcm[start : start + FRAME]
        events += ep.feed(buf)
    buf[:] = 0
    (_, stopped), = utterances(events + ep.flush())
    assert np.array_equal(stopped.audio, expected)
