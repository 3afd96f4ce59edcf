"""Fixtures for dia2 tests: tiny seeded checkpoints written in the official file layouts."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_mimi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Mimi (seed 0, codebooks randomised) saved as config.json + model.safetensors."""
    from dia2.random_mimi import write_random_mimi

    return write_random_mimi(tmp_path_factory.mktemp("tiny-mimi"), "tiny", seed=0)
