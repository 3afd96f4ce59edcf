"""Checkpoint loading: strict, named errors; the factory's folders round-trip; real-shape counts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dia2.checkpoint import build_model_on_meta, load_model, pick_device_and_dtype, resolve_checkpoint
from dia2.config import parse_config
from dia2.errors import CheckpointError
from dia2.random_checkpoint import shape_config


def doc_tensor_count(cfg) -> int:  # type: ignore[no-untyped-def]
    """dia2-format.md §2.4, written independently of the module tree."""
    k, layers = cfg.num_codebooks, cfg.model.decoder.n_layer
    s, w, dl = cfg.num_stages, len(cfg.weight_set_ids), cfg.model.depformer.n_layer
    text = 3 if cfg.model.depformer.text_embedding else 0
    return (k + 3 + 10 * layers + 3) + (s + text + w + dl * (6 + 2 * w) + 1 + s)


@pytest.mark.parametrize("shape", ["tiny", "1b", "2b"])
def test_real_shape_counts_match_the_doc(shape: str) -> None:
    cfg = parse_config(shape_config(shape))
    state = build_model_on_meta(cfg).state_dict()
    assert len(state) == doc_tensor_count(cfg)
    if shape == "1b":
        assert len(state) == 440
        assert sum(t.numel() for t in state.values()) == 1_076_244_736  # the published total
    if shape == "2b":
        assert len(state) == 450
        assert 1.90e9 < sum(t.numel() for t in state.values()) < 1.94e9


def test_official_tensor_names_and_shapes(tiny_model_dir: Path) -> None:
    cfg = parse_config(json.loads((tiny_model_dir / "config.json").read_text()))
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    E, F = cfg.model.decoder.n_embd, cfg.model.decoder.n_hidden
    e = cfg.model.depformer.n_embd
    assert state["transformer.audio_embeds.31.weight"].shape == (2050, E)
    assert state["transformer.layers.1.mlp.wi.weight"].shape == (2 * F, E)
    assert state["transformer.layers.0.attn.k_proj.weight"].shape == (2 * 16, E)
    assert state["transformer.cb0_head.weight"].shape == (2050, E)
    assert state["depformer.layers.0.self_attention.in_proj.2.weight"].shape == (3 * 2 * 16, e)
    assert state["depformer.depformer_in.1.weight"].shape == (e, E)
    assert state["depformer.logits.30.weight"].shape == (2050, e)
    assert "depformer.text_embed.embedding.weight" not in state
    assert all(t.dtype == torch.bfloat16 for t in state.values())  # stored like the released files


def test_factory_folder_round_trips(tiny_model_dir: Path) -> None:
    files = resolve_checkpoint(tiny_model_dir)
    assert files.tokenizer == str(tiny_model_dir)
    assert Path(files.mimi) == tiny_model_dir / "mimi"
    model = load_model(files, device=torch.device("cpu"), dtype=torch.float32)
    stored = load_file(str(files.weights))
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, stored[name].float()), name
    assert model.transformer.rope.cos.device.type == "cpu"  # rebuilt off the meta device


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_unexpected_and_misshaped_tensors_are_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_model_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    cpu, f32 = torch.device("cpu"), torch.float32

    broken = dict(state)
    del broken["transformer.norm.weight"]
    save_file(broken, str(weights))
    with pytest.raises(CheckpointError, match=r"missing tensor 'transformer\.norm\.weight' \(expected shape \[64\]\)"):
        load_model(resolve_checkpoint(folder), device=cpu, dtype=f32)

    broken = dict(state)
    broken["transformer.extra.weight"] = torch.zeros(3)
    save_file(broken, str(weights))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'transformer\.extra\.weight'"):
        load_model(resolve_checkpoint(folder), device=cpu, dtype=f32)

    broken = dict(state)
    broken["transformer.cb0_head.weight"] = torch.zeros(2049, 64, dtype=torch.bfloat16)
    save_file(broken, str(weights))
    with pytest.raises(CheckpointError, match=r"'transformer\.cb0_head\.weight' has shape \[2049, 64\], expected \[2050, 64\]"):
        load_model(resolve_checkpoint(folder), device=cpu, dtype=f32)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(resolve_checkpoint(folder), device=cpu, dtype=f32)


def test_corrupt_and_truncated_weights_give_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_model_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(resolve_checkpoint(folder), device=torch.device("cpu"), dtype=torch.float32)
    weights.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(resolve_checkpoint(folder), device=torch.device("cpu"), dtype=torch.float32)


def test_missing_files_and_folders_are_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model folder not found"):
        resolve_checkpoint(tmp_path / "nowhere")
    folder = _copy(tiny_model_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        resolve_checkpoint(folder)


def test_hub_id_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not fetch model 'nari-labs/Dia2-2B'"):
        resolve_checkpoint("nari-labs/Dia2-2B")


def test_device_and_dtype_policy() -> None:
    dev, dt = pick_device_and_dtype("cpu", "bfloat16")
    assert dev.type == "cpu" and dt == torch.float32  # bf16 on CPU runs float32, as upstream
    with pytest.raises(CheckpointError, match="unknown dtype"):
        pick_device_and_dtype("cpu", "float8")
