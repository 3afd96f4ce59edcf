"""Finding and loading a Dia2 checkpoint: a local folder or a hub repo id.

A model folder holds the official files unchanged: ``config.json``, ``model.safetensors``,
the tokenizer files, and optionally ``dia2_assets.json`` (names the config, weights,
tokenizer and Mimi sources). Loading is strict: every tensor of the module tree must be in
the file with the right shape, and nothing else may be. Weights are read one tensor at a
time from the memory-mapped file and assigned into a model built on the meta device, so no
second full copy of the weights is ever built.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Dia2Config, load_config
from .errors import CheckpointError
from .model import Dia2Model

log = logging.getLogger(__name__)

MANIFEST_NAME = os.environ.get("DIA2_ASSET_MANIFEST", "dia2_assets.json")
DEFAULT_MIMI = "kyutai/mimi"


@dataclass(frozen=True)
class CheckpointFiles:
    """Where each piece of a model lives, after resolving the manifest and the config's assets."""

    root: Path
    config: Path
    weights: Path
    tokenizer: str  # a folder or a hub id
    mimi: str  # a folder or a hub id


def _resolve_relative(root: Path, ref: str) -> str:
    candidate = root / ref
    return str(candidate) if candidate.exists() else ref


def _download(repo_id: str, progress: Callable[[str], None] | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"cannot download {repo_id!r}: huggingface_hub is not installed") from exc
    if progress:
        progress(f"downloading {repo_id} from the hub (cached after the first time)")
    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
        )
    except Exception as exc:  # network, auth, missing repo: all end here with one clear line
        raise CheckpointError(
            f"could not fetch model {repo_id!r} from the hub ({type(exc).__name__}: {exc}). "
            "Pass a local model folder (config.json + model.safetensors + tokenizer files) instead."
        ) from None
    return Path(path)


def resolve_checkpoint(source: str | Path, progress: Callable[[str], None] | None = None) -> CheckpointFiles:
    """A local folder, or a hub repo id (downloaded where the network allows)."""
    path = Path(source).expanduser()
    if path.is_dir():
        root = path
    elif path.exists():
        raise CheckpointError(f"{path} is a file; pass the model folder that contains config.json")
    elif "/" in str(source) and not str(source).startswith((".", "/", "~")) and str(source).count("/") == 1:
        root = _download(str(source), progress)
    else:
        raise CheckpointError(f"model folder not found: {path}")

    manifest: dict[str, str] = {}
    manifest_path = root / MANIFEST_NAME
    if manifest_path.exists():
        try:
            loaded = json.loads(manifest_path.read_text())
            manifest = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError:
            log.warning("ignoring %s: not valid JSON", manifest_path)
    config_path = root / manifest.get("config", "config.json")
    weights_path = root / manifest.get("weights", "model.safetensors")
    for needed in (config_path, weights_path):
        if not needed.exists():
            raise CheckpointError(f"model folder {root} has no {needed.name} (looked for {needed})")
    config = load_config(config_path)
    tokenizer = manifest.get("tokenizer") or config.assets.tokenizer
    tokenizer = _resolve_relative(root, tokenizer) if tokenizer else str(root)
    mimi = manifest.get("mimi") or config.assets.mimi or DEFAULT_MIMI
    mimi = _resolve_relative(root, mimi)
    return CheckpointFiles(root=root, config=config_path, weights=weights_path, tokenizer=tokenizer, mimi=mimi)


def pick_device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """Defaults: CUDA + bfloat16 where a GPU is present, else CPU + float32 (bf16 on CPU gives float32)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for but no CUDA GPU is available")
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype in (None, "auto"):
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in names:
        dt = names[dtype]
    else:
        raise CheckpointError(f"unknown dtype {dtype!r}; use auto, float32 or bfloat16")
    if dev.type == "cpu":
        dt = torch.float32
    return dev, dt


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def load_weights_strict(
    model: Dia2Model, weights: Path, *, device: torch.device, dtype: torch.dtype, progress: bool = False
) -> None:
    """Assign every tensor of ``weights`` into ``model`` (built on meta), checking names and shapes."""
    from safetensors import SafetensorError, safe_open

    want = expected_shapes(model)
    try:
        handle = safe_open(str(weights), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    with handle as f:
        have = set(f.keys())
        missing = sorted(set(want) - have)
        unexpected = sorted(have - set(want))
        problems: list[str] = []
        for name in missing[:5]:
            problems.append(f"missing tensor {name!r} (expected shape {list(want[name])})")
        for name in unexpected[:5]:
            problems.append(f"unexpected tensor {name!r} (shape {f.get_slice(name).get_shape()})")
        for name in sorted(have & set(want)):
            found = tuple(f.get_slice(name).get_shape())
            if found != want[name]:
                problems.append(f"tensor {name!r} has shape {list(found)}, expected {list(want[name])}")
        if problems:
            extra = len(missing) + len(unexpected) - min(5, len(missing)) - min(5, len(unexpected))
            more = f" (and {extra} more missing/unexpected)" if extra > 0 else ""
            raise CheckpointError(f"{weights} does not match config: " + "; ".join(problems[:8]) + more)

        heads = {id(m.weight) for m in model.head_modules()}
        params = dict(model.named_parameters())
        names = sorted(want)
        iterator = names
        if progress:
            from tqdm import tqdm

            iterator = tqdm(names, desc="loading weights", unit="tensor", leave=False)
        state: dict[str, torch.Tensor] = {}
        for name in iterator:
            try:
                tensor = f.get_tensor(name)
            except Exception as exc:  # truncated data section
                raise CheckpointError(f"{weights}: cannot read tensor {name!r} ({exc})") from None
            target_dtype = torch.float32 if id(params.get(name)) in heads else dtype
            state[name] = tensor.to(device=device, dtype=target_dtype)
            del tensor
        model.load_state_dict(state, strict=True, assign=True)
        del state


def build_model_on_meta(config: Dia2Config) -> Dia2Model:
    with torch.device("meta"):
        return Dia2Model(config)


def load_model(
    files: CheckpointFiles,
    *,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = False,
) -> Dia2Model:
    config = load_config(files.config)
    model = build_model_on_meta(config)
    load_weights_strict(model, files.weights, device=device, dtype=dtype, progress=progress)
    model.rebuild_rotary_tables()
    return model.eval().requires_grad_(False)
