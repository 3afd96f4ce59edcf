"""Streaming Mimi decode speed: ms per 80 ms frame, by frames per call, against one-shot decode.

Builds seeded random Mimi checkpoints (tiny and full size) in a temporary folder and loads them
through ``MimiCodec.load``, so no download is needed. Real time needs < 80 ms per frame.

    python bench/mimi_decode.py [--quick] [--sizes tiny,full] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import write_json

from dia2.codec import MimiCodec, MimiStreamDecoder
from dia2.random_mimi import write_random_mimi

FRAMES_PER_CALL = (1, 2, 4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Best wall time of ``reps`` runs in ms, after one untimed warm-up run."""
    fn()
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, (time.perf_counter() - start) * 1e3)
    return best


def bench_size(size: str, frames: int, reps: int, device: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        codec = MimiCodec.load(write_random_mimi(Path(tmp), size=size, seed=0), device=device, progress=False)
    codes = torch.randint(0, codec.codebook_size, (1, codec.num_codebooks, frames),
                          generator=torch.Generator().manual_seed(0)).to(codec.device)
    result: dict[str, Any] = {"frames": frames, "oneshot_ms_per_frame": 0.0, "stream_ms_per_frame": {}}
    result["oneshot_ms_per_frame"] = _best_ms(lambda: codec.decode(codes), codec.device, reps) / frames

    def stream(decoder: MimiStreamDecoder, per_call: int) -> Callable[[], None]:
        def run() -> None:
            decoder.reset()
            for start in range(0, frames, per_call):
                decoder.decode(codes[:, :, start : start + per_call])
        return run

    fast = MimiStreamDecoder(codec, 1)
    for per_call in FRAMES_PER_CALL:
        ms = _best_ms(stream(fast, per_call), codec.device, reps) / frames
        result["stream_ms_per_frame"][str(per_call)] = ms
    # Baseline for the matmul transposed convs: nn.ConvTranspose1d (slow_conv_transpose on CPU).
    reference = MimiStreamDecoder(codec, 1, matmul_convtr=False)
    result["stream_convtr_module_ms_per_frame_1"] = _best_ms(stream(reference, 1), codec.device, reps) / frames
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 frames, 2 timed runs (default 24 and 5)")
    parser.add_argument("--sizes", default="tiny,full", help="comma list of tiny, full")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    frames, reps = (12, 2) if args.quick else (24, 5)

    report: dict[str, Any] = {"device": args.device, "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "sizes": {}}
    print(f"device {args.device}, {torch.get_num_threads()} threads, {frames} frames, best of {reps}")
    print(f"{'size':<5} {'one-shot':>9} " + " ".join(f"{f'stream x{n}':>10}" for n in FRAMES_PER_CALL)
          + f" {'x1 nn.convtr':>13}   (ms per 80 ms frame)")
    for size in args.sizes.split(","):
        r = bench_size(size.strip(), frames, reps, args.device)
        report["sizes"][size] = r
        cells = " ".join(f"{r['stream_ms_per_frame'][str(n)]:>10.2f}" for n in FRAMES_PER_CALL)
        print(f"{size:<5} {r['oneshot_ms_per_frame']:>9.2f} {cells} {r['stream_convtr_module_ms_per_frame_1']:>13.2f}")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
