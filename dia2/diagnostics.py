"""The step without a GPU: on the meta device at any shape, and counted in dispatched operations.

A step's speed on a GPU is set by how many kernels it launches, not by arithmetic (each graph
node costs ~2 µs; a 2B step reads ~4 GB). The number of ATen operations a step dispatches does
not depend on the machine, so it is measured here, on the meta device, where a 2B-shaped model
costs no memory and no compute. The meta device also catches GPU bugs early: a host sync
(``.item()``, ``.cpu()``) or a data-dependent shape raises there, as it would break a CUDA
graph capture.

- :func:`meta_engine` builds a :class:`StepEngine` on the meta device for a config, in the
  CUDA dtype policy (compute weights bf16, heads fp32), with static shapes (what graphs replay).
- :func:`count_ops` runs a function and counts the operations it dispatches: ``ops`` all of
  them, ``kernels`` those that are not views (a view launches nothing).
- :func:`step_op_counts` counts one full step (every depformer stage) and one transformer-only
  step (the continuation zone) of a bucket.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .checkpoint import build_model_on_meta
from .config import Dia2Config
from .engine import StepEngine
from .state_machine import StateRules, TokenIds


@dataclass
class OpCount:
    """Operations one call dispatched: ``ops`` every ATen op, ``kernels`` the non-view ones."""

    ops: int = 0
    kernels: int = 0
    by_name: Counter[str] = field(default_factory=Counter)


class _Counter(TorchDispatchMode):
    def __init__(self, count: OpCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count.ops += 1
        if not func.is_view:
            self.count.kernels += 1
        self.count.by_name[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> OpCount:
    """Run ``fn()`` (in inference mode) and count the ATen operations it dispatches."""
    count = OpCount()
    with torch.inference_mode(), _Counter(count):
        fn()
    return count


def meta_engine(config: Dia2Config, max_streams: int, *, dtype: torch.dtype = torch.bfloat16) -> StepEngine:
    """A static-shape engine for ``config`` on the meta device: weights in ``dtype`` except the
    fp32 heads (the CUDA policy of :func:`dia2.checkpoint.load_model`). Nothing is allocated."""
    model = build_model_on_meta(config)
    model.to(dtype)
    for head in model.head_modules():
        head.float()
    model.rebuild_rotary_tables()
    model.eval().requires_grad_(False)
    return StepEngine(model, rules_without_tokenizer(config), max_streams=max_streams, static_shapes=True)


def rules_without_tokenizer(config: Dia2Config) -> StateRules:
    """State-machine rules from the config alone (BOS 1, speaker tags mapped to new_word): for
    engines fed raw token ids, where no tokenizer is loaded (benchmarks, shape checks)."""
    d = config.data
    ids = TokenIds(new_word=d.text_new_word_token_id, pad=d.text_pad_token_id, zero=d.text_zero_token_id,
                   bos=1, speaker1=d.text_new_word_token_id, speaker2=d.text_new_word_token_id)
    return StateRules.from_config(d, ids)


@dataclass(frozen=True)
class StepOps:
    """Operations of one device step of a bucket: with every depformer stage, and without."""

    rows: int
    full: OpCount
    transformer: OpCount


def step_op_counts(engine: StepEngine, slots: int) -> StepOps:
    """Count one device step of the bucket that holds ``slots`` slots (idle rows: the count does
    not depend on the token values)."""
    step = engine.device_step(slots)
    step.stage([step.idle_row()] * step.n)
    step.inputs.copy_(step.staging)
    full = count_ops(lambda: step.forward(step.inputs, depformer=True))
    transformer = count_ops(lambda: step.forward(step.inputs, depformer=False))
    return StepOps(rows=step.n, full=full, transformer=transformer)
