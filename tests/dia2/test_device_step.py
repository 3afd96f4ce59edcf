"""The device step, checked for GPU bugs without a GPU, and on one where there is one.

On CPU: the step at the real 2B shape on the meta device for every bucket (a host sync or a
data-dependent shape raises there, as it would break a CUDA graph capture), the addresses of
every tensor a captured graph holds across joins, leaves, restores and cancels, the output rule
that makes one graph memory pool safe, device-side clamping with its validity flag, the
device-lost error that per-stream isolation must not swallow, and the cheaper sampling kernels
(one RNG call per step, ``topk`` instead of a sort) against their definitions.

CUDA-marked (skipped here; they have not run yet): the graphed step at the 2B shape equals the
same shapes run eagerly, the attention kernel is a fused one (never the math fallback) at the
2B shape, and the Mimi streaming decoder on CUDA equals the CPU one within TF32 tolerances.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dia2 import Dia2, GenerationConfig, PromptClip, SamplingParams, VoicePrompt
from dia2.checkpoint import build_model_on_meta
from dia2.config import parse_config
from dia2.diagnostics import count_ops, meta_engine, rules_without_tokenizer, step_op_counts
from dia2.engine import StepEngine
from dia2.errors import DeviceLost, StreamError, is_device_lost
from dia2.graphs import Edge, OutputsUnread, buckets_upto, length_buckets
from dia2.model import Dia2Model
from dia2.random_checkpoint import shape_config
from dia2.sampling import MAX_TOP_K, cfg_filter, check_top_k, gumbel, sample, stage_slot, stream_uniforms
from dia2.snapshot import VoiceSnapshot, build_snapshot
from dia2.state_machine import Entry, new_text_state
from dia2.stream import StreamRunner, StreamStatus
from dia2.text import WordTiming

from .test_generation import synthetic_speechlike
from .test_graphs import join_and_leave

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------------- meta device, 2B shape


@pytest.fixture(scope="module")
def meta_2b() -> StepEngine:
    return meta_engine(parse_config(shape_config("2b")), 32)


@pytest.mark.parametrize("bucket", buckets_upto(32))
def test_the_2b_step_runs_on_the_meta_device_in_every_bucket(meta_2b: StepEngine, bucket: int) -> None:
    """Through the same call a graph replay makes (stage rows, copy in, forward over a length
    bucket's cache view). Each batch bucket runs both variants, each at a different length
    bucket, so that across the batch buckets every length runs with and without the depformer
    (the 2B shape has as many length buckets as buckets_upto(32); the full product would cost
    six times as long for shapes that vary independently)."""
    step = meta_2b.device_step(bucket)
    assert step.n == bucket
    lengths = length_buckets(meta_2b.context)
    assert step.lengths == lengths == (64, 128, 256, 512, 1024, 1500) and len(lengths) == len(buckets_upto(32))
    i = buckets_upto(32).index(bucket)
    step.stage([step.idle_row()] * bucket)
    for depformer, length in ((True, lengths[i]), (False, lengths[(i + 3) % len(lengths)])):
        out = step(depformer=depformer, length=length)
        step.guard.release()
        k = meta_2b.num_codebooks
        assert out.edge.device.type == "meta" and out.edge.shape == (bucket, Edge.CODES + k)
        assert out.tokens.shape == (2 * bucket, 2 + k)
        assert (out.stage_logits is not None) == depformer
        if out.stage_logits is not None:
            assert out.stage_logits.shape == (2 * bucket, meta_2b.config.num_stages, meta_2b.config.audio_logit_limit)
            assert out.stage_logits is step.depformer_ws.heads.all  # the heads wrote into the bucket's buffer


def test_operation_counts_do_not_depend_on_the_batch(meta_2b: StepEngine) -> None:
    """The counts bench/step.py reports; equal at 1 and 32 streams, and the full step costs more."""
    one, many = step_op_counts(meta_2b, 1), step_op_counts(meta_2b, 32)
    assert (one.full.ops, one.transformer.ops) == (many.full.ops, many.transformer.ops)
    assert one.full.ops > one.transformer.ops > one.transformer.kernels > 0
    assert "aten.sort.default" not in one.full.by_name  # the CFG and top-k cut-offs use topk


def test_a_step_s_decoder_layer_and_depformer_layer_dispatch_fifteen_ops_each(meta_2b: StepEngine) -> None:
    """Per layer, with the bucket's workspace: pre-norm, q/k/v GEMM, q/k norm, RoPE (mul, roll,
    addcmul into q/k), one KV write, SDPA, a view, o-proj GEMM with the residual add, post-norm,
    wi GEMM, SiLU, product, wo GEMM with the residual add. A depformer stage adds the embedding
    of its input code and its head (norm, float, GEMM)."""
    step = meta_2b.device_step(1)
    model, rows = meta_2b.model, 2
    tr, dep = model.transformer, model.depformer
    opts = {"device": "meta", "dtype": model.dtype}
    x = torch.zeros((rows, model.config.model.decoder.n_embd), **opts)
    cos, sin = tr.layer_tables(torch.zeros(rows, dtype=torch.long, device="meta"))
    cache = step.decoder
    mask = torch.zeros((rows, 1, 1, cache.slots), **opts)
    ws = step.decoder_ws
    layer = count_ops(lambda: tr.layers[0].add_to(x, 1, (cos[0], sin[0]), (ws.rows, ws.rows),
                                                  (cache.kv[0], cache.k[0], cache.v[0]), mask, ws))  # type: ignore[index]
    assert layer.ops == 15, layer.by_name
    hidden = torch.zeros((rows, model.config.model.decoder.n_embd), **opts)
    projected = dep.project(hidden, pairs=True)
    code = torch.zeros(rows // 2, dtype=torch.long, device="meta")  # one per CFG pair, as a step feeds it
    stage = count_ops(lambda: dep.stage(3, hidden, code, step.depformer, projected=projected, ws=step.depformer_ws))
    assert stage.ops == 2 + 15 * len(dep.layers) + 3, stage.by_name


def test_a_short_length_bucket_dispatches_the_operations_of_the_whole_cache(meta_2b: StepEngine) -> None:
    """Each length bucket's cache views are built once with the step: attending over 64 slots
    instead of all 1,500 adds no slicing (or any other operation) to the step."""
    step = meta_2b.device_step(1)
    step.stage([step.idle_row()])
    step.inputs.copy_(step.staging)
    short = count_ops(lambda: step.forward(step.inputs, depformer=False, length=step.lengths[0]))
    whole = count_ops(lambda: step.forward(step.inputs, depformer=False))
    assert step.lengths[0] == 64 and short.by_name == whole.by_name


# ---------------------------------------------------------------------- addresses


@pytest.fixture(scope="module")
def snapshot(tiny_runtime: Dia2) -> VoiceSnapshot:
    words = (WordTiming("Hello", 0.1, 0.5), WordTiming("my", 0.6, 0.8), WordTiming("friend.", 0.9, 1.4))
    return build_snapshot(tiny_runtime, VoicePrompt(s1=PromptClip(synthetic_speechlike(1.5, seed=1), words)))


def captured_addresses(engine: StepEngine) -> dict[str, int]:
    """Every tensor a captured step graph reads or writes outside itself, by name → data address."""
    b = engine.buffers
    found: dict[str, int] = {}
    for name in ("audio", "seed_keys"):
        found[name] = getattr(b, name).data_ptr()
    for name in ("cfg_text", "cfg_cb0", "cfg_audio", "draw_text", "draw_audio"):
        for part, tensor in vars(getattr(b, name)).items():
            if isinstance(tensor, torch.Tensor):
                found[f"{name}.{part}"] = tensor.data_ptr()
    for cache_name, cache in (("decoder", b.decoder), ("depformer", b.depformer)):
        for i, (k, v) in enumerate(zip(cache.k, cache.v)):
            found[f"{cache_name}.k{i}"], found[f"{cache_name}.v{i}"] = k.data_ptr(), v.data_ptr()
        for i, kv in enumerate(cache.kv or []):
            found[f"{cache_name}.kv{i}"] = kv.data_ptr()
    for n, step in enumerate(engine._device_steps):
        if step is not None:
            found[f"step{n}.staging"], found[f"step{n}.inputs"] = step.staging.data_ptr(), step.inputs.data_ptr()
            found[f"step{n}.edge_host"] = step.edge_host.data_ptr()
            found[f"step{n}.decoder.k0"] = step.decoder.k[0].data_ptr()
            for part in ("qkv", "qk", "kv", "q"):
                found[f"step{n}.decoder_ws.{part}"] = getattr(step.decoder_ws.attn, part).data_ptr()
                found[f"step{n}.depformer_ws.{part}"] = getattr(step.depformer_ws.attn, part).data_ptr()
            for part in ("hidden", "gate", "up"):
                found[f"step{n}.decoder_ws.{part}"] = getattr(step.decoder_ws.mlp, part).data_ptr()
                found[f"step{n}.depformer_ws.{part}"] = getattr(step.depformer_ws.mlp, part).data_ptr()
            found[f"step{n}.decoder_ws.rows"] = step.decoder_ws.rows.data_ptr()
            for i, per_stage in enumerate(step.depformer_ws.slots):
                for s, slot in enumerate(per_stage):
                    found[f"step{n}.depformer_ws.slot{i}.{s}"] = slot.data_ptr()
            found[f"step{n}.sampled"], found[f"step{n}.rng_cells"] = step.sampled.data_ptr(), step.rng_cells.data_ptr()
            for width, window in step.windows.items():
                found[f"step{n}.window{width}"] = window.values.data_ptr()
                found[f"step{n}.window{width}.indices"] = window.indices.data_ptr()
            for length, view in step.decoder_by_length.items():  # views built once, of the same memory
                found[f"step{n}.decoder[{length}].k0"] = view.k[0].data_ptr()
                found[f"step{n}.decoder[{length}].v-1"] = view.v[-1].data_ptr()
                found[f"step{n}.decoder[{length}].kv-1"] = view.kv[-1].data_ptr()  # type: ignore[index]
    model = engine.model
    found["rope.cos"] = model.transformer.rope.cos.data_ptr()
    found["audio_table"] = model.transformer.audio_table.data_ptr()
    for s, tables in enumerate(model.depformer.stage_tables):
        found[f"stage{s}.mask"] = tables.mask.data_ptr()
        if tables.rope is not None:
            found[f"stage{s}.cos"] = tables.rope.cos.data_ptr()
        for i, (cos, sin) in enumerate(tables.qk):
            found[f"stage{s}.qk{i}.cos"] = cos.data_ptr()
            if sin is not None:
                found[f"stage{s}.qk{i}.sin"] = sin.data_ptr()
    for i, weight in enumerate(model.depformer.qk_weights):
        found[f"depformer.qk{i}"] = weight.data_ptr()
    tr = model.transformer
    for name in ("rope_cos", "rope_sin", "qk_cos", "qk_sin"):
        found[f"decoder.{name}"] = getattr(tr, name).data_ptr()
    for i, layer in enumerate(tr.layers):
        found[f"decoder.qkv{i}"] = layer.attn.qkv_t.data_ptr()
        found[f"decoder.o{i}"] = layer.attn.o_t.data_ptr()
    return found


def test_captured_tensors_keep_their_addresses_across_joins_leaves_restores_and_cancels(
    tiny_runtime: Dia2, snapshot: VoiceSnapshot
) -> None:
    """A graph replays on the addresses it was captured with: a buffer replaced (not refilled)
    anywhere in the stream lifecycle would make every later replay read stale memory."""
    runner = StreamRunner(tiny_runtime, max_streams=3)
    runner.engine = StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=3, static_shapes=True)
    engine = runner.engine
    steps = {n: engine.device_step(n) for n in buckets_upto(engine.capacity)}
    before = captured_addresses(engine)
    join_and_leave(runner, snapshot)  # restores, a late join, a cancel mid-turn, turns ending
    stream = runner.start(snapshot, GenerationConfig(seed=9), text="[S1] Once more.", close=True)  # a slot reused
    for _ in range(3):
        runner.step()
    stream.cancel()
    runner.step()
    assert all(engine._device_steps[n] is step for n, step in steps.items())
    assert captured_addresses(engine) == before


def test_the_step_reads_its_edge_into_one_reused_host_buffer_and_frames_do_not_alias_it(tiny_runtime: Dia2) -> None:
    """The copy out goes to a preallocated (on CUDA pinned) buffer that the next step overwrites;
    a frame handed out must keep its codes."""
    engine = StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=1, static_shapes=True)
    text = new_text_state(engine.rules, tiny_runtime.script_entries("[S1] Hello there, friend."))
    engine.start_fresh(0, GenerationConfig(seed=4), text, tiny_runtime.token_ids.bos)
    step = engine.device_step(1)
    address = step.edge_host.data_ptr()
    frames = []
    for _ in range(24):
        got = engine.step([0])
        frames.extend((f, f.codes.clone()) for f in got)
        if got:
            assert torch.equal(got[0].codes, step.edge_host[0, Edge.CODES :])
    assert len(frames) > 3 and step.edge_host.data_ptr() == address
    assert all(torch.equal(f.codes, kept) for f, kept in frames)  # later steps did not overwrite them
    assert step.edge_host.is_pinned() == (engine.device.type == "cuda")


# ---------------------------------------------------------------------- first-run safety


def test_a_step_whose_outputs_are_unread_blocks_the_next_one(tiny_runtime: Dia2) -> None:
    """Every bucket's graph shares one memory pool: a replay overwrites the previous outputs."""
    engine = StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=2, static_shapes=True)
    one, two = engine.device_step(1), engine.device_step(2)
    one.stage([one.idle_row()])
    two.stage([two.idle_row()] * 2)
    one(depformer=False)
    with pytest.raises(OutputsUnread, match=r"step\[2\] would run while the outputs of step\[1\] are unread"):
        two(depformer=False)
    one.guard.release()
    two(depformer=False)
    two.guard.release()


def test_the_engine_releases_the_outputs_even_when_its_host_half_raises(
    tiny_runtime: Dia2, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=1, static_shapes=True)
    text = new_text_state(engine.rules, tiny_runtime.script_entries("[S1] Hi there."))
    slot = engine.start_fresh(0, GenerationConfig(seed=1), text, tiny_runtime.token_ids.bos)
    engine.step([0])

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("host half failed")

    monkeypatch.setattr(engine, "_plan_host", boom)
    with pytest.raises(RuntimeError, match="host half failed"):
        engine.step([0])
    monkeypatch.undo()
    assert slot.position == 1  # nothing committed
    engine.step([0])  # the guard was released: the retry runs
    assert slot.position == 2


def test_an_out_of_range_code_is_clamped_on_the_device_and_fails_only_that_slot(tiny_runtime: Dia2) -> None:
    """On CUDA an out-of-range embedding index is a device-side assert that loses the context for
    every stream. The step clamps every id on the device and flags the slot; the host fails it."""
    engine = StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=2, static_shapes=True)
    for s in (0, 1):
        text = new_text_state(engine.rules, tiny_runtime.script_entries("[S1] Hello there, friend."))
        engine.start_fresh(s, GenerationConfig(seed=s), text, tiny_runtime.token_ids.bos)
    for _ in range(20):
        engine.step([0, 1])
    position = engine.slots[0].position
    engine.buffers.audio[0, 5, position] = 99_999  # the code slot 0 reads at its next step
    with pytest.raises(StreamError, match=r"slots \[0\] fed or emitted an id outside its table"):
        engine.step([0, 1])
    assert engine.slots[0].position == position  # nothing committed: the runner retries each slot alone
    engine.step([1])
    step = engine.device_step(2)
    assert step.inputs.shape[0] == 2


def test_device_lost_is_recognised_and_not_isolated_per_stream(
    tiny_runtime: Dia2, snapshot: VoiceSnapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lost CUDA context is every stream's end: the runner must not retry stream by stream and
    fail them one at a time as if each were at fault; it raises DeviceLost to its owner (callbridge
    restarts the worker)."""
    assert is_device_lost(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_device_lost(RuntimeError("shape mismatch")) and not is_device_lost(ValueError("CUDA error"))
    runner = StreamRunner(tiny_runtime, max_streams=2)
    streams = [runner.start(snapshot, GenerationConfig(seed=s), text="[S1] Hi.", close=True) for s in (1, 2)]

    def lost(*_: object, **__: object) -> None:
        raise DeviceLost("the cuda:0 context failed")

    monkeypatch.setattr(runner.engine, "step", lost)
    with pytest.raises(DeviceLost):
        runner.step()
    assert all(s.status is StreamStatus.RUNNING for s in streams)


# ---------------------------------------------------------------------- sampling kernels


def test_one_rng_call_per_step_draws_the_numbers_of_one_call_per_slot() -> None:
    """The counter-based property: the number for (seed, step, slot, id) does not depend on how it is drawn."""
    seeds = torch.tensor([0, 7, 2**40 + 3])
    steps = torch.tensor([0, 19, 1234])
    slots = torch.arange(2 + 31)
    ids = torch.arange(2048)
    together = stream_uniforms(seeds, steps, slots, ids)
    assert together.shape == (3, 33, 2048)
    for s in range(33):
        assert torch.equal(together[:, s], stream_uniforms(seeds, steps, s, ids))
    assert torch.equal(together[:, stage_slot(4)], stream_uniforms(seeds, steps, 6, ids))
    assert torch.equal(together[:, :, :2], stream_uniforms(seeds, steps, slots, ids[:2]))  # the action's width


def test_the_step_draws_what_cfg_filter_and_sample_draw(tiny_runtime: Dia2) -> None:
    """One rule in one place: every id a sampled step draws (action, cb0, each stage) is
    ``sample(cfg_filter(...))`` of the step's own logits with the stream's Gumbel noise for
    (seed, step, slot); the codes drawn at step t are the audio the stream is fed at t + 1."""
    gen = GenerationConfig(text=SamplingParams(1.5, 0), audio=SamplingParams(1.2, 20), cfg_scale=3.0, cfg_filter_k=40,
                           seed=11)
    records = tiny_runtime.generate("[S1] Hello my friend.", config=gen, record=True).records
    cfg = tiny_runtime.config
    limit, vx = cfg.audio_logit_limit, cfg.data.action_vocab_size
    scale, k = torch.tensor([gen.cfg_scale]), torch.tensor([gen.cfg_filter_k])
    step_rows = [(r, nxt) for r, nxt in zip(records, records[1:]) if r.stage_logits is not None and r.step + 1 >= 18]
    assert len(step_rows) > 5

    def draw(logits: torch.Tensor, params: SamplingParams, step: int, slot: int, vocab: int) -> int:
        noise = gumbel(stream_uniforms(torch.tensor([gen.seed]), torch.tensor([step]), slot, torch.arange(vocab)))
        return int(sample(logits, torch.tensor([params.temperature]), torch.tensor([params.top_k]), noise).item())

    for r, nxt in step_rows:
        action = cfg_filter(r.action_logits[0:1], r.action_logits[1:2], scale, k)
        assert draw(action, gen.text, r.step, 0, vx) == r.action
        codes = [draw(cfg_filter(r.cb0_logits[0:1], r.cb0_logits[1:2], scale, k)[:, :limit], gen.audio, r.step, 1, limit)]
        assert r.stage_logits is not None
        for s in range(cfg.num_stages):
            guided = cfg_filter(r.stage_logits[0:1, s], r.stage_logits[1:2, s], scale, k)
            codes.append(draw(guided, gen.audio, r.step, stage_slot(s), limit))
        assert nxt.tokens[0, 2:].tolist() == codes


def sort_cfg_filter(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The definition (dia2-format.md §7.6): keep the entries whose guided value is >= the k-th largest."""
    guided = torch.lerp(uncond, cond, scale[:, None])
    kth = guided.sort(dim=-1, descending=True).values.gather(-1, (k.clamp(1, cond.shape[-1]) - 1)[:, None])
    out = cond.masked_fill(guided < kth, float("-inf"))
    return torch.where(((scale == 1) | (k <= 0))[:, None], cond, out)


def test_the_topk_cfg_cut_equals_the_sorted_one() -> None:
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(6, 2048, generator=gen), torch.randn(6, 2048, generator=gen)
    cond[5, :100] = 1.0  # ties
    uncond[5, :100] = 1.0
    scale = torch.tensor([2.0, 1.0, 3.0, 0.5, 2.0, 2.0])
    k = torch.tensor([50, 50, 1, 256, 0, 60])
    assert torch.equal(cfg_filter(cond, uncond, scale, k), sort_cfg_filter(cond, uncond, scale, k))


def test_sampling_keeps_exactly_the_top_k_and_refuses_a_k_it_cannot_cut_at() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 2048, generator=gen)
    top = set(logits[0].topk(5).indices.tolist())
    steps = torch.arange(300)
    noise = gumbel(stream_uniforms(torch.zeros_like(steps), steps, 2, torch.arange(2048)))  # [300, 2048]
    drawn = {sample(logits, torch.ones(1), torch.tensor([5]), noise[u : u + 1]).item() for u in range(200)}
    assert drawn <= top and len(drawn) > 1
    anything = {sample(logits, torch.full((1,), 5.0), torch.tensor([0]), noise[u : u + 1]).item() for u in range(300)}
    assert len(anything - top) > 0  # top_k 0: no cut
    check_top_k("audio top_k", MAX_TOP_K, 2048)
    check_top_k("audio top_k", 2048, 2048)  # >= vocab: no cut
    with pytest.raises(ValueError, match=f"above the step's top-k limit {MAX_TOP_K}"):
        check_top_k("audio top_k", 1000, 2048)


def test_the_engine_refuses_a_top_k_above_its_limit_with_the_fix(tiny_runtime: Dia2) -> None:
    engine = StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=1)
    text = new_text_state(engine.rules, [Entry((5,), "x")])
    cfg = GenerationConfig(audio=SamplingParams(0.8, 1000))
    with pytest.raises(StreamError, match="larger max_top_k"):
        engine.start_fresh(0, cfg, text, tiny_runtime.token_ids.bos)


def test_counting_sees_every_dispatched_operation() -> None:
    x = torch.ones(4, 8)
    count = count_ops(lambda: (x * 2).view(32).sum())
    assert (count.ops, count.kernels) == (3, 2)


# ---------------------------------------------------------------------- CUDA


@pytest.fixture
def graphs_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from dia2.graphs import ENV_VAR

    monkeypatch.delenv(ENV_VAR, raising=False)
    yield


def random_2b_on_cuda() -> Dia2Model:
    """The 2B shape with small random weights, built straight on the GPU (bf16, fp32 heads)."""
    model = build_model_on_meta(parse_config(shape_config("2b")))
    model.to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(p.shape[-1] ** -0.25 if name.endswith(("q_norm.weight", "k_norm.weight")) else 1.0)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    model.to(torch.bfloat16)
    for head in model.head_modules():
        head.float()
    model.rebuild_rotary_tables()
    return model.eval().requires_grad_(False)


def run_2b(engine: StepEngine, steps: int) -> list[torch.Tensor]:
    """One greedy stream for ``steps`` steps (any shape: raw text ids 100…205); its frames."""
    d = engine.config.data
    text = new_text_state(engine.rules, [Entry((100 + i, 200 + i), f"w{i}") for i in range(6)])
    engine.start_fresh(0, GenerationConfig(seed=3).greedy(), text, 1)
    frames = []
    try:
        for _ in range(steps):
            frames.extend(f.codes for f in engine.step([0]))
    finally:
        engine.release(0)
    assert d.max_delay < steps
    return frames


@cuda
@pytest.mark.cuda
def test_cuda_graphed_2b_step_equals_the_same_shapes_run_eagerly(graphs_on: None) -> None:
    model = random_2b_on_cuda()
    rules = rules_without_tokenizer(model.config)
    graphed = StepEngine(model, rules, max_streams=2)
    assert graphed.use_cuda_graphs and all(graphed._device_steps[n].captured for n in (1, 2))  # type: ignore[union-attr]
    static = StepEngine(model, rules, max_streams=2, use_cuda_graphs=False, static_shapes=True)
    a, b = run_2b(graphed, 30), run_2b(static, 30)
    assert len(a) == len(b) > 0
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@cuda
@pytest.mark.cuda
def test_cuda_attention_at_the_2b_shape_never_falls_back_to_the_math_kernel() -> None:
    """The math fallback expands K/V to every query head in fp32 (~10x the KV traffic). With it
    excluded, SDPA raises instead of falling back, so this fails if only math would do."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = random_2b_on_cuda()
    engine = StepEngine(model, rules_without_tokenizer(model.config), max_streams=4, use_cuda_graphs=False,
                        static_shapes=True)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    for n in (1, 4):
        step = engine.device_step(n)
        step.stage([step.idle_row()] * n)
        with sdpa_kernel(fused):
            out = step(depformer=True)
            step.guard.release()
        torch.cuda.synchronize()
        assert out.stage_logits is not None and torch.isfinite(out.stage_logits).all()


@cuda
@pytest.mark.cuda
def test_cuda_mimi_streaming_decode_equals_cpu_within_tf32_tolerance(tiny_mimi_dir: Path) -> None:
    """Frame by frame on CUDA (TF32 convolutions and matmuls on, as the engine sets them) against
    the CPU fp32 decoder: TF32 keeps 10 mantissa bits, so compare relative to the signal."""
    from dia2.codec import MimiCodec, MimiStreamDecoder
    from dia2.graphs import use_tf32

    use_tf32(torch.device("cuda"))
    cpu, gpu = MimiCodec.load(tiny_mimi_dir, device="cpu"), MimiCodec.load(tiny_mimi_dir, device="cuda")
    codes = torch.randint(0, 2048, (2, 32, 12), generator=torch.Generator().manual_seed(0))
    dec_cpu, dec_gpu = MimiStreamDecoder(cpu, 2), MimiStreamDecoder(gpu, 2)
    ref = torch.cat([dec_cpu.decode(codes[:, :, t : t + 1], clamp=False) for t in range(12)], dim=-1)
    got = torch.cat([dec_gpu.decode(codes[:, :, t : t + 1].cuda(), clamp=False) for t in range(12)], dim=-1).cpu()
    scale = ref.abs().max().item()
    assert scale > 0
    assert (got.float() - ref).abs().max().item() <= 2e-2 * scale


def test_a_compiled_step_needs_static_shapes(tiny_runtime: Dia2) -> None:
    with pytest.raises(ValueError, match="static_shapes=True"):
        StepEngine(tiny_runtime.model, tiny_runtime.rules(), max_streams=1, compile_step=True)


@cuda
@pytest.mark.cuda
def test_cuda_compiled_step_under_graphs_gives_the_eager_tokens(graphs_on: None, tiny_model_dir: Path) -> None:
    """compile_step is opt-in until this passes: Inductor's code captured into the step's CUDA
    graph (compiled during the pre-capture runs) against the same shapes run eagerly, fp32."""
    runtime = Dia2.load(tiny_model_dir, device="cuda", dtype="float32", progress=False)
    rules = rules_without_tokenizer(runtime.model.config)
    compiled = StepEngine(runtime.model, rules, max_streams=2, use_cuda_graphs=True, compile_step=True)
    assert compiled.use_cuda_graphs and all(compiled._device_steps[n].compiled for n in (1, 2))  # type: ignore[union-attr]
    static = StepEngine(runtime.model, rules, max_streams=2, use_cuda_graphs=False, static_shapes=True)
    a, b = run_2b(compiled, 30), run_2b(static, 30)
    assert len(a) == len(b) > 0
    assert all(torch.equal(x, y) for x, y in zip(a, b))
