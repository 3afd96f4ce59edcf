"""The checkpoint's own ``config.json``, parsed into frozen dataclasses.

The schema is the official Dia2 one (top-level ``data``, ``model``, ``runtime`` and an
optional ``assets`` block). Every key has the official default; keys marked "required"
upstream raise :class:`ConfigError` naming the key. The defaults of the loader are NOT
those of the released checkpoints (e.g. eps 1e-5 vs 1e-6): always read the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

_ACTIVATIONS = {"silu", "swish", "swiglu", "gelu", "geglu", "relu", "linear"}


@dataclass(frozen=True)
class DataConfig:
    channels: int
    text_vocab_size: int
    audio_vocab_size: int
    action_vocab_size: int
    text_pad_token_id: int
    text_new_word_token_id: int
    action_pad_token_id: int
    action_new_word_token_id: int
    text_zero_token_id: int = 7
    audio_pad_token_id: int = -1  # resolved to audio_vocab_size - 1
    audio_bos_token_id: int = -1  # resolved to audio_vocab_size - 2
    delay_pattern: tuple[int, ...] = ()
    first_word_min_start: int = 0
    max_pad: int = 0
    second_stream_ahead: int = 0
    tokenizer_path: str | None = None

    @property
    def num_codebooks(self) -> int:
        return self.channels - 2

    @property
    def max_delay(self) -> int:
        return max(self.delay_pattern) if self.delay_pattern else 0


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of the temporal decoder or of the depformer."""

    n_layer: int
    n_embd: int
    n_hidden: int
    gqa_query_heads: int
    kv_heads: int
    gqa_head_dim: int
    low_rank_dim: int | None = None
    mlp_activations: tuple[str, str] = ("silu", "linear")
    # Depformer only.
    apply_rope: bool = True
    text_embedding: bool = True


@dataclass(frozen=True)
class ModelConfig:
    decoder: TransformerConfig
    depformer: TransformerConfig
    dropout: float = 0.0
    rope_min_timescale: float = 1.0
    rope_max_timescale: float = 10000.0
    normalization_layer_epsilon: float = 1e-5


@dataclass(frozen=True)
class RuntimeConfig:
    weights_schedule: tuple[int, ...]
    max_context_steps: int = 1500


@dataclass(frozen=True)
class AssetsConfig:
    tokenizer: str | None = None
    mimi: str | None = None


@dataclass(frozen=True)
class Dia2Config:
    data: DataConfig
    model: ModelConfig
    runtime: RuntimeConfig
    assets: AssetsConfig = field(default_factory=AssetsConfig)
    # The parsed JSON as read, kept so that hashing and re-writing are faithful.
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_codebooks(self) -> int:
        return self.data.num_codebooks

    @property
    def num_stages(self) -> int:
        return self.data.num_codebooks - 1

    @property
    def weight_set_ids(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.runtime.weights_schedule)))

    @property
    def audio_logit_limit(self) -> int:
        """Stage logits are cut to the first min(pad, bos) entries: they never emit BOS/PAD."""
        return min(self.data.audio_pad_token_id, self.data.audio_bos_token_id)

    def to_dict(self) -> dict[str, Any]:
        if self.raw:
            return json.loads(json.dumps(self.raw))
        out: dict[str, Any] = {
            "data": asdict(self.data),
            "model": {
                "decoder": _transformer_dict(self.model.decoder, depformer=False),
                "depformer": _transformer_dict(self.model.depformer, depformer=True),
                "dropout": self.model.dropout,
                "rope_min_timescale": self.model.rope_min_timescale,
                "rope_max_timescale": self.model.rope_max_timescale,
                "normalization_layer_epsilon": self.model.normalization_layer_epsilon,
                "linear": {"mlp_activations": list(self.model.decoder.mlp_activations)},
            },
            "runtime": asdict(self.runtime),
        }
        out["data"]["delay_pattern"] = list(self.data.delay_pattern)
        if out["data"]["tokenizer_path"] is None:
            del out["data"]["tokenizer_path"]
        out["runtime"]["weights_schedule"] = list(self.runtime.weights_schedule)
        assets = {k: v for k, v in asdict(self.assets).items() if v is not None}
        if assets:
            out["assets"] = assets
        return out

    def content_hash(self) -> str:
        """A stable hash of the model-defining content (used to tie snapshots to a model)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _transformer_dict(cfg: TransformerConfig, *, depformer: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "n_hidden": cfg.n_hidden,
        "gqa_query_heads": cfg.gqa_query_heads,
        "kv_heads": cfg.kv_heads,
        "gqa_head_dim": cfg.gqa_head_dim,
    }
    if depformer:
        out["apply_rope"] = cfg.apply_rope
        out["text_embedding"] = cfg.text_embedding
        out["mlp_activations"] = list(cfg.mlp_activations)
    else:
        out["low_rank_dim"] = cfg.low_rank_dim
    return out


# ---------------------------------------------------------------------------- parsing


def _req(block: dict[str, Any], key: str, where: str) -> Any:
    if key not in block:
        raise ConfigError(f"config.json: missing required key '{where}.{key}'")
    return block[key]


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config.json: '{name}' must be an integer, got {value!r}")
    return value


def _activations(value: Any, name: str) -> tuple[str, str]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ConfigError(f"config.json: '{name}' must list exactly two activations, got {value!r}")
    acts = tuple(str(v).lower() for v in value)
    for act in acts:
        if act not in _ACTIVATIONS:
            raise ConfigError(f"config.json: '{name}' has unknown activation {act!r}")
    return acts  # type: ignore[return-value]


def _transformer(block: Any, where: str, *, activations: tuple[str, str], depformer: bool) -> TransformerConfig:
    if not isinstance(block, dict):
        raise ConfigError(f"config.json: '{where}' must be an object")
    names = ("n_layer", "n_embd", "n_hidden", "gqa_query_heads", "kv_heads", "gqa_head_dim")
    values = {n: _int(_req(block, n, where), f"{where}.{n}") for n in names}
    low_rank = block.get("low_rank_dim")
    if low_rank is not None:
        low_rank = _int(low_rank, f"{where}.low_rank_dim")
    acts = activations
    if depformer and "mlp_activations" in block:
        acts = _activations(block["mlp_activations"], f"{where}.mlp_activations")
    cfg = TransformerConfig(
        **values,
        low_rank_dim=low_rank if not depformer else None,
        mlp_activations=acts,
        apply_rope=bool(block.get("apply_rope", True)),
        text_embedding=bool(block.get("text_embedding", True)),
    )
    if cfg.gqa_query_heads % cfg.kv_heads:
        raise ConfigError(
            f"config.json: {where}.gqa_query_heads={cfg.gqa_query_heads} is not a multiple of kv_heads={cfg.kv_heads}"
        )
    if depformer and cfg.kv_heads != cfg.gqa_query_heads:
        # The fused depformer projection has as many key heads as query heads.
        raise ConfigError(
            f"config.json: {where}.kv_heads={cfg.kv_heads} must equal gqa_query_heads={cfg.gqa_query_heads}"
        )
    if cfg.gqa_head_dim % 2:
        raise ConfigError(f"config.json: {where}.gqa_head_dim must be even for RoPE, got {cfg.gqa_head_dim}")
    return cfg


def parse_config(raw: dict[str, Any]) -> Dia2Config:
    """Parse the official ``config.json`` content; raises :class:`ConfigError` naming the bad key."""
    if not isinstance(raw, dict):
        raise ConfigError("config.json must hold a JSON object")
    data_raw = _req(raw, "data", "")
    model_raw = _req(raw, "model", "")
    if "runtime" not in raw:
        raise ConfigError("config.json: missing required block 'runtime' (it may be empty: {})")
    runtime_raw = raw["runtime"] or {}
    assets_raw = raw.get("assets") or {}
    for name, block in (("data", data_raw), ("model", model_raw), ("runtime", runtime_raw), ("assets", assets_raw)):
        if not isinstance(block, dict):
            raise ConfigError(f"config.json: '{name}' must be an object")

    def d_int(key: str, default: int | None = None) -> int:
        if key in data_raw:
            return _int(data_raw[key], f"data.{key}")
        if default is None:
            raise ConfigError(f"config.json: missing required key 'data.{key}'")
        return default

    audio_vocab = d_int("audio_vocab_size")
    delays = data_raw.get("delay_pattern", [])
    if not isinstance(delays, list) or not all(isinstance(d, int) and d >= 0 for d in delays):
        raise ConfigError(f"config.json: 'data.delay_pattern' must be a list of non-negative ints, got {delays!r}")
    data = DataConfig(
        channels=d_int("channels"),
        text_vocab_size=d_int("text_vocab_size"),
        audio_vocab_size=audio_vocab,
        action_vocab_size=d_int("action_vocab_size"),
        text_pad_token_id=d_int("text_pad_token_id"),
        text_new_word_token_id=d_int("text_new_word_token_id"),
        action_pad_token_id=d_int("action_pad_token_id"),
        action_new_word_token_id=d_int("action_new_word_token_id"),
        text_zero_token_id=d_int("text_zero_token_id", 7),
        audio_pad_token_id=d_int("audio_pad_token_id", audio_vocab - 1),
        audio_bos_token_id=d_int("audio_bos_token_id", audio_vocab - 2),
        delay_pattern=tuple(delays),
        first_word_min_start=d_int("first_word_min_start", 0),
        max_pad=d_int("max_pad", 0),
        second_stream_ahead=d_int("second_stream_ahead", 0),
        tokenizer_path=data_raw.get("tokenizer_path"),
    )
    if data.channels < 3:
        raise ConfigError(f"config.json: 'data.channels' must be at least 3 (2 text + audio), got {data.channels}")
    if len(data.delay_pattern) != data.num_codebooks:
        raise ConfigError(
            f"config.json: 'data.delay_pattern' has {len(data.delay_pattern)} entries, "
            f"expected one per audio codebook ({data.num_codebooks})"
        )

    linear = model_raw.get("linear") or {}
    dec_acts = _activations(linear.get("mlp_activations", ["silu", "linear"]), "model.linear.mlp_activations")
    decoder = _transformer(_req(model_raw, "decoder", "model"), "model.decoder", activations=dec_acts, depformer=False)
    depformer = _transformer(
        _req(model_raw, "depformer", "model"), "model.depformer", activations=("silu", "linear"), depformer=True
    )
    model = ModelConfig(
        decoder=decoder,
        depformer=depformer,
        dropout=float(model_raw.get("dropout", 0.0)),
        rope_min_timescale=float(model_raw.get("rope_min_timescale", 1)),
        rope_max_timescale=float(model_raw.get("rope_max_timescale", 10000)),
        normalization_layer_epsilon=float(model_raw.get("normalization_layer_epsilon", 1e-5)),
    )
    stages = data.num_codebooks - 1
    schedule = runtime_raw.get("weights_schedule", list(range(stages)))
    if not isinstance(schedule, list) or not all(isinstance(s, int) and s >= 0 for s in schedule):
        raise ConfigError(f"config.json: 'runtime.weights_schedule' must be a list of ints, got {schedule!r}")
    if len(schedule) != stages:
        raise ConfigError(
            f"config.json: 'runtime.weights_schedule' has {len(schedule)} entries, expected one per depformer stage ({stages})"
        )
    runtime = RuntimeConfig(
        weights_schedule=tuple(schedule),
        max_context_steps=_int(runtime_raw.get("max_context_steps", 1500), "runtime.max_context_steps"),
    )
    assets = AssetsConfig(
        tokenizer=assets_raw.get("tokenizer", data.tokenizer_path),
        mimi=assets_raw.get("mimi"),
    )
    return Dia2Config(data=data, model=model, runtime=runtime, assets=assets, raw=json.loads(json.dumps(raw)))


def load_config(path: str | Path) -> Dia2Config:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
