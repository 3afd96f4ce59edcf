"""Endpointing: where a caller's utterance starts and ends, from the caller's audio alone.

Sans-I/O: :meth:`Endpointer.feed` takes int16 PCM as the carrier delivered it (every frame,
speech or not) and returns :class:`SpeechStarted` / :class:`SpeechStopped` events; the
stopped event carries the utterance's audio, which is all a transcriber ever sees (Whisper
invents text on silence and line noise, so only VAD-bounded audio goes to it).

Rules (all times are caller-audio time, counted from the first sample fed, so a test and
a live call see the same events):
- frames are 20 ms and voiced by :class:`~callbridge.audio.vad.VoicedFrames` (WebRTC VAD
  and a level floor, the same rule barge-in uses);
- an utterance **starts** once ``min_speech_ms`` of voiced frames gather with no gap longer
  than ``start_gap_ms``; ``t_ms`` is its first voiced frame, and its audio begins
  ``pre_roll_ms`` earlier (the VAD misses soft onsets such as "h" and "f");
- it **stops** after ``silence_ms`` without a voiced frame; its audio ends ``tail_ms`` after
  the last voiced frame and ``t_ms`` is the end of that frame;
- it is **cut** at ``max_utterance_s``: a caller who talks on gets a new utterance, started
  by the same rule, with no pre-roll (that audio is already in the cut one).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..audio.vad import FRAME_MS, VoicedFrames

__all__ = ["EndpointState", "Endpointer", "EndpointerConfig", "SpeechEvent", "SpeechStarted", "SpeechStopped"]


@dataclass(frozen=True)
class EndpointerConfig:
    """Endpointing rules. Times in ms unless the name says otherwise; all multiples of 20 ms are exact."""

    silence_ms: int = 500  # silence that ends an utterance (peers: 300-800 ms)
    max_utterance_s: float = 15.0  # longer speech is cut into utterances of at most this
    pre_roll_ms: int = 300  # audio kept from before the first voiced frame
    tail_ms: int = 200  # silence kept after the last voiced frame (Whisper ends words better with some)
    min_speech_ms: int = 100  # voiced time that opens an utterance (a click or a cough is shorter)
    start_gap_ms: int = 100  # a gap longer than this before min_speech_ms abandons the start
    aggressiveness: int = 2  # WebRTC VAD mode 0-3
    min_level_dbfs: float = -45.0  # quieter frames are not speech (line noise)

    def __post_init__(self) -> None:
        if not 100 <= self.silence_ms <= 5000:
            raise ValueError(f"silence_ms must be 100…5000, got {self.silence_ms}")
        if not 1.0 <= self.max_utterance_s <= 30.0:
            raise ValueError(f"max_utterance_s must be 1…30 (Whisper's window is 30 s), got {self.max_utterance_s}")
        if not 0 <= self.pre_roll_ms <= 1000:
            raise ValueError(f"pre_roll_ms must be 0…1000, got {self.pre_roll_ms}")
        if not 0 <= self.tail_ms <= self.silence_ms:
            raise ValueError(f"tail_ms must be 0…silence_ms ({self.silence_ms}), got {self.tail_ms}")
        if not FRAME_MS <= self.min_speech_ms <= 1000:
            raise ValueError(f"min_speech_ms must be {FRAME_MS}…1000, got {self.min_speech_ms}")
        if self.start_gap_ms < 0:
            raise ValueError(f"start_gap_ms must be >= 0, got {self.start_gap_ms}")


@dataclass(frozen=True)
class SpeechStarted:
    """The caller started an utterance at ``t_ms`` (caller-audio time); ``during_bot``: the bot was audible."""

    utterance_id: str
    t_ms: int
    during_bot: bool


@dataclass(frozen=True)
class SpeechStopped:
    """The utterance ended at ``t_ms``; ``speech_ms`` of it was voiced; ``audio`` is what to transcribe.

    ``reason``: ``"silence"`` (``silence_ms`` passed), ``"max_length"`` (cut at ``max_utterance_s``)
    or ``"flush"`` (the audio ended, e.g. the call did). ``audio``: int16 ``[N]`` at ``sample_rate``,
    pre-roll included. Caller data: never logged.
    """

    utterance_id: str
    t_ms: int
    speech_ms: int
    reason: Literal["silence", "max_length", "flush"]
    during_bot: bool
    sample_rate: int
    audio: np.ndarray = field(repr=False)

    @property
    def audio_ms(self) -> int:
        return self.audio.size * 1000 // self.sample_rate


SpeechEvent = SpeechStarted | SpeechStopped


class EndpointState(enum.Enum):
    IDLE = "idle"  # no speech (a start may be gathering)
    SPEECH = "speech"  # inside an utterance


class Endpointer:
    """Feed a caller's PCM as it arrives; get speech events. One per call; :meth:`reset` to reuse."""

    def __init__(self, config: EndpointerConfig | None = None, sample_rate: int = 8000) -> None:
        self.config = config = config or EndpointerConfig()
        self.sample_rate = sample_rate
        self._frames = VoicedFrames(config.aggressiveness, sample_rate, min_level_dbfs=config.min_level_dbfs)
        self._pre_roll_frames = config.pre_roll_ms // FRAME_MS
        self._max_frames = round(config.max_utterance_s * 1000) // FRAME_MS
        self._tail_frames = config.tail_ms // FRAME_MS
        self.utterances = 0  # utterances started, over the endpointer's life
        self.reset()

    def reset(self) -> None:
        """Forget everything in flight (the clock restarts at 0; ids keep counting)."""
        self.state = EndpointState.IDLE
        self._frames.reset()
        self._t_frames = 0  # frames fed so far: the clock
        self._ring: deque[np.ndarray] = deque(maxlen=max(self._pre_roll_frames, 1))
        self._clear_start()
        self._clear_utterance()

    def _clear_start(self) -> None:
        self._start_frames: list[np.ndarray] = []  # since the first voiced frame of a possible start
        self._start_voiced = 0  # voiced frames among them
        self._start_gap = 0  # unvoiced frames since the last voiced one
        self._start_t = 0  # frame index of the first voiced frame

    def _clear_utterance(self) -> None:
        self._utt_frames: list[np.ndarray] = []
        self._utt_id = ""
        self._utt_voiced = 0
        self._utt_silence = 0  # unvoiced frames since the last voiced frame
        self._utt_during_bot = False
        self._utt_last_voiced_end = 0  # frame index just after the last voiced frame

    # ------------------------------------------------------------------ feeding

    def feed(self, pcm16: np.ndarray, *, bot_audible: bool = False) -> list[SpeechEvent]:
        """Add int16 PCM ``[N]`` (any N); the events completed within it, in order.

        ``bot_audible``: whether the bot's audio is playing to the caller now (becomes
        ``during_bot`` of an utterance that starts within this piece).
        """
        events: list[SpeechEvent] = []
        for view, voiced in self._frames.feed(pcm16):
            frame = view.copy()  # kept for up to max_utterance_s: never a view of the caller's buffer
            if self.state is EndpointState.IDLE:
                self._idle_frame(frame, voiced, bot_audible, events)
            else:
                self._speech_frame(frame, voiced, events)
            self._t_frames += 1
        return events

    def flush(self) -> list[SpeechEvent]:
        """The audio has ended: close an utterance in progress (``reason="flush"``), if any."""
        events: list[SpeechEvent] = []
        if self.state is EndpointState.SPEECH:
            keep = len(self._utt_frames) - max(self._utt_silence - self._tail_frames, 0)
            events.append(self._stop("flush", keep))
        self._clear_start()
        self._frames.reset()
        return events

    def _idle_frame(self, frame: np.ndarray, voiced: bool, bot_audible: bool, events: list[SpeechEvent]) -> None:
        cfg = self.config
        if not self._start_frames:
            if not voiced:
                self._remember(frame)
                return
            self._start_t = self._t_frames
        self._start_frames.append(frame)
        if voiced:
            self._start_voiced += 1
            self._start_gap = 0
        else:
            self._start_gap += 1
            if self._start_gap * FRAME_MS > cfg.start_gap_ms:
                # Too short to be speech: its frames become ordinary history for the pre-roll.
                for old in self._start_frames:
                    self._remember(old)
                self._clear_start()
                return
        if self._start_voiced * FRAME_MS >= cfg.min_speech_ms:
            self._begin(bot_audible, events)

    def _remember(self, frame: np.ndarray) -> None:
        if self._pre_roll_frames:
            self._ring.append(frame)

    def _begin(self, bot_audible: bool, events: list[SpeechEvent]) -> None:
        self.utterances += 1
        self.state = EndpointState.SPEECH
        self._utt_id = f"u{self.utterances}"
        self._utt_frames = [*self._ring, *self._start_frames]
        self._utt_voiced = self._start_voiced
        self._utt_silence = self._start_gap
        self._utt_during_bot = bot_audible
        self._utt_last_voiced_end = self._t_frames + 1 - self._start_gap
        events.append(SpeechStarted(self._utt_id, self._start_t * FRAME_MS, bot_audible))
        self._ring.clear()
        self._clear_start()

    def _speech_frame(self, frame: np.ndarray, voiced: bool, events: list[SpeechEvent]) -> None:
        self._utt_frames.append(frame)
        if voiced:
            self._utt_voiced += 1
            self._utt_silence = 0
            self._utt_last_voiced_end = self._t_frames + 1
        else:
            self._utt_silence += 1
        if self._utt_silence * FRAME_MS >= self.config.silence_ms:
            keep = len(self._utt_frames) - self._utt_silence + self._tail_frames
            after = self._utt_frames[keep:]
            events.append(self._stop("silence", keep))
            for old in after:  # the silence after it is history for the next one's pre-roll
                self._remember(old)
        elif len(self._utt_frames) >= self._max_frames:
            # The pre-roll of the next utterance would repeat the end of this one: none.
            events.append(self._stop("max_length", len(self._utt_frames)))

    def _stop(self, reason: Literal["silence", "max_length", "flush"], keep: int) -> SpeechStopped:
        frames = self._utt_frames[:keep]
        audio = np.concatenate(frames) if frames else np.zeros(0, dtype=np.int16)
        # Cut mid-speech, it ends now; otherwise at the end of its last voiced frame.
        end_frames = self._t_frames + 1 if reason == "max_length" else self._utt_last_voiced_end
        event = SpeechStopped(
            utterance_id=self._utt_id,
            t_ms=end_frames * FRAME_MS,
            speech_ms=self._utt_voiced * FRAME_MS,
            reason=reason,
            during_bot=self._utt_during_bot,
            sample_rate=self.sample_rate,
            audio=audio,
        )
        self.state = EndpointState.IDLE
        self._clear_utterance()
        return event
