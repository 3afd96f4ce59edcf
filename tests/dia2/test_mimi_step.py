"""The fixed-shape masked Mimi decode over all rows (the CUDA path of a runner step) against the
emitting-rows decode (the CPU path), on a tiny random Mimi; and on CUDA, graphed against eager.

Equality is to 1e-6 of the signal's peak, not bit for bit: the masked decode runs every layer
on all max_batch rows and the rows decode on the emitting ones only, and CPU GEMMs and convs
(oneDNN/MKL) sum in an order that depends on the batch size (a row's conv1d or linear output
differs in the last bits between a batch of 1 and of 4). Measured: ≤ 7.2e-7 of the peak.
What must hold exactly does: a row that does not emit keeps its state bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from dia2 import Dia2, GenerationConfig
from dia2.codec import MimiCodec, MimiStreamDecoder
from dia2.graphs import ENV_VAR, OutputGuard, OutputsUnread
from dia2.mimi_step import MimiStepDecoder
from dia2.random_mimi import build_random_mimi
from dia2.stream import StreamRunner

ROWS = 4
REL_TOL = 1e-6  # of the signal's peak; see the module doc


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def codec() -> MimiCodec:
    """A 6-step (3-frame) attention window, so a few frames wrap the KV ring."""
    return MimiCodec(build_random_mimi("tiny", seed=3, sliding_window=6))


def frame(seed: int) -> torch.Tensor:
    return torch.randint(0, 2048, (32,), generator=torch.Generator().manual_seed(seed))


def state_of(decoder: MimiStreamDecoder, row: int) -> dict[str, torch.Tensor]:
    return decoder.get_row_state(row)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    peak = want.abs().max().item()
    assert peak > 0.1  # a real signal, not silence
    assert (got - want).abs().max().item() <= REL_TOL * peak


# Each step: which rows emit (a frame seed per row), then an event before the next step.
SCRIPT: list[tuple[dict[int, int], str | None]] = [
    ({0: 1}, None),  # row 0 alone
    ({0: 2, 2: 3}, None),  # row 2 joins
    ({2: 4}, "snapshot 2"),  # row 0 pauses (no frame this step)
    ({0: 5, 2: 6}, None),
    ({0: 7, 1: 8, 2: 9}, None),
    ({1: 10, 2: 11}, "restore 2 into 3"),  # row 3 continues row 2's snapshot
    ({0: 12, 3: 13, 2: 14}, "reset 0"),  # row 0 starts a new turn
    ({0: 15, 1: 16, 2: 17, 3: 18}, None),
    ({3: 19}, None),
    ({0: 20, 1: 21, 2: 22, 3: 23}, None),
]


def test_masked_decode_equals_the_rows_decode_and_idle_rows_keep_their_bits(codec: MimiCodec) -> None:
    """Unclamped output (a clamped peak says nothing about the error's scale)."""
    rows_path, masked = MimiStreamDecoder(codec, ROWS), MimiStreamDecoder(codec, ROWS)
    all_codes = torch.zeros((ROWS, 32, 1), dtype=torch.long)
    snapshots: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
    for emits, event in SCRIPT:
        rows = list(emits)
        codes = torch.stack([frame(seed) for seed in emits.values()])[:, :, None]
        all_codes[rows] = codes
        emit = torch.zeros(ROWS, dtype=torch.bool)
        emit[rows] = True
        idle_before = {r: state_of(masked, r) for r in range(ROWS) if r not in emits}
        want = rows_path.decode(codes, rows=rows, clamp=False)
        got = masked.decode_masked(all_codes, emit, clamp=False)[rows]
        assert got.shape == want.shape == (len(rows), 1920)
        assert_close(got, want)
        for r, before in idle_before.items():  # exactly: not one bit of an idle row moves
            after = state_of(masked, r)
            assert all(torch.equal(after[name], before[name]) for name in before), f"idle row {r} changed"
        assert torch.equal(masked.positions(), rows_path.positions())
        if event is None:
            continue
        verb, *args = event.split()
        if verb == "snapshot":
            r = int(args[0])
            snapshots[r] = (rows_path.get_row_state(r), masked.get_row_state(r))
        elif verb == "restore":
            src, dst = int(args[0]), int(args[2])
            rows_path.set_row_state(dst, snapshots[src][0])
            masked.set_row_state(dst, snapshots[src][1])
        else:
            rows_path.reset_rows([int(args[0])])
            masked.reset_rows([int(args[0])])
    for r in range(ROWS):
        a, b = state_of(rows_path, r), state_of(masked, r)
        assert torch.equal(a["position"], b["position"])
        assert all((a[k] - b[k]).abs().max().item() <= 1e-4 for k in a)  # carried state, to float rounding


def test_an_all_idle_masked_decode_changes_nothing_and_every_row_may_emit(codec: MimiCodec) -> None:
    decoder = MimiStreamDecoder(codec, ROWS)
    decoder.decode(torch.stack([frame(i) for i in range(ROWS)])[:, :, None])
    before = [decoder.get_row_state(r) for r in range(ROWS)]
    step = MimiStepDecoder(decoder, masked=True)
    step.capture()  # no row emits
    assert all(torch.equal(decoder.get_row_state(r)[k], before[r][k]) for r in range(ROWS) for k in before[r])
    everyone = torch.stack([frame(10 + i) for i in range(ROWS)])
    reference = MimiStreamDecoder(codec, ROWS)
    for r in range(ROWS):
        reference.set_row_state(r, before[r])
    want = reference.decode(everyone[:, :, None])  # all rows: the same batch shape, so bit for bit
    assert torch.equal(torch.from_numpy(step.decode(list(range(ROWS)), list(everyone))), want)


def test_masked_decode_makes_no_host_sync_and_no_data_dependent_shape(
        codec: MimiCodec, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CUDA graph forbids, caught on the CPU: no tensor value read on the host (every such
    Tensor method raises while it runs) and, on the meta device, no data-dependent shape."""
    decoder = MimiStreamDecoder(codec, ROWS)
    codes = torch.stack([frame(i) for i in range(ROWS)])[:, :, None]
    emit = torch.tensor([True, False, True, False])

    def sync(*_: object, **__: object) -> None:
        raise AssertionError("host sync inside the masked Mimi decode")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    pcm = decoder.decode_masked(codes, emit)
    monkeypatch.undo()
    assert pcm.shape == (ROWS, 1920)

    meta = MimiCodec(build_random_mimi("tiny", seed=3, sliding_window=6))
    meta.model.to("meta")  # shapes only: an op that needs a value (a sync, a data-dependent shape) raises
    for rvq in (meta.model.quantizer.semantic_residual_vector_quantizer,
                meta.model.quantizer.acoustic_residual_vector_quantizer):
        for vq in rvq.layers:
            vq.codebook._embed = None  # the cached table was built on the CPU
    on_meta = MimiStreamDecoder(meta, ROWS)
    assert on_meta.state.key.device.type == "meta"
    out = on_meta.decode_masked(codes.to("meta"), emit.to("meta"))
    assert out.shape == (ROWS, 1920) and out.device.type == "meta"


def test_masked_decode_checks_its_shapes_and_clamps_codes(codec: MimiCodec) -> None:
    decoder = MimiStreamDecoder(codec, ROWS)
    codes = torch.zeros((ROWS, 32, 1), dtype=torch.long)
    with pytest.raises(ValueError, match=r"codes \[4, K, T\] and a bool emit \[4\]"):
        decoder.decode_masked(codes[:2], torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool emit"):
        decoder.decode_masked(codes, torch.ones(ROWS, dtype=torch.long))
    wild = codes.clone()
    wild[0, 0, 0], wild[1, 3, 0] = -7, 5000  # clamped on the device, never an index error
    emit = torch.ones(ROWS, dtype=torch.bool)
    clamped = wild.clamp(0, 2047)
    assert torch.equal(decoder.decode_masked(wild, emit), MimiStreamDecoder(codec, ROWS).decode_masked(clamped, emit))


def test_a_decode_waits_for_the_steps_outputs_to_be_read(codec: MimiCodec) -> None:
    """The shared graph pool's rule: the masked decode claims the engine's OutputGuard."""
    guard = OutputGuard()
    step = MimiStepDecoder(MimiStreamDecoder(codec, ROWS), masked=True, guard=guard)
    guard.claim("step[4]")
    with pytest.raises(OutputsUnread, match="step\\[4\\]"):
        step.decode([0], [frame(0)])
    guard.release()
    assert step.decode([0], [frame(0)]).shape == (1, 1920)
    assert guard.holder is None
    with pytest.raises(ValueError, match="graphed Mimi decode needs the masked path on a CUDA device"):
        MimiStepDecoder(MimiStreamDecoder(codec, 1), masked=True, graphed=True)


def test_runner_on_the_masked_path_plays_what_the_rows_path_plays(tiny_runtime: Dia2) -> None:
    """StreamRunner with the CUDA path's decode (masked, eager here) against its CPU default,
    streams joining and leaving."""
    runners = [StreamRunner(tiny_runtime, max_streams=3) for _ in range(2)]
    assert not runners[0].frame_decoder.masked  # the CPU choice
    runners[1].frame_decoder = MimiStepDecoder(runners[1].decoder, masked=True)
    pcm: list[dict[int, list]] = [{}, {}]
    for k, runner in enumerate(runners):
        first = runner.start(None, GenerationConfig(seed=1), text="[S1] Hello there.", close=True)
        for _ in range(20):
            runner.step()
        second = runner.start(None, GenerationConfig(seed=2), text="[S1] Fine.", close=True)
        for _ in range(6):
            runner.step()
        first.cancel()
        while not second.done:
            runner.step()
        for i, s in enumerate((first, second)):
            pcm[k][i] = [f.pcm24k for f in s.pop_frames()]
    for i in (0, 1):  # clamped PCM in [-1, 1]: to float rounding, as the codec's streaming tests
        assert len(pcm[0][i]) == len(pcm[1][i]) > 0
        assert np.abs(np.concatenate(pcm[1][i]) - np.concatenate(pcm[0][i])).max() <= 1e-4


# ---- CUDA ---------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.cuda
def test_cuda_graphed_masked_decode_equals_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Graph replays follow rows emitting on different steps; TF32 convolutions and GEMMs (on
    for the engine) round at ~1e-3 relative, so the tolerance is relative to the peak at 1e-2."""
    from dia2.graphs import GraphMemory, use_tf32

    monkeypatch.delenv(ENV_VAR, raising=False)
    device = torch.device("cuda")
    use_tf32(device)
    gpu = MimiCodec(build_random_mimi("tiny", seed=3, sliding_window=6).to(device))
    graphed = MimiStepDecoder(MimiStreamDecoder(gpu, ROWS), graphed=True, memory=GraphMemory.new(device))
    eager = MimiStepDecoder(MimiStreamDecoder(gpu, ROWS))
    assert graphed.masked and eager.masked and not eager.graphed
    graphed.capture()
    assert graphed.captured
    for emits, _ in SCRIPT:
        rows, codes = list(emits), [frame(seed) for seed in emits.values()]
        want = torch.from_numpy(eager.decode(rows, codes))
        got = torch.from_numpy(graphed.decode(rows, codes))
        assert (got - want).abs().max().item() <= 1e-2 * want.abs().max().item()
    assert torch.equal(graphed.decoder.positions(), eager.decoder.positions())
