"""``python -m dia2``: generate, trace, random-checkpoint. Errors print one line, not a traceback."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import Dia2Error


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _read_words(path: Path):  # type: ignore[no-untyped-def]
    from .text import WordTiming

    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise Dia2Error(f"word timings file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise Dia2Error(f"{path}: not valid JSON ({exc})") from None
    if isinstance(raw, dict) and "words" in raw:
        raw = raw["words"]
    if not isinstance(raw, list):
        raise Dia2Error(f"{path}: expected a JSON list of {{\"word\", \"start\", \"end\"}} objects")
    words = []
    for i, item in enumerate(raw):
        try:
            words.append(WordTiming(str(item["word"]), float(item["start"]), float(item["end"])))
        except (KeyError, TypeError, ValueError):
            raise Dia2Error(f"{path}: item {i} must have 'word', 'start' and 'end' (seconds)") from None
    return tuple(words)


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .audio_io import read_prompt_wav, write_wav
    from .runtime import Dia2, PromptClip, VoicePrompt
    from .sampling import GenerationConfig, SamplingParams

    text = args.text
    if args.text_file:
        text = Path(args.text_file).read_text()
    if text is None:
        raise Dia2Error("give the text with --text or --text-file")
    prompt = None
    if args.prompt:
        if not args.prompt_words:
            raise Dia2Error("--prompt needs --prompt-words (a JSON list of {word, start, end} in seconds)")
        prompt = VoicePrompt(s1=PromptClip(read_prompt_wav(args.prompt), _read_words(Path(args.prompt_words))))
    from .checkpoint import pick_device_and_dtype
    from .random_checkpoint import resolve_random_model

    model = resolve_random_model(args.model, say=_say)
    device, _ = pick_device_and_dtype(args.device, args.dtype)
    set_cpu_threads(device.type, args.threads)
    runtime = Dia2.load(model, device=args.device, dtype=args.dtype, mimi=args.mimi, say=_say)
    cfg = GenerationConfig(
        text=SamplingParams(args.text_temperature, args.top_k),
        audio=SamplingParams(args.temperature, args.top_k),
        cfg_scale=args.cfg_scale,
        cfg_filter_k=args.cfg_filter_k,
        initial_padding=args.initial_padding,
        seed=args.seed,
    )
    bar = tqdm(total=1, desc="generating", unit="step", leave=False, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    start = time.perf_counter()
    try:
        result = runtime.generate(text, prompt=prompt, config=cfg, progress=progress)
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    out = write_wav(args.out, result.audio, result.sample_rate)
    seconds = len(result.audio) / result.sample_rate
    _say(f"wrote {out}: {seconds:.2f} s of audio, {result.steps} steps in {elapsed:.2f} s "
         f"({result.steps / max(elapsed, 1e-9):.1f} steps/s){' [truncated at the context limit]' if result.truncated else ''}")
    words = [{"word": w, "start": round(t, 3)} for w, t in result.words]
    if args.words_out:
        Path(args.words_out).write_text(json.dumps(words, indent=2) + "\n")
    print(json.dumps({"wav": str(out), "seconds": round(seconds, 3), "steps": result.steps, "words": words}))
    return 0


def set_cpu_threads(device_type: str, threads: int | None) -> None:
    """On CPU, run torch with ``threads`` intra-op threads (default 1). A step is thousands of
    small ops; on the main thread each one is an OpenMP parallel region whose team spin-waits,
    and on a CPU shared with other work that made generation ~20x slower than the same step on
    the service's worker thread (0.3 against 5.7 steps/s for the tiny model on 2 busy cores)."""
    if device_type == "cpu":
        import torch

        torch.set_num_threads(threads or 1)


def cmd_trace(args: argparse.Namespace) -> int:
    from .checkpoint import load_model, pick_device_and_dtype, resolve_checkpoint
    from .trace import run_trace_files

    files = resolve_checkpoint(args.model, progress=_say)
    dev, dt = pick_device_and_dtype(args.device, args.dtype)
    model = load_model(files, device=dev, dtype=dt, progress=True)
    result = run_trace_files(model, Path(args.tokens), Path(args.out))
    shapes = {k: list(v.shape) for k, v in result.items()}
    _say(f"wrote {args.out}: {shapes}")
    return 0


def cmd_random_checkpoint(args: argparse.Namespace) -> int:
    from .random_checkpoint import write_random_checkpoint

    _say(f"writing a random {args.shape} checkpoint to {args.out} (seed {args.seed})")
    out = write_random_checkpoint(args.out, args.shape, seed=args.seed, mimi=args.mimi,
                                  depformer_text_embedding=args.depformer_text_embedding)
    _say(f"done: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dia2", description="Dia2 runtime tools")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="speak a script to a WAV file")
    gen.add_argument("--model", required=True,
                     help="model folder, hub repo id, or random-tiny (a tiny random checkpoint, written once "
                          "to $DIA2_CACHE or ~/.cache/dia2)")
    gen.add_argument("--text", help='script, e.g. "[S1] Hello there."')
    gen.add_argument("--text-file", help="read the script from a file")
    gen.add_argument("--out", required=True, help="output WAV path (24 kHz mono)")
    gen.add_argument("--prompt", help="S1 voice prompt, 24 kHz mono WAV")
    gen.add_argument("--prompt-words", help="JSON word timings of the prompt: [{word, start, end}] in seconds")
    gen.add_argument("--words-out", help="write the generated words with start times (JSON)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    gen.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16 (CPU always runs float32)")
    gen.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch (default 1: the step is many small ops; more only helps a "
                          "large model on an otherwise idle machine)")
    gen.add_argument("--mimi", default=None, help="Mimi folder or hub id (default: from the checkpoint, else kyutai/mimi)")
    gen.add_argument("--cfg-scale", type=float, default=2.0)
    gen.add_argument("--cfg-filter-k", type=int, default=50)
    gen.add_argument("--temperature", type=float, default=0.8, help="audio temperature")
    gen.add_argument("--text-temperature", type=float, default=0.6)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--initial-padding", type=int, default=2)
    gen.set_defaults(func=cmd_generate)

    tr = sub.add_parser("trace", help="teacher-forced logits for given tokens")
    tr.add_argument("--model", required=True)
    tr.add_argument("--tokens", required=True, help="safetensors with int64 'tokens' [B, C, T+1]")
    tr.add_argument("--out", required=True)
    tr.add_argument("--device", default=None)
    tr.add_argument("--dtype", default="auto")
    tr.set_defaults(func=cmd_trace)

    rc = sub.add_parser("random-checkpoint", help="write a random model folder in the official layout")
    rc.add_argument("--out", required=True)
    rc.add_argument("--shape", choices=["tiny", "1b", "2b"], default="tiny")
    rc.add_argument("--seed", type=int, default=0)
    rc.add_argument("--mimi", choices=["tiny", "full"], default=None, help="Mimi size (default: tiny for tiny, else full)")
    rc.add_argument("--depformer-text-embedding", action="store_true",
                    help="give the depformer a text embedding (config text_embedding: true; released models have none)")
    rc.set_defaults(func=cmd_random_checkpoint)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Dia2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
