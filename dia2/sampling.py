"""Sampling: classifier-free guidance filter, temperature, top-k, and a per-stream RNG.

The RNG is counter-based: the uniform number for (stream seed, step, slot) is a hash of
those three integers, computed on the device. So a stream draws the same numbers whether
it runs alone or batched with other calls, whatever happened before, with no generator
object to carry, no host sync, and nothing that breaks CUDA-graph capture. Slots: 0 for
the action, 1 for codebook 0, 2 + s for depformer stage s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
# Multiplier of the integer finaliser; < 2**31 so products of 32-bit values fit in int64.
_MUL = 0x45D9F3B

SLOT_ACTION = 0
SLOT_CB0 = 1


def stage_slot(stage: int) -> int:
    return 2 + stage


@dataclass(frozen=True)
class SamplingParams:
    """temperature <= 0 means greedy (argmax); top_k <= 0 or >= vocab means no top-k cut."""

    temperature: float
    top_k: int


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings of one stream. Defaults are the official API defaults (dia2-format.md §7.7)."""

    text: SamplingParams = SamplingParams(0.6, 50)
    audio: SamplingParams = SamplingParams(0.8, 50)
    cfg_scale: float = 2.0
    cfg_filter_k: int = 50
    initial_padding: int = 2
    seed: int = 0

    def greedy(self) -> GenerationConfig:
        return GenerationConfig(
            text=SamplingParams(0.0, 0),
            audio=SamplingParams(0.0, 0),
            cfg_scale=self.cfg_scale,
            cfg_filter_k=self.cfg_filter_k,
            initial_padding=self.initial_padding,
            seed=self.seed,
        )


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values in [0, 2**32)."""
    x = ((x >> 16) ^ x) * _MUL & _M32
    x = ((x >> 16) ^ x) * _MUL & _M32
    return (x >> 16) ^ x


def stream_uniforms(seeds: torch.Tensor, steps: torch.Tensor, slot: int) -> torch.Tensor:
    """Uniform floats in [0, 1) for each stream: ``seeds`` [B] and ``steps`` [B] int64 → [B] float32."""
    h = _mix32(seeds & _M32)
    h = _mix32(h ^ ((seeds >> 32) & _M32))
    h = _mix32(h ^ (steps & _M32))
    h = _mix32(h ^ slot)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def cfg_filter(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor, filter_k: torch.Tensor) -> torch.Tensor:
    """Guidance as Dia2 does it: the guided logits only choose candidates.

    ``cond``/``uncond`` [B, V] float32, ``scale`` [B], ``filter_k`` [B] int64. Returns ``cond``
    with every entry whose guided value is below the row's k-th largest guided value set to
    -inf (ties kept). Rows with scale == 1 or k <= 0 are returned unchanged.
    """
    vocab = cond.shape[-1]
    k = filter_k.clamp(1, vocab)
    guided = torch.lerp(uncond, cond, scale[:, None].to(cond.dtype))
    ordered = torch.sort(guided, dim=-1, descending=True).values
    kth = ordered.gather(-1, (k - 1)[:, None])
    filtered = cond.masked_fill(guided < kth, float("-inf"))
    unchanged = (scale == 1.0) | (filter_k <= 0)
    return torch.where(unchanged[:, None], cond, filtered)


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Draw one id per row. ``logits`` [B, V] float32, ``temperature`` [B], ``top_k`` [B] int64,
    ``uniforms`` [B] → [B] int64.

    Rows with temperature <= 0 take the argmax. Others: softmax(logits / T) with NaN/inf → 0,
    an all-zero row becomes one-hot at id 0, the row's ``top_k`` most likely ids kept (0 = all)
    and renormalised, then one id drawn by inverse CDF with the row's uniform.
    """
    vocab = logits.shape[-1]
    greedy = logits.argmax(dim=-1)
    safe_t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits / safe_t[:, None], dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0)
    dead = probs.sum(dim=-1, keepdim=True) <= 0
    one_hot0 = torch.zeros_like(probs)
    one_hot0[:, 0] = 1.0
    probs = torch.where(dead, one_hot0, probs)
    row_k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    top_p, top_i = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep = torch.arange(vocab, device=logits.device)[None, :] < row_k[:, None]
    top_p = top_p * keep
    cdf = torch.cumsum(top_p, dim=-1)
    target = uniforms[:, None] * cdf[:, -1:]
    pick = torch.searchsorted(cdf, target, right=True)
    pick = torch.minimum(pick, row_k[:, None] - 1)
    drawn = top_i.gather(-1, pick).squeeze(-1)
    return torch.where(temperature > 0, drawn, greedy)
