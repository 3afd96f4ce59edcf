"""The caller's side of a call: a WAV or generated speech as 8 kHz mu-law, chunk by chunk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .config import SimConfig
from .queue import CHUNK_BYTES, CHUNK_S, SAMPLE_RATE, SILENCE_BYTE, ulaw_decode, ulaw_encode

# A caller asking to be called back (espeak-ng through the 8 kHz mu-law phone path: the second
# sentence of tests/callbridge/speech/data/phone_speech.ulaw): what the demo's caller says.
DEMO_CALLER_WAV = Path(__file__).resolve().parent / "data" / "caller_request.wav"
DEMO_CALLER_TEXT = "Please call me back tomorrow at 9 o'clock."

VOICE_RMS = 330.0  # about -40 dBFS: the first frame above it is where caller speech starts


def load_caller_wav(path: Path) -> bytes:
    """Any WAV (any rate, any channels) → 8 kHz mono mu-law bytes."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    pcm = (np.clip(mono, -1.0, 1.0) * 32767.0).astype(np.int16)
    return ulaw_encode(pcm)


def voiced_speech(duration_s: float, f0_hz: float = 140.0) -> bytes:
    """A vowel-like voiced signal as 8 kHz mu-law: harmonics of a wobbling f0 shaped by three
    formants, in syllable-rate bursts at about -16 dBFS. Loud and periodic enough for any VAD."""
    t = np.arange(int(duration_s * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = f0_hz * (1.0 + 0.05 * np.sin(2 * np.pi * 3.0 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    sig = np.zeros_like(t)
    for k in range(1, int(3400 // f0_hz) + 1):
        f = k * f0_hz
        weight = (
            np.exp(-(((f - 700) / 250) ** 2))
            + 0.6 * np.exp(-(((f - 1200) / 350) ** 2))
            + 0.3 * np.exp(-(((f - 2500) / 500) ** 2))
            + 0.03
        )
        sig += weight * np.sin(k * phase)
    sig *= 0.65 + 0.35 * np.sin(2 * np.pi * 4.0 * t)  # syllables, never below a VAD threshold
    sig *= 0.15 / max(float(np.sqrt(np.mean(sig**2))), 1e-9)
    fade = min(80, t.size // 2)  # 10 ms ramps: no click at the edges
    if fade:
        ramp = np.linspace(0.0, 1.0, fade)
        sig[:fade] *= ramp
        sig[-fade:] *= ramp[::-1]
    return ulaw_encode((np.clip(sig, -1.0, 1.0) * 32767.0).astype(np.int16))


@dataclass(frozen=True)
class CallerTrack:
    """The caller's side: ``audio`` (mu-law) starts at chunk ``start_chunk``, silence elsewhere;
    ``start_chunk`` None: not placed yet (a reply, placed once the bot has finished speaking).

    ``voice_chunk`` is the first chunk whose level passes about -40 dBFS (None if never): its
    send time is where barge-in timing starts.
    """

    audio: bytes = b""
    start_chunk: int | None = 0

    @property
    def voice_chunk(self) -> int | None:
        if self.start_chunk is None:
            return None
        for i in range(0, len(self.audio), CHUNK_BYTES):
            pcm = ulaw_decode(self.audio[i : i + CHUNK_BYTES]).astype(np.float64)
            if pcm.size and float(np.sqrt(np.mean(pcm**2))) > VOICE_RMS:
                return self.start_chunk + i // CHUNK_BYTES
        return None

    @property
    def end_s(self) -> float:
        """When the caller's audio ends (seconds from start); -1 when it is not placed."""
        if self.start_chunk is None:
            return -1.0
        return self.start_chunk * CHUNK_S + len(self.audio) / SAMPLE_RATE

    def chunk(self, n: int) -> bytes:
        """The 160 bytes of chunk ``n`` (0-based)."""
        if self.start_chunk is None:
            return bytes([SILENCE_BYTE]) * CHUNK_BYTES
        offset = (n - self.start_chunk) * CHUNK_BYTES
        if offset < 0 or offset >= len(self.audio):
            return bytes([SILENCE_BYTE]) * CHUNK_BYTES
        data = self.audio[offset : offset + CHUNK_BYTES]
        return data + bytes([SILENCE_BYTE]) * (CHUNK_BYTES - len(data))


def _caller_track(cfg: SimConfig) -> CallerTrack:
    """With ``barge_in_at_s``: the WAV (or generated speech) at that time, over the bot. A WAV
    alone is the caller's reply: placed later, once the bot's last turn has played."""
    wav = load_caller_wav(cfg.caller_wav) if cfg.caller_wav is not None else b""
    if cfg.barge_in_at_s is not None:
        return CallerTrack(wav or voiced_speech(cfg.speech_s), round(cfg.barge_in_at_s / CHUNK_S))
    return CallerTrack(wav, None if wav else 0)
