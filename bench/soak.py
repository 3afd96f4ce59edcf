"""Soak: N simulated calls for M minutes against the service on loopback; nothing lost, nothing leaked.

    python bench/soak.py [--calls N] [--minutes M] [--quick] [--json PATH]

The service runs in this process (tiny random checkpoint, CPU, real TTS worker thread); the
simulated callers run in a child process (``--child``), so a busy simulator cannot starve the
service's event loop and fake underruns, nor the other way round. ``--calls`` lanes each place
calls back to back until ``--minutes`` have passed, cycling through scenarios: POSTed turns,
streamed text, barge-in, greeting + DTMF, and a network drop with no ``stop``.

Measured (per call, matched by CallSid between the two processes):

- ``lost_chunks``: media the service handed to the socket that the caller never received;
  ``reordered_chunks``: media of calls that arrived complete but whose CRC-32 chain (the
  order-sensitive digest of every payload, kept by both sides) differs. Both must be 0.
- ``lost_marks`` / ``reordered_marks``: the same for marks (echo order is checked by the
  service's protocol state and by the simulator's playout queue). Must be 0.
- ``underruns``: gaps the caller heard inside a turn (and ``service_underruns``, the sends the
  pacer found late). Reported, not an invariant: a loaded 2-core box can underrun.
- ``rss_growth_mb``, ``open_fds_growth``: of the service process, from after a warm-up round
  (all lanes once, the service idle again) to the end (idle again, after a GC).
- ``leaked_stream_slots``: ``worker.active`` once every call has ended; with
  ``leaked_reservations`` (slots still held) and ``leaked_tokens``. Must be 0.

Exit status: 0 when every invariant holds, 1 when one fails, 2 for bad arguments.
``--quick`` (3 lanes, 35 s of calls) finishes in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from common import model_folder, write_json

from callbridge.sim.ports import free_tcp_port

PUBLIC = "https://soak.callbridge.invalid"  # what "Twilio" signs over; never contacted
MAX_CALL_S = 60.0
CHILD_GRACE_S = MAX_CALL_S + 30.0  # past the deadline, the child is killed after this
TEXTS = [
    "Thanks for calling. Your order ships tomorrow morning.",
    "Sure, let me check that for you. One moment please.",
    "I can move your appointment to Tuesday at ten.",
    "This is a longer answer so that the caller has time to talk over it, which they will.",
]


# ---------------------------------------------------------------------------- the child: callers


def _scenario(i: int, lane: int) -> dict[str, Any]:
    """Call ``i`` of ``lane``: settings for SimConfig, cycling through five kinds of call."""
    kind = (i + lane) % 5
    text = TEXTS[(i + 2 * lane) % len(TEXTS)]
    if kind == 0:
        return {"kind": "posted", "texts": [text, TEXTS[(i + 1) % len(TEXTS)]]}
    if kind == 1:
        return {"kind": "streamed", "texts": [text], "stream_text": True}
    if kind == 2:
        return {"kind": "barge_in", "texts": [TEXTS[3]], "stream_text": True, "barge_in_at_s": 1.0, "speech_s": 1.5}
    if kind == 3:
        return {"kind": "greeting_dtmf", "texts": [text], "webhook_query": {"greeting": "Hello there."},
                "dtmf": [(0.5, "5")]}
    return {"kind": "network_drop", "texts": [text], "drop_network": True}


def _install_media_tap(digests: dict[str, list[int]]) -> None:
    """Chain CRC-32 over every media payload each stream receives, before the simulator looks.

    Taps aiohttp's client ``receive`` in this (child) process only: what arrived on the wire,
    whatever the simulator then does with it (it ignores messages after its ``stop``).
    """
    import base64
    import zlib

    import aiohttp

    original = aiohttp.ClientWebSocketResponse.receive

    async def receive(self: aiohttp.ClientWebSocketResponse, timeout: float | None = None) -> aiohttp.WSMessage:
        msg = await original(self, timeout)
        if msg.type is aiohttp.WSMsgType.TEXT and msg.data.startswith('{"event":"media"'):
            data = json.loads(msg.data)
            payload = base64.b64decode(data["media"]["payload"])
            entry = digests.setdefault(data["streamSid"], [0, 0])
            entry[0] = zlib.crc32(payload, entry[0])
            entry[1] += 1
        return msg

    aiohttp.ClientWebSocketResponse.receive = receive  # type: ignore[method-assign]


async def _child_main(args: argparse.Namespace) -> None:
    import logging

    from callbridge.sim import SimConfig, simulate_call

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    digests: dict[str, list[int]] = {}
    _install_media_tap(digests)
    env = os.environ
    base = {"base_url": args.base_url, "public_base_url": PUBLIC, "twilio_auth_token": env["SOAK_TWILIO_AUTH_TOKEN"],
            "account_sid": env["SOAK_ACCOUNT_SID"], "api_token": env["SOAK_API_TOKEN"], "max_call_s": MAX_CALL_S}
    results: list[dict[str, Any]] = []

    async def place(i: int, lane: int) -> None:
        scenario = _scenario(i, lane)
        kind = scenario.pop("kind")
        report = (await simulate_call(SimConfig(**base, **scenario), lane)).to_json()
        digest = digests.pop(report["stream_sid"] or "", [0, 0])
        results.append({
            "kind": kind, "lane": lane, "call_sid": report["call_sid"], "rejected": report["rejected"],
            "error": report["error"], "protocol_errors": report["protocol_errors"][:5],
            "protocol_error_count": report["protocol_error_count"], "chunks": report["chunks"],
            "media_received": digest[1], "media_crc32": digest[0], "marks_sent": report["marks_sent"],
            "marks_echoed": report["marks_echoed"], "marks_out_of_order": report["marks_out_of_order"],
            "lost_or_reordered": report["lost_or_reordered"], "underruns": report["underruns"],
            "gaps_ms": report["gaps_ms"], "ttfa_ms_p50": report["ttfa_ms"]["p50"], "clears": report["clears"],
            "ended_by": report["ended_by"],
        })

    # Warm-up: one short call per lane; then wait for the parent to sample its baseline.
    await asyncio.gather(*(place(10_000 + lane, lane) for lane in range(args.calls)))
    warm = len(results)
    print("WARM", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    deadline = time.monotonic() + args.seconds

    async def lane_loop(lane: int) -> None:
        i = 0
        while time.monotonic() < deadline and i < args.max_calls_per_lane:
            await place(i, lane)
            i += 1

    await asyncio.gather(*(lane_loop(lane) for lane in range(args.calls)))
    print("RESULT " + json.dumps({"warm_up": results[:warm], "calls": results[warm:]}), flush=True)


# ---------------------------------------------------------------------------- the parent: service


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak, where /proc is absent


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


async def _quiet(svc: Any, timeout_s: float = 15.0) -> bool:
    """Wait until no call, no pending stream token and no TTS turn is left (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not svc.calls and not svc.tokens.tokens and svc.worker.active == 0:
            return True
        await asyncio.sleep(0.05)
    return False


def _compare(service: dict[str, dict[str, Any]], callers: list[dict[str, Any]]) -> dict[str, Any]:
    """Per call: what the service sent against what the caller received."""
    lost = reordered = extra = lost_marks = reordered_marks = 0
    unmatched: list[str] = []
    for call in callers:
        if call["rejected"] or call["chunks"] == 0 and call["call_sid"] not in service:
            continue
        sent = service.get(call["call_sid"])
        if sent is None:
            unmatched.append(call["call_sid"])
            continue
        got = call["media_received"]
        lost += max(0, sent["chunks_sent"] - got)
        extra += max(0, got - sent["chunks_sent"])
        if got == sent["chunks_sent"] and call["media_crc32"] != sent["media_crc32"]:
            reordered += got
        lost_marks += max(0, sent["marks_sent"] - call["marks_sent"])
        reordered_marks += sent["marks_out_of_order"] + sent["marks_unknown"] + call["marks_out_of_order"]
    return {"lost_chunks": lost, "reordered_chunks": reordered, "unexpected_chunks": extra,
            "lost_marks": lost_marks, "reordered_marks": reordered_marks, "unmatched_calls": unmatched}


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    import gc
    import logging
    import tempfile

    from aiohttp import web

    from callbridge.calls.call import Call
    from callbridge.config import Settings
    from callbridge.web.app import build_app
    from callbridge.web.services import SERVICES
    from dia2 import Dia2

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    started = time.monotonic()
    runtime = await asyncio.to_thread(Dia2.load, model_folder("tiny"), device="cpu", progress=False)
    secrets_env = {"SOAK_TWILIO_AUTH_TOKEN": secrets.token_hex(16), "SOAK_API_TOKEN": secrets.token_hex(16),
                   "SOAK_ACCOUNT_SID": "AC" + secrets.token_hex(16)}
    port = free_tcp_port()
    voices = tempfile.TemporaryDirectory(prefix="soak-voices-")
    settings = Settings().with_(
        server={"host": "127.0.0.1", "port": port, "public_base_url": PUBLIC, "shutdown_timeout_s": 2.0},
        auth={"enabled": True, "api_token": secrets_env["SOAK_API_TOKEN"]},
        twilio={"auth_token": secrets_env["SOAK_TWILIO_AUTH_TOKEN"], "account_sid": secrets_env["SOAK_ACCOUNT_SID"],
                "api_base_url": f"http://127.0.0.1:{free_tcp_port()}"},
        voices={"dir": voices.name},
        tts={"max_streams": args.calls},
        calls={"max_calls": args.calls},
    )
    app = build_app(settings, runtime=runtime)
    svc = app[SERVICES]
    seen: dict[str, dict[str, Any]] = {}

    def observe(call: Call) -> None:
        s = call.stats
        seen[call.call_sid] = {"chunks_sent": s.chunks_sent, "media_crc32": s.media_crc32, "marks_sent": s.marks_sent,
                               "marks_out_of_order": s.marks_out_of_order,
                               "marks_unknown": s.marks_unknown, "underruns": s.underruns,
                               "end_reason": call.end_reason, "failed_turns": s.failed_turns}

    svc.call_observers.append(observe)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    startup_s = time.monotonic() - started
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), "--child", "--base-url", f"http://127.0.0.1:{port}",
        "--calls", str(args.calls), "--seconds", str(args.seconds), "--max-calls-per-lane", str(args.max_calls_per_lane),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env={**os.environ, **secrets_env},
    )
    assert child.stdin is not None and child.stdout is not None
    result: dict[str, Any] | None = None
    baseline: dict[str, float] = {}
    try:
        async with asyncio.timeout(args.seconds + CHILD_GRACE_S + 60):
            while (line := (await child.stdout.readline()).decode()):
                if line.startswith("WARM"):
                    await _quiet(svc)
                    gc.collect()
                    baseline = {"rss_mb": _rss_mb(), "fds": _open_fds(), "t": time.monotonic()}
                    child.stdin.write(b"go\n")
                    await child.stdin.drain()
                elif line.startswith("RESULT "):
                    result = json.loads(line[7:])
            await child.wait()
    except TimeoutError:
        child.kill()
        await child.wait()
    soak_s = time.monotonic() - baseline.get("t", time.monotonic())
    quiet = await _quiet(svc)
    gc.collect()
    worker = svc.worker
    assert worker is not None
    leaks = {"leaked_stream_slots": worker.active, "leaked_reservations": worker.capacity - worker.free,
             "leaked_tokens": len(svc.tokens.tokens), "calls_left": len(svc.calls)}
    rss_growth = _rss_mb() - baseline.get("rss_mb", _rss_mb())
    fds_growth = _open_fds() - int(baseline.get("fds", _open_fds()))
    await runner.cleanup()
    voices.cleanup()
    if result is None:
        return {"error": f"the simulator process failed (exit {child.returncode})", "ok": False, **leaks}
    calls = result["calls"]
    compared = _compare(seen, result["warm_up"] + calls)
    failed = [c for c in result["warm_up"] + calls if c["error"] or c["protocol_error_count"]]
    underruns = sum(c["underruns"] for c in calls)
    ttfa = sorted(c["ttfa_ms_p50"] for c in calls if c["ttfa_ms_p50"] is not None)
    summary: dict[str, Any] = {
        "calls": len(calls), "lanes": args.calls, "soak_s": round(soak_s, 1), "startup_s": round(startup_s, 1),
        "by_kind": {k: sum(c["kind"] == k for c in calls) for k in sorted({c["kind"] for c in calls})},
        "rejected": sum(c["rejected"] for c in calls),
        "failed_calls": len(failed),
        "failures": [f"{c['call_sid']} ({c['kind']}): {c['error'] or c['protocol_errors']}" for c in failed][:10],
        "chunks": sum(c["media_received"] for c in calls),
        **compared,
        "underruns": underruns,
        "service_underruns": sum(seen[c["call_sid"]]["underruns"] for c in calls if c["call_sid"] in seen),
        "max_gap_ms": max((c["gaps_ms"]["max"] for c in calls), default=0.0),
        "ttfa_ms_p50_median": ttfa[len(ttfa) // 2] if ttfa else None,
        "barge_in_clears": sum(c["clears"] for c in calls),
        "rss_growth_mb": round(rss_growth, 1),
        "open_fds_growth": fds_growth,
        **leaks,
        "service_quiet_at_end": quiet,
    }
    invariants = {
        "lost_chunks": summary["lost_chunks"] == 0,
        "reordered_chunks": summary["reordered_chunks"] == 0,
        "unexpected_chunks": summary["unexpected_chunks"] == 0,
        "lost_marks": summary["lost_marks"] == 0,
        "reordered_marks": summary["reordered_marks"] == 0,
        "leaked_stream_slots": summary["leaked_stream_slots"] == 0,
        "leaked_reservations": summary["leaked_reservations"] == 0,
        "leaked_tokens": summary["leaked_tokens"] == 0,
        "failed_calls": summary["failed_calls"] == 0,
        "unmatched_calls": not summary["unmatched_calls"],
        "calls_placed": summary["calls"] > 0,
    }
    summary["failed_invariants"] = [name for name, ok in invariants.items() if not ok]
    summary["ok"] = not summary["failed_invariants"]
    return summary


def _print(summary: dict[str, Any], wall_s: float) -> None:
    if "calls" not in summary:
        print(f"soak: {summary.get('error')}")
        return
    s = summary
    print(f"soak: {s['calls']} calls on {s['lanes']} lanes over {s['soak_s']} s "
          f"({', '.join(f'{k} {v}' for k, v in s['by_kind'].items())}); {s['rejected']} rejected, "
          f"{s['failed_calls']} failed")
    print(f"  chunks {s['chunks']}: lost_chunks {s['lost_chunks']}, reordered_chunks {s['reordered_chunks']}, "
          f"lost_marks {s['lost_marks']}, reordered_marks {s['reordered_marks']}")
    print(f"  underruns {s['underruns']} heard (max gap {s['max_gap_ms']} ms), {s['service_underruns']} late sends; "
          f"ttfa p50 {s['ttfa_ms_p50_median']} ms; barge-in clears {s['barge_in_clears']}")
    print(f"  rss_growth_mb {s['rss_growth_mb']}, open_fds_growth {s['open_fds_growth']}, "
          f"leaked_stream_slots {s['leaked_stream_slots']}, leaked_reservations {s['leaked_reservations']}, "
          f"leaked_tokens {s['leaked_tokens']}")
    for line in s["failures"]:
        print(f"  failed call: {line}")
    verdict = "OK" if s["ok"] else "FAILED: " + ", ".join(s["failed_invariants"])
    print(f"  {verdict} (wall {wall_s:.0f} s, start-up {s['startup_s']} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=None, help="concurrent calls (lanes); default 6, --quick 3")
    parser.add_argument("--minutes", type=float, default=None, help="how long to keep placing calls; default 5")
    parser.add_argument("--quick", action="store_true", help="3 lanes for 35 s: about a minute on 2 CPU cores")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--max-calls-per-lane", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(_child_main(args))
        return 0
    args.calls = args.calls if args.calls is not None else (3 if args.quick else 6)
    minutes = args.minutes if args.minutes is not None else (35 / 60 if args.quick else 5.0)
    if not 1 <= args.calls <= 64 or not 0 < minutes <= 24 * 60:
        parser.error("--calls must be 1..64 and --minutes in (0, 1440]")
    args.seconds = minutes * 60
    args.max_calls_per_lane = int(args.seconds / 2) + 1  # a bound on the count, whatever the speed
    started = time.monotonic()
    summary = asyncio.run(_run(args))
    _print(summary, time.monotonic() - started)
    if args.json is not None:
        write_json(args.json, summary)
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
