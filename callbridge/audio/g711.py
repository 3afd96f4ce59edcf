"""G.711 mu-law and the phone line's framing (8 kHz, 20 ms chunks of 160 bytes).

These constants are the one place the line format is written down; every module that frames
audio for a call imports them from here.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Final

import numpy as np

# audioop: built in (deprecated) on 3.11/3.12, the audioop-lts package on 3.13+. Imported
# here only, with its DeprecationWarning silenced, so `-W error` runs keep working.
_audioop: ModuleType | None
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop as _audioop
    except ImportError:  # pragma: no cover - only where neither is installed
        _audioop = None

__all__ = [
    "ALAW_SILENCE",
    "CHUNK_BYTES",
    "CHUNK_MS",
    "LINE_RATE",
    "ULAW_SILENCE",
    "alaw_to_pcm16",
    "pcm16_to_alaw_numpy",
    "pcm16_to_ulaw",
    "pcm16_to_ulaw_numpy",
    "ulaw_to_pcm16",
    "ulaw_to_alaw",
    "ulaw_to_pcm16_numpy",
]

LINE_RATE: Final = 8000  # Hz, mu-law both ways
CHUNK_MS: Final = 20  # one Twilio media chunk / one RTP packet
CHUNK_BYTES: Final = LINE_RATE * CHUNK_MS // 1000  # 160: one mu-law byte per sample
ULAW_SILENCE: Final = 0xFF  # mu-law of PCM 0
ALAW_SILENCE: Final = 0xD5  # A-law of PCM 0 (SIP trunks that offer PCMA first)

# CPython audioop's encoder (st_14linear2ulaw): it works on 14-bit samples, so its rounding
# differs from the classic 16-bit formula on 381 negative inputs (twilio-media-streams.md §13).
_SEG_END: Final = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_CLIP14: Final = 8159
_BIAS14: Final = 0x84 >> 2  # 33


def _encode_formula(pcm16: np.ndarray) -> np.ndarray:
    """CPython's ``lin2ulaw(…, 2)`` computed in numpy: int16 ``[N]`` → uint8 ``[N]``."""
    x = pcm16.astype(np.int32) >> 2  # arithmetic shift, as audioop does (sample << 16 >> 18)
    negative = x < 0
    mask = np.where(negative, 0x7F, 0xFF)
    mag = np.minimum(np.abs(x), _CLIP14) + _BIAS14
    seg = np.searchsorted(_SEG_END, mag, side="left")  # first segment end >= mag
    # seg == 8 cannot happen after the clip (8159 + 33 = 0x1FFF); kept exact anyway.
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (seg + 1)) & 0xF))
    return (code ^ mask).astype(np.uint8)


def _decode_formula(ulaw: np.ndarray) -> np.ndarray:
    """G.711 decode (identical in audioop and the 16-bit form): uint8 ``[N]`` → int16 ``[N]``."""
    u = (~ulaw.astype(np.int32)) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


# Built once at import: 64 KiB for encode (indexed by the int16 bits as uint16), 512 B decode.
_ENCODE_TABLE: Final = _encode_formula(np.arange(65536, dtype=np.uint16).view(np.int16))
_DECODE_TABLE: Final = _decode_formula(np.arange(256, dtype=np.uint8))


def _as_pcm16(samples: np.ndarray) -> np.ndarray:
    if not isinstance(samples, np.ndarray) or samples.dtype != np.int16:
        raise TypeError(f"expected an int16 ndarray, got {getattr(samples, 'dtype', type(samples).__name__)}")
    if samples.ndim != 1:
        raise ValueError(f"expected mono samples [N], got shape {samples.shape}")
    return np.ascontiguousarray(samples)


def pcm16_to_ulaw_numpy(samples: np.ndarray) -> bytes:
    """int16 PCM ``[N]`` → ``N`` mu-law bytes, by table; byte-exact with ``audioop.lin2ulaw``."""
    pcm = _as_pcm16(samples)
    return bytes(_ENCODE_TABLE[pcm.view(np.uint16)].tobytes())


def ulaw_to_pcm16_numpy(data: bytes | bytearray | memoryview) -> np.ndarray:
    """``N`` mu-law bytes → int16 PCM ``[N]``, by table; equal to ``audioop.ulaw2lin``."""
    return _DECODE_TABLE[np.frombuffer(data, dtype=np.uint8)]


def pcm16_to_ulaw(samples: np.ndarray) -> bytes:
    """int16 PCM ``[N]`` at 8 kHz → ``N`` mu-law bytes (``audioop`` where present, else numpy)."""
    pcm = _as_pcm16(samples)
    if _audioop is None:
        return pcm16_to_ulaw_numpy(pcm)
    return bytes(_audioop.lin2ulaw(pcm.tobytes(), 2))


def ulaw_to_pcm16(data: bytes | bytearray | memoryview) -> np.ndarray:
    """``N`` mu-law bytes → a new, writable int16 PCM array ``[N]`` at 8 kHz."""
    if _audioop is None:
        return ulaw_to_pcm16_numpy(data)
    return np.frombuffer(_audioop.ulaw2lin(bytes(data), 2), dtype=np.int16).copy()


# ---------------------------------------------------------------------------- A-law (SIP's PCMA)
# The call core speaks mu-law only; a SIP leg that agreed PCMA converts at its edge, byte for
# byte through 256-entry tables (mu-law → PCM → A-law is exact: every mu-law level is a 14-bit
# value A-law's 13-bit encoder rounds the way audioop does).

_ALAW_SEG_END: Final = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def pcm16_to_alaw_numpy(samples: np.ndarray) -> bytes:
    """int16 PCM ``[N]`` → ``N`` A-law bytes; byte-exact with ``audioop.lin2alaw`` (13-bit form)."""
    x = _as_pcm16(samples).astype(np.int32) >> 3
    negative = x < 0
    mask = np.where(negative, 0x55, 0xD5)
    mag = np.where(negative, -x - 1, x)
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left")
    quant = np.where(seg < 2, mag >> 1, mag >> np.maximum(seg, 1)) & 0x0F
    code = np.where(seg >= 8, 0x7F, (seg << 4) | quant)
    return bytes((code ^ mask).astype(np.uint8).tobytes())


def _alaw_decode_formula(alaw: np.ndarray) -> np.ndarray:
    a = alaw.astype(np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = ((a & 0x0F) << 4) + np.where(seg == 0, 8, 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


_ALAW_DECODE_TABLE: Final = _alaw_decode_formula(np.arange(256, dtype=np.uint8))
_ULAW_TO_ALAW: Final = pcm16_to_alaw_numpy(_DECODE_TABLE)  # 256 bytes, a bytes.translate table


def ulaw_to_alaw(data: bytes | bytearray | memoryview) -> bytes:
    """mu-law bytes → A-law bytes of the same samples (one table lookup per byte)."""
    return bytes(data).translate(_ULAW_TO_ALAW)


def alaw_to_pcm16(data: bytes | bytearray | memoryview) -> np.ndarray:
    """``N`` A-law bytes → a new int16 PCM array ``[N]``; equal to ``audioop.alaw2lin``."""
    return _ALAW_DECODE_TABLE[np.frombuffer(data, dtype=np.uint8)]
