"""callbridge.audio.vad: barge-in fires on sustained voice, never on silence or short bursts.

The "speech" is synthetic, made with numpy only: a ~150 Hz glottal-like harmonic series
shaped by three formants, with vibrato and a 4 Hz syllable-rate amplitude modulation.
"""

from __future__ import annotations

import numpy as np
import pytest

from callbridge.audio import pcm16_to_ulaw, ulaw_to_pcm16
from callbridge.audio.vad import BargeInDetector

RATE = 8000
FRAME = 160  # 20 ms


def voiced(seconds: float, *, f0: float = 150.0, level: float = 0.3, seed: int = 0) -> np.ndarray:
    """A vowel-like int16 signal at 8 kHz: harmonics of f0 under formants at 500/1500/2500 Hz."""
    rng = np.random.default_rng(seed)
    n = round(seconds * RATE)
    t = np.arange(n) / RATE
    f = f0 * (1 + 0.03 * np.sin(2 * np.pi * 5.0 * t + rng.uniform(0, 2 * np.pi)))  # vibrato
    phase = 2 * np.pi * np.cumsum(f) / RATE
    sig = np.zeros(n)
    for k in range(1, int(3400 / f0)):
        gain = sum(a * np.exp(-(((k * f0) - formant) / 150.0) ** 2)
                   for formant, a in ((500, 1.0), (1500, 0.5), (2500, 0.25))) + 0.05 / k
        sig += gain * np.sin(k * phase)
    sig /= np.abs(sig).max()
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4.0 * t)  # syllables
    return (sig * envelope * level * 32767).astype(np.int16)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), dtype=np.int16)


def first_trigger_ms(det: BargeInDetector, pcm: np.ndarray, piece: int = FRAME) -> list[float]:
    """Feed ``pcm`` in pieces; the times (ms of audio fed) at which feed() returned True."""
    fired = []
    for start in range(0, len(pcm), piece):
        if det.feed(pcm[start : start + piece]):
            fired.append(1000 * min(start + piece, len(pcm)) / RATE)
    return fired


def test_silence_never_triggers() -> None:
    det = BargeInDetector()
    assert first_trigger_ms(det, silence(10.0)) == []
    # Line noise well below speech level is not speech either (WebRTC alone flags some of it).
    hiss = (np.random.default_rng(1).standard_normal(10 * RATE) * 30).astype(np.int16)
    assert first_trigger_ms(det, hiss) == []
    # Decoded mu-law silence, as Twilio sends it.
    assert first_trigger_ms(det, ulaw_to_pcm16(b"\xff" * 8000 * 5)) == []
    assert det.triggers == 0


@pytest.mark.parametrize("min_speech_ms", [100, 200, 300])
def test_voice_triggers_after_min_speech_and_not_before(min_speech_ms: int) -> None:
    det = BargeInDetector(min_speech_ms=min_speech_ms)
    pcm = np.concatenate([silence(0.5), voiced(2.0)])
    fired = first_trigger_ms(det, pcm)
    assert len(fired) == 1, "fires once per utterance"
    onset_ms = 500
    assert onset_ms + min_speech_ms <= fired[0] <= onset_ms + min_speech_ms + 100


def test_short_bursts_do_not_trigger() -> None:
    det = BargeInDetector(min_speech_ms=200)
    for burst_s in (0.04, 0.1, 0.16, 0.18):
        pcm = np.concatenate([silence(0.4), voiced(burst_s, seed=int(burst_s * 100)), silence(0.4)] * 5)
        assert first_trigger_ms(det, pcm) == [], f"{burst_s * 1000:.0f} ms bursts"


def test_webrtc_hangover_is_not_counted_as_speech() -> None:
    """Bug guarded against: WebRTC keeps flagging ~100 ms after a sound stops, so without the
    level floor a 160 ms burst counted as 260 ms of speech and cut the bot off."""
    pcm = np.concatenate([silence(0.4), voiced(0.16), silence(0.4)])
    assert first_trigger_ms(BargeInDetector(min_level_dbfs=float("-inf")), pcm) != []
    assert first_trigger_ms(BargeInDetector(), pcm) == []


def test_pauses_within_an_utterance_do_not_restart_the_count() -> None:
    det = BargeInDetector(min_speech_ms=200, hangover_ms=100)
    syllable = voiced(0.12)
    pcm = np.concatenate([syllable, silence(0.06), syllable, silence(0.06), syllable])
    assert len(first_trigger_ms(det, pcm)) == 1


def test_fires_again_for_a_new_utterance_and_after_reset() -> None:
    det = BargeInDetector(min_speech_ms=200)
    pcm = np.concatenate([voiced(0.6), silence(0.5), voiced(0.6)])
    assert len(first_trigger_ms(det, pcm)) == 2
    det.reset()
    assert not det.in_utterance
    assert len(first_trigger_ms(det, voiced(0.6))) == 1
    assert det.triggers == 3


def test_any_piece_size_gives_the_same_answer() -> None:
    pcm = np.concatenate([silence(0.3), voiced(1.0)])
    results = set()
    for piece in (1, 77, 160, 333, 4000):
        det = BargeInDetector(min_speech_ms=200)
        fired = first_trigger_ms(det, pcm, piece)
        assert len(fired) == 1
        results.add(det.speech_ms)
    assert len(results) == 1


def test_works_on_mulaw_round_tripped_audio() -> None:
    """What the VAD really sees: speech that went through G.711 on the phone line."""
    line = ulaw_to_pcm16(pcm16_to_ulaw(np.concatenate([silence(0.2), voiced(1.0)])))
    assert len(first_trigger_ms(BargeInDetector(), line)) == 1


def test_other_sample_rates_and_argument_checks() -> None:
    det = BargeInDetector(sample_rate=16000)
    assert det.frame_samples == 320
    for bad in ({"sample_rate": 11025}, {"aggressiveness": 4}, {"min_speech_ms": 0}):
        with pytest.raises(ValueError):
            BargeInDetector(**bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        BargeInDetector().feed(np.zeros(160, dtype=np.float32))
