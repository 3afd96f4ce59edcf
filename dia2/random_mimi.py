"""Seeded random Mimi checkpoints in the ``kyutai/mimi`` file layout, for tests and benchmarks.

``write_random_mimi`` saves config.json + model.safetensors with ``save_pretrained``, so
``MimiCodec.load(folder)`` reads it through the same path as the real checkpoint. The
codebooks are randomised: transformers initialises them to zero, and a zero-codebook Mimi
decodes every code sequence to the same audio (dependencies.md §2, "GOTCHA").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from transformers import MimiConfig, MimiModel

from dia2.codec import hf_progress_bars

MimiSize = Literal["tiny", "full"]

#: A 0.4 M-parameter Mimi with the real frame size (1920), frame rate (12.5 Hz), K = 32 and
#: 2048-entry codebooks; only the widths and depths shrink (dependencies.md §2).
TINY_MIMI_CONFIG: dict[str, Any] = {
    "num_filters": 8,
    "hidden_size": 32,
    "codebook_dim": 16,
    "vector_quantization_hidden_dimension": 16,
    "codebook_size": 2048,
    "num_quantizers": 32,
    "num_hidden_layers": 1,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "upsample_groups": 32,
}


def build_random_mimi(size: MimiSize = "tiny", seed: int = 0, **config_overrides: Any) -> MimiModel:
    """A seeded random ``MimiModel`` (eval mode) with unit-normal codebooks.

    ``size="full"`` is the default ``MimiConfig`` (the kyutai/mimi architecture, 79 M params);
    ``config_overrides`` replace config fields (e.g. ``sliding_window=6`` to exercise the window).
    The same (size, seed, overrides) gives bit-identical weights.
    """
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    fields = {**(TINY_MIMI_CONFIG if size == "tiny" else {}), **config_overrides}
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)  # transformers' _init_weights draws from the global RNG
        model = MimiModel(MimiConfig(**fields)).eval()
    quantizer = model.quantizer
    for rvq in (quantizer.semantic_residual_vector_quantizer, quantizer.acoustic_residual_vector_quantizer):
        for layer in rvq.layers:
            codebook = layer.codebook
            with torch.no_grad():
                codebook.embed_sum.copy_(torch.randn(codebook.embed_sum.shape, generator=gen))
            codebook._embed = None  # cached embed_sum / cluster_usage; stale after the copy
    return model


def write_random_mimi(out_dir: Path, size: MimiSize = "tiny", seed: int = 0,
                      **config_overrides: Any) -> Path:
    """Write a random Mimi checkpoint (config.json + model.safetensors) into ``out_dir``; return it.

    Tiny is ~6 MB, full ~384 MB. Deterministic for a seed. Building from a config and
    ``save_pretrained`` make no network calls (tests check this with sockets blocked).
    """
    out_dir = Path(out_dir)
    model = build_random_mimi(size, seed, **config_overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    with hf_progress_bars(False):
        model.save_pretrained(out_dir)
    return out_dir
