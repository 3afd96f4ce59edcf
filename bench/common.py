"""What every benchmark shares: the cached random checkpoints, a device-synced clock, the commit.

Benchmarks run as scripts (``python bench/NAME.py``), so this folder is on ``sys.path`` and
they import this module as ``common``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "out" / "bench-models"  # one cached random checkpoint per shape
_DONE_MARK = ".complete"  # written last, so a half-written folder is rebuilt


def model_folder(shape: str) -> Path:
    """The random checkpoint of ``shape``, written once under out/bench-models/<shape>."""
    from dia2.random_checkpoint import write_random_checkpoint

    folder = MODELS / shape
    if not (folder / _DONE_MARK).exists():
        print(f"writing a random {shape} checkpoint to {folder} (once)", file=sys.stderr, flush=True)
        write_random_checkpoint(folder, shape, seed=0)  # type: ignore[arg-type]
        (folder / _DONE_MARK).write_text("ok\n")
    return folder


def make_clock(device: torch.device) -> Callable[[], float]:
    """``time.perf_counter`` after the device has finished its queued work."""

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout, or None outside a git work tree."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def write_json(path: Path, report: object) -> None:
    """Write a benchmark's report as indented JSON (creating the folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
