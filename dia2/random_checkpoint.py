"""Random checkpoints in the official folder layout, for tests, the demo and benchmarks.

``tiny`` is small enough for CPU tests; ``1b`` and ``2b`` have the real Dia2-1B / Dia2-2B
shapes (dia2-format.md §0) so that a benchmark on random weights does the same compute per
step as the released models. The folder holds config.json, model.safetensors (bfloat16, as
the released files), the tokenizer files, a random Mimi in ``mimi/`` and a
``dia2_assets.json`` naming it, and loads through the same code as a downloaded model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoint import MANIFEST_NAME, build_model_on_meta
from .config import parse_config
from .random_mimi import write_random_mimi
from .tiny_tokenizer import write_tiny_tokenizer

Shape = Literal["tiny", "1b", "2b"]
SHAPES: tuple[str, ...] = ("tiny", "1b", "2b")
RANDOM_MARKER = "random_weights.json"

_DATA = {
    "channels": 34,
    "text_vocab_size": 49280,
    "audio_vocab_size": 2050,
    "action_vocab_size": 2,
    "text_pad_token_id": 3,
    "text_new_word_token_id": 2,
    "text_zero_token_id": 7,
    "audio_pad_token_id": 2049,
    "audio_bos_token_id": 2048,
    "action_pad_token_id": 0,
    "action_new_word_token_id": 1,
    "delay_pattern": [16] + [18] * 31,
    "first_word_min_start": 3,
    "max_pad": 8,
    "second_stream_ahead": 2,
}


def _transformer(n_layer: int, n_embd: int, n_hidden: int, q: int, kv: int, head_dim: int) -> dict[str, Any]:
    return {
        "n_layer": n_layer,
        "n_embd": n_embd,
        "n_hidden": n_hidden,
        "gqa_query_heads": q,
        "kv_heads": kv,
        "gqa_head_dim": head_dim,
    }


def shape_config(shape: Shape) -> dict[str, Any]:
    """The config.json content of a shape (a fresh dict each call)."""
    data = copy.deepcopy(_DATA)
    if shape == "tiny":
        data["text_vocab_size"] = 512
        decoder = _transformer(2, 64, 128, 4, 2, 16)
        depformer = _transformer(1, 32, 64, 2, 2, 16)
        schedule = [0] * 8 + [1] * 8 + [2] * 15
        context = 512
    elif shape == "1b":
        decoder = _transformer(30, 1024, 6144, 16, 8, 128)
        depformer = _transformer(3, 1024, 3072, 8, 8, 128)
        schedule = [0] * 8 + [1] * 8 + [2] * 15
        context = 1500
    elif shape == "2b":
        decoder = _transformer(28, 2048, 6144, 16, 8, 128)
        # The released 2B depformer n_hidden and schedule split were not published; these are
        # the doc's middle estimate (dia2-format.md §2.4) with 5 weight sets, first 0, last 4.
        depformer = _transformer(4, 1024, 3072, 8, 8, 128)
        schedule = [0] * 8 + [1] * 8 + [2] * 8 + [3] * 4 + [4] * 3
        context = 1500
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    decoder["low_rank_dim"] = None
    depformer.update({"apply_rope": True, "text_embedding": False, "mlp_activations": ["silu", "linear"]})
    return {
        "data": data,
        "model": {
            "decoder": decoder,
            "depformer": depformer,
            "linear": {"mlp_activations": ["silu", "linear"]},
            "dropout": 0.0,
            "rope_min_timescale": 1,
            "rope_max_timescale": 10000,
            "normalization_layer_epsilon": 1e-6,
        },
        "runtime": {"weights_schedule": schedule, "max_context_steps": context},
    }


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Initialisation that keeps a random network's activations and attention in a sane range."""
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        # Attention has scale 1.0: the q/k norm weights carry the 1/sqrt(D) temperature.
        scale = shape[0] ** -0.25
        return scale * (1 + 0.1 * torch.randn(shape, generator=gen))
    if "norm" in name:
        return 1 + 0.1 * torch.randn(shape, generator=gen)
    if "embed" in name and "proj" not in name:
        return 0.5 * torch.randn(shape, generator=gen)
    bound = 1.0 / math.sqrt(shape[-1])
    if name.endswith(("action_head.weight", "cb0_head.weight")) or ".logits." in name:
        bound *= 4.0  # peakier heads make a random model's samples less uniform
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def write_random_checkpoint(
    out_dir: str | Path,
    shape: Shape = "tiny",
    seed: int = 0,
    *,
    mimi: Literal["tiny", "full"] | None = None,
    config_overrides: dict[str, dict[str, Any]] | None = None,
    depformer_text_embedding: bool = False,
) -> Path:
    """Write a complete random model folder. ``config_overrides`` maps a block ("data", "runtime",
    "decoder", "depformer") to keys to replace, for tests that need e.g. a short context.
    ``depformer_text_embedding``: give the depformer a text embedding (``text_embedding: true``;
    the released checkpoints have none, the loader's default has one)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = shape_config(shape)
    raw["model"]["depformer"]["text_embedding"] = depformer_text_embedding
    for block, values in (config_overrides or {}).items():
        target = raw["model"][block] if block in ("decoder", "depformer") else raw[block]
        target.update(values)
    config = parse_config(raw)

    vocab = write_tiny_tokenizer(out)
    if vocab > config.data.text_vocab_size:
        raise ValueError(f"tokenizer has {vocab} ids but text_vocab_size is {config.data.text_vocab_size}")

    from safetensors.torch import save_file

    meta = build_model_on_meta(config)
    tensors = {
        name: _random_tensor(name, tuple(t.shape), seed).to(torch.bfloat16)
        for name, t in meta.state_dict().items()
    }
    save_file(tensors, str(out / "model.safetensors"))
    del tensors
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")

    write_random_mimi(out / "mimi", size=mimi or ("tiny" if shape == "tiny" else "full"), seed=seed)
    (out / MANIFEST_NAME).write_text(json.dumps({"mimi": "mimi"}, indent=2) + "\n")
    # Not part of the official layout: lets tools say loudly that these weights are random.
    (out / RANDOM_MARKER).write_text(json.dumps({"shape": shape, "seed": seed}) + "\n")
    return out


def is_random_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / RANDOM_MARKER).exists()


#: Model names that stand for a random checkpoint written on first use (``--model random-tiny``).
RANDOM_MODELS: dict[str, Shape] = {"random-tiny": "tiny"}


def default_cache_dir() -> Path:
    """Where random checkpoints named by :data:`RANDOM_MODELS` are written: ``$DIA2_CACHE``, else
    ``$XDG_CACHE_HOME/dia2``, else ``~/.cache/dia2`` (never the working directory)."""
    if os.environ.get("DIA2_CACHE"):
        return Path(os.environ["DIA2_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dia2"


def resolve_random_model(
    source: str, folder: str | Path | None = None, say: Callable[[str], None] | None = None
) -> str:
    """``source`` unchanged unless it names a random model (``random-tiny``): then the folder of
    that checkpoint (``folder``, default ``default_cache_dir() / source``), written on first use
    (seed 0) into a temporary folder and renamed, so a half-written one is never used."""
    shape = RANDOM_MODELS.get(source)
    if shape is None:
        return source
    target = Path(folder) if folder is not None else default_cache_dir() / source
    if not (target / "config.json").exists():
        if say is not None:
            say(f"writing a {shape} random checkpoint to {target} (once)")
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        write_random_checkpoint(partial, shape, seed=0)
        if (target / "config.json").exists():  # another process finished first
            shutil.rmtree(partial, ignore_errors=True)
        else:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
    return str(target)
