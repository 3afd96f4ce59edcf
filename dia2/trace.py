"""Teacher-forced trace: the logits a checkpoint produces for given tokens, for validating a port.

Input ``tokens`` int64 [B, C, T+1] in the official channel layout (channel 0 main text,
1 second text, 2… audio codebooks), B = 2 CFG rows. For each step t < T the transformer
reads column t at position t, and depformer stage s is teacher-forced with codebook s of
column t+1 (stage 0 also gets column t+1's text where the checkpoint embeds text there: row
0's text for every row, as the reference runtime feeds the conditional text to both CFG rows).
Outputs (float32): ``action_logits`` [B, T, A], ``cb0_logits`` [B, T, V],
``depformer_logits`` [B, T, K-1, V'] with V' the audio logit limit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import Dia2Error
from .model import Dia2Model


def teacher_forced_trace(model: Dia2Model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    cfg = model.config
    if tokens.dim() != 3:
        raise Dia2Error(f"tokens must be [B, C, T+1], got shape {list(tokens.shape)}")
    rows, channels, columns = tokens.shape
    if channels != cfg.data.channels:
        raise Dia2Error(f"tokens have {channels} channels, the model expects {cfg.data.channels}")
    if columns < 2:
        raise Dia2Error("tokens need at least 2 columns (T+1 with T >= 1)")
    steps = columns - 1
    if steps > cfg.runtime.max_context_steps:
        raise Dia2Error(f"{steps} steps exceed the model context of {cfg.runtime.max_context_steps}")
    if tokens.dtype != torch.long:
        raise Dia2Error(f"tokens must be int64, got {tokens.dtype}")
    dev = model.device
    tokens = tokens.to(dev)
    cache = model.allocate_decoder_cache(rows, slots=steps)
    dep_cache = model.allocate_depformer_cache(rows)
    action, cb0, stages = [], [], []
    with torch.inference_mode():
        for t in range(steps):
            pos = torch.full((rows,), t, dtype=torch.long, device=dev)
            out = model.transformer(tokens[:, :, t : t + 1], pos, cache, slots=t + 1)
            action.append(out.action_logits[:, 0])
            cb0.append(out.cb0_logits[:, 0])
            nxt = tokens[:, :, t + 1]
            text = None
            if model.depformer.text_embed is not None:
                text = (nxt[:1, 0].expand(rows), nxt[:1, 1].expand(rows))  # row 0's text on every row
            per_stage = []
            for s in range(cfg.num_stages):
                prev = nxt[:, 2 + s].clamp(0, cfg.data.audio_vocab_size - 1)
                per_stage.append(model.depformer.stage(s, out.hidden[:, 0], prev, dep_cache, text=text))
            stages.append(torch.stack(per_stage, dim=1))
    return {
        "action_logits": torch.stack(action, dim=1).float().cpu(),
        "cb0_logits": torch.stack(cb0, dim=1).float().cpu(),
        "depformer_logits": torch.stack(stages, dim=1).float().cpu(),
    }


def run_trace_files(model: Dia2Model, tokens_path: Path, out_path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    try:
        loaded = load_file(str(tokens_path))
    except (SafetensorError, OSError) as exc:
        raise Dia2Error(f"{tokens_path}: not a readable safetensors file ({exc})") from None
    if "tokens" not in loaded:
        raise Dia2Error(f"{tokens_path} has no tensor named 'tokens' (found: {', '.join(sorted(loaded)) or 'none'})")
    result = teacher_forced_trace(model, loaded["tokens"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in result.items()}, str(out_path))
    return result
