"""The graphable device step: static shapes equal eager on CPU; the CUDA-graph wrapper, its
switches and shape checks; and, on a CUDA host, graphed steps equal eager ones with no host sync."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from dia2 import Dia2, GenerationConfig, PromptClip, VoicePrompt
from dia2.checkpoint import load_model
from dia2.engine import FrameOut, StepEngine, StepRecord
from dia2.graphs import (
    ENV_VAR,
    CUDAGraphed,
    DeviceStep,
    Edge,
    GraphShapeError,
    SlotInputs,
    StepTensors,
    bucket_for,
    buckets_upto,
    cuda_graphs_enabled,
    length_bucket_for,
    length_buckets,
    no_cuda_graphs,
    resolve_use_cuda_graphs,
)
from dia2.snapshot import VoiceSnapshot, build_snapshot
from dia2.state_machine import new_text_state
from dia2.stream import Stream, StreamRunner
from dia2.text import WordTiming

from .test_generation import synthetic_speechlike

TEXT = "[S1] Hello there, how are you?"
TURNS = ["[S1] Fine, thanks.", "[S1] How can I help?", "[S1] Goodbye now."]
LONG_TEXT = "[S1] " + " ".join(["Thanks for calling, how can I help you with your order today?"] * 2)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_fresh(runtime: Dia2, engine: StepEngine, cfg: GenerationConfig, text: str = TEXT) -> tuple[
    torch.Tensor, list[StepRecord]
]:
    """One closed turn without a prompt on slot 0: codes [K, frames] and the step records."""
    text_state = new_text_state(engine.rules, runtime.script_entries(text), initial_padding=cfg.initial_padding)
    slot = engine.start_fresh(0, cfg, text_state, runtime.token_ids.bos)
    slot.record = []
    frames: list[FrameOut] = []
    try:
        while not slot.finished:
            frames.extend(engine.step([0]))
    finally:
        engine.release(0)
    return torch.stack([f.codes for f in frames], dim=1), slot.record


def assert_records_close(a: list[StepRecord], b: list[StepRecord], atol: float = 1e-5) -> None:
    """Same fed tokens and actions at every step; logits equal up to ``atol``."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.step == y.step and x.action == y.action
        assert torch.equal(x.tokens, y.tokens), x.step
        torch.testing.assert_close(x.action_logits, y.action_logits, rtol=0, atol=atol)
        torch.testing.assert_close(x.cb0_logits, y.cb0_logits, rtol=0, atol=atol)
        assert (x.stage_logits is None) == (y.stage_logits is None), x.step
        if x.stage_logits is not None and y.stage_logits is not None:
            torch.testing.assert_close(x.stage_logits, y.stage_logits, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def snapshot(tiny_runtime: Dia2) -> VoiceSnapshot:
    words = (WordTiming("Hello", 0.1, 0.5), WordTiming("my", 0.6, 0.8), WordTiming("friend.", 0.9, 1.4))
    return build_snapshot(tiny_runtime, VoicePrompt(s1=PromptClip(synthetic_speechlike(1.5, seed=1), words)))


def join_and_leave(runner: StreamRunner, snapshot: VoiceSnapshot, *, greedy: bool = False) -> list[torch.Tensor]:
    """Three streams over four slots' worth of buckets: one joins late, one leaves mid-turn.
    The second stream is greedy; the others sample unless ``greedy``."""

    def config(seed: int) -> GenerationConfig:
        return GenerationConfig(seed=seed).greedy() if greedy else GenerationConfig(seed=seed)

    first = runner.start(snapshot, config(5), text=TURNS[0], close=True)
    second = runner.start(snapshot, GenerationConfig().greedy(), text=TURNS[1], close=True)
    codes: dict[int, list[torch.Tensor]] = {first.id: [], second.id: []}
    streams: list[Stream] = [first, second]

    def pump(steps: int) -> None:
        for _ in range(steps):
            runner.step()
            for s in streams:
                codes[s.id].extend(f.codes for f in s.pop_frames())

    pump(6)
    third = runner.start(snapshot, config(7), text=TURNS[2], close=True)  # joins: slot 2
    streams.append(third)
    codes[third.id] = []
    pump(22)
    second.cancel()  # leaves mid-turn
    while not (first.done and third.done):
        pump(1)
    return [torch.stack(codes[s.id], dim=1) for s in streams]


# ---------------------------------------------------------------------- CPU: static equals eager


@pytest.fixture
def lengths_used(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """The ``length`` of every device step run from here on (None: the whole cache or eager)."""
    used: list[int | None] = []
    call = DeviceStep.__call__

    def spy(self: DeviceStep, **kwargs: object) -> StepTensors:
        used.append(kwargs.get("length"))  # type: ignore[arg-type]
        return call(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(DeviceStep, "__call__", spy)
    return used


@pytest.mark.parametrize(("cfg", "text"), [
    (GenerationConfig(seed=0), LONG_TEXT),
    (GenerationConfig(seed=1), TEXT),
    (GenerationConfig(seed=0).greedy(), TEXT),
], ids=["sampled-long", "sampled", "greedy"])
def test_static_length_bucket_path_gives_the_eager_tokens(tiny_runtime: Dia2, lengths_used: list[int | None],
                                                          cfg: GenerationConfig, text: str) -> None:
    """What a graph replays (bucket rows, attention over the smallest length bucket that holds
    the positions), run eagerly on CPU; the long turn crosses the 64- and 128-slot boundaries.

    Tokens are identical, sampled and greedy. Logits agree to the last bits only: attending over
    more slots than are filled (the masked ones add exact zeros) changes the float summation order."""
    rules = tiny_runtime.rules()
    eager = StepEngine(tiny_runtime.model, rules, max_streams=1)
    static = StepEngine(tiny_runtime.model, rules, max_streams=1, static_shapes=True)
    assert not eager.static_shapes and static.static_shapes and not static.use_cuda_graphs
    codes_eager, records_eager = run_fresh(tiny_runtime, eager, cfg, text)
    assert set(lengths_used) == {None}
    lengths_used.clear()
    codes_static, records_static = run_fresh(tiny_runtime, static, cfg, text)
    assert torch.equal(codes_static, codes_eager)
    assert_records_close(records_static, records_eager)
    # Each step ran over the smallest length bucket that holds its position.
    assert lengths_used == [length_bucket_for(r.step + 1, length_buckets(static.context)) for r in records_static]
    if text == LONG_TEXT:
        assert set(lengths_used) == {64, 128, 256}


def test_the_length_bucket_holds_the_rows_that_are_not_listed_too(tiny_runtime: Dia2,
                                                                  lengths_used: list[int | None]) -> None:
    """An active slot that is not listed still writes the KV slot at its own position (its next
    step overwrites it), so the step's length must hold that position too: 128 slots here for a
    listed row at position 0, or the write would fall outside the 64-slot view."""
    engine = StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=2, static_shapes=True)
    for s in (0, 1):
        text = new_text_state(engine.rules, tiny_runtime.script_entries("[S1] Hello there."))
        engine.start_fresh(s, GenerationConfig(seed=s), text, tiny_runtime.token_ids.bos)
    engine.slots[0].position = 70  # as if slot 0 had spoken for 70 steps
    engine.step([1])
    assert lengths_used == [128]
    assert engine.slots[1].position == 1 and engine.slots[0].position == 70


def test_length_buckets_are_powers_of_two_up_to_the_whole_cache(tiny_runtime: Dia2) -> None:
    assert length_buckets(1500) == (64, 128, 256, 512, 1024, 1500)
    assert length_buckets(512) == (64, 128, 256, 512) and length_buckets(513) == (64, 128, 256, 512, 513)
    assert length_buckets(64) == (64,) and length_buckets(40) == (40,)
    assert [length_bucket_for(n, (64, 128, 200)) for n in (1, 64, 65, 128, 129, 200)] == [64, 64, 128, 128, 200, 200]
    with pytest.raises(ValueError, match="needs 201 cache slots but the longest length bucket is 200"):
        length_bucket_for(201, (64, 128, 200))
    step = StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=2, static_shapes=True).device_step(2)
    assert step.lengths == (64, 128, 256, 512) and set(step.graphs) == {
        (depformer, length) for depformer in (True, False) for length in step.lengths
    }
    for length, view in step.decoder_by_length.items():
        assert [t.shape[2] for t in (*view.k, *view.v)] == [length] * 2 * len(view.k)
        assert view.k[0].data_ptr() == step.decoder.k[0].data_ptr()
    with pytest.raises(GraphShapeError, match=r"no length bucket 100; use one of \(64, 128, 256, 512\)"):
        step(depformer=False, length=100)
    step(depformer=False, length=64)  # the refused call claimed nothing
    step.guard.release()


def test_capture_runs_every_variant_of_a_step(tiny_runtime: Dia2, lengths_used: list[int | None]) -> None:
    """What capture_graphs does per batch bucket at start-up (graphs themselves need CUDA)."""
    step = StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=1, static_shapes=True).device_step(1)
    step.capture()
    assert sorted(lengths_used) == sorted(length for _, length in step.graphs) == sorted([64, 128, 256, 512] * 2)


def test_static_path_equals_eager_with_prompts_buckets_joins_and_leaves(
    tiny_runtime: Dia2, snapshot: VoiceSnapshot
) -> None:
    """Continuation zone (the variant without depformer), buckets 2 and 4, unlisted rows."""
    eager = StreamRunner(tiny_runtime, max_streams=3)
    static = StreamRunner(tiny_runtime, max_streams=3)
    static.engine = StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=3, static_shapes=True)
    assert static.engine.capacity == 4 and static.engine.buffers.audio.shape[0] == 4
    for a, b in zip(join_and_leave(static, snapshot), join_and_leave(eager, snapshot)):
        assert torch.equal(a, b)
    used = [n for n, step in enumerate(static.engine._device_steps) if step is not None]
    assert used == [2, 4]  # slots 0…1, then 0…2 (and 2 alone) in the 4-slot bucket


def test_buckets_are_powers_of_two_and_capacity_rounds_up(tiny_runtime: Dia2) -> None:
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 8, 9, 17, 32)] == [1, 2, 4, 4, 8, 8, 16, 32, 32]
    assert buckets_upto(32) == (1, 2, 4, 8, 16, 32) and buckets_upto(5) == (1, 2, 4, 8)
    with pytest.raises(ValueError, match="at least one"):
        bucket_for(0)
    engine = StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=5, static_shapes=True)
    assert engine.capacity == 8 and engine.buffers.decoder.rows == 16
    assert engine.free_slots() == [0, 1, 2, 3, 4]  # the bucket's spare slots are never handed out
    assert engine.device_step(3).n == 4 and engine.device_step(3) is engine.device_step(4)
    assert StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=5).capacity == 5


def test_the_device_step_makes_no_python_level_host_sync(
    tiny_runtime: Dia2, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside the step nothing may read a tensor value on the host (a sync on CUDA, and
    impossible inside a graph capture). On CPU: every such Tensor method raises while it runs."""
    engine = StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=2, static_shapes=True)
    step = engine.device_step(2)
    pad = tiny_runtime.config.data.text_pad_token_id
    step.stage([SlotInputs(position=0, listed=True, main=tiny_runtime.token_ids.bos, second=pad), step.idle_row()])

    def sync(*_: object, **__: object) -> None:
        raise AssertionError("host sync inside the device step")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    out = step(depformer=True)
    monkeypatch.undo()
    assert out.edge.shape == (2, Edge.CODES + engine.num_codebooks)
    assert out.stage_logits is not None and out.stage_logits.shape[:2] == (4, engine.config.num_stages)


def test_shape_checks_say_how_to_fix_the_call(tiny_runtime: Dia2) -> None:
    calls: list[int] = []

    def double(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return 2 * x

    graphed = CUDAGraphed(double, name="double")
    assert torch.equal(graphed(torch.ones(4, 3)), torch.full((4, 3), 2.0))
    assert len(calls) == 1 and not graphed.captured  # CPU: eager, fn called once
    with pytest.raises(GraphShapeError, match=r"input 0 is \[2, 3\] float32 on cpu but the graph is fixed to "
                                              r"\[4, 3\] float32 on cpu\. Pad the input"):
        graphed(torch.ones(2, 3))
    with pytest.raises(GraphShapeError, match="int64"):
        graphed(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(GraphShapeError, match="called with 2 tensors, built for 1"):
        graphed(torch.ones(4, 3), torch.ones(4, 3))

    engine = StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=2, static_shapes=True)
    with pytest.raises(GraphShapeError, match=r"got 1 rows; pass one row per slot 0…1"):
        engine.device_step(2).stage([SlotInputs()])


@pytest.fixture
def graphs_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv(ENV_VAR, raising=False)
    yield monkeypatch


def test_env_var_and_context_manager_switch_graphs_off(graphs_env: pytest.MonkeyPatch, tiny_runtime: Dia2) -> None:
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert cuda_graphs_enabled() and resolve_use_cuda_graphs(None, gpu)
    assert not resolve_use_cuda_graphs(None, cpu) and not resolve_use_cuda_graphs(False, gpu)
    with no_cuda_graphs():
        assert not cuda_graphs_enabled() and not resolve_use_cuda_graphs(None, gpu)
        with no_cuda_graphs():
            assert not cuda_graphs_enabled()
        assert not cuda_graphs_enabled()  # nested blocks count
    assert cuda_graphs_enabled()
    for off in ("0", "false", "OFF"):
        graphs_env.setenv(ENV_VAR, off)
        assert not cuda_graphs_enabled() and not resolve_use_cuda_graphs(True, gpu)  # the switch wins
    graphs_env.setenv(ENV_VAR, "1")
    assert resolve_use_cuda_graphs(True, gpu)
    with pytest.raises(ValueError, match="needs a CUDA device.*use_cuda_graphs=None"):
        resolve_use_cuda_graphs(True, cpu)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        StepEngine(tiny_runtime.model, tiny_runtime.rules(), use_cuda_graphs=True)
    engine = StepEngine(tiny_runtime.model, tiny_runtime.rules())
    assert not engine.use_cuda_graphs and not engine.static_shapes  # CPU default: plain eager
    engine.capture_graphs()  # a no-op without graphs


def test_bf16_policy_weights_bf16_heads_fp32_caches_bf16(tiny_runtime: Dia2) -> None:
    """What Dia2.load does on CUDA (checkpoint.pick_device_and_dtype), checked on CPU."""
    model = load_model(tiny_runtime.files, device=torch.device("cpu"), dtype=torch.bfloat16)
    heads = {id(m.weight) for m in model.head_modules()}
    assert len(heads) == 2 + model.config.num_stages
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if id(p) in heads else torch.bfloat16), name
    engine = StepEngine(model, tiny_runtime.rules(), max_streams=1)
    assert all(t.dtype == torch.bfloat16 for t in (*engine.buffers.decoder.k, *engine.buffers.depformer.v))
    assert model.transformer.rope.cos.dtype == torch.float32  # RoPE tables stay fp32, cast per use


# ---------------------------------------------------------------------- CUDA


@pytest.fixture(scope="module")
def cuda_runtime_fp32(tiny_model_dir) -> Dia2:  # type: ignore[no-untyped-def]
    """fp32 on CUDA, so graphed and sliced-attention eager tokens can be compared exactly."""
    return Dia2.load(tiny_model_dir, device="cuda", dtype="float32", progress=False)


@cuda
@pytest.mark.cuda
def test_cuda_graphs_are_captured_at_construction_for_every_bucket(graphs_env: pytest.MonkeyPatch,
                                                                   cuda_runtime_fp32: Dia2) -> None:
    engine = StepEngine(cuda_runtime_fp32.model, cuda_runtime_fp32.rules(), max_streams=4)
    assert engine.use_cuda_graphs and engine.static_shapes
    steps = {n: engine._device_steps[n] for n in (1, 2, 4)}
    assert all(s is not None and s.captured for s in steps.values())
    # One graph per (depformer or not, length bucket) in every batch bucket, all captured.
    lengths = length_buckets(engine.context)
    assert lengths == (64, 128, 256, 512)
    for s in steps.values():
        assert s is not None and set(s.graphs) == {(d, length) for d in (True, False) for length in lengths}
        assert all(g.captured for g in s.graphs.values())
    graphs = {n: dict(s.graphs) for n, s in steps.items() if s is not None}
    run_fresh(cuda_runtime_fp32, engine, GenerationConfig(seed=1).greedy(), text="[S1] Hi.")
    assert all(engine._device_steps[n] is steps[n] for n in steps)  # stepping captured nothing new
    assert all(steps[n].graphs == graphs[n] for n in steps)  # type: ignore[union-attr]
    with no_cuda_graphs():
        assert not StepEngine(cuda_runtime_fp32.model, cuda_runtime_fp32.rules()).use_cuda_graphs


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize(("seed", "text"), [(0, TEXT), (3, LONG_TEXT)])
def test_cuda_graphed_greedy_tokens_equal_eager(graphs_env: pytest.MonkeyPatch, cuda_runtime_fp32: Dia2,
                                                seed: int, text: str) -> None:
    """The long turn replays the 64-, 128- and 256-slot length buckets' graphs."""
    rules = cuda_runtime_fp32.rules()
    graphed = StepEngine(cuda_runtime_fp32.model, rules, max_streams=1)
    eager = StepEngine(cuda_runtime_fp32.model, rules, max_streams=1, use_cuda_graphs=False)
    cfg = GenerationConfig(seed=seed).greedy()
    codes_graphed, records_graphed = run_fresh(cuda_runtime_fp32, graphed, cfg, text)
    codes_eager, records_eager = run_fresh(cuda_runtime_fp32, eager, cfg, text)
    assert torch.equal(codes_graphed, codes_eager)
    assert_records_close(records_graphed, records_eager, atol=1e-4)  # GPU kernels differ more by length


@cuda
@pytest.mark.cuda
def test_cuda_graphed_bf16_equals_the_same_shapes_run_eagerly(graphs_env: pytest.MonkeyPatch,
                                                              tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """bf16 (the CUDA default): a replay runs the very kernels of the static eager path."""
    runtime = Dia2.load(tiny_model_dir, device="cuda", progress=False)
    assert runtime.model.dtype == torch.bfloat16 and runtime.model.transformer.cb0_head.weight.dtype == torch.float32
    graphed = StepEngine(runtime.model, runtime.rules(), max_streams=1)
    static = StepEngine(runtime.model, runtime.rules(), max_streams=1, use_cuda_graphs=False, static_shapes=True)
    for cfg in (GenerationConfig(seed=2), GenerationConfig(seed=2).greedy()):
        assert torch.equal(run_fresh(runtime, graphed, cfg)[0], run_fresh(runtime, static, cfg)[0])


@cuda
@pytest.mark.cuda
def test_cuda_graph_replays_follow_slots_joining_and_leaving(graphs_env: pytest.MonkeyPatch,
                                                             cuda_runtime_fp32: Dia2) -> None:
    words = (WordTiming("Hello", 0.1, 0.5), WordTiming("my", 0.6, 0.8), WordTiming("friend.", 0.9, 1.4))
    snap = build_snapshot(cuda_runtime_fp32, VoicePrompt(s1=PromptClip(synthetic_speechlike(1.5, seed=1), words)))
    graphed = StreamRunner(cuda_runtime_fp32, max_streams=3)
    assert graphed.engine.use_cuda_graphs
    eager = StreamRunner(cuda_runtime_fp32, max_streams=3)
    eager.engine = StepEngine(cuda_runtime_fp32.model, cuda_runtime_fp32.rules(), max_streams=3,
                              use_cuda_graphs=False)
    for a, b in zip(join_and_leave(graphed, snap, greedy=True), join_and_leave(eager, snap, greedy=True)):
        assert torch.equal(a, b)


@cuda
@pytest.mark.cuda
def test_cuda_graphed_step_has_no_host_sync(graphs_env: pytest.MonkeyPatch, cuda_runtime_fp32: Dia2) -> None:
    engine = StepEngine(cuda_runtime_fp32.model, cuda_runtime_fp32.rules(), max_streams=2)
    step = engine.device_step(2)
    assert step.captured
    pad = cuda_runtime_fp32.config.data.text_pad_token_id
    step.stage([SlotInputs(listed=True, main=cuda_runtime_fp32.token_ids.bos, second=pad), step.idle_row()])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step(depformer=True)  # host→device copy in, replay
        step.guard.release()
        out = step(depformer=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.edge.cpu().shape == (2, Edge.CODES + engine.num_codebooks)
