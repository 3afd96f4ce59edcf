"""callbridge.audio: G.711 pinned to audioop, and the 24 kHz → 8 kHz mu-law chunker."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callbridge.audio import (
    CHUNK_BYTES,
    InboundAudio,
    OutboundAudio,
    fade_out_chunk,
    g711,
    pcm16_to_ulaw,
    pcm16_to_ulaw_numpy,
    ulaw_to_pcm16,
    ulaw_to_pcm16_numpy,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    audioop = pytest.importorskip("audioop")

ALL_PCM16 = np.arange(65536, dtype=np.uint16).view(np.int16)
ALL_ULAW = bytes(range(256))


def tone(freq_hz: float, seconds: float, rate: int = 24000, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2)))


# --------------------------------------------------------------------------- mu-law


def test_numpy_encoder_matches_audioop_for_every_int16() -> None:
    assert pcm16_to_ulaw_numpy(ALL_PCM16) == audioop.lin2ulaw(ALL_PCM16.tobytes(), 2)


def test_numpy_decoder_matches_audioop_for_every_byte() -> None:
    expected = np.frombuffer(audioop.ulaw2lin(ALL_ULAW, 2), dtype=np.int16)
    assert np.array_equal(ulaw_to_pcm16_numpy(ALL_ULAW), expected)


def test_public_codec_equals_the_numpy_one() -> None:
    assert pcm16_to_ulaw(ALL_PCM16) == pcm16_to_ulaw_numpy(ALL_PCM16)
    assert np.array_equal(ulaw_to_pcm16(ALL_ULAW), ulaw_to_pcm16_numpy(ALL_ULAW))


def test_codec_without_audioop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.13 without audioop-lts: the numpy tables take over, with the same bytes."""
    monkeypatch.setattr(g711, "_audioop", None)
    assert pcm16_to_ulaw(ALL_PCM16) == audioop.lin2ulaw(ALL_PCM16.tobytes(), 2)
    assert ulaw_to_pcm16(ALL_ULAW).tobytes() == audioop.ulaw2lin(ALL_ULAW, 2)


def test_mulaw_facts() -> None:
    assert pcm16_to_ulaw(np.zeros(160, dtype=np.int16)) == b"\xff" * 160  # silence
    decoded = ulaw_to_pcm16(ALL_ULAW)
    assert decoded[0x7F] == 0 and decoded[0xFF] == 0
    assert np.abs(decoded).max() == 32124
    # Decode then encode returns every byte, except "negative zero" 0x7F, which becomes 0xFF.
    again = pcm16_to_ulaw(decoded)
    assert [i for i in range(256) if again[i] != i] == [0x7F]
    assert again[0x7F] == 0xFF


def test_codec_shapes_and_types() -> None:
    assert ulaw_to_pcm16(b"").shape == (0,)
    assert pcm16_to_ulaw(np.zeros(0, dtype=np.int16)) == b""
    out = ulaw_to_pcm16(bytearray(b"\x00\x80"))
    out[0] = 1  # a fresh writable array, not a view of the input
    assert ulaw_to_pcm16(memoryview(b"\xff" * 3)).dtype == np.int16
    with pytest.raises(TypeError):
        pcm16_to_ulaw(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError):
        pcm16_to_ulaw(np.zeros((2, 2), dtype=np.int16))
    # Non-contiguous input is handled (a strided view of stereo, say).
    stereo = np.arange(20, dtype=np.int16).reshape(10, 2) * 300
    assert pcm16_to_ulaw(stereo[:, 0]) == pcm16_to_ulaw(stereo[:, 0].copy())


# --------------------------------------------------------------------------- OutboundAudio


def run_all(pcm24k: np.ndarray, splits: list[int], quality: str = "HQ") -> list[bytes]:
    out = OutboundAudio(quality=quality)
    chunks: list[bytes] = []
    bounds = [0, *sorted(splits), len(pcm24k)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        chunks.extend(out.push(pcm24k[lo:hi]))
    chunks.extend(out.finish())
    return chunks


def expected_bytes(n_in: int) -> int:
    # soxr outputs round(n/3) samples for n inputs; the last chunk is padded to 160.
    n_out = (n_in + 1) // 3
    return math.ceil(n_out / CHUNK_BYTES) * CHUNK_BYTES


signals = st.integers(0, 9000).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.integers(0, 2**32 - 1),
        st.lists(st.integers(0, n), max_size=12),
    )
)


@settings(max_examples=60, deadline=None)
@given(signals, st.sampled_from(["LQ", "HQ"]))
def test_any_split_equals_one_push(sig: tuple[int, int, list[int]], quality: str) -> None:
    n, seed, splits = sig
    x = (np.random.default_rng(seed).standard_normal(n) * 0.4).astype(np.float32)
    whole = run_all(x, [], quality)
    chunked = run_all(x, splits, quality)
    assert b"".join(chunked) == b"".join(whole)
    assert all(len(c) == CHUNK_BYTES for c in chunked)
    assert len(b"".join(chunked)) == expected_bytes(n)
    if n % 3 == 0:  # the brief's formula, exact for whole 8 kHz samples
        assert len(b"".join(chunked)) == math.ceil(n / 3 / CHUNK_BYTES) * CHUNK_BYTES


def test_mimi_frames_come_out_as_whole_chunks() -> None:
    out = OutboundAudio()
    sig = tone(440, 1.0)
    got: list[bytes] = []
    for i in range(0, len(sig), 1920):
        got.extend(out.push(sig[i : i + 1920]))
    assert 0 < len(got) < 50  # soxr holds some back
    got.extend(out.finish())
    assert len(got) == 50 and {len(c) for c in got} == {CHUNK_BYTES}
    assert out.chunks_out == 50 and out.pending_samples == 0


def test_first_frame_latency_by_quality() -> None:
    """HQ releases most of the first 80 ms frame; VHQ releases none of it (why it is not the default)."""
    frame = tone(440, 0.08)
    released = {q: len(OutboundAudio(quality=q).push(frame)) for q in ("LQ", "MQ", "HQ", "VHQ")}
    assert released == {"LQ": 3, "MQ": 3, "HQ": 3, "VHQ": 0}  # 3 chunks = 60 of the 80 ms


def test_finish_pads_with_silence_and_resets() -> None:
    out = OutboundAudio()
    chunks = out.push(tone(440, 0.05)) + out.finish()  # 400 samples at 8 kHz: 2.5 chunks
    assert len(chunks) == 3
    assert chunks[-1][80:] == b"\xff" * 80
    assert out.finish() == []  # nothing pending
    # The next turn starts from a clean resampler: same input, same output.
    again = out.push(tone(440, 0.05)) + out.finish()
    assert again == chunks


def test_passband_is_kept_and_aliases_are_removed() -> None:
    def level_8k(freq: float) -> float:
        chunks = run_all(tone(freq, 0.5, amp=0.5), [])
        pcm = ulaw_to_pcm16(b"".join(chunks)).astype(np.float64) / 32767
        return rms(pcm[400:3600])  # skip the edges

    assert level_8k(1000) == pytest.approx(0.5 / math.sqrt(2), rel=0.03)
    assert level_8k(5000) < 0.002  # would alias to 3 kHz at full strength without a filter


def test_clipping_is_counted_and_clipped() -> None:
    out = OutboundAudio()
    loud = tone(300, 0.2, amp=1.5)
    chunks = out.push(loud) + out.finish()
    assert out.clipped_samples > 0
    pcm = ulaw_to_pcm16(b"".join(chunks))
    assert np.abs(pcm).max() <= 32124  # the largest mu-law value: clipped, not wrapped around
    quiet = OutboundAudio()
    quiet.push(tone(300, 0.2, amp=0.5))
    quiet.finish()
    assert quiet.clipped_samples == 0


def test_drop_discards_everything_pending() -> None:
    out = OutboundAudio()
    out.push(tone(440, 0.1))
    assert out.pending_samples > 0
    assert out.drop() > 0
    assert out.pending_samples == 0
    assert out.finish() == []
    # After a drop the next turn is bit-identical to a fresh converter's.
    fresh = OutboundAudio()
    sig = tone(660, 0.2)
    assert out.push(sig) + out.finish() == fresh.push(sig) + fresh.finish()


def test_fade_out_chunk_starts_at_full_level_and_ramps_to_silence() -> None:
    chunk = pcm16_to_ulaw((tone(440, 0.02, amp=0.5, rate=8000) * 32767).astype(np.int16))
    assert len(chunk) == CHUNK_BYTES
    faded = fade_out_chunk(chunk, 10)
    assert len(faded) == CHUNK_BYTES
    pcm = ulaw_to_pcm16(faded).astype(np.float64) / 32767
    original = ulaw_to_pcm16(chunk).astype(np.float64) / 32767
    # The first samples are the chunk at about full level (no step where the cut was)...
    assert np.allclose(pcm[:4], original[:4], atol=0.05)
    # ...and reach silence within 10 ms (80 samples); the rest of the chunk is silence.
    assert np.abs(pcm[70:80]).max() < 0.05
    assert faded[80:] == b"\xff" * 80
    assert fade_out_chunk(chunk, 0) == b"\xff" * CHUNK_BYTES
    assert fade_out_chunk(chunk, 40) != fade_out_chunk(chunk, 10)  # longer than a chunk: the whole chunk ramps
    with pytest.raises(ValueError):
        fade_out_chunk(chunk, -1)


def test_outbound_argument_checks() -> None:
    with pytest.raises(ValueError):
        OutboundAudio(quality="QQ")
    out = OutboundAudio()
    with pytest.raises(TypeError):
        out.push(np.zeros(10, dtype=np.int16))
    with pytest.raises(ValueError):
        out.push(np.zeros((10, 2), dtype=np.float32))
    assert out.push(np.zeros(0, dtype=np.float32)) == []
    assert len(out.push(np.zeros(960, dtype=np.float64))) in (0, 1, 2)  # float64 is converted


def test_converters_are_independent() -> None:
    """Two calls interleaving pushes get what each would get alone (no shared state)."""
    a, b = tone(440, 0.3), tone(1200, 0.3, amp=0.2)
    conv_a, conv_b = OutboundAudio(), OutboundAudio()
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    for i in range(0, len(a), 1920):
        got_a += conv_a.push(a[i : i + 1920])
        got_b += conv_b.push(b[i : i + 1920])
    assert got_a + conv_a.finish() == run_all(a, [])
    assert got_b + conv_b.finish() == run_all(b, [])


# --------------------------------------------------------------------------- InboundAudio


def test_inbound_decodes_any_length() -> None:
    inbound = InboundAudio()
    for n in (0, 1, 159, 160, 333):
        pcm = inbound.decode(bytes(i % 256 for i in range(n)))
        assert pcm.dtype == np.int16 and pcm.shape == (n,)
    assert inbound.bytes_in == 0 + 1 + 159 + 160 + 333
    assert inbound.sample_rate == 8000
    assert not inbound.decode(b"\xff" * 160).any()
