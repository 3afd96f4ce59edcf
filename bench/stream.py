"""Streaming turn latency: snapshot restore vs. prompt prefill per turn, on a random checkpoint of a shape.

For a random checkpoint of the real shape (same compute per step as the released weights),
it builds one voice snapshot, then times text turns two ways in the same run:

- restored (ours): restore the snapshot into a slot (a memory copy), step until the first
  complete frame, decode it (time to first audio), keep stepping (steps per second);
- naive (what earlier Dia2 servers did): teacher-force the voice prompt on every turn
  (``Dia2.prefill_prompt``) and prime the Mimi decoder with it, then stream the same way.

Figures are the median (p50) over a few turns after one untimed warm-up turn; on CUDA the
device is synchronised before every clock read.

    python bench/stream.py [--shape tiny|1b|2b] [--quick] [--json PATH] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from common import make_clock, model_folder, write_json

from dia2 import Dia2, GenerationConfig, PromptClip, VoicePrompt
from dia2.audio_io import synthetic_speechlike
from dia2.random_checkpoint import SHAPES
from dia2.snapshot import VoiceSnapshot, build_snapshot
from dia2.stream import Stream, StreamRunner
from dia2.text import WordTiming

TURN_TEXT = "[S1] Thanks for calling. How can I help you today?"
S1_SECONDS, S2_SECONDS = 4.0, 1.5


@dataclass
class TurnFigures:
    """One timed turn. Times in ms; ``prepare_ms`` is the restore (ours) or the prompt prefill (naive)."""

    prepare_ms: float
    steps_to_first_frame: int
    ttfa_ms: float  # text known → first 24 kHz PCM frame on the host
    steps_per_s: float  # one stream, after its first frame


def synthetic_words(text: str, seconds: float) -> tuple[WordTiming, ...]:
    """Word timings spread evenly over the clip (what Whisper would give for real speech)."""
    words = text.split()
    span = seconds / (len(words) + 1)
    return tuple(WordTiming(w, (i + 0.5) * span, (i + 1.3) * span) for i, w in enumerate(words))


def voice_prompt() -> VoicePrompt:
    s1 = "Hello and welcome, my name is Ada and I will be your guide."
    s2 = "Hi Ada, nice to meet you."
    return VoicePrompt(
        s1=PromptClip(synthetic_speechlike(S1_SECONDS, seed=1), synthetic_words(s1, S1_SECONDS)),
        s2=PromptClip(synthetic_speechlike(S2_SECONDS, seed=2), synthetic_words(s2, S2_SECONDS)),
    )


def stream_turn(runner: StreamRunner, stream: Stream, now: Callable[[], float], t0: float,
                max_steps: int) -> tuple[int, float, float]:
    """Step ``stream`` to its first frame, then on for up to ``max_steps`` steps in all.

    Returns (steps to first frame, ms from ``t0`` to the first frame, steps/s after it).
    """
    first_at: float | None = None
    first_steps = 0
    steps = 0
    while not stream.done and steps < max_steps:
        runner.step()
        steps += 1
        if first_at is None and stream.frames:
            first_at = now()  # the frame's PCM is on the host already (decoded in the step)
            first_steps = steps
    end = now()
    stream.cancel()
    if first_at is None:
        raise RuntimeError(f"no frame within {max_steps} steps; raise the step budget")
    after = steps - first_steps
    rate = after / (end - first_at) if after and end > first_at else float("nan")
    return first_steps, (first_at - t0) * 1e3, rate


def restored_turn(runner: StreamRunner, snapshot: VoiceSnapshot, cfg: GenerationConfig,
                  now: Callable[[], float], max_steps: int) -> TurnFigures:
    t0 = now()
    stream = runner.start(snapshot, cfg, text=TURN_TEXT, close=True)
    restored = now()
    first_steps, ttfa_ms, rate = stream_turn(runner, stream, now, t0, max_steps)
    return TurnFigures((restored - t0) * 1e3, first_steps, ttfa_ms, rate)


def naive_turn(runtime: Dia2, runner: StreamRunner, snapshot: VoiceSnapshot, prompt: VoicePrompt,
               cfg: GenerationConfig, now: Callable[[], float], max_steps: int) -> TurnFigures:
    """Warm-up per turn: teacher-force the prompt and prime the decoder, then stream the same way."""
    slot = runner.engine.free_slots()[0]
    t0 = now()
    state, codes = runtime.prefill_prompt(runner.engine, slot, prompt)
    runner.decoder.reset_rows([slot])
    with torch.inference_mode():
        runner.decoder.decode(codes[None].to(runtime.codec.device), rows=[slot])
    live = VoiceSnapshot(manifest=snapshot.manifest, prompt=state, mimi_state=runner.decoder.get_row_state(slot))
    stream = runner.start(live, cfg, text=TURN_TEXT, close=True)
    warmed = now()
    first_steps, ttfa_ms, rate = stream_turn(runner, stream, now, t0, max_steps)
    return TurnFigures((warmed - t0) * 1e3, first_steps, ttfa_ms, rate)


def p50(values: list[float]) -> float:
    return float(statistics.median(values))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--quick", action="store_true", help="2 timed turns of at most 40 steps (default 5 of 120)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    turns, max_steps = (2, 40) if args.quick else (5, 120)

    t_load = time.perf_counter()
    runtime = Dia2.load(model_folder(args.shape), device=args.device, progress=False)
    load_s = time.perf_counter() - t_load
    device = runtime.device
    now = make_clock(device)
    prompt = voice_prompt()
    t_build = now()
    snapshot = build_snapshot(runtime, prompt)
    build_s = now() - t_build
    runner = StreamRunner(runtime, max_streams=1)

    restored: list[TurnFigures] = []
    naive: list[TurnFigures] = []
    # One untimed turn of each kind first (allocator, kernels, caches), then alternate them.
    restored_turn(runner, snapshot, GenerationConfig(seed=0), now, max_steps)
    naive_turn(runtime, runner, snapshot, prompt, GenerationConfig(seed=0), now, max_steps)
    for i in range(turns):
        cfg = GenerationConfig(seed=1 + i)
        restored.append(restored_turn(runner, snapshot, cfg, now, max_steps))
        naive.append(naive_turn(runtime, runner, snapshot, prompt, cfg, now, max_steps))

    report: dict[str, Any] = {
        "shape": args.shape,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "dtype": str(runtime.model.dtype).removeprefix("torch."),
        "turns": turns,
        "prompt_frames": snapshot.prompt_frames,
        "restore_ms": p50([r.prepare_ms for r in restored]),
        "steps_to_first_frame": int(p50([r.steps_to_first_frame for r in restored])),
        "ttfa_ms": p50([r.ttfa_ms for r in restored]),
        "steps_per_s": p50([r.steps_per_s for r in restored]),
        "naive_warmup_ms": p50([r.prepare_ms for r in naive]),
        "naive_steps_to_first_frame": int(p50([r.steps_to_first_frame for r in naive])),
        "naive_ttfa_ms": p50([r.ttfa_ms for r in naive]),
        "naive_steps_per_s": p50([r.steps_per_s for r in naive]),
        "load_s": load_s,
        "snapshot_build_s": build_s,
        "runs": {"restored": [asdict(r) for r in restored], "naive": [asdict(r) for r in naive]},
    }
    print(f"shape {args.shape}, {report['device']} {report['dtype']}, {torch.get_num_threads()} CPU threads, "
          f"prompt {snapshot.prompt_frames} frames ({snapshot.prompt_frames / runtime.frame_rate:.1f} s), "
          f"p50 of {turns} turns; load {load_s:.1f} s, snapshot build {build_s * 1e3:.0f} ms")
    print(f"{'path':<10} {'prepare ms':>11} {'steps→frame':>12} {'TTFA ms':>9} {'steps/s':>9}")
    print(f"{'restored':<10} {report['restore_ms']:>11.1f} {report['steps_to_first_frame']:>12d} "
          f"{report['ttfa_ms']:>9.1f} {report['steps_per_s']:>9.1f}")
    print(f"{'naive':<10} {report['naive_warmup_ms']:>11.1f} {report['naive_steps_to_first_frame']:>12d} "
          f"{report['naive_ttfa_ms']:>9.1f} {report['naive_steps_per_s']:>9.1f}")
    print("prepare = snapshot restore (restored) or prompt prefill + decoder priming (naive); "
          "TTFA = text known → first 24 kHz frame; real time needs 12.5 steps/s")
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
