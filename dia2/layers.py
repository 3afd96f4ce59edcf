"""Building blocks shared by the temporal transformer and the depformer.

Numerics follow dia2-format.md §3: RMSNorm statistic in float32, per-head q/k RMSNorm
before RoPE, half-split RoPE, attention scale 1.0 (the learned q/k norms carry the
temperature), gated MLP with the gate in the first half of ``wi``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)


_ACT = {
    "silu": F.silu,
    "swish": F.silu,
    "swiglu": F.silu,
    "gelu": F.gelu,
    "geglu": F.gelu,
    "relu": F.relu,
    "linear": lambda x: x,
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.wi(x).unflatten(-1, (2, self.hidden))
        return self.wo(self.act0(p[..., 0, :]) * self.act1(p[..., 1, :]))


class RotaryTable(nn.Module):
    """cos/sin tables [N, D] for positions 0…N-1, half-split layout (non-persistent buffers)."""

    def __init__(self, head_dim: int, max_positions: int, min_timescale: float, max_timescale: float) -> None:
        super().__init__()
        half = head_dim // 2
        frac = 2.0 * torch.arange(half, dtype=torch.float32) / head_dim
        timescale = min_timescale * (max_timescale / min_timescale) ** frac
        inv_freq = 1.0 / timescale
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        self.max_positions = max_positions
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, D], positions [B, T] int64 → rotated x."""
        cos = self.cos[positions].unsqueeze(2).to(x.dtype)  # [B, T, 1, D]
        sin = self.sin[positions].unsqueeze(2).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attend(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Scaled dot-product attention with scale 1.0 and GQA.

    q [B, Hq, T, D]; caches [B, Hkv, S, D]; mask [B, 1, T, S] bool (True = attend).
    Returns [B, T, Hq*D].
    """
    # GQA without copying the cache: query head h reads kv head h // (Hq / Hkv).
    out = F.scaled_dot_product_attention(
        q, k_cache, v_cache, attn_mask=mask, scale=1.0, enable_gqa=q.shape[1] != k_cache.shape[1]
    )
    return out.transpose(1, 2).flatten(2)
