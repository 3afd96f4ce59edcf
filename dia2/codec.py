"""Mimi, the 24 kHz neural audio codec Dia2 speaks in, through transformers' ``MimiModel``.

Two ways to decode:

- ``MimiCodec.decode``: one-shot, exactly transformers' ``MimiModel.decode`` (the reference).
- ``MimiStreamDecoder.decode``: frame by frame with carried state, equal to a one-shot decode of
  the concatenated frames. transformers' decoder keeps no convolution state between calls, so a
  naive chunked decode clicks at every frame edge (dependencies.md §2, dia2-format.md §10.6).
  The streaming decoder reuses the HF modules and weights but runs its own loop:

  codes [B, K, T] → quantizer.decode → latent [B, D, T] (12.5 Hz)
  → upsample (transposed conv, carried overlap-add tail) → [B, D, 2T] (25 Hz)
  → decoder transformer (own attention over a per-row KV ring, per-row positions)
  → SEANet decoder (causal convs with carried left context; transposed convs with carried tails)
  → pcm [B, 1, T·1920] (24 kHz).

Rows of the streaming decoder are independent streams (one phone call's turn each); a row's
state can be read out (voice snapshot) and copied into another row.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import Tensor, nn
from transformers import MimiModel
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConvTranspose1d,
    MimiResnetBlock,
    MimiTransformerModel,
)

from dia2.errors import CheckpointError, SnapshotError

logger = logging.getLogger(__name__)

#: Files a Mimi checkpoint folder must hold (the transformers ``kyutai/mimi`` layout).
MIMI_FILES: tuple[str, ...] = ("config.json", "model.safetensors")
#: The checkpoint Dia2 was trained with.
DEFAULT_MIMI_REPO = "kyutai/mimi"

# "owner/name" or "name": what may be a hub repo id rather than a local path.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@contextlib.contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled=False``: hub download and transformers load/save bars off for one block."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    if enabled or not was_on:
        yield
        return
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        enable_progress_bars()


def _resolve_checkpoint(source: str | Path, progress: bool) -> Path:
    """A local folder holding MIMI_FILES, downloading ``source`` from the hub if it is a repo id."""
    wanted = " + ".join(MIMI_FILES)
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path
    elif path.exists():
        raise CheckpointError(f"Mimi checkpoint {path} is a file; expected a folder with {wanted}")
    elif isinstance(source, Path) or not _REPO_ID.fullmatch(str(source)) or ".." in str(source):
        raise CheckpointError(f"Mimi checkpoint folder {path} does not exist (expected a folder with {wanted})")
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            with hf_progress_bars(progress):
                folder = Path(snapshot_download(str(source), allow_patterns=list(MIMI_FILES)))
        except (OSError, ValueError, EntryNotFoundError) as exc:
            # Offline, unknown repo, gated repo, bad id: one line naming what was wanted.
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"cannot get Mimi checkpoint {source!r}: no local folder of that name and the "
                f"Hugging Face Hub download of {wanted} failed ({type(exc).__name__}: {reason}). "
                "Pass a local folder, or pre-download it with network access."
            ) from None
    missing = [name for name in MIMI_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"Mimi checkpoint {source} lacks {', '.join(missing)} (looked in {folder})")
    return folder


class MimiCodec:
    """Mimi in fp32, eval mode, no grad: 24 kHz mono PCM ↔ codes [K, T] at 12.5 frames/s.

    One frame is 80 ms = 1920 samples; K = 32 codebooks of ``codebook_size`` (2048) entries.
    """

    def __init__(self, model: MimiModel) -> None:
        if model.decoder is None:
            raise CheckpointError("Mimi model was built without a decoder (decoder_config=None)")
        self.model = model.float().eval().requires_grad_(False)
        self.config = model.config
        semantic = model.quantizer.semantic_residual_vector_quantizer.layers[0].codebook
        if not bool(semantic.embed_sum.any()):
            # A randomly initialised Mimi has zero codebooks: decode then ignores the codes.
            logger.warning("Mimi codebooks are all zero: decode output will not depend on the codes")

    @classmethod
    def load(cls, source: str | Path, device: str | torch.device = "cpu", progress: bool = True) -> MimiCodec:
        """Load from a local folder (config.json + model.safetensors) or a hub repo id (e.g. DEFAULT_MIMI_REPO).

        A repo id is fetched with huggingface_hub (its cache; HF_HUB_OFFLINE=1 means cache only).

        Raises CheckpointError naming the source when files are missing, corrupt or unreachable.
        """
        folder = _resolve_checkpoint(source, progress)
        try:
            with hf_progress_bars(progress):
                model, info = MimiModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CheckpointError(
                f"Mimi checkpoint {source} ({folder}) cannot be loaded: {type(exc).__name__}: {reason}"
            ) from None
        # from_pretrained fills missing tensors with random values; for a codec that is silent garbage.
        for kind in ("missing_keys", "mismatched_keys"):
            bad = sorted(str(k) for k in info.get(kind, []))
            if bad:
                raise CheckpointError(
                    f"Mimi checkpoint {folder / 'model.safetensors'} does not match its config.json: "
                    f"{len(bad)} {kind.replace('_', ' ')}, e.g. {', '.join(bad[:3])}"
                )
        return cls(model.to(device))

    # ---- constants -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def sample_rate(self) -> int:
        """PCM rate in Hz (24000)."""
        return int(self.config.sampling_rate)

    @property
    def samples_per_frame(self) -> int:
        """PCM samples per Mimi frame (1920 = 80 ms)."""
        return int(self.config.frame_size)

    @property
    def frame_rate(self) -> float:
        """Mimi frames per second (12.5)."""
        return float(self.config.frame_rate)

    @property
    def num_codebooks(self) -> int:
        """K, codebooks per frame (32)."""
        return int(self.config.num_quantizers)

    @property
    def codebook_size(self) -> int:
        """Entries per codebook (2048): valid codes are 0..codebook_size-1."""
        return int(self.config.codebook_size)

    # ---- checks ----------------------------------------------------------------------------
    def check_codes(self, codes: Tensor) -> Tensor:
        """Validate codes [K, T] or [B, K, T] and return them as long [B, K, T].

        Raises ValueError on a wrong shape, a float dtype, or any code outside 0..codebook_size-1
        (Dia2's BOS 2048 / PAD 2049 and the −2 "ungenerated" sentinel must be removed upstream).
        """
        if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"Mimi codes must be an integer tensor, got {codes.dtype}")
        if codes.dim() == 2:
            codes = codes.unsqueeze(0)
        if codes.dim() != 3:
            raise ValueError(f"Mimi codes must be [K, T] or [B, K, T], got shape {tuple(codes.shape)}")
        b, k, t = codes.shape
        if k != self.num_codebooks:
            raise ValueError(f"Mimi needs all {self.num_codebooks} codebooks, got K={k} (shape {tuple(codes.shape)})")
        if b == 0 or t == 0:
            raise ValueError(f"Mimi codes are empty: shape {tuple(codes.shape)}")
        lo, hi = int(codes.min()), int(codes.max())  # one host sync per call, at the edge
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(
                f"Mimi codes must be in 0..{self.codebook_size - 1}, got min {lo} max {hi}: Dia2's special "
                f"audio ids ({self.codebook_size} BOS, {self.codebook_size + 1} PAD) and the -2 "
                "'ungenerated' sentinel must be removed before decoding"
            )
        return codes.long()

    # ---- one-shot --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pcm24k: Tensor) -> Tensor:
        """Mono float PCM [N] or [1, N] at 24 kHz in [-1, 1] → long codes [K, T], T = ceil(N / 1920).

        The last partial frame is zero-padded by Mimi.
        """
        if pcm24k.dim() == 2 and pcm24k.shape[0] == 1:
            pcm24k = pcm24k[0]
        if pcm24k.dim() != 1:
            raise ValueError(f"encode takes mono PCM [N] or [1, N], got shape {tuple(pcm24k.shape)}")
        if pcm24k.numel() == 0:
            raise ValueError("encode got no samples")
        if not pcm24k.is_floating_point():
            raise ValueError(f"encode takes float PCM in [-1, 1], got {pcm24k.dtype}")
        x = pcm24k.to(device=self.device, dtype=torch.float32)[None, None]  # [1, 1, N]
        codes = self.model.encode(x, return_dict=True).audio_codes  # [1, K, T]
        return codes[0].long()

    @torch.no_grad()
    def decode(self, codes: Tensor, *, clamp: bool = True) -> Tensor:
        """Codes [K, T] or [B, K, T] → float PCM [B, T·1920] at 24 kHz, clamped to [-1, 1].

        This is transformers' batch ``MimiModel.decode``: the reference the stream decoder matches.
        ``clamp=False`` returns the raw decoder output (for tests and analysis).
        """
        codes = self.check_codes(codes).to(self.device)
        pcm = self.model.decode(codes, return_dict=True).audio_values[:, 0]  # [B, T·1920]
        return pcm.clamp(-1.0, 1.0) if clamp else pcm


# ---------------------------------------------------------------------------------------------
# Streaming decoder
# ---------------------------------------------------------------------------------------------


def conv_transpose1d_matmul(x: Tensor, weight: Tensor, stride: int, groups: int = 1) -> Tensor:
    """Transposed conv without bias, as a matmul plus an overlap-add of output blocks.

    x [B, Cin, T], weight [Cin, Cout/groups, Kw] (nn.ConvTranspose1d layout) → y [B, Cout, (T+n-1)·stride]
    with n = ceil(Kw / stride). y[..., :(T-1)·stride + Kw] equals ``F.conv_transpose1d`` (to float
    rounding) and the rest is 0. CPU torch runs ConvTranspose1d as ``slow_conv_transpose``; on a
    one-frame full-size streaming decode (2-core CPU) this form cuts ~27 ms to ~20 ms per frame.
    """
    c_out = weight.shape[1] * groups
    n = math.ceil(weight.shape[-1] / stride)
    cols = _convtr_columns(x, _convtr_matrix(weight, stride, groups), groups)
    return _overlap_add(cols, c_out, n, stride)


def _convtr_matrix(weight: Tensor, stride: int, groups: int) -> Tensor:
    """[Cin, Cout_g, Kw] → [G, Cout_g·n·s, Cin_g], the kernel zero-padded to n·s taps."""
    c_in, c_out_g, kw = weight.shape
    n = math.ceil(kw / stride)
    w = F.pad(weight, (0, n * stride - kw))  # [Cin, Cout_g, n·s]
    w = w.reshape(groups, c_in // groups, c_out_g * n * stride)  # [G, Cin_g, Cout_g·n·s]
    return w.transpose(1, 2).contiguous()


def _convtr_columns(x: Tensor, w: Tensor, groups: int) -> Tensor:
    """x [B, Cin, T], w [G, Cout_g·n·s, Cin_g] → columns [B, G·Cout_g·n·s, T]: each step's output block."""
    b, c_in, t = x.shape
    xg = x.reshape(b, groups, c_in // groups, t)  # [B, G, Cin_g, T]
    # Depthwise (the 12.5 → 25 Hz upsample) is a broadcast product; a batch of 1-wide matmuls is slower.
    cols = w[None] * xg if w.shape[-1] == 1 else torch.matmul(w, xg)  # [B, G, Cout_g·n·s, T]
    return cols.reshape(b, -1, t)


def _overlap_add(cols: Tensor, c_out: int, n: int, stride: int) -> Tensor:
    """columns [B, Cout·n·s, T] → y [B, Cout, (T+n-1)·s]: block m of input step t lands on output block t+m."""
    b, _, t = cols.shape
    blocks = cols.view(b, c_out, n, stride, t).transpose(-1, -2)  # [B, Cout, n, T, s]
    if n == 1:
        return blocks[:, :, 0].reshape(b, c_out, t * stride)
    y = cols.new_zeros(b, c_out, t + n - 1, stride)
    for m in range(n):
        y[:, :, m : m + t] += blocks[:, :, m]
    return y.reshape(b, c_out, (t + n - 1) * stride)


@dataclass
class _CausalConv:
    """A stride-1 causal MimiConv1d: carries its last ``context`` (= padding_total) input samples."""

    name: str
    conv: nn.Conv1d
    context: int


@dataclass
class _CausalConvTranspose:
    """A causal MimiConvTranspose1d (all trimming on the right): carries the overlap-add tail."""

    name: str
    conv: nn.ConvTranspose1d
    matrix: Tensor  # [G, Cout_g·n·s, Cin_g], see _convtr_matrix
    groups: int
    stride: int
    blocks: int  # n = ceil(kernel / stride); the tail is (n-1)·stride samples
    out_channels: int

    @property
    def tail(self) -> int:
        return (self.blocks - 1) * self.stride


@dataclass
class MimiStreamState:
    """Everything the next streaming decode call reads, for ``max_batch`` rows. Allocated once.

    Time axes: ``context`` and ``tails`` are in samples of their layer's rate (25 Hz … 24 kHz);
    the KV ring and ``position`` are in decoder-transformer steps (25 Hz, 2 per Mimi frame).
    """

    context: dict[str, Tensor]  # conv name → [B, Cin, padding_total]: last input samples
    tails: dict[str, Tensor]  # convtr name → [B, Cout, (n-1)·s]: pending overlap-add, bias excluded
    key: Tensor  # [L, B, W, Hkv, D] post-RoPE keys; position p lives in slot p % W
    value: Tensor  # [L, B, W, Hkv, D]
    position: Tensor  # [B] long: transformer steps decoded so far

    def row_views(self, row: int) -> dict[str, Tensor]:
        """Views of one row's slices, keyed as in get_row_state."""
        views = {f"context.{name}": buf[row] for name, buf in self.context.items()}
        views.update({f"tail.{name}": buf[row] for name, buf in self.tails.items()})
        views["key"] = self.key[:, row]  # [L, W, Hkv, D]
        views["value"] = self.value[:, row]
        views["position"] = self.position[row]  # [] long
        return views

    def zero_rows(self, idx: Tensor) -> None:
        for buf in (*self.context.values(), *self.tails.values(), self.position):
            buf.index_fill_(0, idx, 0)
        self.key.index_fill_(1, idx, 0.0)
        self.value.index_fill_(1, idx, 0.0)


@dataclass(frozen=True)
class _Rows:
    """The rows one decode call computes and the rows whose state it writes.

    ``idx`` [n]: a subset (gathered, decoded, scattered back). ``idx`` None: all ``max_batch``
    rows, in place; then ``emit`` [B] bool (or None for every row) says whose state advances.
    The masked form has one shape whatever emits and reads no tensor on the host: a CUDA graph.
    """

    idx: Tensor | None = None
    emit: Tensor | None = None


def _take(buf: Tensor, rows: _Rows) -> Tensor:
    """The computed rows of a [B, ...] state buffer (the buffer itself when all rows are decoded)."""
    return buf if rows.idx is None else buf.index_select(0, rows.idx)


def _put(buf: Tensor, rows: _Rows, value: Tensor) -> None:
    """Write the computed rows of a [B, ...] state buffer in place; masked rows keep their bits."""
    if rows.idx is not None:
        buf.index_copy_(0, rows.idx, value)
    elif rows.emit is not None:
        buf.copy_(torch.where(_per_row(rows.emit, buf), value, buf))
    else:
        buf.copy_(value)


def _per_row(flags: Tensor, like: Tensor) -> Tensor:
    """[B] → [B, 1, …, 1], broadcastable against ``like`` [B, …]."""
    return flags.view(-1, *([1] * (like.dim() - 1)))


class MimiStreamDecoder:
    """Exact streaming Mimi decoder for ``max_batch`` independent rows.

    ``decode(codes [n, K, T])`` returns PCM [n, T·1920] and carries all state, so any split of a
    code sequence into calls gives the one-shot ``MimiCodec.decode`` of the whole sequence (to
    float rounding, ≤1e-4). Rows have their own positions: a row can be reset, snapshotted and
    restored while the others keep streaming.

    Uses the HF modules' weights and their conv / linear / norm modules; only the glue that
    carries state is ours (MimiModel.decode keeps none between calls). The transposed-conv
    weights are re-laid out once here, so build the decoder after the weights are loaded.
    """

    def __init__(self, codec: MimiCodec, max_batch: int = 1, *, matmul_convtr: bool = True) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.codec = codec
        self.max_batch = max_batch
        #: Transposed convs as matmul + overlap-add (fast); False runs nn.ConvTranspose1d (reference).
        self.matmul_convtr = matmul_convtr
        model, cfg = codec.model, codec.config
        decoder = model.decoder
        self._quantizer = model.quantizer
        self._transformer: MimiTransformerModel = decoder.decoder_transformer
        self._seanet: nn.Module = decoder.decoder_seanet
        self._upsample: MimiConvTranspose1d | None = decoder.upsample

        self._convs: dict[nn.Module, _CausalConv] = {}
        self._convtrs: dict[nn.Module, _CausalConvTranspose] = {}
        for name, module in decoder.named_modules():
            if isinstance(module, MimiConv1d):
                self._convs[module] = self._plan_conv(name, module)
            elif isinstance(module, MimiConvTranspose1d):
                self._convtrs[module] = self._plan_convtr(name, module)

        layers = self._transformer.layers
        attn = layers[0].self_attn
        self._heads: int = attn.num_heads
        self._kv_heads: int = attn.num_key_value_heads
        self._head_dim: int = attn.head_dim
        if not isinstance(cfg.sliding_window, int) or cfg.sliding_window < 1:
            raise CheckpointError(f"Mimi config sliding_window must be a positive int, got {cfg.sliding_window!r}")
        self._window: int = cfg.sliding_window  # keys a query sees, itself included
        rope = self._transformer.rotary_emb
        if rope.rope_type != "default":
            raise CheckpointError(f"Mimi rope_type {rope.rope_type!r} is not supported (only 'default')")

        device = codec.device
        f32 = dict(device=device, dtype=torch.float32)
        kv_shape = (len(layers), max_batch, self._window, self._kv_heads, self._head_dim)
        self.state = MimiStreamState(
            context={p.name: torch.zeros(max_batch, p.conv.in_channels, p.context, **f32)
                     for p in self._convs.values() if p.context > 0},
            tails={p.name: torch.zeros(max_batch, p.out_channels, p.tail, **f32)
                   for p in self._convtrs.values() if p.tail > 0},
            key=torch.zeros(kv_shape, **f32),
            value=torch.zeros(kv_shape, **f32),
            position=torch.zeros(max_batch, dtype=torch.long, device=device),
        )
        self._all_rows = torch.arange(max_batch, device=device)
        # The codebooks' embed tables are cached on first use: build them now, outside any graph capture.
        for rvq in (self._quantizer.semantic_residual_vector_quantizer, self._quantizer.acoustic_residual_vector_quantizer):
            for vq in rvq.layers:
                _ = vq.codebook.embed

    @staticmethod
    def _plan_conv(name: str, module: MimiConv1d) -> _CausalConv:
        conv = module.conv
        if not module.causal or conv.stride[0] != 1 or conv.padding[0] != 0:
            raise CheckpointError(f"Mimi decoder conv {name}: streaming needs causal stride-1 convs")
        if module.pad_mode != "constant":
            # Zero initial context equals zero left padding only for constant padding.
            raise CheckpointError(f"Mimi decoder conv {name}: pad_mode {module.pad_mode!r} is not supported")
        # MimiConv1d.padding_total, from the conv's own ints (no tensor read: builds on the meta device too).
        context = (conv.kernel_size[0] - 1) * conv.dilation[0] + 1 - conv.stride[0]
        return _CausalConv(name=name, conv=conv, context=context)

    @staticmethod
    def _plan_convtr(name: str, module: MimiConvTranspose1d) -> _CausalConvTranspose:
        conv = module.conv
        stride, kernel = conv.stride[0], conv.kernel_size[0]
        if not module.causal or module.padding_left != 0 or module.padding_right != kernel - stride:
            raise CheckpointError(f"Mimi decoder transposed conv {name}: streaming needs trim_right_ratio 1.0")
        if conv.padding[0] != 0 or conv.output_padding[0] != 0 or conv.dilation[0] != 1:
            raise CheckpointError(f"Mimi decoder transposed conv {name}: unexpected padding or dilation")
        return _CausalConvTranspose(
            name=name,
            conv=conv,
            matrix=_convtr_matrix(conv.weight.detach(), stride, conv.groups),
            groups=conv.groups,
            stride=stride,
            blocks=math.ceil(kernel / stride),
            out_channels=conv.out_channels,
        )

    # ---- row bookkeeping -------------------------------------------------------------------
    def _row_index(self, rows: Sequence[int] | Tensor | None, n: int) -> Tensor | None:
        if rows is None:
            if n != self.max_batch:
                raise ValueError(
                    f"codes have {n} rows but the decoder has {self.max_batch}; pass rows=[...] to decode a subset"
                )
            return None
        host = rows.flatten().tolist() if isinstance(rows, Tensor) else [int(r) for r in rows]
        if len(host) != n:
            raise ValueError(f"rows names {len(host)} rows but codes have {n}")
        if len(set(host)) != len(host) or not all(0 <= r < self.max_batch for r in host):
            raise ValueError(f"rows must be distinct and in 0..{self.max_batch - 1}, got {host}")
        return torch.tensor(host, dtype=torch.long, device=self._all_rows.device)

    def _check_row(self, row: int) -> int:
        if not 0 <= row < self.max_batch:
            raise IndexError(f"row {row} is outside 0..{self.max_batch - 1}")
        return int(row)

    def reset(self) -> None:
        """Every row back to the start of a stream."""
        self.state.zero_rows(self._all_rows)

    def reset_rows(self, rows: Sequence[int] | Tensor) -> None:
        """Rows back to the start of a stream (zero context, tails, KV; position 0)."""
        idx = self._row_index(rows, len(rows))
        assert idx is not None
        self.state.zero_rows(idx)

    def positions(self) -> Tensor:
        """[B] long: transformer steps (25 Hz, 2 per frame) each row has decoded; a copy."""
        return self.state.position.clone()

    def get_row_state(self, row: int) -> dict[str, Tensor]:
        """A clone of one row's state: conv contexts, transposed-conv tails, KV ring, position.

        Keys: ``context.<module>``, ``tail.<module>``, ``key``/``value`` [L, W, Hkv, D], ``position`` [].
        """
        return {name: view.clone() for name, view in self.state.row_views(self._check_row(row)).items()}

    def set_row_state(self, row: int, state: dict[str, Tensor]) -> None:
        """Copy a state from get_row_state into ``row``'s preallocated buffers (no reallocation).

        Raises SnapshotError if the keys or shapes were made by a different Mimi config.
        """
        views = self.state.row_views(self._check_row(row))
        if set(state) != set(views):
            missing, extra = sorted(set(views) - set(state)), sorted(set(state) - set(views))
            raise SnapshotError(f"Mimi decoder state does not fit this model: missing {missing[:3]}, extra {extra[:3]}")
        for name, view in views.items():
            if tuple(state[name].shape) != tuple(view.shape):
                raise SnapshotError(
                    f"Mimi decoder state {name!r} has shape {tuple(state[name].shape)}, expected {tuple(view.shape)}"
                )
        for name, view in views.items():
            view.copy_(state[name])

    # ---- decoding --------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, codes: Tensor, rows: Sequence[int] | Tensor | None = None, *,
               clamp: bool = True, validate: bool = True) -> Tensor:
        """Decode the next T ≥ 1 frames of each named row: codes [n, K, T] → PCM [n, T·1920] (24 kHz).

        ``rows`` (n distinct row indices) defaults to all ``max_batch`` rows. Output is clamped to
        [-1, 1] unless ``clamp=False``. ``validate=False`` skips the code-range check (a host sync).
        """
        if validate:
            codes = self.codec.check_codes(codes)
        elif codes.dim() != 3:
            raise ValueError(f"codes must be [n, K, T], got shape {tuple(codes.shape)}")
        idx = self._row_index(rows, codes.shape[0])
        codes = codes.to(device=self._all_rows.device, dtype=torch.long)
        return self._decode(codes, _Rows(idx=idx), clamp)

    @torch.no_grad()
    def decode_masked(self, codes: Tensor, emit: Tensor, *, clamp: bool = True) -> Tensor:
        """One fixed-shape decode over ALL rows: codes [max_batch, K, T] long, emit [max_batch] bool
        (on the decoder's device) → PCM [max_batch, T·1920].

        Only rows with ``emit`` advance; every other row's state keeps its bits and its output
        row is meaningless. No host sync, no data-dependent shape (CUDA-graph safe), so
        nothing is validated: codes are clamped into the codebook on the device instead (an
        out-of-range index would be a device-side assert). For in-range codes an emitting row
        gets what ``decode(codes[rows], rows=rows)`` gives it.
        """
        if codes.dim() != 3 or codes.shape[0] != self.max_batch or emit.shape != (self.max_batch,) \
                or emit.dtype != torch.bool:
            raise ValueError(f"decode_masked takes codes [{self.max_batch}, K, T] and a bool emit [{self.max_batch}], "
                             f"got {tuple(codes.shape)} and {emit.dtype} {tuple(emit.shape)}")
        codes = codes.clamp(0, self.codec.codebook_size - 1)
        return self._decode(codes, _Rows(emit=emit), clamp)

    def _decode(self, codes: Tensor, rows: _Rows, clamp: bool) -> Tensor:
        latent = self._quantizer.decode(codes)  # [n, D, T] at 12.5 Hz
        if self._upsample is not None:
            latent = self._convtr(self._convtrs[self._upsample], latent, rows)  # [n, D, 2T] at 25 Hz
        hidden = self._decoder_transformer(latent.transpose(1, 2), rows)  # [n, 2T, D]
        pcm = self._seanet_forward(hidden.transpose(1, 2), rows)[:, 0]  # [n, T·1920]
        return pcm.clamp(-1.0, 1.0) if clamp else pcm

    def _conv(self, plan: _CausalConv, x: Tensor, rows: _Rows) -> Tensor:
        """x [n, Cin, T] → [n, Cout, T], left context taken from and given back to the state."""
        if plan.context == 0:
            return plan.conv(x)
        buf = self.state.context[plan.name]
        full = torch.cat([_take(buf, rows), x], dim=-1)  # [n, Cin, P + T]
        _put(buf, rows, full[..., full.shape[-1] - plan.context :])
        return plan.conv(full)

    def _convtr(self, plan: _CausalConvTranspose, x: Tensor, rows: _Rows) -> Tensor:
        """x [n, Cin, T] → [n, Cout, T·s]: this call's samples complete; the spill-over is carried."""
        t, s = x.shape[-1], plan.stride
        if self.matmul_convtr:
            y = _overlap_add(_convtr_columns(x, plan.matrix, plan.groups), plan.out_channels, plan.blocks, s)
        else:
            y = F.conv_transpose1d(x, plan.conv.weight, None, stride=s, groups=plan.groups)
            y = F.pad(y, (0, (t + plan.blocks - 1) * s - y.shape[-1]))  # [n, Cout, (T+n-1)·s]
        if plan.tail > 0:
            buf = self.state.tails[plan.name]
            y[..., : plan.tail] += _take(buf, rows)
            _put(buf, rows, y[..., t * s :])  # bias-free: the bias is added once, on emission
        out = y[..., : t * s]
        if plan.conv.bias is not None:
            out = out + plan.conv.bias[:, None]
        return out

    def _seanet_forward(self, x: Tensor, rows: _Rows) -> Tensor:
        """The SEANet decoder [n, D, 2T] → [n, 1, T·1920], walking MimiDecoder.layers in order."""
        for layer in self._seanet.layers:
            x = self._layer(layer, x, rows)
        return x

    def _layer(self, layer: nn.Module, x: Tensor, rows: _Rows) -> Tensor:
        if isinstance(layer, MimiConv1d):
            return self._conv(self._convs[layer], x, rows)
        if isinstance(layer, MimiConvTranspose1d):
            return self._convtr(self._convtrs[layer], x, rows)
        if isinstance(layer, MimiResnetBlock):
            h = x
            for sub in layer.block:
                h = self._layer(sub, h, rows)
            return self._layer(layer.shortcut, x, rows) + h
        return layer(x)  # ELU, Identity: stateless

    def _decoder_transformer(self, x: Tensor, rows: _Rows) -> Tensor:
        """Mimi's decoder transformer, x [n, T, D] → [n, T, D], attending over each row's KV ring.

        Mirrors MimiTransformerLayer: pre-LayerNorm, RoPE on q/k, causal sliding-window attention
        (query q sees keys k with q - W < k ≤ q), layer-scaled residuals, no final norm.
        """
        n, t, _ = x.shape
        w, device = self._window, x.device
        pos = _take(self.state.position, rows)  # [n]
        q_pos = pos[:, None] + torch.arange(t, device=device)  # [n, T]
        cos, sin = self._rope(q_pos)  # [n, 1, T, D]

        # Slot i holds the latest earlier position ≡ i (mod W); negative means never written.
        slots = torch.arange(w, device=device)
        slot_pos = pos[:, None] - 1 - torch.remainder(pos[:, None] - 1 - slots, w)  # [n, W]
        k_pos = torch.cat([slot_pos, q_pos], dim=1)  # [n, W + T]
        delta = q_pos[:, :, None] - k_pos[:, None, :]  # [n, T, W + T]
        mask = ((delta >= 0) & (delta < w) & (k_pos[:, None, :] >= 0))[:, None]  # [n, 1, T, W + T]
        keep = min(t, w)  # only the last W steps can be seen again
        write_slots = torch.remainder(q_pos[:, t - keep :], w)  # [n, keep]

        for layer_idx, layer in enumerate(self._transformer.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(n, t, self._heads, self._head_dim).transpose(1, 2)  # [n, H, T, D]
            k = attn.k_proj(h).view(n, t, self._kv_heads, self._head_dim).transpose(1, 2)  # [n, Hkv, T, D]
            v = attn.v_proj(h).view(n, t, self._kv_heads, self._head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin

            ring_k, ring_v = self.state.key[layer_idx], self.state.value[layer_idx]  # [B, W, Hkv, D]
            keys = torch.cat([_take(ring_k, rows).transpose(1, 2), k], dim=2)  # [n, Hkv, W + T, D]
            values = torch.cat([_take(ring_v, rows).transpose(1, 2), v], dim=2)
            _write_ring(ring_k, rows, write_slots, k[:, :, t - keep :].transpose(1, 2))  # after the read above
            _write_ring(ring_v, rows, write_slots, v[:, :, t - keep :].transpose(1, 2))
            if self._kv_heads != self._heads:  # grouped-query: head h reads kv head h // groups
                keys = keys.repeat_interleave(self._heads // self._kv_heads, dim=1)
                values = values.repeat_interleave(self._heads // self._kv_heads, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
            out = attn.o_proj(out.transpose(1, 2).reshape(n, t, self._heads * self._head_dim))
            x = x + layer.self_attn_layer_scale(out)
            x = x + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(x)))

        _put(self.state.position, rows, pos + t)
        return x

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [n, 1, T, D] for positions [n, T], computed as MimiRotaryEmbedding does."""
        rope = self._transformer.rotary_emb
        freqs = positions[..., None].float() * rope.inv_freq.float()  # [n, T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [n, T, D]
        return (emb.cos() * rope.attention_scaling)[:, None], (emb.sin() * rope.attention_scaling)[:, None]


def _write_ring(ring: Tensor, rows: _Rows, slots: Tensor, new: Tensor) -> None:
    """Write ``new`` [n, keep, Hkv, D] into slots [n, keep] of the computed rows of a KV ring [B, W, Hkv, D]."""
    if rows.idx is not None:
        ring[rows.idx[:, None], slots] = new
        return
    at = slots[:, :, None, None].expand_as(new)  # all rows: a scatter, masked rows write back their own bits
    if rows.emit is not None:
        new = torch.where(_per_row(rows.emit, new), new, ring.gather(1, at))
    ring.scatter_(1, at, new)


def _rotate_half(x: Tensor) -> Tensor:
    """[..., D] → [..., D]: (x1, x2) ↦ (-x2, x1) over the two halves, Mimi's RoPE layout."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
