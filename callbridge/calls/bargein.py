"""Barge-in: the caller talks over the bot long enough, so the bot stops.

A caller-audio consumer of the call. Every caller frame goes through the voice activity
detector, speech or silence, bot talking or not. What counts as barge-in is speech while the
bot is audible: the detector's utterance restarts when the bot starts being audible, so
speech from before does not count, and a detection while the bot is silent cuts nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from ..audio import BargeInDetector
from ..config import BargeInSettings
from .leg import CallerAudio

__all__ = ["BargeIn"]


class BargeIn:
    """Calls ``cut()`` when the caller has spoken ``min_speech_ms`` over audible bot audio."""

    def __init__(self, settings: BargeInSettings, *, bot_audible: Callable[[], bool], cut: Callable[[], None]) -> None:
        self.detector = BargeInDetector(min_speech_ms=settings.min_speech_ms, aggressiveness=settings.aggressiveness)
        self._bot_audible = bot_audible
        self._cut = cut
        self._was_audible = False
        self.frames_seen = 0  # caller audio events fed to the detector

    def on_caller_audio(self, audio: CallerAudio) -> None:
        audible = self._bot_audible()
        if audible and not self._was_audible:
            self.detector.reset()  # count the caller's speech from when the bot can be talked over
        self._was_audible = audible
        self.frames_seen += 1
        if audio.sample_rate != self.detector.sample_rate:
            raise ValueError(f"barge-in reads {self.detector.sample_rate} Hz caller audio, not {audio.sample_rate} Hz")
        if self.detector.feed(audio.pcm16) and audible:
            self._cut()
