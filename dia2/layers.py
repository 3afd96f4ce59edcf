"""Building blocks shared by the temporal transformer and the depformer.

Numerics follow dia2-format.md §3: RMSNorm statistic in float32, per-head q/k RMSNorm
before RoPE, half-split RoPE, attention scale 1.0 (the learned q/k norms carry the
temperature), gated MLP with the gate in the first half of ``wi``.

Kernel count matters more than arithmetic at one query position (a step is thousands of
tiny kernels), so each block is written with as few dispatched operations as the numerics
allow: RMSNorm is PyTorch's fused op with the weight inside; the q and k norms of a layer
run as one norm over both; RoPE reads tables gathered once per step (:class:`Rope`) and
rotates with a roll and one ``addcmul`` instead of split/negate/concatenate; attention
regroups the query heads over the KV heads and attends with an additive mask (:func:`attend`);
a residual add is the output GEMM's own accumulation (``addmm_`` on the 2-D hidden state,
with the weights transposed once as views), and a step's GEMMs write into buffers made once
per batch bucket (:class:`MLPWorkspace`; static addresses under CUDA graphs).
Where this rounds differently from the reference's op-by-op bf16 order it is by the last bit
(the fused forms round once where the reference rounds twice); in fp32 it is within 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .workspace import MLPWorkspace


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) over the last axis; the statistic in float32, the result cast to
    x's dtype once (what the reference's unfused path computes), as one fused op."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op, weight included (held in the compute dtype). In fp32 this equals the
        # reference's normalise-then-multiply bit for bit; in bf16 the weight is applied before
        # the one rounding instead of after it (dia2-format.md §3.9: last-bit differences).
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


_ACT = {
    "silu": F.silu,
    "swish": F.silu,
    "swiglu": F.silu,
    "gelu": F.gelu,
    "geglu": F.gelu,
    "relu": F.relu,
    "linear": None,  # identity: no op at all
}


class GatedMLP(nn.Module):
    """out = wo(act0(gate) * act1(up)) where ``wi`` rows [0, F) are the gate, [F, 2F) the up branch."""

    def __init__(self, dim: int, hidden: int, activations: tuple[str, str]) -> None:
        super().__init__()
        self.hidden = hidden
        self.act0 = _ACT[activations[0]]
        self.act1 = _ACT[activations[1]]
        self.wi = nn.Linear(dim, 2 * hidden, bias=False)
        self.wo = nn.Linear(hidden, dim, bias=False)
        self.wi_t, self.wo_t = self.transposed_weights()

    def transposed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``wi`` and ``wo`` as [in, out] views (no copy) for ``mm``/``addmm_``, made once (rebuilt
        by :meth:`dia2.model.Dia2Model.rebuild_rotary_tables`): no transpose per call."""
        return self.wi.weight.t(), self.wo.weight.t()

    def workspace(self, rows: int) -> MLPWorkspace:
        w = self.wi.weight
        return MLPWorkspace.of(torch.empty((rows, 2 * self.hidden), device=w.device, dtype=w.dtype), self.hidden)

    def add_to(self, z: torch.Tensor, x: torch.Tensor, ws: MLPWorkspace | None = None) -> None:
        """z += wo(…) of x, both [rows, dim], in place: the residual add is the ``wo`` GEMM's own
        accumulation (``addmm_``). ``ws``: where the first GEMM writes (else a new tensor)."""
        if ws is None:
            ws = MLPWorkspace.of(torch.mm(x, self.wi_t), self.hidden)
        else:
            torch.mm(x, self.wi_t, out=ws.hidden)
        gate = ws.gate if self.act0 is None else self.act0(ws.gate)
        up = ws.up if self.act1 is None else self.act1(ws.up)
        z.addmm_(gate * up, self.wo_t)


class RotaryTable(nn.Module):
    """cos and signed-sin tables [N, D] for positions 0…N-1, half-split layout (non-persistent).

    ``sin`` holds [-sin θ, +sin θ] so that a rotation is x·cos + roll(x, D/2)·sin: roll gives
    [x₂, x₁], the same products and sum as x·cos + [-x₂, x₁]·sin (dia2-format.md §3.5).
    """

    def __init__(self, head_dim: int, max_positions: int, min_timescale: float, max_timescale: float) -> None:
        super().__init__()
        half = head_dim // 2
        frac = 2.0 * torch.arange(half, dtype=torch.float32) / head_dim
        timescale = min_timescale * (max_timescale / min_timescale) ** frac
        inv_freq = 1.0 / timescale
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.max_positions = max_positions
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], dim=-1), persistent=False)

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """The tables of ``positions`` [B, T] in ``dtype``, gathered once and shared by every layer."""
        cos = self.cos[positions].unsqueeze(2).to(dtype)  # [B, T, 1, D]
        sin = self.sin[positions].unsqueeze(2).to(dtype)
        return Rope(cos, sin)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, D], positions [B, T] int64 → rotated x."""
        return self.at(positions, x.dtype).apply(x)


@dataclass(frozen=True)
class Rope:
    """RoPE tables for one set of positions, broadcastable to [B, T, H, D] (or [B, H, D])."""

    cos: torch.Tensor
    sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return rotate(x, self.cos, self.sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x·cos + roll(x, D/2)·sin in three ops (the second product and the sum as one ``addcmul``),
    into ``out`` if given (a view the caller wants filled in place; it must not overlap x).
    ``cos``/``sin`` may carry a per-element weight folded in (see :class:`dia2.model.StageTables`);
    ``sin`` None: no rotation, only x·cos (a norm weight without RoPE)."""
    direct = None if torch.compiler.is_compiling() else out
    if sin is None:
        value = torch.mul(x, cos, out=direct)
    else:
        value = torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin, out=direct)
    if out is not None and direct is None:  # Dynamo refuses a strided out=: the compiled graph fuses this copy
        out.copy_(value)
    return value


def group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q [B, T, Hq, D] → [B, Hkv, G·T, D] (G = Hq / Hkv), the layout :func:`attend` reads.

    Query head h reads KV head h // G. The G heads of a group and the T query positions are
    folded into the query length, so no kernel ever expands K/V to Hq heads and fused kernels
    (which refuse ``enable_gqa`` with a mask) can run. At T == 1 this is a view (no copy)."""
    B, T, Hq, D = q.shape
    G = Hq // kv_heads
    if T == 1:
        return q.view(B, kv_heads, G, D)  # head h = kv·G + j → [B, kv, j, D]
    return q.view(B, T, kv_heads, G, D).permute(0, 2, 3, 1, 4).reshape(B, kv_heads, G * T, D)


def attend(qg: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Scaled dot-product attention with scale 1.0 and grouped KV heads, as plain attention.

    qg [B, Hkv, G·T, D] (:func:`group_queries`, T = ``steps``); caches [B, Hkv, S, D]; mask
    [B or 1, 1, T, S] additive (0 = attend, the most negative finite value = masked) in the
    caches' dtype. Returns [B·T, Hq·D] (rows in (b, t) order), the layout of the next GEMM.
    """
    B, Hkv, GT, D = qg.shape
    T = steps
    G = GT // T
    m = mask if T == 1 else mask.repeat(1, 1, G, 1)  # [B, 1, G·T, S]: row j·T + t is query position t
    out = F.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=m, scale=1.0)  # [B, Hkv, G·T, D]
    if T == 1:  # reshape, not view: CUDA's flash/efficient kernels may return [B, G, Hkv, D] storage
        return out.reshape(B, Hkv * G * D)
    return out.view(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(B * T, Hkv * G * D)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool → additive mask in ``dtype``: 0 where allowed, the most negative finite value elsewhere
    (as the reference builds it)."""
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)
