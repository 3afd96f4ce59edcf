"""Streaming Mimi decode speed: ms per 80 ms frame, by frames per call, against one-shot decode;
and a runner step's decode by path (dia2/mimi_step.py) at several decoder sizes.

Builds seeded random Mimi checkpoints (tiny and full size) in a temporary folder and loads them
through ``MimiCodec.load``, so no download is needed. Real time needs < 80 ms per frame.

Step paths, ms per runner step (one frame for each emitting row, PCM on the host), for a
decoder of ``max_batch`` rows: ``rows`` decodes only the emitting rows (the CPU path),
``masked`` every row with an emit mask (the CUDA path; graphed there, eager here), with all
rows emitting and with one.

    python bench/mimi_decode.py [--quick] [--sizes tiny,full] [--batches 1,8,32] [--threads N]
                                [--device cpu] [--json out.json]
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
from dia2.graphs import GraphMemory
from dia2.mimi_step import MimiStepDecoder
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


def load(size: str, device: str) -> MimiCodec:
    with tempfile.TemporaryDirectory() as tmp:
        return MimiCodec.load(write_random_mimi(Path(tmp), size=size, seed=0), device=device, progress=False)


STEP_PATHS = ("rows all", "rows one", "masked all", "masked one")


def bench_step_paths(codec: MimiCodec, batches: list[int], steps: int, reps: int) -> dict[str, dict[str, float]]:
    """{max_batch: {path: ms per step}}: ``steps`` one-frame decodes through MimiStepDecoder."""
    gen = torch.Generator().manual_seed(1)
    out: dict[str, dict[str, float]] = {}
    for b in batches:
        codes = torch.randint(0, codec.codebook_size, (steps, b, codec.num_codebooks), generator=gen)
        graphed = codec.device.type == "cuda"
        paths = {
            "rows": MimiStepDecoder(MimiStreamDecoder(codec, b), masked=False),
            "masked": MimiStepDecoder(MimiStreamDecoder(codec, b), masked=True, graphed=graphed,
                                      memory=GraphMemory.new(codec.device) if graphed else None),
        }
        paths["masked"].capture()
        row: dict[str, float] = {}
        for name, step in paths.items():
            for emitting in ("all", "one"):
                rows = list(range(b)) if emitting == "all" else [b // 2]

                def run(step: MimiStepDecoder = step, rows: list[int] = rows, codes: torch.Tensor = codes) -> None:
                    step.decoder.reset()
                    for t in range(steps):
                        step.decode(rows, list(codes[t, rows]))

                row[f"{name} {emitting}"] = _best_ms(run, codec.device, reps) / steps
        out[str(b)] = row
    return out


def bench_size(size: str, frames: int, reps: int, device: str) -> dict[str, Any]:
    codec = load(size, device)
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
    parser.add_argument("--batches", default="1,8,32", help="decoder rows (max_batch) for the step paths")
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
    batches = [int(b) for b in args.batches.split(",")]
    steps = 4 if args.quick else 8
    print(f"\nrunner step decode, ms per step ({steps} steps, one frame per emitting row)")
    print(f"{'size':<5} {'rows':>5} " + " ".join(f"{p:>11}" for p in STEP_PATHS))
    for size in args.sizes.split(","):
        paths = bench_step_paths(load(size.strip(), args.device), batches, steps, reps)
        report["sizes"][size]["step_ms"] = paths
        for b, row in paths.items():
            print(f"{size:<5} {b:>5} " + " ".join(f"{row[p]:>11.2f}" for p in STEP_PATHS))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
