"""Where a step's layers write: GEMM output buffers and the views of them each op reads, made
once per batch bucket (in :class:`dia2.graphs.DeviceStep`) and shared by every layer (the
layers run one after the other).

Why: a graphed step replays on the addresses it was captured with, and at one query position
a view made per layer (a split, a slice, a narrow) is an operation of its own; a buffer with
its views built once leaves only the GEMMs (``mm(…, out=)``) and the math. Without a
workspace (a voice prompt's prefill, the teacher-forced trace) the same code makes the same
views of new tensors per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MLPWorkspace:
    """Where a :class:`dia2.layers.GatedMLP` writes its first GEMM for a fixed number of rows: ``hidden``
    [rows, 2F] and its ``gate`` and ``up`` halves (views, made once)."""

    hidden: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor

    @classmethod
    def of(cls, hidden: torch.Tensor, width: int) -> MLPWorkspace:
        gate, up = hidden.split(width, dim=-1)
        return cls(hidden, gate, up)


@dataclass(frozen=True)
class QKV:
    """Views of one decoder q/k/v GEMM output ``qkv`` [B·T, (Hq + 2·Hkv)·D] (rows in (b, t) order):
    ``qk`` [B·T, Hq + Hkv, D] (normed and rotated in place), ``kv`` [B·T, 2, Hkv, D] (one write
    into the joint cache) and ``q``: at T == 1 already grouped for :func:`dia2.layers.attend` (a view,
    :func:`dia2.layers.group_queries`), else [B, T, Hq, D] (grouping it is a copy: made after the rotation)."""

    qkv: torch.Tensor
    qk: torch.Tensor
    kv: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True)
class DecoderWorkspace:
    """Where a one-position step over a fixed number of rows writes its GEMM outputs, made once
    (static addresses under CUDA graphs) and shared by every layer: the layers run one after
    the other. ``rows`` indexes each row's cache row (for the KV write)."""

    attn: QKV
    mlp: MLPWorkspace
    rows: torch.Tensor


@dataclass(frozen=True)
class DepformerViews:
    """Views of one depformer in_proj GEMM output ``qkv`` [B, 3·h·dh]: ``qk`` [B, 2, h, 1, dh]
    (normed and rotated in place), ``kv`` [B, 2, h, 1, dh] (one copy into the cache) and ``q``
    [B, h, 1, dh], already SDPA's layout."""

    qkv: torch.Tensor
    qk: torch.Tensor
    kv: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True)
class DepformerWorkspace:
    """Where a step's stages over a fixed set of cache rows write their GEMM outputs, and the
    cache slot of every (layer, stage) as a view of that cache, all made once (static addresses
    under CUDA graphs; no slicing per stage). Layers and stages run one after the other."""

    attn: DepformerViews
    mlp: MLPWorkspace
    k: tuple[torch.Tensor, ...]  # per layer: the cache's keys [rows, h, S, dh] (views)
    v: tuple[torch.Tensor, ...]
    slots: tuple[tuple[torch.Tensor, ...], ...]  # [layer][stage]: the joint cache's kv[layer].narrow(3, stage, 1)
    z: torch.Tensor  # [rows, e]: a stage's residual stream
    z_pairs: torch.Tensor  # the same as [rows/2, 2, e] (CFG pairs)
    heads: StageLogits  # where each stage's head writes its logits


@dataclass(frozen=True)
class StageLogits:
    """Where a step's depformer heads write: ``all`` [rows, S, V'] float32 (the step's stage
    logits, no stack at the end), and per stage ``of[s]`` [rows, V'] with its CFG halves
    ``cond[s]`` (even rows) and ``uncond[s]`` (odd rows), views made once: a stage's head is one
    ``mm(…, out=)`` and CFG reads its two halves with no view, unbind or select per stage."""

    all: torch.Tensor
    of: tuple[torch.Tensor, ...]
    cond: tuple[torch.Tensor, ...]
    uncond: tuple[torch.Tensor, ...]

    @classmethod
    def of_buffer(cls, logits: torch.Tensor) -> StageLogits:
        stages = logits.unbind(1)
        return cls(logits, stages, tuple(x[0::2] for x in stages), tuple(x[1::2] for x in stages))
