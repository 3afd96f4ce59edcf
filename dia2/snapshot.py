"""Voice snapshots: a voice prompt run once, captured, saved as one file, restored by copy.

A snapshot holds everything the first generated step reads: the KV rows of both CFG
branches for the prompt's P positions, the delayed audio buffer with the prompt's tail, the
text tokens fed at step P, and the streaming Mimi decoder's row state after decoding the
prompt (so the first new frame decodes with the prompt as its acoustic context). The text
state machine is not stored: after the prompt it is empty by construction (prompt words that
were never started are dropped, nothing is pending), so each turn starts a clean one.

File: safetensors tensors (``kv.keys``, ``kv.values``, ``audio``, ``mimi.*``) with a JSON
manifest in the metadata (format version, model/config/Mimi identity, prompt length,
transcript, layout, creation time). Loading refuses a snapshot made for another model or
format, naming both sides.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .codec import MimiStreamDecoder
from .engine import PromptState, StepEngine
from .errors import PromptError, SnapshotError
from .runtime import Dia2, VoicePrompt
from .state_machine import new_text_state

FORMAT_VERSION = 1
Layout = Literal["s1_s2", "s1_only"]
LAYOUTS: tuple[str, ...] = ("s1_s2", "s1_only")

# A prompt must leave room for a turn: at most this share of the context.
MAX_PROMPT_SHARE = 0.5
MIN_PROMPT_RMS = 1e-3  # below this the clip is treated as silence


def weights_identity(path: Path) -> str:
    """A cheap, content-based id of a weights file: its header and the first/last MiB of data."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        head = f.read(8)
        h.update(head)
        if len(head) == 8:
            header_len = int.from_bytes(head, "little")
            h.update(f.read(min(header_len, 100 * 1024 * 1024)))
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def codec_identity(runtime: Dia2) -> str:
    cfg = runtime.codec.model.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path"):  # not part of the codec's identity
        cfg.pop(volatile, None)
    text = json.dumps(cfg, sort_keys=True, default=str)
    first = next(iter(runtime.codec.model.parameters())).detach().float().flatten()[:256].cpu().numpy().tobytes()
    return hashlib.sha256(text.encode() + first).hexdigest()[:16]


@dataclass(frozen=True)
class SnapshotManifest:
    format_version: int
    model_id: str
    config_hash: str
    mimi_id: str
    layout: str
    prompt_frames: int
    s1_frames: int
    s2_frames: int
    transcript: dict[str, list[str]]
    dropped_prompt_words: int
    main_token: int
    second_token: int
    dtype: str
    created_at: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SnapshotManifest:
        raw = json.loads(text)
        return cls(**raw)


@dataclass
class VoiceSnapshot:
    """A built or loaded snapshot. ``prompt`` is ready for :meth:`StepEngine.start_from_prompt`."""

    manifest: SnapshotManifest
    prompt: PromptState
    mimi_state: dict[str, torch.Tensor]

    @property
    def layout(self) -> str:
        return self.manifest.layout

    @property
    def opens_with_s1(self) -> bool:
        """``s1_s2``: turns open with ``[S1]`` as in training. ``s1_only``: turns continue S1 untagged."""
        return self.manifest.layout == "s1_s2"

    @property
    def prompt_frames(self) -> int:
        return self.manifest.prompt_frames

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "kv.keys": self.prompt.keys.detach().cpu().contiguous(),
            "kv.values": self.prompt.values.detach().cpu().contiguous(),
            "audio": self.prompt.audio.detach().cpu().contiguous(),
        }
        for name, value in self.mimi_state.items():
            tensors[f"mimi.{name}"] = value.detach().cpu().contiguous()
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(tensors, str(tmp), metadata={"manifest": self.manifest.to_json()})
        tmp.replace(path)  # never leave a half-written snapshot under the real name
        return path


def identity_of(runtime: Dia2) -> tuple[str, str, str]:
    return weights_identity(runtime.files.weights), runtime.config.content_hash(), codec_identity(runtime)


def _check_clip(runtime: Dia2, name: str, audio: np.ndarray, max_frames: int) -> None:
    if audio.ndim != 1:
        raise PromptError(f"{name} audio must be mono [N], got shape {audio.shape}")
    if audio.size == 0 or float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < MIN_PROMPT_RMS:
        raise PromptError(f"{name} audio has no speech (it is silent)")
    frames = -(-audio.size // runtime.codec.samples_per_frame)
    if frames > max_frames:
        raise PromptError(
            f"{name} audio is {audio.size / runtime.codec.sample_rate:.1f} s; a prompt may use at most "
            f"{max_frames / runtime.frame_rate:.1f} s ({int(MAX_PROMPT_SHARE * 100)}% of the model context)"
        )


def build_snapshot(
    runtime: Dia2,
    prompt: VoicePrompt,
    *,
    layout: Layout | None = None,
    engine: StepEngine | None = None,
    decoder: MimiStreamDecoder | None = None,
    slot: int = 0,
) -> VoiceSnapshot:
    """Teacher-force ``prompt`` once and capture the state every turn starts from.

    ``layout`` defaults to ``s1_s2`` when an S2 clip is given, else ``s1_only``.
    """
    layout = layout or ("s1_s2" if prompt.s2 is not None else "s1_only")
    if layout not in LAYOUTS:
        raise PromptError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    max_frames = int(MAX_PROMPT_SHARE * runtime.config.runtime.max_context_steps)
    _check_clip(runtime, "S1 prompt", prompt.s1.audio, max_frames)
    if prompt.s2 is not None:
        _check_clip(runtime, "S2 clip", prompt.s2.audio, max_frames)
    engine = engine or runtime.engine(runtime.rules())
    state, codes = runtime.prefill_prompt(engine, slot, prompt)
    if state.prompt_frames > max_frames:
        raise PromptError(
            f"prompt is {state.prompt_frames / runtime.frame_rate:.1f} s in all; at most "
            f"{max_frames / runtime.frame_rate:.1f} s fit the model context"
        )
    decoder = decoder or MimiStreamDecoder(runtime.codec, max_batch=1)
    decoder.reset_rows([slot])
    with torch.inference_mode():
        decoder.decode(codes[None].to(runtime.codec.device), rows=[slot])
    mimi_state = decoder.get_row_state(slot)
    s1_frames = -(-prompt.s1.audio.size // runtime.codec.samples_per_frame)
    model_id, config_hash, mimi_id = identity_of(runtime)
    manifest = SnapshotManifest(
        format_version=FORMAT_VERSION,
        model_id=model_id,
        config_hash=config_hash,
        mimi_id=mimi_id,
        layout=layout,
        prompt_frames=state.prompt_frames,
        s1_frames=s1_frames,
        s2_frames=state.prompt_frames - s1_frames,
        transcript={
            "s1": [w.word for w in prompt.s1.words],
            "s2": [w.word for w in prompt.s2.words] if prompt.s2 is not None else [],
        },
        dropped_prompt_words=int(state.extra.get("dropped_prompt_words", 0)),
        main_token=state.main,
        second_token=state.second,
        dtype=str(runtime.model.dtype).removeprefix("torch."),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    return VoiceSnapshot(manifest=manifest, prompt=state, mimi_state=mimi_state)


def load_snapshot(path: str | Path, runtime: Dia2) -> VoiceSnapshot:
    """Load a snapshot file for ``runtime``; refuses one made for another model, Mimi or format."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise SnapshotError(f"snapshot not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SnapshotError(f"{path}: corrupt or truncated snapshot ({exc}); rebuild the voice") from None
    if "manifest" not in meta:
        raise SnapshotError(f"{path}: not a voice snapshot (no manifest)")
    try:
        manifest = SnapshotManifest.from_json(meta["manifest"])
    except (json.JSONDecodeError, TypeError) as exc:
        raise SnapshotError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.format_version != FORMAT_VERSION:
        raise SnapshotError(
            f"{path}: snapshot format {manifest.format_version}, this runtime reads format {FORMAT_VERSION}; "
            "rebuild the voice"
        )
    model_id, config_hash, mimi_id = identity_of(runtime)
    if (manifest.model_id, manifest.config_hash) != (model_id, config_hash):
        raise SnapshotError(
            f"{path}: snapshot was made for another model (model {manifest.model_id}, config {manifest.config_hash}; "
            f"loaded model {model_id}, config {config_hash}); rebuild the voice for this model"
        )
    if manifest.mimi_id != mimi_id:
        raise SnapshotError(f"{path}: snapshot was made with another Mimi codec ({manifest.mimi_id} vs {mimi_id})")
    for needed in ("kv.keys", "kv.values", "audio"):
        if needed not in tensors:
            raise SnapshotError(f"{path}: snapshot lacks tensor {needed!r}")
    dev, dt = runtime.device, runtime.model.dtype
    keys, values, audio = tensors["kv.keys"], tensors["kv.values"], tensors["audio"]
    dec = runtime.config.model.decoder
    want = (dec.n_layer, 2, dec.kv_heads, manifest.prompt_frames, dec.gqa_head_dim)
    if tuple(keys.shape) != want or tuple(values.shape) != want:
        raise SnapshotError(f"{path}: KV tensors have shape {list(keys.shape)}, expected {list(want)}")
    if tuple(audio.shape) != (runtime.config.num_codebooks, manifest.prompt_frames + runtime.config.data.max_delay):
        raise SnapshotError(f"{path}: audio buffer has shape {list(audio.shape)}")
    rules = runtime.rules()
    prompt = PromptState(
        prompt_frames=manifest.prompt_frames,
        keys=keys.to(dev, dt),
        values=values.to(dev, dt),
        audio=audio.to(dev),
        text=new_text_state(rules, (), initial_padding=0, closed=True),
        main=manifest.main_token,
        second=manifest.second_token,
    )
    mimi_state = {k.removeprefix("mimi."): v.to(runtime.codec.device) for k, v in tensors.items() if k.startswith("mimi.")}
    return VoiceSnapshot(manifest=manifest, prompt=prompt, mimi_state=mimi_state)
