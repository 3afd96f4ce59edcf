"""MimiCodec (load, encode, decode) and the exact streaming decoder, on tiny random Mimis.

The codebooks of these Mimis are randomised, so decoded audio depends on the codes; with
transformers' zero init every test below would pass for the wrong reason.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from dia2.codec import MimiCodec, MimiStreamDecoder, conv_transpose1d_matmul
from dia2.errors import CheckpointError, SnapshotError
from dia2.random_mimi import build_random_mimi, write_random_mimi

FRAMES = 24
TOL = 1e-4  # max abs diff, streaming vs one-shot, on unclamped output


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny-model ops are too small to gain from threads, and OpenMP spin-waits make them many
    times slower when the CPU is shared (as on CI)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def codec(tiny_mimi_dir: Path) -> MimiCodec:
    return MimiCodec.load(tiny_mimi_dir, progress=False)


@pytest.fixture(scope="module")
def windowed_codec() -> MimiCodec:
    """A 6-step (3-frame) attention window, so 24 frames wrap the KV ring many times."""
    return MimiCodec(build_random_mimi("tiny", seed=3, sliding_window=6))


def random_codes(batch: int, frames: int = FRAMES, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2048, (batch, 32, frames), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def stream(decoder: MimiStreamDecoder, codes: torch.Tensor, cuts: list[int], rows: list[int] | None = None
           ) -> torch.Tensor:
    """Decode codes [n, K, T] in calls split at ``cuts`` (sorted frame indices) and concatenate."""
    bounds = [0, *cuts, codes.shape[-1]]
    parts = [decoder.decode(codes[:, :, a:b], rows=rows, clamp=False) for a, b in zip(bounds, bounds[1:])]
    return torch.cat(parts, dim=-1)


# ---- loading -------------------------------------------------------------------------------

def test_load_round_trip_matches_the_written_model(codec: MimiCodec) -> None:
    assert (codec.sample_rate, codec.samples_per_frame, codec.frame_rate) == (24000, 1920, 12.5)
    assert (codec.num_codebooks, codec.codebook_size) == (32, 2048)
    assert not codec.model.training
    assert all(not p.requires_grad for p in codec.model.parameters())
    in_memory = MimiCodec(build_random_mimi("tiny", seed=0))
    codes = random_codes(1, 6)
    assert torch.equal(codec.decode(codes, clamp=False), in_memory.decode(codes, clamp=False))


def test_random_mimi_is_deterministic_per_seed(tmp_path: Path, tiny_mimi_dir: Path) -> None:
    again = load_file(write_random_mimi(tmp_path / "again", "tiny", seed=0) / "model.safetensors")
    first = load_file(tiny_mimi_dir / "model.safetensors")
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)
    other = load_file(write_random_mimi(tmp_path / "other", "tiny", seed=1) / "model.safetensors")
    assert not all(torch.equal(other[k], first[k]) for k in first)


def test_random_mimi_is_in_the_kyutai_layout(tiny_mimi_dir: Path) -> None:
    keys = load_file(tiny_mimi_dir / "model.safetensors").keys()
    assert "decoder_transformer.layers.0.self_attn.q_proj.weight" in keys
    assert "upsample.conv.weight" in keys
    assert "quantizer.acoustic_residual_vector_quantizer.layers.30.codebook.embed_sum" in keys


def test_random_codebooks_make_decode_depend_on_codes(codec: MimiCodec) -> None:
    """The zero-codebook gotcha: with transformers' init every code sequence decodes alike."""
    a, b = codec.decode(random_codes(1, 4, seed=1)), codec.decode(random_codes(1, 4, seed=2))
    assert max_diff(a, b) > 0.1


def test_writing_and_loading_touch_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    folder = write_random_mimi(tmp_path / "m", "tiny", seed=5)
    assert MimiCodec.load(folder, progress=False).num_codebooks == 32


def test_missing_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        MimiCodec.load(tmp_path / "nope", progress=False)


def test_folder_without_weights_names_the_missing_file(tmp_path: Path, tiny_mimi_dir: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_mimi_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        MimiCodec.load(tmp_path, progress=False)


def test_corrupt_weights_are_a_checkpoint_error(tmp_path: Path, tiny_mimi_dir: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_mimi_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        MimiCodec.load(tmp_path, progress=False)


def test_weights_of_another_config_are_a_checkpoint_error(tmp_path: Path) -> None:
    write_random_mimi(tmp_path, "tiny", seed=0)
    (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text().replace(
        '"num_hidden_layers": 1', '"num_hidden_layers": 2'))
    with pytest.raises(CheckpointError, match="missing keys"):
        MimiCodec.load(tmp_path, progress=False)


def test_unreachable_hub_repo_is_a_checkpoint_error() -> None:
    # Offline in tests (HF_HUB_OFFLINE=1) or an unknown repo online: either way one clear error.
    with pytest.raises(CheckpointError, match="dia2-tests/no-such-mimi") as info:
        MimiCodec.load("dia2-tests/no-such-mimi", progress=False)
    assert "model.safetensors" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# ---- one-shot encode / decode --------------------------------------------------------------

@pytest.mark.parametrize("samples", [1, 1919, 1920, 1921, 23040, 24000])
def test_encode_gives_one_frame_per_started_1920_samples(codec: MimiCodec, samples: int) -> None:
    pcm = 0.1 * torch.randn(samples, generator=torch.Generator().manual_seed(samples))
    codes = codec.encode(pcm)
    assert codes.dtype == torch.long and codes.shape == (32, math.ceil(samples / 1920))
    assert int(codes.min()) >= 0 and int(codes.max()) < 2048
    assert torch.equal(codec.encode(pcm[None]), codes)


@pytest.mark.parametrize("bad", [torch.zeros(2, 1920), torch.zeros(0), torch.zeros(1920, dtype=torch.int16)])
def test_encode_rejects_non_mono_empty_or_integer_pcm(codec: MimiCodec, bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        codec.encode(bad)


def test_decode_shapes_and_clamp(codec: MimiCodec) -> None:
    codes = random_codes(3, 5)
    pcm = codec.decode(codes)
    assert pcm.shape == (3, 5 * 1920) and pcm.dtype == torch.float32
    raw = codec.decode(codes, clamp=False)
    assert raw.abs().max() > 1.0  # random weights are loud: the clamp is exercised
    assert torch.equal(pcm, raw.clamp(-1.0, 1.0))
    assert max_diff(codec.decode(codes[1]), pcm[1:2]) <= TOL  # [K, T] is a batch of one


@pytest.mark.parametrize(
    ("codes", "match"),
    [
        (torch.full((32, 2), 2048), "0..2047"),  # BOS
        (torch.full((32, 2), 2049), "0..2047"),  # PAD
        (torch.full((32, 2), -2), "0..2047"),  # the "ungenerated" sentinel
        (torch.zeros(16, 2, dtype=torch.long), "all 32 codebooks"),
        (torch.zeros(32, 2), "integer"),
        (torch.zeros(32, 0, dtype=torch.long), "empty"),
    ],
)
def test_decode_rejects_invalid_codes(codec: MimiCodec, codes: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        codec.decode(codes)
    with pytest.raises(ValueError, match=match):
        MimiStreamDecoder(codec, 1).decode(codes if codes.dim() == 3 else codes[None])


# ---- streaming == one-shot -----------------------------------------------------------------

@pytest.mark.parametrize("which", ["codec", "windowed_codec"])
def test_streaming_equals_one_shot_at_every_split_point(which: str, request: pytest.FixtureRequest) -> None:
    """A naive chunked MimiModel.decode zero-pads every conv and drops transposed-conv tails:
    audible clicks at each call boundary (max diff ~20 on a signal of ~26)."""
    codec: MimiCodec = request.getfixturevalue(which)
    codes = random_codes(2)
    reference = codec.decode(codes, clamp=False)
    decoder = MimiStreamDecoder(codec, 2)
    for cut in range(1, FRAMES):
        decoder.reset()
        assert max_diff(stream(decoder, codes, [cut]), reference) <= TOL, f"split at frame {cut}"
    decoder.reset()
    assert max_diff(stream(decoder, codes, list(range(1, FRAMES))), reference) <= TOL  # frame by frame
    decoder.reset()
    assert max_diff(stream(decoder, codes, []), reference) <= TOL  # one call
    decoder.reset()
    assert max_diff(decoder.decode(codes), codec.decode(codes)) <= TOL  # clamped, the default


@settings(max_examples=30, deadline=None)
@given(cuts=st.sets(st.integers(1, FRAMES - 1)), windowed=st.booleans())
def test_streaming_equals_one_shot_for_drawn_splits(cuts: set[int], windowed: bool, codec: MimiCodec,
                                                    windowed_codec: MimiCodec) -> None:
    use = windowed_codec if windowed else codec
    codes = random_codes(1, seed=7)
    decoder = MimiStreamDecoder(use, 1)
    assert max_diff(stream(decoder, codes, sorted(cuts)), use.decode(codes, clamp=False)) <= TOL


def test_reset_restarts_the_stream(codec: MimiCodec) -> None:
    decoder = MimiStreamDecoder(codec, 1)
    codes = random_codes(1, 6)
    first = decoder.decode(codes, clamp=False)
    assert not torch.equal(decoder.decode(codes, clamp=False), first)  # state was carried
    decoder.reset()
    assert torch.equal(decoder.decode(codes, clamp=False), first)


# ---- rows ----------------------------------------------------------------------------------

def test_a_row_decodes_alike_alone_or_beside_other_streams(windowed_codec: MimiCodec) -> None:
    codec = windowed_codec
    x, others = random_codes(1, seed=1), random_codes(3, seed=2)
    alone = stream(MimiStreamDecoder(codec, 1), x, [3, 4, 10, 17])

    batch = MimiStreamDecoder(codec, 4)
    mixed = torch.cat([others[:2], x, others[2:]])  # x in row 2
    parts = [
        batch.decode(mixed[:, :, 0:3], clamp=False)[2:3],
        batch.decode(x[:, :, 3:4], rows=[2], clamp=False),  # row 2 alone
        batch.decode(mixed[[3, 2], :, 4:10], rows=torch.tensor([3, 2]), clamp=False)[1:2],  # order free
        batch.decode(mixed[:, :, 10:17], clamp=False)[2:3],
    ]
    batch.reset_rows([0])  # a neighbour starts a new turn: row 2 must not notice
    parts.append(batch.decode(mixed[:, :, 17:24], clamp=False)[2:3])
    assert max_diff(torch.cat(parts, dim=-1), alone) <= TOL
    assert batch.positions().tolist() == [14, 34, 48, 46]  # 25 Hz steps: 2 per decoded frame


def test_rows_that_joined_at_different_times_match_fresh_streams(windowed_codec: MimiCodec) -> None:
    """Per-row positions: a row reset mid-stream restarts at position 0 while others run on."""
    codec = windowed_codec
    a, b = random_codes(1, seed=3), random_codes(1, seed=4)
    batch = MimiStreamDecoder(codec, 2)
    batch.decode(a[:, :, :9], rows=[0])
    out_a, out_b = [], []
    for start in range(0, FRAMES - 9, 3):
        both = batch.decode(torch.cat([a[:, :, 9 + start : 12 + start], b[:, :, start : start + 3]]),
                            clamp=False)
        out_a.append(both[0:1])
        out_b.append(both[1:2])
    fresh_a = stream(MimiStreamDecoder(codec, 1), a[:, :, : FRAMES], [9])[:, 9 * 1920 :]
    fresh_b = codec.decode(b[:, :, : FRAMES - 9], clamp=False)
    assert max_diff(torch.cat(out_a, dim=-1), fresh_a) <= TOL
    assert max_diff(torch.cat(out_b, dim=-1), fresh_b) <= TOL


def test_row_state_copied_to_another_row_continues_the_stream(windowed_codec: MimiCodec) -> None:
    codec = windowed_codec
    prompt, turn = random_codes(1, 10, seed=5), random_codes(1, 14, seed=6)
    solo = MimiStreamDecoder(codec, 1)
    solo.decode(prompt)
    expected = solo.decode(turn, clamp=False)

    batch = MimiStreamDecoder(codec, 4)
    batch.decode(prompt, rows=[0])
    snapshot = batch.get_row_state(0)
    assert int(snapshot["position"]) == 20
    buffers = [t.data_ptr() for t in batch.state.row_views(3).values()]
    batch.decode(random_codes(1, 5, seed=9), rows=[3])  # row 3 holds some other stream first
    batch.set_row_state(3, snapshot)
    assert [t.data_ptr() for t in batch.state.row_views(3).values()] == buffers  # copied, not reallocated
    snapshot["key"].add_(1.0)  # get_row_state returned clones: the decoder must not see this
    both = batch.decode(torch.cat([turn, turn]), rows=[0, 3], clamp=False)
    assert max_diff(both[0:1], expected) <= TOL
    assert max_diff(both[1:2], expected) <= TOL


def test_set_row_state_rejects_a_state_of_another_model(codec: MimiCodec, windowed_codec: MimiCodec) -> None:
    other = MimiStreamDecoder(windowed_codec, 1).get_row_state(0)  # KV ring of 6 slots, not 250
    decoder = MimiStreamDecoder(codec, 1)
    with pytest.raises(SnapshotError, match="shape"):
        decoder.set_row_state(0, other)
    state = decoder.get_row_state(0)
    del state["position"]
    with pytest.raises(SnapshotError, match="position"):
        decoder.set_row_state(0, state)


def test_bad_rows_are_rejected(codec: MimiCodec) -> None:
    decoder = MimiStreamDecoder(codec, 2)
    codes = random_codes(2, 1)
    with pytest.raises(ValueError, match="rows"):
        decoder.decode(codes[:1])  # 1 row of codes for a 2-row decoder and no rows=
    with pytest.raises(ValueError, match="distinct"):
        decoder.decode(codes, rows=[1, 1])
    with pytest.raises(ValueError, match="distinct"):
        decoder.decode(codes[:1], rows=[2])
    with pytest.raises(IndexError):
        decoder.get_row_state(2)


# ---- transposed convs as matmul + overlap-add ----------------------------------------------

@pytest.mark.parametrize(("c_in", "c_out", "kernel", "stride", "groups"),
                         [(12, 5, 16, 8, 1), (8, 4, 10, 5, 1), (6, 6, 4, 2, 6), (8, 4, 7, 3, 2), (4, 3, 3, 3, 1)])
def test_conv_transpose_as_matmul_equals_torch(c_in: int, c_out: int, kernel: int, stride: int, groups: int
                                               ) -> None:
    gen = torch.Generator().manual_seed(kernel)
    x = torch.randn(2, c_in, 9, generator=gen)
    w = torch.randn(c_in, c_out // groups, kernel, generator=gen)
    want = F.conv_transpose1d(x, w, stride=stride, groups=groups)
    got = conv_transpose1d_matmul(x, w, stride, groups)
    assert max_diff(got[..., : want.shape[-1]], want) <= 1e-5
    assert not got[..., want.shape[-1] :].any()


def test_matmul_and_module_transposed_convs_stream_alike(codec: MimiCodec) -> None:
    codes = random_codes(1, 8, seed=11)
    fast = stream(MimiStreamDecoder(codec, 1), codes, [1, 2, 5])
    module = stream(MimiStreamDecoder(codec, 1, matmul_convtr=False), codes, [1, 2, 5])
    assert max_diff(fast, module) <= TOL
    assert max_diff(module, codec.decode(codes, clamp=False)) <= TOL
