"""The Dia2 network: temporal transformer + depformer, module names = official tensor names.

Shapes: B rows (2 per stream: conditional, unconditional), C channels (2 text + K audio),
T steps, E decoder width, e depformer width, S depformer stages (K - 1).

The KV caches are not module state: they are preallocated by the caller for its maximum
number of rows (:meth:`Dia2Model.allocate_decoder_cache`) and passed in, so one model serves any set
of streams and a voice snapshot is a copy of cache rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import Dia2Config, TransformerConfig
from .layers import (
    GatedMLP,
    RMSNorm,
    Rope,
    RotaryTable,
    additive_mask,
    attend,
    group_queries,
    rms_normalize,
    rotate,
)
from .workspace import QKV, DecoderWorkspace, DepformerViews, DepformerWorkspace, StageLogits


@dataclass
class KVCache:
    """Per-layer keys and values [rows, heads, slots, head_dim].

    ``kv`` (:meth:`allocate_joint`, both caches of a model): per layer one tensor
    [rows, 2, heads, slots, head_dim] of which ``k[i]`` and ``v[i]`` are views, so a step writes
    a layer's key and value in one copy. The model refuses a cache without it."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    kv: list[torch.Tensor] | None = None

    @classmethod
    def allocate_joint(
        cls, layers: int, rows: int, heads: int, slots: int, head_dim: int, *, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        kv = [torch.zeros((rows, 2, heads, slots, head_dim), device=device, dtype=dtype) for _ in range(layers)]
        return cls(k=[t[:, 0] for t in kv], v=[t[:, 1] for t in kv], kv=kv)

    def row_range(self, start: int, stop: int) -> KVCache:
        """Views of rows start…stop-1 (the same memory)."""
        kv = [t[start:stop] for t in self.kv] if self.kv is not None else None
        return KVCache(k=[t[start:stop] for t in self.k], v=[t[start:stop] for t in self.v], kv=kv)

    def first_rows(self, rows: int) -> KVCache:
        """Views of rows 0…rows-1 (the same memory)."""
        return self.row_range(0, rows)

    def first_slots(self, slots: int) -> KVCache:
        """Views of slots 0…slots-1 of every layer, ``kv`` included (the same memory): a step
        that reads only these may be handed this cache (its positions must be < slots)."""
        kv = [t[:, :, :, :slots] for t in self.kv] if self.kv is not None else None
        return KVCache(k=[t[:, :, :slots] for t in self.k], v=[t[:, :, :slots] for t in self.v], kv=kv)

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))  # views of kv: the same bytes


@dataclass
class StepOutput:
    action_logits: torch.Tensor  # [B, T, Vx] float32
    cb0_logits: torch.Tensor  # [B, T, Va] float32
    hidden: torch.Tensor  # [B, T, E] compute dtype (after the final norm)


class TextEmbedding(nn.Module):
    """One table shared by both text streams; the second stream is gated off where it is PAD."""

    def __init__(self, vocab: int, table_dim: int, out_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, table_dim)
        self.main_proj = nn.Linear(table_dim, out_dim, bias=False)
        self.second_proj = nn.Linear(table_dim, out_dim, bias=False)

    def forward(self, main: torch.Tensor, second: torch.Tensor, pad_id: int) -> torch.Tensor:
        u = self.main_proj(self.embedding(main))
        v = self.second_proj(self.embedding(second))
        return torch.addcmul(u, v, (second != pad_id).unsqueeze(-1).to(v.dtype))  # u + v·gate, gate 0 or 1: exact


class DecoderAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig, eps: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.gqa_query_heads, cfg.kv_heads, cfg.gqa_head_dim
        self.q_proj = nn.Linear(cfg.n_embd, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.eps = eps
        self.qkv_t, self.o_t = self.fuse_projections()

    def fuse_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The q, k and v projection weights as one matrix, so one GEMM serves all three, and
        ``o_proj``'s; both transposed to [in, out] for ``mm``/``addmm_`` (views, made once). The
        three parameters become views of the fused [(Hq + 2·Hkv)·D, E] matrix (no second copy of
        the weights); rebuilt by :meth:`Dia2Model.rebuild_rotary_tables` after loading or a dtype change."""
        fused = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        parts = fused.split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features])
        for proj, part in zip((self.q_proj, self.k_proj, self.v_proj), parts):
            proj.weight.data = part
        return fused.t(), self.o_proj.weight.t()

    def qk_norm_weight(self) -> torch.Tensor:
        """[Hq + Hkv, D]: the q norm weight for each query head, then the k norm weight for each
        KV head (folded into the step's RoPE tables, :meth:`TemporalTransformer.layer_tables`)."""
        return torch.cat([self.q_norm.weight.expand(self.heads, -1), self.k_norm.weight.expand(self.kv_heads, -1)])

    def views(self, qkv: torch.Tensor, batch: int, steps: int) -> QKV:
        """The :class:`QKV` views of a GEMM output [B·T, (Hq + 2·Hkv)·D]."""
        h, hkv, d = self.heads, self.kv_heads, self.head_dim
        heads = qkv.view(batch * steps, h + 2 * hkv, d)
        q = heads[:, :h].view(batch, steps, h, d)
        return QKV(qkv, heads[:, : h + hkv], heads[:, h:].view(batch * steps, 2, hkv, d),
                   group_queries(q, hkv) if steps == 1 else q)

    def workspace(self, rows: int) -> QKV:
        """Views of a new one-position GEMM output buffer for ``rows`` rows."""
        w = self.qkv_t
        return self.views(torch.empty((rows, w.shape[1]), device=w.device, dtype=w.dtype), rows, 1)

    def add_to(
        self,
        z: torch.Tensor,
        x: torch.Tensor,
        steps: int,
        tables: tuple[torch.Tensor, torch.Tensor],
        write: tuple[torch.Tensor, torch.Tensor],
        cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        ws: QKV | None = None,
    ) -> None:
        """z += o_proj(attention(x)) in place (the residual add is the GEMM's accumulation).

        z, x [B·T, E] (x normed); ``tables`` this layer's (cos, sin) [B·T, Hq + Hkv, D] with the
        q/k norm weights folded in; ``write`` = (rows, positions) [B·T] the cache slots to write;
        ``cache`` = (kv [B, 2, Hkv, S, D], k, v [B, Hkv, S', D]: the S' slots read); mask
        [B, 1, T, S'] additive. ``ws``: views of where the q/k/v GEMM writes (else a new tensor)."""
        if ws is None:
            ws = self.views(torch.mm(x, self.qkv_t), x.shape[0] // steps, steps)
        else:
            torch.mm(x, self.qkv_t, out=ws.qkv)
        # Both norms and both rotations at once, written back over q and k: then k and v lie side
        # by side and one index_put_ stores both (the KV slot of a step is its position).
        rotate(rms_normalize(ws.qk, self.eps), *tables, out=ws.qk)
        kv_cache, k_cache, v_cache = cache
        torch.ops.aten.index_put_(kv_cache, [write[0], None, None, write[1]], ws.kv)
        q = ws.q if steps == 1 else group_queries(ws.q, self.kv_heads)
        z.addmm_(attend(q, k_cache, v_cache, mask, steps), self.o_t)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, eps: float) -> None:
        super().__init__()
        self.pre_norm = RMSNorm(cfg.n_embd, eps)
        self.attn = DecoderAttention(cfg, eps)
        self.post_norm = RMSNorm(cfg.n_embd, eps)
        self.mlp = GatedMLP(cfg.n_embd, cfg.n_hidden, cfg.mlp_activations)

    def add_to(self, x, steps, tables, write, cache, mask, ws=None):  # type: ignore[no-untyped-def]
        """The layer on the hidden state x [B·T, E], in place (see :meth:`DecoderAttention.add_to`)."""
        self.attn.add_to(x, self.pre_norm(x), steps, tables, write, cache, mask, ws.attn if ws else None)
        self.mlp.add_to(x, self.post_norm(x), ws.mlp if ws else None)


class TemporalTransformer(nn.Module):
    """One step per 80 ms frame: reads text + delayed audio tokens, predicts action, cb0 and h."""

    def __init__(self, config: Dia2Config) -> None:
        super().__init__()
        d, dec = config.data, config.model.decoder
        eps = config.model.normalization_layer_epsilon
        self.num_codebooks = d.num_codebooks
        self.text_pad_id = d.text_pad_token_id
        self.audio_embeds = nn.ModuleList(nn.Embedding(d.audio_vocab_size, dec.n_embd) for _ in range(d.num_codebooks))
        self.text_embed = TextEmbedding(d.text_vocab_size, dec.low_rank_dim or dec.n_embd, dec.n_embd)
        self.layers = nn.ModuleList(DecoderLayer(dec, eps) for _ in range(dec.n_layer))
        self.norm = RMSNorm(dec.n_embd, eps)
        self.action_head = nn.Linear(dec.n_embd, d.action_vocab_size, bias=False)
        self.cb0_head = nn.Linear(dec.n_embd, d.audio_vocab_size, bias=False)
        self.rope = RotaryTable(
            dec.gqa_head_dim,
            config.runtime.max_context_steps,
            config.model.rope_min_timescale,
            config.model.rope_max_timescale,
        )
        self.audio_table, self.audio_offsets = self.fuse_audio_embeds()
        self.rope_cos, self.rope_sin, self.qk_cos, self.qk_sin = self.build_tables()

    def fuse_audio_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K codebook tables as one [K·V, E] table (the K parameters become views of it) and
        the offsets [K, 1] of each codebook's rows: one embedding lookup for every codebook."""
        tables = [e.weight for e in self.audio_embeds]
        fused = torch.cat(tables)
        for embed, part in zip(self.audio_embeds, fused.split([t.shape[0] for t in tables])):
            embed.weight.data = part
        rows = torch.tensor([0] + [t.shape[0] for t in tables[:-1]], device=fused.device).cumsum(0)
        return fused, rows[:, None]

    def build_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Derived tensors in the compute dtype (rebuilt by :meth:`Dia2Model.rebuild_rotary_tables`):
        the RoPE tables [N, 1, D] and every layer's q/k norm weights w stacked [L, 1, Hq + Hkv, D]
        as ``w`` (the cos side) and ``roll(w, D/2)`` (the sin side): RoPE(n·w) = n·(w·cos) +
        roll(n)·(roll(w)·sin), so the weights ride in the step's tables (:meth:`layer_tables`)."""
        dtype = self.norm.weight.dtype
        w = torch.stack([layer.attn.qk_norm_weight() for layer in self.layers])[:, None]
        cos, sin = self.rope.cos.to(dtype)[:, None], self.rope.sin.to(dtype)[:, None]
        return cos, sin, w, w.roll(w.shape[-1] // 2, dims=-1)

    def layer_tables(self, positions: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """positions [R] → per layer the (cos, sin) tables [R, Hq + Hkv, D] with that layer's q/k
        norm weights folded in: six ops per step for every layer, none per layer."""
        cos = (self.rope_cos[positions] * self.qk_cos).unbind(0)
        sin = (self.rope_sin[positions] * self.qk_sin).unbind(0)
        return cos, sin

    def workspace(self, rows: int) -> DecoderWorkspace:
        """GEMM outputs of a one-position step over ``rows`` rows, made once (see :class:`DecoderWorkspace`)."""
        layer = self.layers[0]
        rows_ids = torch.arange(rows, device=self.norm.weight.device)
        return DecoderWorkspace(layer.attn.workspace(rows), layer.mlp.workspace(rows), rows_ids)

    def forward(
        self,
        tokens: torch.Tensor,
        start: torch.Tensor,
        cache: KVCache,
        slots: int | None = None,
        ws: DecoderWorkspace | None = None,
    ) -> StepOutput:
        """tokens [B, C, T] int64 (rows 0…B-1 of ``cache``); start [B] int64 = position of tokens[..., 0].

        ``slots`` limits attention to the first slots of the cache (every position < slots);
        None reads all of them (fixed shape, as a captured graph needs). Everything that depends
        only on the positions (RoPE tables, KV write indices, the mask) is built once here and
        shared by every layer. ``ws``: a :meth:`workspace` for B rows, only when T == 1 (a step);
        the layers then write into it instead of new tensors.
        """
        B, _, T = tokens.shape
        if cache.kv is None:
            raise ValueError("the decoder needs a joint cache: use Dia2Model.allocate_decoder_cache")
        if ws is not None and (T != 1 or ws.rows.shape[0] != B):
            raise ValueError(f"a decoder workspace serves one position of {ws.rows.shape[0]} rows, got {B}×{T}")
        if T == 1:  # a step: one position per row
            positions, flat = start[:, None], start
        else:
            positions = start[:, None] + torch.arange(T, device=tokens.device)[None, :]  # [B, T]
            flat = positions.view(B * T)  # rows in (b, t) order, as the layers' 2-D hidden state
        x = self.text_embed(tokens[:, 0], tokens[:, 1], self.text_pad_id)
        dtype = self.norm.weight.dtype
        # Every codebook in one lookup, summed in one reduction (the reference adds them one by
        # one, rounding after each add: in bf16 this is within its last bit, dia2-format.md §3.2).
        audio = torch.nn.functional.embedding(tokens[:, 2:] + self.audio_offsets, self.audio_table)  # [B, K, T, E]
        x = x + audio.sum(dim=1)  # [B, T, E]: the layers update it in place through a 2-D view
        n_slots = slots if slots is not None else cache.slots
        slot_ids = torch.arange(n_slots, device=tokens.device)
        mask = additive_mask((slot_ids[None, None, :] <= positions[:, :, None]).unsqueeze(1), dtype)  # [B, 1, T, S]
        cos, sin = self.layer_tables(flat)
        rows = ws.rows if ws is not None else torch.arange(B, device=tokens.device).repeat_interleave(T)
        if cache.rows != B:
            cache = cache.first_rows(B)
        assert cache.kv is not None
        h = x.view(B * T, -1)
        for i, layer in enumerate(self.layers):
            k, v = cache.k[i], cache.v[i]
            if n_slots != cache.slots:  # attend over the first slots only (changes shapes: eager)
                k, v = k.narrow(2, 0, n_slots), v.narrow(2, 0, n_slots)
            layer.add_to(h, T, (cos[i], sin[i]), (rows, flat), (cache.kv[i], k, v), mask, ws)
        h = self.norm(x)
        h32 = h.float()  # the heads run in float32 (dia2-format.md §3.7)
        return StepOutput(action_logits=self.action_head(h32), cb0_logits=self.cb0_head(h32), hidden=h)


class DepformerAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig, eps: float, weight_ids: tuple[int, ...]) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.gqa_query_heads, cfg.gqa_head_dim
        self.eps = eps
        width = self.heads * self.head_dim
        self.in_proj = nn.ModuleDict({str(w): nn.Linear(cfg.n_embd, 3 * width, bias=False) for w in weight_ids})
        self.out_proj = nn.ModuleDict({str(w): nn.Linear(width, cfg.n_embd, bias=False) for w in weight_ids})
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.in_t, self.out_t = self.transposed_weights()

    def transposed_weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Every weight set's in_proj and out_proj as [in, out] views for ``mm``/``addmm_``, by id,
        made once (rebuilt with :meth:`Depformer.build_tables`)."""
        return ({w: p.weight.t() for w, p in self.in_proj.items()}, {w: p.weight.t() for w, p in self.out_proj.items()})

    def qk_norm_weight(self) -> torch.Tensor:
        """[2, 1, 1, dh]: the q and k norm weights side by side (broadcast over heads and the one
        query position), so one norm serves both."""
        return torch.stack([self.q_norm.weight, self.k_norm.weight])[:, None, None, :]

    def views(self, qkv: torch.Tensor) -> DepformerViews:
        """The :class:`DepformerViews` of an in_proj output [B, 3·h·dh]."""
        heads = qkv.view(qkv.shape[0], 3, self.heads, 1, self.head_dim)  # [B, (q, k, v), h, 1, dh]
        return DepformerViews(qkv, heads[:, :2], heads[:, 1:], heads[:, 0])

    def workspace(self, rows: int) -> DepformerViews:
        w = next(iter(self.in_t.values()))
        return self.views(torch.empty((rows, w.shape[1]), device=w.device, dtype=w.dtype))

    def add_to(
        self,
        z: torch.Tensor,
        x: torch.Tensor,
        weight_id: str,
        mask: torch.Tensor,
        qk_tables: tuple[torch.Tensor, torch.Tensor | None],
        cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        ws: DepformerViews | None = None,
    ) -> None:
        """z += out_proj(attention(x)) in place (the residual add is the GEMM's accumulation).

        z, x [B, e] (x normed); ``qk_tables`` this layer's (cos, sin) at the stage with the q/k
        norm weights folded in (:class:`StageTables`; sin None without RoPE); ``cache`` = (the
        stage's slot [B, 2, h, 1, dh] of the joint cache, its halves k, v [B, h, S, dh]). Stage s
        attends over the stages 0…s of this frame through the stage's additive mask over all S
        slots, so all 31 stages have one shape: one kernel choice (one cuDNN plan) for all."""
        B = x.shape[0]
        if ws is None:
            ws = self.views(torch.mm(x, self.in_t[weight_id]))
        else:
            torch.mm(x, self.in_t[weight_id], out=ws.qkv)
        # Norm weights and RoPE together, written back over q and k: then k and v lie side by side
        # in qkv and one copy stores both in the cache.
        rotate(rms_normalize(ws.qk, self.eps), *qk_tables, out=ws.qk)
        slot, k_cache, v_cache = cache
        slot.copy_(ws.kv)
        out = torch.nn.functional.scaled_dot_product_attention(ws.q, k_cache, v_cache, attn_mask=mask, scale=1.0)
        z.addmm_(out.view(B, self.heads * self.head_dim), self.out_t[weight_id])


@dataclass(frozen=True)
class StageTables:
    """What depends only on the stage index, in the compute dtype: RoPE at position s ([1, 1, dh]
    tables), the additive mask [1, 1, 1, S] of the slots 0…s, and per layer the q/k tables
    (cos·w, roll(w)·sin) [2, 1, 1, dh] with that layer's q and k norm weights w folded in, so
    rotate(n, *qk[i]) = RoPE(n·w) for the normalised n (only (w, None) without RoPE)."""

    rope: Rope | None
    mask: torch.Tensor
    qk: tuple[tuple[torch.Tensor, torch.Tensor | None], ...] = ()


class DepformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, eps: float, weight_ids: tuple[int, ...]) -> None:
        super().__init__()
        self.pre_norm = RMSNorm(cfg.n_embd, eps)
        self.self_attention = DepformerAttention(cfg, eps, weight_ids)
        self.post_norm = RMSNorm(cfg.n_embd, eps)
        self.mlp = GatedMLP(cfg.n_embd, cfg.n_hidden, cfg.mlp_activations)


class Depformer(nn.Module):
    """Predicts codebooks 1…K-1 of one delayed column, one stage per codebook, from the decoder's h."""

    def __init__(self, config: Dia2Config) -> None:
        super().__init__()
        d, dep, dec = config.data, config.model.depformer, config.model.decoder
        eps = config.model.normalization_layer_epsilon
        stages = config.num_stages
        ids = config.weight_set_ids
        self.schedule = tuple(str(w) for w in config.runtime.weights_schedule)
        self.logit_limit = config.audio_logit_limit
        self.text_pad_id = d.text_pad_token_id
        self.audio_embeds = nn.ModuleList(nn.Embedding(d.audio_vocab_size, dep.n_embd) for _ in range(stages))
        self.text_embed = TextEmbedding(d.text_vocab_size, dep.n_embd, dep.n_embd) if dep.text_embedding else None
        self.depformer_in = nn.ModuleDict({str(w): nn.Linear(dec.n_embd, dep.n_embd, bias=False) for w in ids})
        self.layers = nn.ModuleList(DepformerLayer(dep, eps, ids) for _ in range(dep.n_layer))
        self.norm = RMSNorm(dep.n_embd, eps)
        self.logits = nn.ModuleList(nn.Linear(dep.n_embd, d.audio_vocab_size, bias=False) for _ in range(stages))
        self.rope = (
            RotaryTable(
                dep.gqa_head_dim,
                max(config.runtime.max_context_steps, stages),
                config.model.rope_min_timescale,
                config.model.rope_max_timescale,
            )
            if dep.apply_rope
            else None
        )
        self.stage_tables: list[StageTables] = []
        self.qk_weights: list[torch.Tensor] = []
        self.head_weights: list[torch.Tensor] = []
        self.head_weights_t: list[torch.Tensor] = []
        self.code_tables: list[torch.Tensor] = []
        self.in_fused_t = torch.empty(0)
        self.build_tables()

    def workspace(self, cache: KVCache) -> DepformerWorkspace:
        """GEMM outputs and per-(layer, stage) cache slots for steps over ``cache``'s rows (a
        :meth:`Dia2Model.allocate_depformer_cache` or rows of one), made once."""
        if cache.kv is None:
            raise ValueError("the depformer needs a joint cache: use Dia2Model.allocate_depformer_cache")
        layer = self.layers[0]
        slots = tuple(tuple(kv.narrow(3, s, 1) for s in range(len(self.audio_embeds))) for kv in cache.kv)
        w = self.norm.weight
        z = torch.empty((cache.rows, w.shape[0]), device=w.device, dtype=w.dtype)
        logits = torch.empty((cache.rows, len(self.audio_embeds), self.logit_limit), device=w.device,
                             dtype=self.logits[0].weight.dtype)
        return DepformerWorkspace(layer.self_attention.workspace(cache.rows), layer.mlp.workspace(cache.rows),
                                  tuple(cache.k), tuple(cache.v), slots, z, z.view(cache.rows // 2, 2, -1),
                                  StageLogits.of_buffer(logits))

    def build_tables(self) -> None:
        """Derived tensors, built once (and again by :meth:`Dia2Model.rebuild_rotary_tables` after
        loading or a dtype change): per stage, :class:`StageTables`; per layer, the joint q/k
        norm weight. Not parameters: change a norm weight and call this again."""
        stages = len(self.audio_embeds)
        dtype = self.norm.weight.dtype
        device = self.norm.weight.device
        slots = torch.arange(stages, device=device)
        self.qk_weights = [layer.self_attention.qk_norm_weight() for layer in self.layers]
        self.in_fused_t = self.fuse_inputs()
        for layer in self.layers:
            layer.self_attention.in_t, layer.self_attention.out_t = layer.self_attention.transposed_weights()
            layer.mlp.wi_t, layer.mlp.wo_t = layer.mlp.transposed_weights()
        # Each stage's code embedding as [V, 1, e] (views): a lookup of one code per CFG pair
        # comes out [B/2, 1, e], ready to broadcast over the pair's two rows.
        self.code_tables = [embed.weight[:, None] for embed in self.audio_embeds]
        # Each stage's head cut to the logit limit once (views): no slice of the logits per stage;
        # transposed (views) for a head written straight into a step's logits (mm out=).
        self.head_weights = [head.weight[: self.logit_limit] for head in self.logits]
        self.head_weights_t = [w.t() for w in self.head_weights]
        self.stage_tables = []
        for s in range(stages):
            rope = None
            qk: list[tuple[torch.Tensor, torch.Tensor | None]] = [(w, None) for w in self.qk_weights]
            if self.rope is not None:
                # [1, 1, dh]: broadcasts over [B, 2, h, dh]
                rope = self.rope.at(torch.full((1, 1), s, dtype=torch.long, device=device), dtype)
                half = rope.cos.shape[-1] // 2
                qk = [(w * rope.cos[0], w.roll(half, dims=-1) * rope.sin[0]) for w in self.qk_weights]
            mask = additive_mask(slots <= s, dtype).view(1, 1, 1, stages)
            self.stage_tables.append(StageTables(rope, mask, tuple(qk)))

    def stage(
        self,
        stage: int,
        hidden: torch.Tensor,
        prev_token: torch.Tensor,
        cache: KVCache,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
        projected: dict[str, torch.Tensor] | None = None,
        ws: DepformerWorkspace | None = None,
    ) -> torch.Tensor:
        """One stage. hidden [B, E] (decoder output), prev_token (codebook ``stage`` of the column
        being predicted, cb0 for stage 0): [B], one code per row, or [B/2], one per CFG pair (rows
        2i and 2i+1 get code i, a step's case: no index per stage) → logits [B, V'] float32 for
        codebook stage+1, V' = logit limit. ``text`` (main, second), in prev_token's form, is
        only used at stage 0 by checkpoints with a depformer text embedding.
        ``projected``: :meth:`project` of this ``hidden`` (a step computes it once for all stages;
        with ``pairs=True`` for codes per pair).
        ``ws``: a :meth:`workspace` of this ``cache`` (a step's; else views are made per call).
        The cache's slots > ``stage`` may hold anything finite (they are masked).
        """
        B = hidden.shape[0]
        w = self.schedule[stage]
        tables = self.stage_tables[stage]
        pairs = prev_token.shape[0] * 2 == B
        if pairs:  # one code per CFG pair: looked up once, broadcast to both rows by the add
            t = torch.index_select(self.code_tables[stage], 0, prev_token)  # [B/2, 1, e]
        else:
            t = self.audio_embeds[stage](prev_token)  # [B, e]
        if stage == 0 and self.text_embed is not None and text is not None:
            text_t = self.text_embed(text[0], text[1], self.text_pad_id)
            t = t + (text_t[:, None] if pairs else text_t)
        base = projected[w] if projected is not None else self.depformer_in[w](hidden)
        if pairs and base.dim() == 2:
            base = base.view(B // 2, 2, -1)
        # z [B, e]: the residual every layer updates in place (the workspace's, when there is one)
        if ws is None:
            if cache.kv is None:
                raise ValueError("the depformer needs a joint cache: use Dia2Model.allocate_depformer_cache")
            if cache.rows != B:
                cache = cache.first_rows(B)
            assert cache.kv is not None
            z = (base + t).view(B, -1)
            slots, keys, values = [kv.narrow(3, stage, 1) for kv in cache.kv], cache.k, cache.v
        else:
            torch.add(base, t, out=ws.z_pairs if pairs else ws.z)
            z, slots, keys, values = ws.z, [per_stage[stage] for per_stage in ws.slots], ws.k, ws.v
        for i, layer in enumerate(self.layers):
            attn = layer.self_attention
            attn.add_to(z, layer.pre_norm(z), w, tables.mask, tables.qk[i], (slots[i], keys[i], values[i]),
                        ws.attn if ws else None)
            layer.mlp.add_to(z, layer.post_norm(z), ws.mlp if ws else None)
        h32 = self.norm(z).float()  # the heads run in float32 (dia2-format.md §3.7)
        if ws is None or torch.compiler.is_compiling():  # Dynamo refuses a strided out=
            logits = torch.nn.functional.linear(h32, self.head_weights[stage])
            return logits if ws is None else ws.heads.of[stage].copy_(logits)
        # Straight into the step's [rows, S, V'] logits (the same GEMM as linear: x @ Wᵀ)
        return torch.mm(h32, self.head_weights_t[stage], out=ws.heads.of[stage])

    def fuse_inputs(self) -> torch.Tensor:
        """Every weight set's ``depformer_in`` as one [E, sets·e] matrix (transposed view of the
        concatenation; the parameters become views of it, no second copy), so one GEMM projects
        the decoder's h for every set."""
        fused = torch.cat([proj.weight for proj in self.depformer_in.values()])
        for proj, part in zip(self.depformer_in.values(), fused.split(self.norm.weight.shape[0])):
            proj.weight.data = part
        return fused.t()

    def project(self, hidden: torch.Tensor, *, pairs: bool = False) -> dict[str, torch.Tensor]:
        """depformer_in of ``hidden`` [B, E] for each weight set, by id: the same for every stage
        of a step that uses the set, so a step computes it once for all sets (one GEMM), not once
        per stage. ``pairs``: each [B/2, 2, e] (CFG pairs), what a stage fed one code per pair adds to."""
        B, e = hidden.shape[0], self.norm.weight.shape[0]
        sets = len(self.depformer_in)
        out = torch.mm(hidden, self.in_fused_t)  # [B, sets·e]
        parts = (out.view(B // 2, 2, sets, e) if pairs else out.view(B, sets, e)).unbind(-2)
        return dict(zip(self.depformer_in.keys(), parts))


class Dia2Model(nn.Module):
    def __init__(self, config: Dia2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = TemporalTransformer(config)
        self.depformer = Depformer(config)

    @property
    def device(self) -> torch.device:
        return self.transformer.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.norm.weight.dtype

    def head_modules(self) -> list[nn.Linear]:
        """Output heads, kept in float32 whatever the compute dtype (logits are always float32)."""
        return [self.transformer.action_head, self.transformer.cb0_head, *self.depformer.logits]

    def allocate_decoder_cache(self, rows: int, slots: int | None = None) -> KVCache:
        dec = self.config.model.decoder
        return KVCache.allocate_joint(
            dec.n_layer,
            rows,
            dec.kv_heads,
            slots or self.config.runtime.max_context_steps,
            dec.gqa_head_dim,
            device=self.device,
            dtype=self.dtype,
        )

    def allocate_depformer_cache(self, rows: int) -> KVCache:
        dep = self.config.model.depformer
        return KVCache.allocate_joint(
            dep.n_layer, rows, dep.kv_heads, self.config.num_stages, dep.gqa_head_dim, device=self.device, dtype=self.dtype
        )

    def rebuild_rotary_tables(self) -> None:
        """Recompute every derived tensor on the model's device in its compute dtype (after a
        meta-device build, loading or a dtype change): the non-persistent RoPE tables, the
        depformer's per-stage tables, the q/k norm weights stacked for the RoPE tables, the
        fused weights (decoder q/k/v projection, the audio embedding tables; the parameters
        become views of them) and the transposed views the in-place GEMMs read."""
        cfg = self.config
        dec, dep = cfg.model.decoder, cfg.model.depformer
        lo, hi = cfg.model.rope_min_timescale, cfg.model.rope_max_timescale
        self.transformer.rope = RotaryTable(dec.gqa_head_dim, cfg.runtime.max_context_steps, lo, hi).to(self.device)
        self.transformer.audio_table, self.transformer.audio_offsets = self.transformer.fuse_audio_embeds()
        for layer in self.transformer.layers:
            layer.attn.qkv_t, layer.attn.o_t = layer.attn.fuse_projections()
            layer.mlp.wi_t, layer.mlp.wo_t = layer.mlp.transposed_weights()
        tr = self.transformer
        tr.rope_cos, tr.rope_sin, tr.qk_cos, tr.qk_sin = tr.build_tables()
        if self.depformer.rope is not None:
            n = max(cfg.runtime.max_context_steps, cfg.num_stages)
            self.depformer.rope = RotaryTable(dep.gqa_head_dim, n, lo, hi).to(self.device)
        self.depformer.build_tables()
