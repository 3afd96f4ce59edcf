"""How many simultaneous calls one service keeps in real time: simulated Twilio calls on loopback.

The real service (``build_app``: webhook, media streams, the TTS worker thread, pacing) runs in
a child process; the simulator (``callbridge.sim``, acting as Twilio and modelling its
playback queue) runs in this one. Two processes, two event loops: a simulator starved by the
service's loop (or the other way round) would fake underruns that a real call never sees.
The simulator stamps media when its loop reads them, so it must not be starved of CPU either:
Twilio runs on other machines. On a small box the child runs at ``--service-nice`` (default
+5) so the light simulator gets a core first; the service's own underrun counter
(``service_underruns``, read from /metrics) is reported beside the callers' view, and a gap
the callers heard that the service did not count points at the simulator, not the service.

N calls are placed at once, each speaking the same short text turns; N goes 1, 2, 4, 8, … up to
``--max-calls``, then bisects between the last N that held and the first that did not. A run
holds when every call was answered, got audio for every turn, and heard it with no underrun
(no dry spell in Twilio's queue inside a turn) and nothing lost or reordered. The answer,
``max_realtime_calls``, is the largest N that held (0 when even one call did not).

Everything is bounded: each call by ``max_call_s``, the sweep by ``--time-limit-s`` (a step
that would not fit is skipped and the report says so), the service's start-up (model load,
voice snapshot, worker warm-up) and shutdown by their own timeouts. Only loopback addresses
are used.

    python bench/calls.py [--quick] [--max-calls N] [--shape tiny|1b|2b | --model PATH]
                          [--device cuda|cpu] [--time-limit-s S] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from common import git_commit, model_folder, write_json

from callbridge.config import Settings
from callbridge.sim import CallReport, SimConfig, run_simulation, summarize_reports

HOST = "127.0.0.1"  # the service listens here only
PUBLIC = "https://callbridge-bench.invalid"  # what "Twilio" signs over; never contacted
ACCOUNT_SID = "AC" + "0" * 32
SHAPES = ("tiny", "1b", "2b")  # dia2.random_checkpoint.SHAPES, without importing torch here
QUICK_TEXTS = ("Thanks for calling. Your order ships today.",)
FULL_TEXTS = (
    "Thanks for calling. How can I help you today?",
    "Your order ships tomorrow morning, and you will get a text message when it leaves the warehouse.",
)
STARTUP_TIMEOUT_S = 600.0  # model load + voice snapshot + worker warm-up in the child
STOP_TIMEOUT_S = 30.0
_UNDERRUNS = re.compile(r"^callbridge_underruns_total\s+([0-9.eE+-]+)$", re.MULTILINE)


# ---------------------------------------------------------------------------- the service (child)


@dataclass(frozen=True)
class ServiceSpec:
    """What the child process serves: settings (port 0: the child picks one) and the model to use."""

    settings: Settings
    shape: str | None  # a random checkpoint of this shape, written once under out/bench-models
    model: str | None  # or a real model folder / hub id
    nice: int = 0  # added to the child's niceness (Unix)


def serve(spec: ServiceSpec, conn: multiprocessing.connection.Connection) -> None:
    """Child process entry: run the service until the parent says stop (or goes away).

    Sends ``{"port", "device", "max_streams"}`` once the service is ready, or ``{"error"}``.
    """
    logging.basicConfig(level=logging.WARNING, format="service %(levelname)s %(name)s: %(message)s")
    if spec.nice and hasattr(os, "nice"):
        os.nice(spec.nice)
    try:
        asyncio.run(_serve(spec, conn))
    except Exception as exc:  # top of the process: tell the parent rather than die silently
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        raise


async def _serve(spec: ServiceSpec, conn: multiprocessing.connection.Connection) -> None:
    from aiohttp import web

    from callbridge.web.app import build_app  # torch is imported here, in the child only
    from callbridge.web.services import SERVICES

    settings = spec.settings
    if spec.model is None:
        assert spec.shape is not None
        settings = settings.with_(model={"model": str(model_folder(spec.shape))})
    app = build_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=settings.server.shutdown_timeout_s)
    await runner.setup()  # runs cleanup_ctx: model, voices, the TTS worker and its warm-up
    try:
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        svc = app[SERVICES]
        assert svc.runtime is not None and svc.worker is not None
        device = svc.runtime.device
        name = str(device)
        if device.type == "cuda":
            import torch

            name += f" ({torch.cuda.get_device_name(device)})"
        conn.send({"port": runner.addresses[0][1], "device": name, "max_streams": svc.worker.capacity,
                   "dtype": str(svc.runtime.model.dtype).removeprefix("torch.")})
        # Wait on a thread so the service's loop keeps running; EOFError: the parent is gone.
        with contextlib.suppress(EOFError):
            await asyncio.to_thread(conn.recv)
    finally:
        await runner.cleanup()


@dataclass
class ServiceProcess:
    """The child process and its pipe; ``stop`` is bounded and always leaves no child behind."""

    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, spec: ServiceSpec, timeout_s: float) -> ServiceProcess:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited loop or threads
        parent, child = ctx.Pipe()
        process = ctx.Process(target=serve, args=(spec, child), name="callbridge-bench-service", daemon=True)
        process.start()
        child.close()
        service = cls(process, parent)
        if not parent.poll(timeout_s):
            service.stop()
            raise RuntimeError(f"the service did not start within {timeout_s:.0f} s")
        try:
            info = parent.recv()
        except EOFError:
            service.stop()
            raise RuntimeError(f"the service process exited during start-up (exit code {process.exitcode})") from None
        if "error" in info:
            service.stop()
            raise RuntimeError(f"the service failed to start: {info['error']}")
        service.info = info
        return service

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.info['port']}"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        with contextlib.suppress(OSError, ValueError):  # the child is gone already
            self.conn.send("stop")
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        self.conn.close()


# ---------------------------------------------------------------------------- one step of the sweep


@dataclass
class StepResult:
    """N simultaneous calls: what the callers heard (simulator) and what the service counted."""

    calls: int
    realtime: bool
    underruns: int
    gaps_ms_max: float
    ttfa_ms: dict[str, float | None]  # p50, p95, max over every text turn of every call
    lost_or_reordered: int
    rejected: int
    protocol_errors: int
    turns_without_audio: int
    errors: list[str]
    service_underruns: int | None  # callbridge_underruns_total during this step (the writer's own count)
    wall_s: float


def _turns_without_audio(report: CallReport, texts: int) -> int:
    heard = [v for v in report.ttfa_ms["per_turn"] if v is not None]
    return max(0, texts - len(heard))


async def _service_underruns(http: aiohttp.ClientSession, base_url: str) -> int | None:
    """The service's own underrun counter from /metrics (None when it cannot be read)."""
    try:
        async with http.get(f"{base_url}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            found = _UNDERRUNS.search(await resp.text())
    except (aiohttp.ClientError, TimeoutError):
        return None
    return int(float(found.group(1))) if found else None


async def run_step(cfg: SimConfig, texts: int, http: aiohttp.ClientSession) -> StepResult:
    """Place ``cfg.calls`` calls at once and judge them."""
    before = await _service_underruns(http, cfg.base_url)
    started = time.monotonic()
    reports = await run_simulation(cfg)
    wall_s = time.monotonic() - started
    after = await _service_underruns(http, cfg.base_url)
    s = summarize_reports(reports)
    missing = sum(_turns_without_audio(r, texts) for r in reports if not r.rejected)
    result = StepResult(
        calls=cfg.calls,
        realtime=False,
        underruns=s["underruns"],
        gaps_ms_max=s["gaps_ms"]["max"],
        ttfa_ms={k: s["ttfa_ms"][k] for k in ("p50", "p95", "max")},
        lost_or_reordered=s["lost_or_reordered"],
        rejected=s["rejected"],
        protocol_errors=s["protocol_errors"],
        turns_without_audio=missing,
        errors=s["errors"][:10],
        service_underruns=None if before is None or after is None else after - before,
        wall_s=round(wall_s, 2),
    )
    result.realtime = not (result.underruns or result.lost_or_reordered or result.rejected
                           or result.protocol_errors or missing or result.errors)
    return result


def ladder(max_calls: int) -> list[int]:
    """1, 2, 4, … up to ``max_calls``, which is always the last rung."""
    rungs = [1]
    while rungs[-1] * 2 < max_calls:
        rungs.append(rungs[-1] * 2)
    if rungs[-1] != max_calls:
        rungs.append(max_calls)
    return rungs


@dataclass
class Sweep:
    """The sweep's state: every step run, the bracket, and why it stopped."""

    deadline: float  # time.monotonic() by which the sweep must be over
    steps: list[StepResult] = field(default_factory=list)
    held: int = 0  # largest N that held
    failed: int | None = None  # smallest N that did not
    stopped_by: str = "done"

    def fits(self, estimate_s: float) -> bool:
        return time.monotonic() + estimate_s <= self.deadline

    def record(self, step: StepResult) -> None:
        self.steps.append(step)
        if step.realtime:
            self.held = max(self.held, step.calls)
        else:
            self.failed = step.calls if self.failed is None else min(self.failed, step.calls)


async def sweep(make_cfg: Callable[[int], SimConfig], texts: int, max_calls: int, bisect: bool, deadline: float,
                first_estimate_s: float) -> Sweep:
    """Double N until a step fails (or ``max_calls``), then bisect; each step only if it fits in time."""
    state = Sweep(deadline=deadline)
    estimate = first_estimate_s
    async with aiohttp.ClientSession() as http:

        async def step(n: int) -> bool:
            nonlocal estimate
            if not state.fits(estimate):
                state.stopped_by = f"time limit (next step: {n} calls, ~{estimate:.0f} s)"
                return False
            result = await run_step(make_cfg(n), texts, http)
            state.record(result)
            print(format_step(result), flush=True)
            estimate = max(estimate, 1.5 * result.wall_s)  # more calls take no less time
            return True

        for n in ladder(max_calls):
            if not await step(n) or state.failed is not None:
                break
        while bisect and state.failed is not None and state.failed - state.held > 1:
            if not await step((state.held + state.failed) // 2):
                break
    if state.failed is None and state.held == max_calls:
        state.stopped_by = "reached --max-calls: the answer is a lower bound"
    return state


# ---------------------------------------------------------------------------- report


def format_step(r: StepResult) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    verdict = "real time" if r.realtime else "NOT real time"
    extra = f"; {r.errors[0]}" if r.errors else ""
    return (f"{r.calls:>4} calls: {verdict:<13} underruns {r.underruns:>3} (max gap {r.gaps_ms_max:>5.0f} ms, "
            f"service {r.service_underruns if r.service_underruns is not None else '-'}), "
            f"ttfa p50/p95 {ms(r.ttfa_ms['p50'])}/{ms(r.ttfa_ms['p95'])} ms, lost/reordered {r.lost_or_reordered}, "
            f"rejected {r.rejected}, no-audio turns {r.turns_without_audio}, {r.wall_s:.1f} s{extra}")


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized: up to 4 calls, one short turn, no bisection")
    p.add_argument("--max-calls", type=int, default=None, help="largest N tried (default 32; 4 with --quick)")
    p.add_argument("--shape", choices=SHAPES, default="tiny", help="random checkpoint of this shape (default tiny)")
    p.add_argument("--model", default=None, help="a real model folder or hub id instead of a random checkpoint")
    p.add_argument("--voices", default=None, help="voices folder for --model (default: the service's)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (the service's setting)")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="bound on the sweep, after the service is up (default 1800; 60 with --quick)")
    p.add_argument("--no-bisect", action="store_true", help="stop at the first failing power of two")
    p.add_argument("--service-nice", type=int, default=5, help="niceness added to the service process (0: none)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    args.max_calls = args.max_calls or (4 if args.quick else 32)
    args.time_limit_s = args.time_limit_s or (60.0 if args.quick else 1800.0)
    if not 1 <= args.max_calls <= 1000:
        p.error(f"--max-calls {args.max_calls}: expected 1..1000 (the simulator's bound)")
    if args.time_limit_s <= 0:
        p.error(f"--time-limit-s {args.time_limit_s}: must be > 0")
    return args


def service_settings(args: argparse.Namespace, auth_token: str, api_token: str, voices_dir: str) -> Settings:
    """The service as deployed, on loopback: signatures and the API token checked, one slot per call."""
    return Settings().with_(
        server={"host": HOST, "port": 0, "public_base_url": PUBLIC, "shutdown_timeout_s": 2.0},
        auth={"enabled": True, "api_token": api_token},
        twilio={"auth_token": auth_token, "account_sid": ACCOUNT_SID},
        model={"model": args.model or "random-tiny", "device": args.device},
        voices={"dir": voices_dir},
        tts={"max_streams": args.max_calls},
        calls={"max_calls": args.max_calls},
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.monotonic()
    texts = QUICK_TEXTS if args.quick else FULL_TEXTS
    auth_token, api_token = secrets.token_hex(16), secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="bench-calls-") as tmp:
        # The random model gets the service's generated demo voice (no voice folder on disk).
        voices_dir = args.voices or (Settings().voices.dir if args.model else str(Path(tmp) / "voices"))
        spec = ServiceSpec(service_settings(args, auth_token, api_token, voices_dir),
                           shape=None if args.model else args.shape, model=args.model, nice=args.service_nice)
        service = ServiceProcess.start(spec, STARTUP_TIMEOUT_S)
        try:
            ready_s = time.monotonic() - started
            deadline = time.monotonic() + args.time_limit_s  # the sweep's bound; start-up has its own
            print(f"service up on {service.base_url} in {ready_s:.1f} s: {service.info['device']} "
                  f"{service.info['dtype']}, {service.info['max_streams']} TTS slots, nice +{args.service_nice}; "
                  f"{len(texts)} turn(s) per call, {os.cpu_count()} CPUs here",
                  flush=True)

            def make_cfg(n: int) -> SimConfig:
                return SimConfig(base_url=service.base_url, public_base_url=PUBLIC, twilio_auth_token=auth_token,
                                 account_sid=ACCOUNT_SID, api_token=api_token, texts=list(texts), calls=n,
                                 max_call_s=60.0 if args.quick else 300.0,
                                 turn_timeout_s=20.0 if args.quick else 60.0)

            # A first guess at one step's length, corrected by every step run.
            result = asyncio.run(sweep(make_cfg, len(texts), args.max_calls, bisect=not (args.quick or args.no_bisect),
                                       deadline=deadline, first_estimate_s=10.0 * len(texts)))
        finally:
            service.stop()
    report: dict[str, Any] = {
        "device": service.info["device"],
        "shape": "custom" if args.model else args.shape,
        "model": args.model,
        "commit": git_commit(),
        "dtype": service.info["dtype"],
        "quick": args.quick,
        "max_calls": args.max_calls,
        "texts": list(texts),
        "time_limit_s": args.time_limit_s,
        "service_nice": args.service_nice,
        "cpu_count": os.cpu_count(),
        "service_start_s": round(ready_s, 2),
        "max_realtime_calls": result.held,
        "first_failing_calls": result.failed,
        "stopped_by": result.stopped_by,
        "steps": [asdict(s) for s in result.steps],
        "wall_s": round(time.monotonic() - started, 1),
    }
    held = f"{result.held}" + ("" if result.failed is None else f" (fails at {result.failed})")
    print(f"max_realtime_calls: {held}; sweep {result.stopped_by}; {report['wall_s']:.0f} s in all")
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
