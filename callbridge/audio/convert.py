"""Audio converters between the TTS and the phone line, one set per call and direction.

Outbound: 24 kHz float32 PCM (80 ms Mimi frames of 1920 samples) → soxr streaming
resampler → 8 kHz float32 FIFO → clip to [-1, 1] → int16 → G.711 mu-law → 160-byte
(20 ms) chunks. Inbound: mu-law bytes of any length → int16 8 kHz PCM for the VAD.

Never share a converter between calls: the resampler carries state from one chunk to the
next (shared/docs/twilio-media-streams.md §13–§15, dependencies.md §4–§5).
"""

from __future__ import annotations

import math
from typing import Final, Literal

import numpy as np
import soxr

from .g711 import CHUNK_BYTES, LINE_RATE, ULAW_SILENCE, pcm16_to_ulaw, ulaw_to_pcm16

__all__ = ["InboundAudio", "OutboundAudio", "Quality", "TTS_RATE", "fade_out_chunk"]

TTS_RATE: Final = 24000  # Hz, Mimi output

# --------------------------------------------------------------------------- outbound

Quality = Literal["LQ", "MQ", "HQ", "VHQ"]
_QUALITIES: Final = ("LQ", "MQ", "HQ", "VHQ")


class OutboundAudio:
    """24 kHz float32 TTS audio → 160-byte 8 kHz mu-law chunks, for one call.

    ``push`` returns every complete chunk available so far; soxr holds some output back
    (it needs future input for its filter), so the chunk count per push varies. At the end
    of a turn ``finish`` flushes that tail; on barge-in ``drop`` throws it away (the cut
    itself is faded by :func:`fade_out_chunk`). Both leave the converter ready for the next
    turn.

    Quality (soxr recipe; all but QQ filter aliasing equally well, about -83 dB at 5 kHz):
    the default is ``HQ``: it releases 490 of the 640 samples owed for the first 80 ms
    frame (61 ms) and holds back 14-71 ms while running. ``VHQ`` is accepted but not the
    default: it returns nothing for the first frame (a whole 80 ms more to first audio)
    and holds back up to 152 ms, for no gain audible on an 8 kHz line. ``LQ`` holds back
    least (5-40 ms). ``QQ`` does no anti-alias filtering and is refused.
    """

    def __init__(self, quality: Quality | str = "HQ", *, in_rate: int = TTS_RATE) -> None:
        if quality not in _QUALITIES:
            raise ValueError(f"resampler quality must be one of {_QUALITIES}, not {quality!r}")
        self.quality = quality
        self.in_rate = in_rate
        self._rs = soxr.ResampleStream(in_rate, LINE_RATE, 1, dtype="float32", quality=quality)
        self._fifo = np.zeros(0, dtype=np.float32)  # 8 kHz samples not yet cut into a chunk
        self.clipped_samples = 0  # samples outside [-1, 1] after resampling, over the call
        self.chunks_out = 0

    @property
    def pending_samples(self) -> int:
        """8 kHz samples in the FIFO plus those soxr still holds back."""
        return int(self._fifo.size + round(self._rs.delay()))

    def _check(self, pcm24k: np.ndarray) -> np.ndarray:
        if not isinstance(pcm24k, np.ndarray) or pcm24k.dtype.kind != "f":
            raise TypeError(f"expected float PCM in [-1, 1], got {getattr(pcm24k, 'dtype', type(pcm24k).__name__)}")
        if pcm24k.ndim != 1:
            raise ValueError(f"expected mono PCM [T], got shape {pcm24k.shape}")
        pcm = np.ascontiguousarray(pcm24k, dtype=np.float32)
        if not np.isfinite(pcm).all():
            # A NaN would reach the int16 cast as a full-scale click; silence it instead.
            pcm = np.nan_to_num(pcm, nan=0.0, posinf=1.0, neginf=-1.0)
        return pcm

    def _encode(self, pcm8k: np.ndarray) -> bytes:
        over = np.count_nonzero(np.abs(pcm8k) > 1.0)
        if over:
            self.clipped_samples += int(over)  # rising counts mean the TTS needs headroom
        pcm16 = np.rint(np.clip(pcm8k, -1.0, 1.0) * 32767.0).astype(np.int16)
        return pcm16_to_ulaw(pcm16)

    def _cut(self, pcm8k: np.ndarray) -> list[bytes]:
        fifo = np.concatenate((self._fifo, pcm8k)) if self._fifo.size else pcm8k
        n = fifo.size - fifo.size % CHUNK_BYTES
        self._fifo = fifo[n:].copy()
        if n == 0:
            return []
        ulaw = self._encode(fifo[:n])
        self.chunks_out += n // CHUNK_BYTES
        return [ulaw[i : i + CHUNK_BYTES] for i in range(0, n, CHUNK_BYTES)]

    def push(self, pcm24k: np.ndarray) -> list[bytes]:
        """Feed TTS audio ``[T]`` (float, 24 kHz); return every complete 20 ms chunk now ready."""
        return self._cut(self._rs.resample_chunk(self._check(pcm24k)))

    def finish(self) -> list[bytes]:
        """End of a turn: flush soxr's tail, pad the last chunk with mu-law silence, reset.

        After ``finish`` the total returned for the turn is ``ceil(round(T / 3) / 160)``
        chunks for ``T`` input samples.
        """
        chunks = self._cut(self._rs.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        if self._fifo.size:
            tail = self._encode(self._fifo)
            chunks.append(tail + bytes([ULAW_SILENCE]) * (CHUNK_BYTES - len(tail)))
            self.chunks_out += 1
        self._reset()
        return chunks

    def drop(self) -> int:
        """Barge-in after a ``clear``: discard everything pending; returns 8 kHz samples dropped."""
        dropped = self.pending_samples
        self._reset()
        return dropped

    def _reset(self) -> None:
        self._rs.clear()
        self._fifo = np.zeros(0, dtype=np.float32)


def fade_out_chunk(ulaw8k: bytes, ms: float) -> bytes:
    """One chunk that fades ``ulaw8k`` (the chunk playing when audio was cut) to silence.

    Its first ``ms`` are ramped from full level to zero (raised cosine) and the rest of the
    chunk is silence, so a cut ends without a click. The one fade-out rule of the service
    (the playout sends it after a ``clear``).
    """
    if ms < 0:
        raise ValueError(f"fade length must be >= 0 ms, got {ms}")
    pcm = ulaw_to_pcm16(ulaw8k).astype(np.float64)
    n = min(pcm.size, round(ms * LINE_RATE / 1000))
    faded = np.zeros(pcm.size, dtype=np.float64)
    if n:
        ramp = 0.5 * (1.0 + np.cos(np.linspace(0.0, math.pi, n + 1, dtype=np.float64)[1:]))
        faded[:n] = pcm[:n] * ramp
    return pcm16_to_ulaw(np.rint(faded).astype(np.int16))


# --------------------------------------------------------------------------- inbound


class InboundAudio:
    """Caller audio: mu-law bytes of any length → int16 8 kHz PCM ``[N]`` (for the VAD).

    Stateless today (mu-law decodes byte by byte); an object per call so that a resampler
    (e.g. to 16 kHz for another VAD or ASR) can be added without changing callers.
    """

    sample_rate: Final = LINE_RATE

    def __init__(self) -> None:
        self.bytes_in = 0

    def decode(self, ulaw8k: bytes | bytearray | memoryview) -> np.ndarray:
        """Decode one payload; returns a new int16 array of ``len(ulaw8k)`` samples."""
        self.bytes_in += len(ulaw8k)
        return ulaw_to_pcm16(ulaw8k)
