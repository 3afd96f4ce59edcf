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


def seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """The per-stream half of the hash: depends on the seed alone, so an engine computes it once
    when a stream starts (:func:`keyed_uniforms` then costs a step two mixing rounds, not four)."""
    h = _mix32(seeds & _M32)
    return _mix32(h ^ ((seeds >> 32) & _M32))


def stream_uniforms(seeds: torch.Tensor, steps: torch.Tensor, slot: int | torch.Tensor) -> torch.Tensor:
    """Uniform floats in [0, 1) for each stream: ``seeds`` [B] and ``steps`` [B] int64 → [B] float32.

    ``slot`` may be a tensor of slots [S] (int64): then all of them at once, [B, S], each number
    equal to the one a separate call for that slot gives (one call serves a whole step)."""
    return keyed_uniforms(seed_keys(seeds), steps, slot)


def keyed_uniforms(keys: torch.Tensor, steps: torch.Tensor, slot: int | torch.Tensor) -> torch.Tensor:
    """:func:`stream_uniforms` from the streams' :func:`seed_keys` [B]."""
    h = _mix32(keys ^ (steps & _M32))
    if isinstance(slot, torch.Tensor):
        h = h[:, None]
    h = _mix32(h ^ slot)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


#: The largest top-k (sampling) and CFG filter k a step supports below the full vocabulary: the
#: cut-off is found with one ``topk`` of this size instead of sorting the vocabulary.
MAX_TOP_K = 256


def check_top_k(name: str, k: int, vocab: int, max_k: int = MAX_TOP_K) -> None:
    """Refuse a k the step cannot cut at (0 and >= vocab mean "no cut" and are always fine)."""
    if max_k < k < vocab:
        raise ValueError(f"{name}={k} is above the step's top-k limit {max_k} (vocabulary {vocab}); "
                         f"use a value <= {max_k}, or 0 for no cut")


@dataclass(frozen=True)
class CfgCut:
    """Per-step constants of the CFG candidate cut over a V-wide head, for n rows (built once a
    step by :func:`cfg_cut`, used by every head of that width)."""

    scale: torch.Tensor  # [n, 1] float32
    index: torch.Tensor  # [n, 1] int64: k - 1, inside the topk window
    off: torch.Tensor  # [n, 1] bool: the row is left unchanged (scale 1, k <= 0, or no cut)
    width: int  # topk window: min(max_k, V)


def cfg_cut(scale: torch.Tensor, filter_k: torch.Tensor, vocab: int, max_k: int = MAX_TOP_K) -> CfgCut:
    """``scale`` [n] float, ``filter_k`` [n] int64 (each ≤ ``max_k`` or ≥ V; above ``max_k`` is
    no cut: :func:`check_top_k` refuses those first)."""
    width = min(max_k, vocab)
    off = (scale == 1.0) | (filter_k <= 0) | (filter_k > width) | (filter_k >= vocab)
    return CfgCut(scale.float()[:, None], (filter_k.clamp(1, width) - 1)[:, None], off[:, None], width)


def cfg_filter_cut(cond: torch.Tensor, uncond: torch.Tensor, cut: CfgCut) -> torch.Tensor:
    """Guidance as Dia2 does it: the guided logits only choose candidates.

    ``cond``/``uncond`` [n, V] float32. Returns ``cond`` with every entry whose guided value is
    below the row's k-th largest guided value set to -inf (ties kept); rows ``cut.off`` unchanged.
    The k-th value comes from one ``topk`` of ``cut.width`` (no sort of the vocabulary).
    """
    guided = torch.lerp(uncond, cond, cut.scale)  # logits and scale are float32
    kth = guided.topk(cut.width, dim=-1).values.gather(-1, cut.index)
    kth = kth.masked_fill(cut.off, float("-inf"))  # an unchanged row: nothing is below -inf
    return cond.masked_fill(guided < kth, float("-inf"))


def cfg_filter(
    cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor, filter_k: torch.Tensor, max_k: int = MAX_TOP_K
) -> torch.Tensor:
    """:func:`cfg_filter_cut` with the cut built for this call: ``scale`` [B], ``filter_k`` [B]."""
    return cfg_filter_cut(cond, uncond, cfg_cut(scale, filter_k, cond.shape[-1], max_k))


@dataclass(frozen=True)
class SampleCut:
    """Per-step constants of sampling over a V-wide head, for n rows (built once a step by
    :func:`sample_cut`)."""

    temperature: torch.Tensor  # [n, 1] float32, 1 where greedy (never divides by 0)
    greedy: torch.Tensor  # [n] bool: temperature <= 0, take the argmax
    index: torch.Tensor  # [n, 1] int64: top_k - 1, inside the topk window
    no_cut: torch.Tensor  # [n, 1] bool: keep every id (top_k 0, ≥ V, or above the window)
    width: int  # topk window: min(max_k, V)


def sample_cut(temperature: torch.Tensor, top_k: torch.Tensor, vocab: int, max_k: int = MAX_TOP_K) -> SampleCut:
    """``temperature`` [n], ``top_k`` [n] int64 (each ≤ ``max_k``, or 0 / ≥ V for no cut; above
    ``max_k`` is no cut: :func:`check_top_k` refuses those first)."""
    width = min(max_k, vocab)
    greedy = temperature <= 0
    no_cut = (top_k <= 0) | (top_k > width) | (top_k >= vocab)
    return SampleCut(
        temperature=torch.where(greedy, 1.0, temperature)[:, None],
        greedy=greedy,
        index=(top_k.clamp(1, width) - 1)[:, None],
        no_cut=no_cut[:, None],
        width=width,
    )


def sample_with(logits: torch.Tensor, cut: SampleCut, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one id per row. ``logits`` [n, V] float32, ``uniforms`` [n, 1] → [n] int64.

    Greedy rows take the argmax. Others: softmax(logits / T) with NaN/inf → 0, the ids whose
    probability is at least the row's ``top_k``-th largest kept (ties at the cut are kept),
    then one id drawn by inverse CDF with the row's uniform over the kept probabilities in
    vocabulary order (no sort); a row with no probability mass left draws id 0.
    """
    probs = torch.softmax(logits / cut.temperature, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0)
    kth = probs.topk(cut.width, dim=-1).values.gather(-1, cut.index)
    kth = kth.masked_fill(cut.no_cut, 0.0)  # no cut: keep every id
    cdf = torch.cumsum(probs.masked_fill(probs < kth, 0.0), dim=-1)
    total = cdf[:, -1:]
    drawn = torch.searchsorted(cdf, uniforms * total, right=True).clamp(max=logits.shape[-1] - 1)
    drawn = drawn.masked_fill(total <= 0, 0)[:, 0]
    return torch.where(cut.greedy, logits.argmax(dim=-1), drawn)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    uniforms: torch.Tensor,
    max_k: int = MAX_TOP_K,
) -> torch.Tensor:
    """:func:`sample_with` with the cut built for this call: ``temperature`` [B], ``top_k`` [B]
    int64, ``uniforms`` [B] → [B] int64."""
    return sample_with(logits, sample_cut(temperature, top_k, logits.shape[-1], max_k), uniforms[:, None])
