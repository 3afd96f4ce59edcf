"""Step time p50/p99 by batch size (streams stepped together), eager against CUDA-graphed, and
the device operations one step dispatches.

For random checkpoints of the tiny, Dia2-1B and Dia2-2B shapes (same compute per step as the
released weights), it starts B streams (1, 2, 4, … 32) in one engine and times single batched
steps: one step advances every stream by one 80 ms frame, so real time for all B streams
needs a step under 80 ms. Each figure is over the timed steps after dropped warm-up steps;
the device is synchronised before every clock read. The eager baseline is always measured in
the same run; on CPU there are no graphs and that column is n/a.

Overlapped (``overlapped``, graphed on CUDA, eager on CPU): the steps in an overlapped
runner's order (dia2/stream.py): each step is planned from both outcomes of the previous
step's unread actions and launched before that step is committed; a step's time is the host's
time around one iteration (no sync per step: it would undo the overlap). ``host_p50_ms`` is
the host planning per step (prepare + commit); the table shows the overlapped one per stream.

Eager steps attend over the filled cache slots only, so they get slower as a turn goes on;
graphed steps attend over the smallest length bucket that holds the positions (64, 128, …, the
whole cache: ``dia2.graphs.length_buckets``), so they get slower in steps, at each bucket
boundary. The timed window (positions warm-up … warm-up + steps) and the length buckets it
reads are in the report; with graphs, also how many graphs the engine captured at start-up
(one per batch bucket, length bucket and depformer or not), how long that took and the GPU
memory it reserved beyond the engine's buffers. The dropped steps are at least the
max delay (18): before that no depformer stage runs, and a timed window there would show a
transformer-only step (~2 ms for tiny) instead of a full one.

Operation counts (``ops_full_step``, ``ops_transformer_step`` per shape and batch; also
``kernels_*``, the same without views): ATen operations dispatched by one device step with
every depformer stage, and by one transformer-only step (the continuation zone), counted on
the meta device at the shape's real size (no memory, no compute; the same on any machine, so
comparable across commits). See dia2/diagnostics.py.

With ``--compiled`` (slow: Inductor compiles the whole step, ~10 min for tiny on a 2-core
machine) it also reports ``kernels_compiled_full_step``: the kernels the torch.compile'd full step
launches (fused C++/Triton kernels, GEMMs and other library calls), counted from the code
Inductor generates, with the eager step's for comparison (StepEngine ``compile_step``).

    python bench/step.py [--quick] [--shapes tiny,1b,2b] [--batches 1,2,4] [--device cuda|cpu]
                         [--steps N] [--warmup N] [--ops-only] [--compiled] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import ROOT, git_commit, make_clock, model_folder

from dia2.checkpoint import load_model, pick_device_and_dtype, resolve_checkpoint
from dia2.config import parse_config
from dia2.diagnostics import meta_engine, step_op_counts
from dia2.engine import StepEngine
from dia2.graphs import bucket_for, length_bucket_for, length_buckets
from dia2.model import Dia2Model
from dia2.random_checkpoint import SHAPES, shape_config
from dia2.sampling import GenerationConfig
from dia2.state_machine import StateRules, new_text_state
from dia2.text import TextTokenizer, parse_script

BATCHES = (1, 2, 4, 8, 16, 32)
FRAME_MS = 80.0
# Long enough that no stream runs dry in the timed window; an open text holds if it does.
SCRIPT = "[S1] " + " ".join(["Thanks for calling, how can I help you with your order today?"] * 8)


@dataclass
class StepFigures:
    shape: str
    mode: str  # "eager" or "graphed" (one step after the other), or "overlapped" (graphed on CUDA)
    batch: int  # streams stepped together
    rows: int  # slots the device step computes (the bucket when graphed)
    p50_ms: float
    p99_ms: float
    mean_ms: float
    steps: int  # timed steps (after the dropped warm-up ones)
    host_p50_ms: float  # of which host planning: prepare (rows and plans of both actions) + commit


def load(shape: str, device: str) -> tuple[Dia2Model, StateRules, TextTokenizer]:
    """The model and the text front end only (the step needs no Mimi)."""
    files = resolve_checkpoint(model_folder(shape))
    dev, dtype = pick_device_and_dtype(device, None)
    model = load_model(files, device=dev, dtype=dtype)
    tokenizer = TextTokenizer.from_pretrained(files.tokenizer)
    rules = StateRules.from_config(model.config.data, tokenizer.token_ids(model.config.data))
    return model, rules, tokenizer


def time_batch(engine: StepEngine, tokenizer: TextTokenizer, batch: int, warmup: int, steps: int,
               now: Callable[[], float], overlap: bool) -> tuple[list[float], list[float]]:
    """Step ``batch`` fresh streams ``warmup + steps`` times; the timed steps' ms, and the host
    planning ms of each (:meth:`StepEngine.prepare` + :meth:`StepEngine.commit`, plain wall time:
    the host half never waits on the device).

    ``overlap``: the order of an overlapped runner (dia2/stream.py): each step is prepared from
    both outcomes of the previous step's unread actions and launched before that step is
    committed. A step's time is then the host's time around one iteration (``now`` is read at
    the start and end only: a device sync per step would undo the overlap)."""
    entries = parse_script(tokenizer, SCRIPT)
    slots = list(range(batch))
    for slot in slots:
        text = new_text_state(engine.rules, entries, closed=False)  # open: holds, never ends
        engine.start_fresh(slot, GenerationConfig(seed=slot), text, tokenizer.bos_id)
    times: list[float] = []
    host: list[float] = []
    pending = None
    try:
        for i in range(warmup + steps):
            start = now() if not overlap else time.perf_counter()
            t0 = time.perf_counter()
            plan = engine.prepare(slots, after=pending if overlap else None)
            planned = time.perf_counter() - t0
            if overlap:
                if pending is not None:
                    engine.wait(pending)
                ticket = engine.launch(plan)
                t1 = time.perf_counter()
                if pending is not None:
                    engine.commit(pending)
                pending = ticket
                t2 = end = time.perf_counter()
            else:
                ticket = engine.launch(plan)
                engine.wait(ticket)
                t1 = time.perf_counter()
                engine.commit(ticket)
                t2 = time.perf_counter()
                end = now()
            if i >= warmup:
                times.append((end - start) * 1e3)
                host.append((planned + t2 - t1) * 1e3)
    finally:
        if pending is not None:  # even after an error: the engine must not keep a step in flight
            with contextlib.suppress(Exception):
                engine.wait(pending)  # (returns at once when read; raises again when it failed)
                engine.commit(pending)
        for slot in slots:
            engine.release(slot)
    return times, host


def count_shape(shape: str, batches: list[int]) -> dict[str, dict[str, int]]:
    """Operations of one full and one transformer-only step at batch 1 and the largest batch,
    counted on the meta device (keyed by batch, as a string for JSON)."""
    engine = meta_engine(parse_config(shape_config(shape)), max(batches))  # type: ignore[arg-type]
    counts: dict[str, dict[str, int]] = {}
    for batch in sorted({1, max(batches)}):
        got = step_op_counts(engine, batch)
        counts[str(batch)] = {
            "rows": got.rows,
            "ops_full_step": got.full.ops,
            "ops_transformer_step": got.transformer.ops,
            "kernels_full_step": got.full.kernels,
            "kernels_transformer_step": got.transformer.kernels,
        }
        c = counts[str(batch)]
        print(f"  {shape} batch {batch:>2}: {c['ops_full_step']} ops per full step ({c['kernels_full_step']} "
              f"non-view), {c['ops_transformer_step']} transformer-only ({c['kernels_transformer_step']})", flush=True)
    return counts


# A launch in Inductor's generated ``call()``: a fused kernel, a library call, or an ATen fallback.
_LAUNCH = re.compile(r"^\s+(?:[\w, ]+ = )?((?:cpp|triton)_\w+|extern_kernels\.\w+|torch\.ops\.aten\.[\w.]+)(?:\.run)?\(",
                     re.M)


def count_compiled_kernels(shape: str, device: str) -> dict[str, Any]:
    """Compile one bucket-1 full step (StepEngine compile_step) and count the kernels its
    generated code launches per call."""
    from torch._inductor.utils import run_and_get_code

    model, rules, _ = load(shape, device)
    engine = StepEngine(model, rules, max_streams=1, static_shapes=True, compile_step=True)
    step = engine.device_step(1)
    step.stage([step.idle_row()])
    t0 = time.perf_counter()
    with torch.inference_mode():
        step.inputs.copy_(step.staging)
        _, sources = run_and_get_code(lambda: step._with_depformer(step.inputs))
    seconds = time.perf_counter() - t0
    launches = 0
    for source in sources:
        call = source[source.index("def call("):] if "def call(" in source else ""
        launches += len(_LAUNCH.findall(call))
    print(f"  {shape} compiled full step: {launches} kernel launches (compiled in {seconds:.0f} s)", flush=True)
    return {"kernels_compiled_full_step": launches, "compile_s": seconds}


def bench_shape(shape: str, device: str, batches: list[int], warmup: int | None, steps: int) -> tuple[
    list[StepFigures], dict[str, Any]
]:
    model, rules, tokenizer = load(shape, device)
    if warmup is None:
        warmup = model.config.data.max_delay
    if warmup < model.config.data.max_delay:
        print(f"  note: {warmup} dropped steps < max delay {model.config.data.max_delay}: "
              "the first timed steps run no depformer", flush=True)
    if warmup + steps >= model.config.runtime.max_context_steps:
        raise SystemExit(f"--warmup + --steps must stay under the {shape} context "
                         f"({model.config.runtime.max_context_steps} steps)")
    now = make_clock(model.device)
    # On CUDA: eager and graphed steps one after the other, and graphed steps overlapped. On the
    # CPU (no graphs) eager steps in both orders: a launch computes at once, so the order changes
    # only the host planning (from both outcomes of each slot's pending action when overlapped).
    modes = ["eager", "graphed", "overlapped"] if model.device.type == "cuda" else ["eager", "overlapped"]
    figures: list[StepFigures] = []
    ladder = length_buckets(model.config.runtime.max_context_steps)
    first, last = length_bucket_for(warmup + 1, ladder), length_bucket_for(warmup + steps, ladder)
    info: dict[str, Any] = {"dtype": str(model.dtype).removeprefix("torch."), "warmup_steps": warmup,
                            "positions": [warmup, warmup + steps - 1],
                            "length_buckets": [length for length in ladder if first <= length <= last]}
    for mode in modes:
        reserved = torch.cuda.memory_reserved(model.device) if model.device.type == "cuda" else 0
        t0 = now()
        # Graphed: every bucket's graphs are captured here, at construction.
        engine = StepEngine(model, rules, max_streams=max(batches),
                            use_cuda_graphs=mode != "eager" and model.device.type == "cuda")
        if mode == "graphed":
            info["capture_s"] = now() - t0
            info["graphs"] = sum(len(s.graphs) for s in engine._device_steps if s is not None)
            buffers = engine.buffers.decoder.nbytes() + engine.buffers.depformer.nbytes()
            # Beyond the KV caches: the graph pool plus each bucket's workspaces (head logits
            # buffers, GEMM outputs, topk windows, RNG cell tables) and the audio buffer.
            info["engine_extra_mb"] = (torch.cuda.memory_reserved(model.device) - reserved - buffers) / 2**20
        for batch in batches:
            times, host = time_batch(engine, tokenizer, batch, warmup, steps, now, overlap=mode == "overlapped")
            rows = bucket_for(batch) if engine.static_shapes else batch
            figures.append(StepFigures(
                shape=shape, mode=mode, batch=batch, rows=rows, p50_ms=float(np.percentile(times, 50)),
                p99_ms=float(np.percentile(times, 99)), mean_ms=float(np.mean(times)), steps=len(times),
                host_p50_ms=float(np.percentile(host, 50)),
            ))
            f = figures[-1]
            print(f"  {shape} {mode:<7} batch {batch:>2}: p50 {f.p50_ms:8.2f} ms  p99 {f.p99_ms:8.2f} ms  "
                  f"(host planning p50 {f.host_p50_ms:.2f} ms)", flush=True)
        del engine
        gc.collect()  # a device step and its graph wrappers refer to each other
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
    return figures, info


def table(figures: list[StepFigures], shapes: list[str], batches: list[int]) -> str:
    """p50/p99 per shape and batch, eager next to graphed, with the speed-up and real-time factor."""

    def ms(f: StepFigures | None) -> str:
        return f"{f.p50_ms:9.2f} {f.p99_ms:9.2f}" if f is not None else f"{'n/a':>9} {'n/a':>9}"

    def realtime(f: StepFigures | None) -> str:
        return f"{FRAME_MS / f.p50_ms:7.1f}x" if f is not None else f"{'n/a':>8}"

    lines = [f"{'shape':<6} {'batch':>5}  {'eager p50':>9} {'p99':>9}  {'graph p50':>9} {'p99':>9}  "
             f"{'overlap p50':>11} {'p99':>9}  {'speedup':>7}  {'RT eager':>8} {'RT best':>8}  {'host/stream':>11}"]
    for shape in shapes:
        for batch in batches:
            found = {f.mode: f for f in figures if f.shape == shape and f.batch == batch}
            eager, graphed, overlapped = found.get("eager"), found.get("graphed"), found.get("overlapped")
            best = overlapped or graphed
            speedup = f"{eager.p50_ms / best.p50_ms:6.2f}x" if eager and best else f"{'n/a':>7}"
            # Host planning per stream, from the figures that planned both outcomes.
            per_stream = f"{overlapped.host_p50_ms * 1e3 / batch:9.0f}us" if overlapped else f"{'n/a':>11}"
            lines.append(f"{shape:<6} {batch:>5}  {ms(eager)}  {ms(graphed)}  {ms(overlapped):>21}  {speedup:>7}  "
                         f"{realtime(eager)} {realtime(best)}  {per_stream}")
    return "\n".join(lines)


def ops_table(ops: dict[str, Any]) -> str:
    """Operations per step by shape and batch: full step and transformer-only, all ops and non-view."""
    lines = [f"{'shape':<6} {'batch':>5}  {'ops full':>9} {'kernels':>8}  {'ops transf.':>11} {'kernels':>8}"]
    for shape, by_batch in ops.items():
        for batch, c in by_batch.items():
            lines.append(f"{shape:<6} {batch:>5}  {c['ops_full_step']:>9} {c['kernels_full_step']:>8}  "
                         f"{c['ops_transformer_step']:>11} {c['kernels_transformer_step']:>8}")
    return "\n".join(lines)


def plot(figures: list[StepFigures], shapes: list[str], path: Path) -> str:
    """A PNG of p50 step time against batch size, one panel per shape (p99 dashed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (it is not a dependency; pip install it for the PNG)"
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for mode, color in (("eager", "tab:blue"), ("graphed", "tab:orange"), ("overlapped", "tab:green")):
            rows = sorted((f for f in figures if f.shape == shape and f.mode == mode), key=lambda f: f.batch)
            if not rows:
                continue
            xs = [f.batch for f in rows]
            ax.plot(xs, [f.p50_ms for f in rows], "o-", color=color, label=f"{mode} p50")
            ax.plot(xs, [f.p99_ms for f in rows], "--", color=color, alpha=0.6, label=f"{mode} p99")
        ax.axhline(FRAME_MS, color="gray", linewidth=0.8, label="80 ms (real time)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("streams per step")
        ax.set_ylabel("step time (ms)")
        ax.set_title(shape)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI size: tiny only, batches 1,2,4, 18 dropped + 10 timed steps")
    parser.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)} (default: all)")
    parser.add_argument("--batches", default=None, help="comma list of streams per step (default 1,2,4,8,16,32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=None,
                        help="dropped steps per batch (default: the max delay, 18, so every timed step runs the depformer)")
    parser.add_argument("--ops-only", action="store_true", help="count operations only (no model, no timing)")
    parser.add_argument("--compiled", action="store_true",
                        help="also compile the step and count its kernels (slow: minutes per shape)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per batch (default 100; quick 10)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG path (default: the --json path with .png, else out/bench-step.png)")
    args = parser.parse_args(argv)

    shapes = (args.shapes or ("tiny" if args.quick else ",".join(SHAPES))).split(",")
    for s in shapes:
        if s not in SHAPES:
            parser.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    batches = sorted({int(b) for b in (args.batches or ("1,2,4" if args.quick else ",".join(map(str, BATCHES)))).split(",")})
    if batches[0] < 1:
        parser.error("batch sizes must be >= 1")
    warmup: int | None = args.warmup
    steps = args.steps if args.steps is not None else (10 if args.quick else 100)
    if steps < 1:
        parser.error("--steps must be >= 1")

    device = torch.device(args.device)
    device_name = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    dropped = "the max delay" if warmup is None else str(warmup)
    print(f"step time on {device_name}, {torch.get_num_threads()} CPU threads; {dropped} warm-up steps dropped, "
          f"{steps} timed per batch", flush=True)
    figures: list[StepFigures] = []
    per_shape: dict[str, Any] = {}
    ops: dict[str, Any] = {}
    compiled: dict[str, Any] = {}  # --compiled: per shape, kernels of the compiled full step
    for shape in shapes:
        print(f"counting operations per step at the {shape} shape (meta device)", flush=True)
        ops[shape] = count_shape(shape, batches)
        if args.compiled:
            compiled[shape] = count_compiled_kernels(shape, args.device)
        if args.ops_only:
            continue
        got, info = bench_shape(shape, args.device, batches, warmup, steps)
        figures.extend(got)
        per_shape[shape] = info

    print()
    print(ops_table(ops))
    if not args.ops_only:
        print(table(figures, shapes, batches))
        windows = ", ".join(f"{s} {i['positions'][0]}…{i['positions'][1]} (graphed: length buckets "
                            f"{', '.join(map(str, i['length_buckets']))})" for s, i in per_shape.items())
        print(f"p50/p99 in ms per batched step (every stream advances one {FRAME_MS:.0f} ms frame); RT (real-time "
              f"factor) = {FRAME_MS:.0f} ms / p50, above 1x keeps up; positions {windows}"
              + ("; CPU: no CUDA graphs, graphed = n/a" if device.type != "cuda" else ""))

    report: dict[str, Any] = {
        "device": device_name,
        "shape": ",".join(shapes),
        "commit": git_commit(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "batches": batches,
        "timed_steps": steps,
        "shapes": per_shape,
        "ops": ops,
        "compiled": compiled,
        "results": [asdict(f) for f in figures],
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {args.json}")
    if args.ops_only:
        return report
    print(plot(figures, shapes, args.plot or (args.json.with_suffix(".png") if args.json else ROOT / "out" / "bench-step.png")))
    return report


if __name__ == "__main__":
    main()
