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
from .layers import GatedMLP, RMSNorm, RotaryTable, attend


@dataclass
class KVCache:
    """Per-layer keys and values [rows, heads, slots, head_dim]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(
        cls, layers: int, rows: int, heads: int, slots: int, head_dim: int, *, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (rows, heads, slots, head_dim)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)],
        )

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


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

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryTable,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, T, E]; positions [B, T]; caches [B, Hkv, Tmax, D]; mask [B, 1, T, S] (S ≤ Tmax slots read)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, T, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        q = rope.rotate(q, positions)
        k = rope.rotate(k, positions)
        # The KV slot of a step is its position: slot p holds position p for every row.
        rows = torch.arange(B, device=x.device)[:, None].expand(B, T)
        k_cache[rows, :, positions] = k.to(k_cache.dtype)
        v_cache[rows, :, positions] = v.to(v_cache.dtype)
        slots = mask.shape[-1]
        out = attend(q.transpose(1, 2), k_cache[:, :, :slots], v_cache[:, :, :slots], mask)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, eps: float) -> None:
        super().__init__()
        self.pre_norm = RMSNorm(cfg.n_embd, eps)
        self.attn = DecoderAttention(cfg, eps)
        self.post_norm = RMSNorm(cfg.n_embd, eps)
        self.mlp = GatedMLP(cfg.n_embd, cfg.n_hidden, cfg.mlp_activations)

    def forward(self, x, positions, rope, k_cache, v_cache, mask):  # type: ignore[no-untyped-def]
        x = x + self.attn(self.pre_norm(x), positions, rope, k_cache, v_cache, mask)
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

    def forward(
        self, tokens: torch.Tensor, start: torch.Tensor, cache: KVCache, slots: int | None = None
    ) -> StepOutput:
        """tokens [B, C, T] int64 (rows 0…B-1 of ``cache``); start [B] int64 = position of tokens[..., 0].

        ``slots`` limits attention to the first slots of the cache (every position < slots);
        None reads all of them (fixed shape, as a captured graph needs).
        """
        B, _, T = tokens.shape
        positions = start[:, None] + torch.arange(T, device=tokens.device)[None, :]  # [B, T]
        x = self.text_embed(tokens[:, 0], tokens[:, 1], self.text_pad_id)
        dtype = self.norm.weight.dtype
        x = x.to(dtype)
        for c, table in enumerate(self.audio_embeds):
            x = x + table(tokens[:, 2 + c])
        n_slots = slots if slots is not None else cache.slots
        slot_ids = torch.arange(n_slots, device=tokens.device)
        mask = (slot_ids[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, T, S]
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, self.rope, cache.k[i][:B], cache.v[i][:B], mask)
        h = self.norm(x)
        return StepOutput(
            action_logits=self.action_head(h.to(self.action_head.weight.dtype)).float(),
            cb0_logits=self.cb0_head(h.to(self.cb0_head.weight.dtype)).float(),
            hidden=h,
        )


class DepformerAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig, eps: float, weight_ids: tuple[int, ...]) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.gqa_query_heads, cfg.gqa_head_dim
        width = self.heads * self.head_dim
        self.in_proj = nn.ModuleDict({str(w): nn.Linear(cfg.n_embd, 3 * width, bias=False) for w in weight_ids})
        self.out_proj = nn.ModuleDict({str(w): nn.Linear(width, cfg.n_embd, bias=False) for w in weight_ids})
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def forward(
        self,
        x: torch.Tensor,
        stage: int,
        weight_id: str,
        rope: RotaryTable | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, 1, e]; caches [B, h, S, dh]; stage s attends over stages 0…s of this frame."""
        B = x.shape[0]
        qkv = self.in_proj[weight_id](x).view(B, 1, 3, self.heads, self.head_dim)
        q = self.q_norm(qkv[:, :, 0])
        k = self.k_norm(qkv[:, :, 1])
        v = qkv[:, :, 2]
        if rope is not None:
            pos = torch.full((B, 1), stage, dtype=torch.long, device=x.device)
            q = rope.rotate(q, pos)
            k = rope.rotate(k, pos)
        k_cache[:, :, stage] = k[:, 0].to(k_cache.dtype)
        v_cache[:, :, stage] = v[:, 0].to(v_cache.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k_cache[:, :, : stage + 1], v_cache[:, :, : stage + 1], scale=1.0
        )
        return self.out_proj[weight_id](out.transpose(1, 2).flatten(2))


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

    def stage(
        self,
        stage: int,
        hidden: torch.Tensor,
        prev_token: torch.Tensor,
        cache: KVCache,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One stage. hidden [B, E] (decoder output), prev_token [B] (codebook ``stage`` of the column
        being predicted, cb0 for stage 0) → logits [B, V'] float32 for codebook stage+1, V' = logit limit.
        ``text`` (main, second) [B] is only used at stage 0 by checkpoints with a depformer text embedding.
        """
        B = hidden.shape[0]
        w = self.schedule[stage]
        dtype = self.norm.weight.dtype
        t = self.audio_embeds[stage](prev_token).to(dtype)
        if stage == 0 and self.text_embed is not None and text is not None:
            t = t + self.text_embed(text[0], text[1], self.text_pad_id).to(dtype)
        z = (self.depformer_in[w](hidden.to(dtype)) + t).unsqueeze(1)  # [B, 1, e]
        for i, layer in enumerate(self.layers):
            z = z + layer.self_attention(
                layer.pre_norm(z), stage, w, self.rope, cache.k[i][:B], cache.v[i][:B]
            )
            z = z + layer.mlp(layer.post_norm(z))
        head = self.logits[stage]
        out = head(self.norm(z)[:, 0].to(head.weight.dtype)).float()
        return out[:, : self.logit_limit]


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
        return KVCache.allocate(
            dep.n_layer, rows, dep.kv_heads, self.config.num_stages, dep.gqa_head_dim, device=self.device, dtype=self.dtype
        )

    def rebuild_rotary_tables(self) -> None:
        """Recompute the non-persistent RoPE tables on the model's device (after a meta-device build)."""
        cfg = self.config
        dec, dep = cfg.model.decoder, cfg.model.depformer
        lo, hi = cfg.model.rope_min_timescale, cfg.model.rope_max_timescale
        self.transformer.rope = RotaryTable(dec.gqa_head_dim, cfg.runtime.max_context_steps, lo, hi).to(self.device)
        if self.depformer.rope is not None:
            n = max(cfg.runtime.max_context_steps, cfg.num_stages)
            self.depformer.rope = RotaryTable(dep.gqa_head_dim, n, lo, hi).to(self.device)
