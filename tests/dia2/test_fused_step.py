"""The fused step against the format's definition, written op by op (dia2-format.md §3).

The runtime fuses for kernel count: one q/k/v GEMM, one lookup for every audio codebook, the
norm weights inside the fused RMSNorm, the depformer's q/k norm weights folded into its RoPE
tables, key and value written in one copy. This file computes the same logits the plain way
(separate projections, 32 successive adds, norm then weight, rotate then attend over repeated
KV heads) from the same parameters, in float32, and requires the trace to match; and it checks
that the fused weights are views of the parameters, not copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dia2 import Dia2
from dia2.model import Dia2Model
from dia2.trace import teacher_forced_trace


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x: torch.Tensor, pos: torch.Tensor, model: Dia2Model) -> torch.Tensor:
    """x [..., T, H, D] at positions pos [T]: half-split rotation from the format's formula."""
    m = model.config.model
    d = x.shape[-1]
    j = torch.arange(d // 2, dtype=torch.float32)
    omega = 1.0 / (m.rope_min_timescale * (m.rope_max_timescale / m.rope_min_timescale) ** (2 * j / d))
    angle = pos.float()[:, None] * omega[None, :]  # [T, D/2]
    cos = torch.cat([angle.cos(), angle.cos()], -1)[:, None, :]
    sin = torch.cat([angle.sin(), angle.sin()], -1)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], causal, scale 1, query head h reads KV head h // (Hq/Hkv)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("thd,shd->hts", q, k)
    t = q.shape[0]
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(t, -1)


def mlp(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, layer.wi.weight).split(layer.hidden, -1)
    return F.linear(F.silu(gate) * up, layer.wo.weight)


def reference_logits(model: Dia2Model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """One CFG row's trace, the plain way: tokens [C, T+1] → the logits of steps 0…T-1."""
    tr, dep, cfg = model.transformer, model.depformer, model.config
    eps = cfg.model.normalization_layer_epsilon
    pad = cfg.data.text_pad_token_id
    steps = tokens.shape[1] - 1
    pos = torch.arange(steps)
    te = tr.text_embed
    x = te.main_proj(te.embedding(tokens[0, :steps]))
    x = x + te.second_proj(te.embedding(tokens[1, :steps])) * (tokens[1, :steps] != pad)[:, None].float()
    for c, table in enumerate(tr.audio_embeds):
        x = x + table.weight[tokens[2 + c, :steps]]
    for layer in tr.layers:
        a = layer.attn
        h = rms(x, layer.pre_norm.weight, eps)
        q = F.linear(h, a.q_proj.weight).view(steps, a.heads, a.head_dim)
        k = F.linear(h, a.k_proj.weight).view(steps, a.kv_heads, a.head_dim)
        v = F.linear(h, a.v_proj.weight).view(steps, a.kv_heads, a.head_dim)
        q, k = rope(rms(q, a.q_norm.weight, eps), pos, model), rope(rms(k, a.k_norm.weight, eps), pos, model)
        x = x + F.linear(attention(q, k, v), a.o_proj.weight)
        x = x + mlp(layer.mlp, rms(x, layer.post_norm.weight, eps))
    hidden = rms(x, tr.norm.weight, eps)
    stages = []
    for t in range(steps):
        z_in = [dep.audio_embeds[s].weight[tokens[2 + s, t + 1]] for s in range(cfg.num_stages)]
        ks: list[list[torch.Tensor]] = [[] for _ in dep.layers]
        vs: list[list[torch.Tensor]] = [[] for _ in dep.layers]
        row = []
        for s in range(cfg.num_stages):
            w = dep.schedule[s]
            z = F.linear(hidden[t], dep.depformer_in[w].weight) + z_in[s]
            for i, layer in enumerate(dep.layers):
                a = layer.self_attention
                qkv = F.linear(rms(z, layer.pre_norm.weight, eps), a.in_proj[w].weight).view(3, a.heads, a.head_dim)
                at = torch.tensor([s])
                q = rope(rms(qkv[0], a.q_norm.weight, eps)[None], at, model)[0]
                ks[i].append(rope(rms(qkv[1], a.k_norm.weight, eps)[None], at, model)[0])
                vs[i].append(qkv[2])
                scores = torch.einsum("hd,shd->hs", q, torch.stack(ks[i])).softmax(-1)
                out = torch.einsum("hs,shd->hd", scores, torch.stack(vs[i])).reshape(-1)
                z = z + F.linear(out, a.out_proj[w].weight)
                z = z + mlp(layer.mlp, rms(z, layer.post_norm.weight, eps))
            row.append(F.linear(rms(z, dep.norm.weight, eps), dep.logits[s].weight)[: cfg.audio_logit_limit])
        stages.append(torch.stack(row))
    return {"action_logits": F.linear(hidden, tr.action_head.weight), "cb0_logits": F.linear(hidden, tr.cb0_head.weight),
            "depformer_logits": torch.stack(stages)}


def test_the_fused_step_computes_the_format_s_definition(tiny_runtime: Dia2) -> None:
    model = tiny_runtime.model
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 2048, (2, model.config.data.channels, 5), generator=gen)
    tokens[:, 0:2] = torch.randint(0, 400, (2, 2, 5), generator=gen)
    tokens[0, 1, 2] = model.config.data.text_pad_token_id  # the gated second stream
    trace = teacher_forced_trace(model, tokens)
    with torch.inference_mode():
        want = reference_logits(model, tokens[0])
    for name, value in want.items():
        torch.testing.assert_close(trace[name][0], value, rtol=0, atol=2e-5, msg=name)


def test_fused_weights_are_views_of_the_parameters(tiny_runtime: Dia2) -> None:
    """No second copy of the weights, and a parameter loaded in place reaches the fused GEMM."""
    tr = tiny_runtime.model.transformer
    attn = tr.layers[0].attn
    assert attn.q_proj.weight.data_ptr() == attn.qkv_t.data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == attn.qkv_t.untyped_storage().data_ptr()
    assert torch.equal(attn.qkv_t.t(), torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    # The transposed weights the in-place GEMMs read are views too (no copy, no transpose per call).
    dep = tiny_runtime.model.depformer
    pairs = [(attn.o_t, attn.o_proj.weight), (tr.layers[0].mlp.wi_t, tr.layers[0].mlp.wi.weight),
             (tr.layers[0].mlp.wo_t, tr.layers[0].mlp.wo.weight)]
    for layer in dep.layers:
        a = layer.self_attention
        pairs += [(a.in_t[w], a.in_proj[w].weight) for w in a.in_proj] + [(a.out_t[w], a.out_proj[w].weight) for w in a.out_proj]
        pairs += [(layer.mlp.wi_t, layer.mlp.wi.weight), (layer.mlp.wo_t, layer.mlp.wo.weight)]
    for transposed, weight in pairs:
        assert transposed.data_ptr() == weight.data_ptr() and torch.equal(transposed.t(), weight)
    first = next(iter(dep.depformer_in.values())).weight
    assert first.data_ptr() == dep.in_fused_t.data_ptr()
    assert torch.equal(dep.in_fused_t.t(), torch.cat([p.weight for p in dep.depformer_in.values()]))
    last = tr.audio_embeds[-1].weight
    assert last.untyped_storage().data_ptr() == tr.audio_table.untyped_storage().data_ptr()
    assert torch.equal(tr.audio_table[-last.shape[0] :], last)


def test_a_prefill_chunk_computes_what_one_position_steps_compute(tiny_runtime: Dia2) -> None:
    """The layers have one code path for T positions at once (a voice prompt's prefill) and for
    one position (a step, with views made once): the same hidden states and cache keys, fp32."""
    model = tiny_runtime.model
    gen = torch.Generator().manual_seed(7)
    steps = 19
    tokens = torch.randint(0, 400, (2, model.config.data.channels, steps), generator=gen)
    chunk_cache, step_cache = model.allocate_decoder_cache(2, slots=32), model.allocate_decoder_cache(2, slots=32)
    with torch.inference_mode():
        chunk = model.transformer(tokens, torch.zeros(2, dtype=torch.long), chunk_cache, slots=steps).hidden
        ws = model.transformer.workspace(2)
        one = [
            model.transformer(tokens[:, :, t : t + 1], torch.full((2,), t), step_cache, slots=t + 1, ws=ws).hidden
            for t in range(steps)
        ]
    torch.testing.assert_close(chunk, torch.cat(one, dim=1), rtol=0, atol=1e-5)
    for a, b in zip(chunk_cache.kv or [], step_cache.kv or []):
        torch.testing.assert_close(a[:, :, :, :steps], b[:, :, :, :steps], rtol=0, atol=1e-5)


def test_a_cache_s_first_slots_are_views_that_a_step_can_write_through(tiny_runtime: Dia2) -> None:
    """A step handed only the first slots of the cache (what it reads) writes the same keys,
    through the joint ``kv`` view, as one handed the whole cache."""
    model = tiny_runtime.model
    tokens = torch.randint(0, 400, (2, model.config.data.channels, 1), generator=torch.Generator().manual_seed(3))
    whole, part = model.allocate_decoder_cache(2, slots=16), model.allocate_decoder_cache(2, slots=16)
    short = part.first_slots(8)
    assert short.slots == 8 and short.kv is not None and short.k[0].data_ptr() == part.k[0].data_ptr()
    with torch.inference_mode():
        want = model.transformer(tokens, torch.full((2,), 5), whole, slots=8).hidden
        got = model.transformer(tokens, torch.full((2,), 5), short).hidden
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(whole.kv or [], part.kv or []))
