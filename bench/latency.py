"""Server-side time to first audio at 1, 4, 16 concurrent calls, broken down, with the naive baseline.

Drives the real :class:`callbridge.tts.TtsWorker` (its own thread, batched steps) with K turns
opened together, each a short text, for R rounds, and follows every turn the way a call does:
worker frame → :class:`OutboundAudio` (24 kHz → 8 kHz mu-law) → :class:`Pacer` → a no-op
"socket". Time to first audio (TTFA) runs from the turn being accepted to its first 20 ms mu-law
chunk handed to that socket, so the figure is the server's share only (no network, no Twilio).

Per turn, on one ``time.monotonic`` clock (the worker's own timestamps use it too):

- prepare: accepted → turn opened. 0 for ours; the per-turn prompt prefill for the naive path
  (queued behind other turns' prefills on the one worker thread, as it would be in a server);
- restore: opened → stream started on the worker thread (waiting for the step in flight, then
  the snapshot copy; the copy alone is ``restore_copy_ms`` in the JSON);
- first frame: started → first complete frame on the worker, over ``steps_to_first_frame``
  steps. It splits into ``steps_ms`` (the engine's steps, each from its launch to its read)
  and ``decode_ms`` (the one Mimi decode call that produced the frame, batched over every
  stream that completed a frame in that step, so shared by them), timed by wrapping those
  calls on the worker thread (their ends already wait on the device: no sync is added, see
  :class:`RunnerProbe`);
- handoff: worker has the frame → the event loop's reader has it (``call_soon_threadsafe``);
- resample: the first ``OutboundAudio.push`` calls, up to the one that yields a chunk;
- pacing: first chunk ready → the pacer lets it go (a fresh pacer with a lead: ~0);
- steady (not part of TTFA): step + decode per frame once audio flows, the K streams sharing
  each step. Real time needs < 80 ms; the steps before the first frame are cheaper (the
  depformer is skipped in the continuation zone), so they say little about keeping up.

Baseline in the same run: the naive path (what earlier Dia2 servers did) teacher-forces the
voice prompt and primes the Mimi decoder for every turn, on the worker thread, then streams
the same way; CUDA graphs are switched off for it when dia2 has such a switch (eager).

The first round of each (path, K) is a warm-up and is dropped. Percentiles pool every turn of
the timed rounds (K × R samples); with few samples p99 is close to the max. Turns play to their
end, except with ``--quick`` (2 timed rounds, each turn cancelled after its 4th frame: the
TTFA figures hold, but later naive turns then meet less contention than in a full run).

    python bench/latency.py [--calls 1,4,16] [--rounds R] [--quick] [--shape tiny|1b|2b]
                            [--device cuda|cpu] [--json PATH] [--png PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import git_commit, model_folder, write_json

from callbridge.audio import OutboundAudio
from callbridge.audio.pacing import Pacer
from callbridge.config import Settings
from callbridge.tts import TtsWorker, TurnHandle, generation_config
from callbridge.voices import demo_voice_prompt
from dia2 import Dia2, GenerationConfig, VoicePrompt
from dia2.random_checkpoint import SHAPES
from dia2.snapshot import VoiceSnapshot, build_snapshot
from dia2.stream import StreamRunner

#: Short turns, as an agent's first sentence would be; round-robin over the K turns of a round.
TURN_TEXTS = ("Thanks for calling.", "One moment please.", "Your order ships today.", "How can I help?")
PATHS = ("restored", "naive")
#: --quick cuts each turn after this many frames: enough for a few steady-state steps.
QUICK_MAX_FRAMES = 4
#: dia2's process-wide "CUDA graphs off" context manager (env twin: DIA2_CUDA_GRAPHS=0). Looked
#: up rather than imported so the bench still runs against a dia2 without graphs (all eager).
EAGER_SWITCH = ("dia2.graphs", "no_cuda_graphs")


# ---------------------------------------------------------------------------- set-up


def device_name(device: torch.device) -> str:
    return str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")


def service_generation_config(seed: int) -> GenerationConfig:
    """The sampling settings a call uses with the default settings."""
    return generation_config(Settings().tts, seed=seed)


def eager_switch(device: torch.device) -> tuple[contextlib.AbstractContextManager[object], str]:
    """The context that keeps the naive worker's engine eager, and a note for the report.

    The switch is read when an engine is built (on the worker thread, inside ``start``), so
    it must stay open from the naive worker's start to its stop.
    """
    if device.type != "cuda":
        return contextlib.nullcontext(), "eager (no CUDA graphs off CUDA)"
    module_name, attr = EAGER_SWITCH
    with contextlib.suppress(ImportError):
        switch = getattr(importlib.import_module(module_name), attr, None)
        if callable(switch):
            return switch(), f"eager ({module_name}.{attr}())"
    return contextlib.nullcontext(), "as built: this dia2 has no CUDA-graph switch"


# ---------------------------------------------------------------------------- worker-side timing


@dataclass(frozen=True)
class Span:
    """One timed call on the worker thread: ``kind`` is step, decode or start; ``slots`` it served."""

    kind: str
    t0: float
    t1: float
    slots: tuple[int, ...]

    @property
    def ms(self) -> float:
        return (self.t1 - self.t0) * 1e3


class RunnerProbe:
    """Times the engine's steps, the Mimi decodes and the restores of one worker's runner.

    Installed on the worker thread (``worker.run_in_thread``) by shadowing bound methods on the
    instances: no code of dia2 or callbridge changes. A step runs from its launch to the end of
    its wait (the host has its actions: the device finished it), a decode from its submit to
    the end of its collect (the PCM is on the host); both ends already wait on the device's
    events, so the probe adds no sync and an overlapped runner (CUDA) keeps its overlap. There
    a step's span also holds the previous step's Mimi decode, queued just before it. Spans
    are appended on the worker thread and taken there too (``worker.run_in_thread(probe.take)``),
    so no lock is needed.
    """

    def __init__(self, runner: StreamRunner) -> None:
        self.spans: list[Span] = []
        engine, frames = runner.engine, runner.frame_decoder
        launch, wait, submit, collect, start = engine.launch, engine.wait, frames.submit, frames.collect, runner.start
        launched: dict[int, float] = {}  # id(ticket) → launch time
        submitted: list[tuple[float, tuple[int, ...]]] = []

        def launch_(plan: Any) -> Any:
            t0 = time.monotonic()
            ticket = launch(plan)
            launched[id(ticket)] = t0
            return ticket

        def wait_(ticket: Any) -> None:
            try:
                wait(ticket)
            finally:
                t0 = launched.pop(id(ticket), None)
                if t0 is not None and ticket.outcomes:
                    self.spans.append(Span("step", t0, time.monotonic(), tuple(ticket.outcomes)))

        def submit_(rows: Any, codes: Any) -> None:
            t0 = time.monotonic()
            submit(rows, codes)
            submitted.append((t0, tuple(int(r) for r in rows)))

        def collect_() -> Any:
            try:
                return collect()
            finally:
                if submitted:
                    t0, rows = submitted.pop()
                    self.spans.append(Span("decode", t0, time.monotonic(), rows))

        def start_(*args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            stream = start(*args, **kwargs)
            if runner.runtime.device.type == "cuda":
                torch.cuda.synchronize(runner.runtime.device)  # the restore's copies are queued
            self.spans.append(Span("start", t0, time.monotonic(), (stream.slot,)))
            return stream

        engine.launch = launch_  # type: ignore[method-assign]
        engine.wait = wait_  # type: ignore[method-assign]
        frames.submit = submit_  # type: ignore[method-assign]
        frames.collect = collect_  # type: ignore[method-assign]
        runner.start = start_  # type: ignore[method-assign]

    def take(self, _runner: StreamRunner | None = None) -> list[Span]:
        spans, self.spans = self.spans, []
        return spans


def naive_prefill(runtime: Dia2, prompt: VoicePrompt, snapshot: VoiceSnapshot) -> Callable[[StreamRunner], VoiceSnapshot]:
    """A worker-thread function: teacher-force ``prompt`` and prime the Mimi decoder in a free
    slot, returning a live snapshot to start the turn from (bench/stream.py ``naive_turn``)."""

    def run(runner: StreamRunner) -> VoiceSnapshot:
        slot = runner.engine.free_slots()[0]  # scratch only: prefill_prompt leaves the slot free
        state, codes = runtime.prefill_prompt(runner.engine, slot, prompt)
        runner.decoder.reset_rows([slot])
        with torch.inference_mode():
            runner.decoder.decode(codes[None].to(runtime.codec.device), rows=[slot])
        return VoiceSnapshot(manifest=snapshot.manifest, prompt=state, mimi_state=runner.decoder.get_row_state(slot))

    return run


# ---------------------------------------------------------------------------- one turn


@dataclass
class TurnSample:
    """One timed turn; times in ms (see the module docstring for each span)."""

    path: str
    calls: int
    round: int
    ttfa_ms: float
    prepare_ms: float
    restore_ms: float
    restore_copy_ms: float | None
    steps_to_first_frame: int
    first_frame_ms: float
    steps_ms: float
    decode_ms: float | None
    handoff_ms: float
    resample_ms: float
    pacing_ms: float
    steady_step_ms: float | None  # step + decode per frame once audio flows (real time: < 80 ms)


@dataclass
class LoopSide:
    """What the reader saw on the event loop for one turn (monotonic seconds)."""

    accepted_at: float
    frame_at: float | None = None  # first frame out of handle.frames()
    resample_s: float = 0.0
    ready_at: float | None = None  # first chunk out of OutboundAudio
    allowed_at: float | None = None  # the pacer let it go
    sent_at: float | None = None  # handed to the sink


def sink(_chunk: bytes) -> None:
    """The "socket": takes the chunk and does nothing, so the figure stays server-side."""


async def play(handle: TurnHandle, side: LoopSide, quality: str, lead_ms: float, max_frames: int | None) -> None:
    """Follow a turn as a call does: frames → mu-law chunks → pacer → socket, until it ends.

    Only the first chunk is paced (that is the one TTFA waits for); later chunks go straight to
    the sink, so a round lasts as long as the worker needs, not the audio's duration. With
    ``max_frames`` the turn is cancelled after that many frames (a barge-in, as far as the
    worker can tell) to keep short runs short.
    """
    outbound, pacer = OutboundAudio(quality), Pacer(lead_ms=lead_ms)
    frames = 0
    async for frame in handle.frames():
        frames += 1
        if max_frames is not None and frames >= max_frames:
            handle.cancel()  # idempotent; frames already queued still drain through this loop
        if side.sent_at is not None:
            for chunk in outbound.push(frame.pcm24k):
                sink(chunk)
            continue
        if side.frame_at is None:
            side.frame_at = time.monotonic()
        t0 = time.monotonic()
        chunks = outbound.push(frame.pcm24k)
        side.resample_s += time.monotonic() - t0
        if not chunks:
            continue  # soxr held all of it back (VHQ does for a whole frame): wait for the next
        side.ready_at = time.monotonic()
        delay = pacer.delay_for_next()
        if delay > 0:
            await asyncio.sleep(delay)
        side.allowed_at = time.monotonic()
        sink(chunks[0])
        pacer.sent()
        side.sent_at = time.monotonic()
        for chunk in chunks[1:]:
            sink(chunk)
    for chunk in outbound.finish():
        sink(chunk)


async def run_turn(worker: TtsWorker, snapshot: VoiceSnapshot, text: str, seed: int, *,
                   naive: Callable[[StreamRunner], VoiceSnapshot] | None, quality: str, lead_ms: float,
                   max_frames: int | None, timeout_s: float) -> tuple[TurnHandle, LoopSide]:
    """Accept one turn now, open it on the worker (after a prompt prefill for the naive path), play it.

    Bounded by ``timeout_s`` from accept to the turn's end; a turn cut by it raises TimeoutError
    (the bench fails rather than report a figure for a turn that never finished).
    """
    side = LoopSide(accepted_at=time.monotonic())
    async with asyncio.timeout(timeout_s):
        if naive is not None:
            snapshot = await worker.run_in_thread(naive)
        handle = await worker.open_turn(snapshot, service_generation_config(seed), turn_id=f"t{seed}",
                                        text=text, close=True)
        try:
            await play(handle, side, quality, lead_ms, max_frames)
        finally:
            handle.cancel()  # no-op when it ended; frees the slot when it was cut short
    return handle, side


def sample_of(path: str, calls: int, rnd: int, handle: TurnHandle, side: LoopSide, spans: list[Span]) -> TurnSample:
    """Join the loop's and the worker's timestamps of one turn into its breakdown."""
    t = handle.timing
    if t.started_at is None or t.first_frame_at is None or side.sent_at is None or side.frame_at is None:
        raise RuntimeError(f"turn {handle.turn_id} produced no audio ({handle.status.value}: {handle.error})")
    assert side.ready_at is not None and side.allowed_at is not None and t.steps_to_first_frame is not None
    slot = handle.slot
    mine = [s for s in spans if slot in s.slots]
    steps = [s for s in mine if s.kind == "step" and t.started_at <= s.t0 and s.t1 <= t.first_frame_at]
    decodes = [s for s in mine if s.kind == "decode" and t.started_at <= s.t0 and s.t1 <= t.first_frame_at]
    starts = [s for s in mine if s.kind == "start" and t.opened_at <= s.t0 and s.t1 <= t.started_at]
    # After the first frame every step runs the depformer and decodes a frame per stream.
    end = t.ended_at if t.ended_at is not None else float("inf")
    after = [s for s in mine if s.kind in ("step", "decode") and t.first_frame_at <= s.t0 and s.t1 <= end]
    steady_steps = sum(s.kind == "step" for s in after)
    ms = 1e3
    return TurnSample(
        path=path, calls=calls, round=rnd,
        ttfa_ms=(side.sent_at - side.accepted_at) * ms,
        prepare_ms=(t.opened_at - side.accepted_at) * ms,
        restore_ms=(t.started_at - t.opened_at) * ms,
        restore_copy_ms=starts[-1].ms if starts else None,
        steps_to_first_frame=t.steps_to_first_frame,
        first_frame_ms=(t.first_frame_at - t.started_at) * ms,
        steps_ms=sum(s.ms for s in steps),
        decode_ms=decodes[-1].ms if decodes else None,
        handoff_ms=(side.frame_at - t.first_frame_at) * ms,
        resample_ms=side.resample_s * ms,
        pacing_ms=(side.allowed_at - side.ready_at) * ms,
        steady_step_ms=sum(s.ms for s in after) / steady_steps if steady_steps else None,
    )


# ---------------------------------------------------------------------------- one path


@dataclass(frozen=True)
class Plan:
    calls: tuple[int, ...]
    rounds: int
    warm_rounds: int
    quality: str
    lead_ms: float
    max_frames: int | None  # cut each timed turn after this many frames (None: play it to the end)
    timeout_s: float


@dataclass
class PathRun:
    """One path's samples, its worker's start-up warm-up and whether its engine replays CUDA graphs."""

    samples: list[TurnSample]
    warm_up_s: float
    cuda_graphs: bool


async def run_path(path: str, runtime: Dia2, snapshot: VoiceSnapshot, prompt: VoicePrompt, plan: Plan) -> PathRun:
    """Every K of the plan on a fresh worker (so each path's engine is built under its own switch)."""
    worker = TtsWorker(runtime, max(plan.calls), name=f"bench-{path}")
    worker.start()
    warm_up_s = await worker.ready()
    graphs = bool(await worker.run_in_thread(lambda runner: getattr(runner.engine, "use_cuda_graphs", False)))
    probe: RunnerProbe = await worker.run_in_thread(RunnerProbe)
    naive = naive_prefill(runtime, prompt, snapshot) if path == "naive" else None
    samples: list[TurnSample] = []
    seed = 0
    try:
        for calls in plan.calls:
            for rnd in range(plan.warm_rounds + plan.rounds):
                await worker.run_in_thread(probe.take)  # forget spans of earlier rounds
                turns = []
                for i in range(calls):  # opened together: no await between the K accepts
                    seed += 1
                    text = TURN_TEXTS[i % len(TURN_TEXTS)]
                    # Warm-up rounds only need every kernel once: cut them after the first frame.
                    max_frames = plan.max_frames if rnd >= plan.warm_rounds else 1
                    turns.append(run_turn(worker, snapshot, text, seed, naive=naive, quality=plan.quality,
                                          lead_ms=plan.lead_ms, max_frames=max_frames, timeout_s=plan.timeout_s))
                done = await asyncio.gather(*turns)
                spans = await worker.run_in_thread(probe.take)
                if rnd >= plan.warm_rounds:  # the first round(s) of each K are warm-up
                    samples += [sample_of(path, calls, rnd - plan.warm_rounds, h, s, spans) for h, s in done]
    finally:
        await worker.stop()
    return PathRun(samples, warm_up_s, graphs)


# ---------------------------------------------------------------------------- report


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def dist(values: list[float | None]) -> dict[str, float | int | None]:
    """n, p50, p95, p99, mean and max of the values that exist (ms)."""
    clean = [float(v) for v in values if v is not None]
    return {"n": len(clean), "p50": pct(clean, 50), "p95": pct(clean, 95), "p99": pct(clean, 99),
            "mean": round(float(np.mean(clean)), 2) if clean else None,
            "max": round(max(clean), 2) if clean else None}


def summarize(samples: list[TurnSample]) -> dict[str, Any]:
    """One (path, K) cell: the distribution of every column, plus the step time per step."""
    cols = [f for f in TurnSample.__dataclass_fields__ if f not in ("path", "calls", "round")]
    out: dict[str, Any] = {c: dist([getattr(s, c) for s in samples]) for c in cols}
    out["step_ms"] = dist([s.steps_ms / s.steps_to_first_frame for s in samples if s.steps_to_first_frame])
    return out


def cell(d: dict[str, Any], key: str, stat: str = "p50") -> str:
    value = d[key][stat]
    return "-" if value is None else f"{value:.1f}"


def print_table(results: dict[str, dict[str, Any]]) -> None:
    head = (f"{'path':<9}{'K':>3}{'n':>4} | {'TTFA p50':>8}{'p95':>7}{'p99':>7} | {'prep':>6}{'restore':>8}"
            f"{'steps':>6}{'1st frame':>10}{'step':>6}{'decode':>7}{'handoff':>8}{'resample':>9}{'pacing':>7}"
            f" | {'steady':>6}")
    print(head)
    print("-" * len(head))
    for path, by_k in results.items():
        for k, d in by_k.items():
            print(f"{path:<9}{k:>3}{d['ttfa_ms']['n']:>4} | {cell(d, 'ttfa_ms'):>8}{cell(d, 'ttfa_ms', 'p95'):>7}"
                  f"{cell(d, 'ttfa_ms', 'p99'):>7} | {cell(d, 'prepare_ms'):>6}{cell(d, 'restore_ms'):>8}"
                  f"{cell(d, 'steps_to_first_frame'):>6}{cell(d, 'first_frame_ms'):>10}{cell(d, 'step_ms'):>6}"
                  f"{cell(d, 'decode_ms'):>7}{cell(d, 'handoff_ms'):>8}{cell(d, 'resample_ms'):>9}"
                  f"{cell(d, 'pacing_ms'):>7} | {cell(d, 'steady_step_ms'):>6}")
    print("ms, p50 unless marked. TTFA = turn accepted → first 20 ms mu-law chunk handed to the socket = "
          "prep + restore + 1st frame (steps × step, decode included) + handoff + resample + pacing.\n"
          "step: mean engine step up to the first frame (mostly the continuation zone: no depformer); steady: step + "
          "decode per frame after it, shared by the K streams (real time needs < 80 ms).")


def write_png(path: Path, samples: list[TurnSample]) -> bool:
    """Box plots of TTFA per (path, K); False when matplotlib is not installed (not a dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = sorted({(s.path, s.calls) for s in samples}, key=lambda k: (PATHS.index(k[0]), k[1]))
    fig, ax = plt.subplots(figsize=(1.2 * len(keys) + 3, 4))
    ax.boxplot([[s.ttfa_ms for s in samples if (s.path, s.calls) == k] for k in keys], whis=(1, 99))
    ax.set_xticks(range(1, len(keys) + 1), [f"{p}\nK={k}" for p, k in keys])
    ax.set_ylabel("server-side time to first audio (ms)")
    ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", default="1,4,16", help="concurrent turns per round, comma-separated (default 1,4,16)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per K (default 8; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="2 timed rounds per K: a CI-sized run")
    p.add_argument("--shape", choices=SHAPES, default="tiny", help="random checkpoint of this shape")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quality", default=Settings().audio.resampler_quality, help="resampler quality (service default)")
    p.add_argument("--lead-ms", type=float, default=float(Settings().audio.lead_ms), help="pacer lead (service default)")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--png", type=Path, default=None, help="box plots of TTFA (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        args.calls = tuple(int(k) for k in args.calls.split(","))
    except ValueError:
        p.error(f"--calls {args.calls!r}: expected comma-separated integers, e.g. 1,4,16")
    if not args.calls or min(args.calls) < 1:
        p.error(f"--calls {args.calls}: every K must be >= 1")
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds {args.rounds}: must be >= 1")
    return args


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    t_load = time.perf_counter()
    runtime = Dia2.load(model_folder(args.shape), device=args.device, progress=False)
    load_s = time.perf_counter() - t_load
    prompt = demo_voice_prompt()  # the voice the service itself builds for the random model
    t_build = time.perf_counter()
    snapshot = await asyncio.to_thread(build_snapshot, runtime, prompt)
    build_s = time.perf_counter() - t_build
    plan = Plan(calls=args.calls, rounds=args.rounds or (2 if args.quick else 8), warm_rounds=1,
                quality=args.quality, lead_ms=args.lead_ms, max_frames=QUICK_MAX_FRAMES if args.quick else None,
                timeout_s=60.0 if args.quick else 300.0)

    ours = await run_path("restored", runtime, snapshot, prompt, plan)
    switch, eager_note = eager_switch(runtime.device)
    with switch:
        naive = await run_path("naive", runtime, snapshot, prompt, plan)
    samples = ours.samples + naive.samples

    results = {path: {str(k): summarize([s for s in samples if s.path == path and s.calls == k])
                      for k in plan.calls} for path in PATHS}
    return {
        "device": device_name(runtime.device),
        "shape": args.shape,
        "commit": git_commit(),
        "dtype": str(runtime.model.dtype).removeprefix("torch."),
        "cpu_threads": torch.get_num_threads(),
        "calls": list(plan.calls),
        "rounds": plan.rounds,
        "quick": args.quick,
        "texts": list(TURN_TEXTS),
        "prompt_frames": snapshot.prompt_frames,
        "resampler_quality": plan.quality,
        "lead_ms": plan.lead_ms,
        "max_frames": plan.max_frames,
        "naive_eager": eager_note,
        "cuda_graphs": {"restored": ours.cuda_graphs, "naive": naive.cuda_graphs},
        "load_s": round(load_s, 3),
        "snapshot_build_s": round(build_s, 3),
        "worker_warm_up_s": {"restored": round(ours.warm_up_s, 3), "naive": round(naive.warm_up_s, 3)},
        "results": results,
        "samples": [asdict(s) for s in samples],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = asyncio.run(bench(args))
    print(f"shape {report['shape']}, {report['device']} {report['dtype']}, {report['cpu_threads']} CPU threads, "
          f"prompt {report['prompt_frames']} frames, {report['rounds']} timed round(s) per K after 1 warm-up, "
          f"resampler {report['resampler_quality']}, lead {report['lead_ms']:.0f} ms; CUDA graphs: "
          f"restored {'on' if report['cuda_graphs']['restored'] else 'off'}, naive {report['naive_eager']}")
    print_table(report["results"])
    if args.json:
        write_json(args.json, report)
    if args.png:
        samples = [TurnSample(**s) for s in report["samples"]]
        print(f"wrote {args.png}" if write_png(args.png, samples) else "no PNG: matplotlib is not installed")
    return report


if __name__ == "__main__":
    main()
