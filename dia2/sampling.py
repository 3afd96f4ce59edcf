"""Sampling: classifier-free guidance filter, temperature, top-k, and a per-stream RNG.

The RNG is counter-based: the uniform number for (stream seed, step, slot, vocabulary id) is
a hash of those four integers, computed on the device. So a stream draws the same numbers
whether it runs alone or batched with other calls, whatever happened before, with no generator
object to carry, no host sync, and nothing that breaks CUDA-graph capture. Slots: 0 for the
action, 1 for codebook 0, 2 + s for depformer stage s. One call per step draws every slot.

The draw is Gumbel-max: with g iid Gumbel(0, 1) per id (``-log(-log u)``), the id of the largest
``logit + T·g`` over the kept ids (largest ``logit / T + g``) is distributed exactly as
softmax(logits / T) over those ids, so a draw is one elementwise op and one ``argmax``: no
softmax, no cumulative sum, no search. T = 0 (greedy) makes the scores the filtered logits
themselves: the argmax, the first largest in vocabulary order.

Per-row settings become small per-row constants once, when a stream starts (:class:`CfgRule`,
:class:`DrawRule`); a step reads them, it does not rebuild them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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


# ---------------------------------------------------------------------- the RNG


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values in [0, 2**32)."""
    x = ((x >> 16) ^ x) * _MUL & _M32
    x = ((x >> 16) ^ x) * _MUL & _M32
    return (x >> 16) ^ x


def seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """The per-stream part of the hash: depends on the seed alone, so an engine computes it once
    when a stream starts."""
    h = _mix32(seeds & _M32)
    return _mix32(h ^ ((seeds >> 32) & _M32))


def cell_keys(slot: int | torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The per-(slot, id) part of the hash: ``ids`` [V] int64 (< 2**16) → [V] for one slot, or
    [S, V] for slots [S] (< 2**16); distinct cells get distinct keys. A step builds its table once."""
    if isinstance(slot, torch.Tensor):
        slot = slot[:, None]
    return _mix32((slot << 16) | ids)


def stream_uniforms(
    seeds: torch.Tensor, steps: torch.Tensor, slot: int | torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Uniform floats in (0, 1) for each stream and vocabulary id: ``seeds`` [B], ``steps`` [B]
    int64, ``ids`` [V] int64 → [B, V] float32.

    ``slot`` may be a tensor of slots [S] (int64): then all of them at once, [B, S, V], each
    number equal to the one a separate call for that slot gives (one call serves a whole step),
    and each id's number is the same whichever other ids are drawn."""
    return keyed_uniforms(seed_keys(seeds), steps, cell_keys(slot, ids))


def keyed_uniforms(keys: torch.Tensor, steps: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """:func:`stream_uniforms` from the streams' :func:`seed_keys` [B] and a :func:`cell_keys`
    table ([V] or [S, V]) → [B, V] or [B, S, V].

    Two mixing rounds a step: (key, step), then with each cell's key. Steps are positions in
    [0, 2**32). The top 24 bits of the hash, made odd, over 2**24: in [2**-24, 1 - 2**-24],
    exact in float32, never 0 or 1 (so :func:`gumbel` is finite)."""
    h = _mix32(keys ^ steps)
    h = _mix32(h.view(h.shape + (1,) * cells.dim()) ^ cells)
    return ((h >> 8) | 1).to(torch.float32) * (1.0 / (1 << 24))


def gumbel(uniforms: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise ``-log(-log u)`` from uniforms in (0, 1): finite for
    :func:`keyed_uniforms`' numbers (within [-2.82, 16.7])."""
    return uniforms.log().neg().log().neg()


# ---------------------------------------------------------------------- per-row constants

#: The largest top-k (sampling) and CFG filter k a step supports below the full vocabulary: the
#: cut-off is found with one ``topk`` of this size instead of sorting the vocabulary.
MAX_TOP_K = 256


def check_top_k(name: str, k: int, vocab: int, max_k: int = MAX_TOP_K) -> None:
    """Refuse a k the step cannot cut at (0 and >= vocab mean "no cut" and are always fine)."""
    if max_k < k < vocab:
        raise ValueError(f"{name}={k} is above the step's top-k limit {max_k} (vocabulary {vocab}); "
                         f"use a value <= {max_k}, or 0 for no cut")


def _cut_index(k: torch.Tensor, keep_all: torch.Tensor, width: int) -> torch.Tensor:
    """[n] → [n, 1] int64: k - 1 inside a ``topk`` window of ``width``, or ``width`` itself (the
    window's -inf floor column, :class:`Window`) where every id is kept."""
    return torch.where(keep_all, width, k.clamp(1, width) - 1)[:, None]


@dataclass(frozen=True)
class CfgRule:
    """Per-row constants of the CFG candidate filter over a V-wide head, n rows (:func:`cfg_rule`)."""

    scale: torch.Tensor  # [n, 1] float32
    index: torch.Tensor  # [n, 1] int64: k - 1 in the topk window; ``width`` leaves the row unchanged
    width: int  # topk window: min(max_k, V)

    def rows(self, n: int) -> CfgRule:
        """Views of rows 0…n-1 (the same memory)."""
        return replace(self, scale=self.scale[:n], index=self.index[:n])

    def write(self, row: int, one: CfgRule) -> None:
        """Copy the one-row rule ``one`` into ``row`` (in place: captured graphs keep addresses)."""
        self.scale[row].copy_(one.scale[0])
        self.index[row].copy_(one.index[0])


def cfg_rule(scale: torch.Tensor, filter_k: torch.Tensor, vocab: int, max_k: int = MAX_TOP_K) -> CfgRule:
    """``scale`` [n] float, ``filter_k`` [n] int64 (each ≤ ``max_k`` or ≥ V; above ``max_k`` is
    no cut: :func:`check_top_k` refuses those first). A row is left unchanged when its scale is
    1, its k ≤ 0, or its k is at least the vocabulary (or above the window)."""
    width = min(max_k, vocab)
    keep_all = (scale == 1.0) | (filter_k <= 0) | (filter_k > width) | (filter_k >= vocab)
    return CfgRule(scale.float()[:, None], _cut_index(filter_k, keep_all, width), width)


@dataclass(frozen=True)
class DrawRule:
    """Per-row constants of a draw over a V-wide head, n rows (:func:`draw_rule`)."""

    temperature: torch.Tensor  # [n, 1] float32, 0 where greedy
    index: torch.Tensor  # [n, 1] int64: top_k - 1 in the topk window; ``width`` keeps every id
    width: int  # topk window: min(max_k, V)

    def rows(self, n: int) -> DrawRule:
        return replace(self, temperature=self.temperature[:n], index=self.index[:n])

    def write(self, row: int, one: DrawRule) -> None:
        self.temperature[row].copy_(one.temperature[0])
        self.index[row].copy_(one.index[0])


def draw_rule(temperature: torch.Tensor, top_k: torch.Tensor, vocab: int, max_k: int = MAX_TOP_K) -> DrawRule:
    """``temperature`` [n] (≤ 0: greedy), ``top_k`` [n] int64 (each ≤ ``max_k``, or 0 / ≥ V for
    no cut; above ``max_k`` is no cut: :func:`check_top_k` refuses those first)."""
    width = min(max_k, vocab)
    keep_all = (top_k <= 0) | (top_k > width) | (top_k >= vocab)
    return DrawRule(temperature.float().clamp(min=0)[:, None], _cut_index(top_k, keep_all, width), width)


# ---------------------------------------------------------------------- CFG filter and draw


class Window:
    """Scratch of a ``topk`` window of ``width`` for n rows, allocated once (a captured graph
    keeps its address): ``values`` [n, width + 1] float32 whose last column is a -inf floor, so
    the k-th largest of a row that keeps every id (its index is ``width``) is -inf, with no
    per-call fix-up; ``indices`` [n, width] int64 (written, unused)."""

    def __init__(self, n: int, width: int, device: torch.device | str) -> None:
        self.width = width
        self.values = torch.full((n, width + 1), float("-inf"), device=device)
        self.indices = torch.zeros((n, width), dtype=torch.long, device=device)
        self.window = self.values[:, :width]  # views made once: a call slices nothing

    def kth_largest(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``x`` [n, V] → [n, 1]: the value at ``index`` [n, 1] of each row's descending top
        ``width`` values (-inf where the index is ``width``). One ``topk`` and one ``gather``."""
        if torch.compiler.is_compiling():  # Dynamo refuses a strided out=; the compiled graph fuses the copy
            self.window.copy_(x.topk(self.width, dim=-1).values)
        else:
            torch.topk(x, self.width, dim=-1, out=(self.window, self.indices))
        return self.values.gather(-1, index)


def cfg_filter_with(cond: torch.Tensor, uncond: torch.Tensor, rule: CfgRule, window: Window) -> torch.Tensor:
    """Guidance as Dia2 does it: the guided logits only choose candidates.

    ``cond``/``uncond`` [n, V] float32. Returns ``cond`` with every entry whose guided value is
    below the row's k-th largest guided value set to -inf (ties kept); rows the rule leaves
    unchanged are ``cond`` as is (their k-th largest is the window's -inf floor).
    """
    guided = torch.lerp(uncond, cond, rule.scale)  # logits and scale are float32
    return cond.masked_fill(guided < window.kth_largest(guided, rule.index), float("-inf"))


def cfg_filter(
    cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor, filter_k: torch.Tensor, max_k: int = MAX_TOP_K
) -> torch.Tensor:
    """:func:`cfg_filter_with` with the rule built for this call: ``scale`` [B], ``filter_k`` [B]."""
    rule = cfg_rule(scale, filter_k, cond.shape[-1], max_k)
    return cfg_filter_with(cond, uncond, rule, Window(cond.shape[0], rule.width, cond.device))


def sample_with(
    logits: torch.Tensor, rule: DrawRule, noise: torch.Tensor, window: Window, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Draw one id per row. ``logits`` [n, V] float32 (-inf: never drawn), ``noise`` [n, V]
    Gumbel (:func:`gumbel`) → [n] int64, written into ``out`` [n] when given.

    The ids whose logit is at least the row's ``top_k``-th largest are kept (ties at the cut
    kept); the draw is the first largest of ``logit + T·noise`` over them: a sample of
    softmax(logits / T) over the kept ids, or for T = 0 the first largest logit (greedy). A
    row with every logit -inf draws id 0.
    """
    scores = torch.addcmul(logits, rule.temperature, noise)
    scores.masked_fill_(logits < window.kth_largest(logits, rule.index), float("-inf"))
    if out is None:
        return scores.argmax(dim=-1)
    if torch.compiler.is_compiling():
        out.copy_(scores.argmax(dim=-1))
        return out
    return torch.argmax(scores, dim=-1, out=out)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    noise: torch.Tensor,
    max_k: int = MAX_TOP_K,
) -> torch.Tensor:
    """:func:`sample_with` with the rule built for this call: ``temperature`` [B], ``top_k`` [B]
    int64, ``noise`` [B, V] Gumbel → [B] int64."""
    rule = draw_rule(temperature, top_k, logits.shape[-1], max_k)
    return sample_with(logits, rule, noise, Window(logits.shape[0], rule.width, logits.device))
