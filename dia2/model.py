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
from .layers import GatedMLP, RMSNorm, Rope, RotaryTable, additive_mask, attend, rms_normalize, rotate


@dataclass
class KVCache:
    """Per-layer keys and values [rows, heads, slots, head_dim].

    ``kv``, where present (the depformer's cache, :meth:`allocate_joint`): per layer one tensor
    [rows, 2, heads, slots, head_dim] of which ``k[i]`` and ``v[i]`` are views, so a step writes
    a layer's key and value in one copy."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    kv: list[torch.Tensor] | None = None

    @classmethod
    def allocate(
        cls, layers: int, rows: int, heads: int, slots: int, head_dim: int, *, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (rows, heads, slots, head_dim)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)],
        )

    @classmethod
    def allocate_joint(
        cls, layers: int, rows: int, heads: int, slots: int, head_dim: int, *, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        kv = [torch.zeros((rows, 2, heads, slots, head_dim), device=device, dtype=dtype) for _ in range(layers)]
        return cls(k=[t[:, 0] for t in kv], v=[t[:, 1] for t in kv], kv=kv)

    def first_rows(self, rows: int) -> KVCache:
        """Views of rows 0…rows-1 (the same memory)."""
        kv = [t[:rows] for t in self.kv] if self.kv is not None else None
        return KVCache(k=[t[:rows] for t in self.k], v=[t[:rows] for t in self.v], kv=kv)

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
        return u + v * (second != pad_id).unsqueeze(-1).to(v.dtype)


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
        self.qk_weight = self.qk_norm_weight()
        self.qkv_weight = self.fuse_projections()

    def fuse_projections(self) -> torch.Tensor:
        """[(Hq + 2·Hkv)·D, E]: the q, k and v projection weights as one matrix, so one GEMM
        serves all three. The three parameters become views of it (no second copy of the
        weights); rebuilt by :meth:`Dia2Model.rebuild_rotary_tables` after loading or a dtype change."""
        fused = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        parts = fused.split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features])
        for proj, part in zip((self.q_proj, self.k_proj, self.v_proj), parts):
            proj.weight.data = part
        return fused

    def qk_norm_weight(self) -> torch.Tensor:
        """[Hq + Hkv, D]: the q norm weight for each query head, then the k norm weight for each
        KV head, so one norm serves both (rebuilt by :meth:`Dia2Model.rebuild_rotary_tables`)."""
        return torch.cat([self.q_norm.weight.expand(self.heads, -1), self.k_norm.weight.expand(self.kv_heads, -1)])

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        write: tuple[torch.Tensor, torch.Tensor],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, T, E]; rope at the step's positions; ``write`` = (rows, positions) [B, T] index
        tensors of the KV slots to write; caches [B, Hkv, S, D] (the S slots read); mask
        [B, 1, T, S] additive."""
        B, T, _ = x.shape
        qkv = torch.nn.functional.linear(x, self.qkv_weight).view(B, T, self.heads + 2 * self.kv_heads, self.head_dim)
        qk, v = qkv.split([self.heads + self.kv_heads, self.kv_heads], dim=2)  # [B, T, Hq + Hkv, D], [B, T, Hkv, D]
        qk = rope.apply(rms_normalize(qk, self.eps) * self.qk_weight)  # both norms and both rotations at once
        q, k = qk.split([self.heads, self.kv_heads], dim=2)
        # The KV slot of a step is its position: slot p holds position p for every row.
        torch.ops.aten.index_put_(k_cache, [write[0], None, write[1]], k)
        torch.ops.aten.index_put_(v_cache, [write[0], None, write[1]], v)
        return self.o_proj(attend(q, k_cache, v_cache, mask))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, eps: float) -> None:
        super().__init__()
        self.pre_norm = RMSNorm(cfg.n_embd, eps)
        self.attn = DecoderAttention(cfg, eps)
        self.post_norm = RMSNorm(cfg.n_embd, eps)
        self.mlp = GatedMLP(cfg.n_embd, cfg.n_hidden, cfg.mlp_activations)

    def forward(self, x, rope, write, k_cache, v_cache, mask):  # type: ignore[no-untyped-def]
        x = x + self.attn(self.pre_norm(x), rope, write, k_cache, v_cache, mask)
        return x + self.mlp(self.post_norm(x))


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

    def fuse_audio_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K codebook tables as one [K·V, E] table (the K parameters become views of it) and
        the offsets [K, 1] of each codebook's rows: one embedding lookup for every codebook."""
        tables = [e.weight for e in self.audio_embeds]
        fused = torch.cat(tables)
        for embed, part in zip(self.audio_embeds, fused.split([t.shape[0] for t in tables])):
            embed.weight.data = part
        rows = torch.tensor([0] + [t.shape[0] for t in tables[:-1]], device=fused.device).cumsum(0)
        return fused, rows[:, None]

    def forward(
        self, tokens: torch.Tensor, start: torch.Tensor, cache: KVCache, slots: int | None = None
    ) -> StepOutput:
        """tokens [B, C, T] int64 (rows 0…B-1 of ``cache``); start [B] int64 = position of tokens[..., 0].

        ``slots`` limits attention to the first slots of the cache (every position < slots);
        None reads all of them (fixed shape, as a captured graph needs). Everything that depends
        only on the positions (RoPE tables, KV write indices, the mask) is built once here and
        shared by every layer.
        """
        B, _, T = tokens.shape
        positions = start[:, None] + torch.arange(T, device=tokens.device)[None, :]  # [B, T]
        x = self.text_embed(tokens[:, 0], tokens[:, 1], self.text_pad_id)
        dtype = self.norm.weight.dtype
        # Every codebook in one lookup, summed in one reduction (the reference adds them one by
        # one, rounding after each add: in bf16 this is within its last bit, dia2-format.md §3.2).
        audio = torch.nn.functional.embedding(tokens[:, 2:] + self.audio_offsets, self.audio_table)  # [B, K, T, E]
        x = x.to(dtype) + audio.sum(dim=1)
        n_slots = slots if slots is not None else cache.slots
        slot_ids = torch.arange(n_slots, device=tokens.device)
        mask = additive_mask((slot_ids[None, None, :] <= positions[:, :, None]).unsqueeze(1), dtype)  # [B, 1, T, S]
        rope = self.rope.at(positions, dtype)
        write = (torch.arange(B, device=tokens.device)[:, None].expand(B, T), positions)
        full = n_slots == cache.slots and cache.rows == B
        for i, layer in enumerate(self.layers):
            k, v = (cache.k[i], cache.v[i]) if full else (cache.k[i][:B, :, :n_slots], cache.v[i][:B, :, :n_slots])
            x = layer(x, rope, write, k, v, mask)
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

    def qk_norm_weight(self) -> torch.Tensor:
        """[2, 1, 1, dh]: the q and k norm weights side by side (broadcast over heads and the one
        query position), so one norm serves both."""
        return torch.stack([self.q_norm.weight, self.k_norm.weight])[:, None, None, :]

    def forward(
        self,
        x: torch.Tensor,
        stage: int,
        weight_id: str,
        mask: torch.Tensor,
        qk_tables: tuple[torch.Tensor, torch.Tensor | None],
        kv_cache: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, e]; ``kv_cache`` [B, 2, h, S, dh] with its halves ``k_cache``, ``v_cache`` [B, h, S, dh]
        (:meth:`KVCache.allocate_joint`); ``qk_tables`` this layer's (cos, sin) at the stage with
        the q/k norm weights folded in (:class:`StageTables`; sin None without RoPE). Stage s
        attends over the stages 0…s of this frame through the stage's additive mask over all S
        slots, so all 31 stages have one shape: one kernel choice (one cuDNN plan) for all."""
        B = x.shape[0]
        # [B, (q, k, v), h, 1, dh]: q = qkv[:, 0] is already SDPA's [B, h, 1, dh]
        qkv = self.in_proj[weight_id](x).view(B, 3, self.heads, 1, self.head_dim)
        qk = qkv[:, :2]
        normed = rms_normalize(qk, self.eps)  # q and k normed at once
        cos, sin = qk_tables
        # Norm weights and RoPE together, written back over q and k: then k and v lie side by side
        # in qkv and one copy stores both in the cache.
        if torch.compiler.is_compiling():  # Dynamo refuses a strided out=; the compiled graph fuses the copy
            qk.copy_(normed * cos if sin is None else rotate(normed, cos, sin))
        elif sin is None:
            torch.mul(normed, cos, out=qk)
        else:
            rotate(normed, cos, sin, out=qk)
        kv_cache.narrow(3, stage, 1).copy_(qkv[:, 1:])
        out = torch.nn.functional.scaled_dot_product_attention(qkv[:, 0], k_cache, v_cache, attn_mask=mask, scale=1.0)
        return self.out_proj[weight_id](out.view(B, self.heads * self.head_dim))


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
        self.build_tables()

    def build_tables(self) -> None:
        """Derived tensors, built once (and again by :meth:`Dia2Model.rebuild_rotary_tables` after
        loading or a dtype change): per stage, :class:`StageTables`; per layer, the joint q/k
        norm weight. Not parameters: change a norm weight and call this again."""
        stages = len(self.audio_embeds)
        dtype = self.norm.weight.dtype
        device = self.norm.weight.device
        slots = torch.arange(stages, device=device)
        self.qk_weights = [layer.self_attention.qk_norm_weight() for layer in self.layers]
        # Each stage's head cut to the logit limit once (views): no slice of the logits per stage.
        self.head_weights = [head.weight[: self.logit_limit] for head in self.logits]
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
    ) -> torch.Tensor:
        """One stage. hidden [B, E] (decoder output), prev_token [B] (codebook ``stage`` of the column
        being predicted, cb0 for stage 0) → logits [B, V'] float32 for codebook stage+1, V' = logit limit.
        ``text`` (main, second) [B] is only used at stage 0 by checkpoints with a depformer text embedding.
        ``projected``: :meth:`project` of this ``hidden`` (a step computes it once for all stages).
        The cache's slots > ``stage`` may hold anything finite (they are masked).
        """
        B = hidden.shape[0]
        w = self.schedule[stage]
        tables = self.stage_tables[stage]
        t = self.audio_embeds[stage](prev_token)
        if stage == 0 and self.text_embed is not None and text is not None:
            t = t + self.text_embed(text[0], text[1], self.text_pad_id)
        z = (projected[w] if projected is not None else self.depformer_in[w](hidden)) + t  # [B, e]
        if cache.kv is None:
            raise ValueError("the depformer needs a joint cache: use Dia2Model.allocate_depformer_cache")
        if cache.rows != B:
            cache = cache.first_rows(B)
        assert cache.kv is not None
        for i, layer in enumerate(self.layers):
            z = z + layer.self_attention(layer.pre_norm(z), stage, w, tables.mask, tables.qk[i], cache.kv[i],
                                         cache.k[i], cache.v[i])
            z = z + layer.mlp(layer.post_norm(z))
        return torch.nn.functional.linear(self.norm(z).float(), self.head_weights[stage])

    def project(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """depformer_in of ``hidden`` [B, E] for each weight set, by id: the same for every stage
        of a step that uses the set, so a step computes it once per set, not once per stage."""
        return {w: proj(hidden) for w, proj in self.depformer_in.items()}


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
        return KVCache.allocate(
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
        depformer's per-stage tables, the joint q/k norm weights, and the fused weights (decoder
        q/k/v projection, the audio embedding tables; the parameters become views of them)."""
        cfg = self.config
        dec, dep = cfg.model.decoder, cfg.model.depformer
        lo, hi = cfg.model.rope_min_timescale, cfg.model.rope_max_timescale
        self.transformer.rope = RotaryTable(dec.gqa_head_dim, cfg.runtime.max_context_steps, lo, hi).to(self.device)
        self.transformer.audio_table, self.transformer.audio_offsets = self.transformer.fuse_audio_embeds()
        for layer in self.transformer.layers:
            layer.attn.qk_weight = layer.attn.qk_norm_weight()
            layer.attn.qkv_weight = layer.attn.fuse_projections()
        if self.depformer.rope is not None:
            n = max(cfg.runtime.max_context_steps, cfg.num_stages)
            self.depformer.rope = RotaryTable(dep.gqa_head_dim, n, lo, hi).to(self.device)
        self.depformer.build_tables()
