"""Fixtures shared by every test: tiny random checkpoints written in the official layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: everything they load is written by fixtures.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny random Dia2 folder: config.json, model.safetensors, tokenizer, mimi/."""
    from dia2.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-dia2"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_runtime(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """The tiny model loaded once per session (CPU, float32)."""
    from dia2 import Dia2

    return Dia2.load(tiny_model_dir, device="cpu", progress=False)
