"""Barge-in detection: has the caller been talking long enough to stop the bot?

WebRTC's VAD classifies 20 ms frames of the caller's 8 kHz audio. A frame counts as speech
only if the VAD says so *and* it is louder than a floor: WebRTC keeps saying "speech" for
up to ~100 ms after a sound ends (its own hang-over), which would let a 150 ms cough pass
for 240 ms of talk. Speech frames add up within one utterance; gaps up to ``hangover_ms``
(a pause between syllables) do not end it, longer ones do. The detector fires once per
utterance, when its speech reaches ``min_speech_ms`` (shared/docs/twilio-media-streams.md
§7, §12: a minimum speech time keeps echo and short noises from cutting the bot off).

The per-frame rule (WebRTC says speech *and* louder than the floor) lives in one place,
:class:`VoicedFrames`, shared with the caller-speech endpointer (``callbridge.speech``).
"""

from __future__ import annotations

import numpy as np
import webrtcvad

__all__ = ["FRAME_MS", "BargeInDetector", "VoicedFrames"]

_RATES = (8000, 16000, 32000, 48000)  # what WebRTC's VAD accepts
FRAME_MS = 20


class VoicedFrames:
    """Cuts int16 PCM into 20 ms frames and says which are voiced; keeps a partial frame.

    ``aggressiveness``: WebRTC VAD mode 0 (least) to 3 (most eager to call audio non-speech).
    ``min_level_dbfs``: frames quieter than this (RMS, re full-scale int16) are not speech.
    """

    def __init__(self, aggressiveness: int = 2, sample_rate: int = 8000, *, min_level_dbfs: float = -45.0) -> None:
        if sample_rate not in _RATES:
            raise ValueError(f"sample_rate must be one of {_RATES}, got {sample_rate}")
        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"aggressiveness must be 0-3, got {aggressiveness}")
        self.aggressiveness = aggressiveness
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate * FRAME_MS // 1000
        # Mean square of int16 samples at the floor, compared without a sqrt per frame.
        self._min_power = (32768.0 * 10 ** (min_level_dbfs / 20)) ** 2
        self._vad = webrtcvad.Vad(aggressiveness)
        self._pending = np.zeros(0, dtype=np.int16)

    def feed(self, pcm16: np.ndarray) -> list[tuple[np.ndarray, bool]]:
        """Add int16 PCM ``[N]`` (any N); every whole frame completed, with its verdict, in order."""
        if not isinstance(pcm16, np.ndarray) or pcm16.dtype != np.int16 or pcm16.ndim != 1:
            raise TypeError("expected mono int16 PCM [N]")
        buf = np.concatenate((self._pending, pcm16)) if self._pending.size else pcm16
        usable = buf.size - buf.size % self.frame_samples
        out = []
        for start in range(0, usable, self.frame_samples):
            frame = buf[start : start + self.frame_samples]
            out.append((frame, self.is_voiced(frame)))
        self._pending = buf[usable:].copy()
        return out

    def is_voiced(self, frame: np.ndarray) -> bool:
        """One whole frame: WebRTC calls it speech and it is louder than the floor."""
        power = float(np.mean(frame.astype(np.float64) ** 2))
        return power >= self._min_power and self._vad.is_speech(frame.tobytes(), self.sample_rate)

    def reset(self) -> None:
        """Drop a partial frame."""
        self._pending = np.zeros(0, dtype=np.int16)


class BargeInDetector:
    """Feed caller PCM as it arrives; :meth:`feed` returns True once per long-enough utterance.

    ``min_speech_ms``: speech needed before barge-in, counted in whole 20 ms frames.
    ``aggressiveness``: WebRTC VAD mode 0 (least) to 3 (most eager to call audio non-speech).
    ``hangover_ms``: silence within an utterance that does not end it.
    ``min_level_dbfs``: frames quieter than this (RMS, re full-scale int16) are not speech.
    """

    def __init__(
        self,
        min_speech_ms: int = 200,
        aggressiveness: int = 2,
        sample_rate: int = 8000,
        *,
        hangover_ms: int = 100,
        min_level_dbfs: float = -45.0,
    ) -> None:
        if min_speech_ms <= 0 or hangover_ms < 0:
            raise ValueError("min_speech_ms must be > 0 and hangover_ms >= 0")
        self._frames = VoicedFrames(aggressiveness, sample_rate, min_level_dbfs=min_level_dbfs)
        self.min_speech_ms = min_speech_ms
        self.aggressiveness = aggressiveness
        self.sample_rate = sample_rate
        self.hangover_ms = hangover_ms
        self.frame_samples = self._frames.frame_samples
        self.speech_ms = 0  # speech in the current utterance
        self._silence_ms = 0  # silence since its last speech frame
        self._fired = False  # already reported for this utterance
        self.triggers = 0

    @property
    def in_utterance(self) -> bool:
        return self.speech_ms > 0

    def feed(self, pcm16: np.ndarray) -> bool:
        """Add int16 PCM ``[N]`` (any N); True if barge-in fired within this piece."""
        fired = False
        for _, voiced in self._frames.feed(pcm16):
            fired |= self._frame(voiced)
        return fired

    def _frame(self, voiced: bool) -> bool:
        if not voiced:
            if self.speech_ms:
                self._silence_ms += FRAME_MS
                if self._silence_ms > self.hangover_ms:
                    self._end_utterance()
            return False
        self._silence_ms = 0
        self.speech_ms += FRAME_MS
        if not self._fired and self.speech_ms >= self.min_speech_ms:
            self._fired = True
            self.triggers += 1
            return True
        return False

    def _end_utterance(self) -> None:
        self.speech_ms = 0
        self._silence_ms = 0
        self._fired = False

    def reset(self) -> None:
        """Forget the current utterance and any partial frame (e.g. when the bot stops talking)."""
        self._end_utterance()
        self._frames.reset()
