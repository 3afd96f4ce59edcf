"""Cluster costs: a control request through another instance vs direct, and admission with Redis vs embedded.

    python bench/cluster.py [--requests N] [--webhooks N] [--quick] [--json PATH]

Everything runs in this process on loopback, against a real ``redis-server`` (started here on a
free port, nothing on disk): three instances of the service (tiny random checkpoint, CPU, each its
own TTS worker thread and HTTP port) — ``E`` embedded (no Redis), ``B`` and ``F`` sharing Redis,
``F`` kept full so that each webhook it answers is placed on ``B``.

Measured, in the same run, interleaved request by request so that load on a shared machine hits
both sides of each comparison alike:

- ``control``: ``GET /calls/{sid}`` and ``POST /calls/{sid}/interrupt`` for a live simulated call
  held by ``B``, sent to ``B`` (``direct``) and to ``F`` (``forwarded``: directory look-up in Redis,
  then the same request to ``B``). Client-side round trip, ms.
- ``admission``: the signed voice webhook's round trip (``webhook_ms``) and the admission call
  inside it (``place_ms``): ``embedded`` (``E``), ``redis_here`` (``B`` keeps the call: one Lua
  script), ``redis_elsewhere`` (``F`` is full and places the call on ``B``: one script, ticket
  included). Each admitted slot is given back before the next webhook.

Exit status 0, or 2 when redis-server is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import git_commit, model_folder, write_json

from callbridge.sim.ports import free_tcp_port

PUBLIC = "https://cluster.callbridge.invalid"  # what "Twilio" signs over; never contacted
AUTH, API, ACCOUNT = "bench-twilio-token", "bench-api-token", "AC" + "0" * 32
HEADERS = {"Authorization": f"Bearer {API}"}


def dist(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "mean": None}
    a = np.asarray(values)
    return {"n": int(a.size), "p50": round(float(np.percentile(a, 50)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "mean": round(float(a.mean()), 3)}


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    assert binary is not None
    port = free_tcp_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("redis-server did not start")
        time.sleep(0.05)


async def _run(args: argparse.Namespace, tmp: Path, redis_url: str) -> dict[str, Any]:
    import aiohttp
    from aiohttp import web

    from callbridge.config import Settings
    from callbridge.sim import FakeTwilioRest, SimConfig, simulate_call
    from callbridge.transports.twilio import compute_signature
    from callbridge.web.app import build_app
    from callbridge.web.services import SERVICES
    from dia2 import Dia2

    runtime = await asyncio.to_thread(Dia2.load, model_folder("tiny"), device="cpu", progress=False)
    rest = FakeTwilioRest(account_sid=ACCOUNT, auth_token=AUTH)
    rest_url = await rest.start()
    runners: list[web.AppRunner] = []
    apps: dict[str, tuple[str, web.Application]] = {}
    for name, max_calls in (("E", 8), ("B", 8), ("F", 1)):
        port = free_tcp_port()
        cluster = {} if name == "E" else {
            "redis_url": redis_url, "instance_id": name, "internal_url": f"http://127.0.0.1:{port}",
            "public_url": f"https://{name.lower()}.cluster.callbridge.invalid", "key_prefix": "bench:"}
        settings = Settings().with_(
            server={"host": "127.0.0.1", "port": port, "public_base_url": PUBLIC},
            auth={"api_token": API}, voices={"dir": str(tmp / "voices")},
            twilio={"auth_token": AUTH, "account_sid": ACCOUNT, "api_base_url": rest_url, "stream_token_ttl_s": 600.0},
            tts={"max_streams": 8}, calls={"max_calls": max_calls}, cluster=cluster)
        app = build_app(settings, runtime=runtime)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        apps[name] = (f"http://127.0.0.1:{port}", app)
    base = {n: b for n, (b, _) in apps.items()}
    svc = {n: a[SERVICES] for n, (_, a) in apps.items()}
    place_ms: dict[str, list[float]] = {"embedded": [], "redis_here": [], "redis_elsewhere": []}
    current: list[str] = ["embedded"]

    for name in ("E", "B", "F"):  # time each admission call inside the webhook
        admission = svc[name].admission
        assert admission is not None
        inner = admission.place

        async def timed(*a: Any, _inner: Callable[..., Awaitable[Any]] = inner, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await _inner(*a, **kw)
            finally:
                place_ms[current[0]].append((time.perf_counter() - t0) * 1000)

        admission.place = timed  # type: ignore[method-assign]

    http = aiohttp.ClientSession()
    counter = iter(range(10**9))

    async def webhook(name: str) -> tuple[float, str]:
        sid = f"CA{next(counter):032x}"
        form = {"CallSid": sid, "AccountSid": ACCOUNT, "From": "+1", "To": "+2", "CallStatus": "ringing"}
        sig = compute_signature(AUTH, PUBLIC + "/twilio/voice", form)
        t0 = time.perf_counter()
        async with http.post(base[name] + "/twilio/voice", data=form, headers={"X-Twilio-Signature": sig}) as resp:
            twiml = await resp.text()
        ms = (time.perf_counter() - t0) * 1000
        assert resp.status == 200 and "<Stream" in twiml, twiml
        return ms, twiml.split('url="')[1].split('"')[0].rsplit("/", 1)[1]

    try:
        held = asyncio.Event()
        call_task = asyncio.create_task(simulate_call(SimConfig(
            base_url=base["B"], public_base_url=PUBLIC, twilio_auth_token=AUTH, account_sid=ACCOUNT, api_token=API,
            max_call_s=3000.0, hold_s=2990.0, rest_server=rest,
            resolve={"https://b.cluster.callbridge.invalid": base["B"]}, announce=lambda _: held.set()), 0))
        await asyncio.wait_for(held.wait(), 120)
        sid = next(iter(svc["B"].calls))
        await webhook("F")  # F's one slot: held (its token lives 600 s) so F places every call on B

        control: dict[str, dict[str, list[float]]] = {k: {"direct": [], "forwarded": []} for k in ("get", "interrupt")}
        for i in range(args.requests):
            for kind, method, path in (("get", "GET", f"/calls/{sid}"), ("interrupt", "POST", f"/calls/{sid}/interrupt")):
                order = ("direct", "forwarded") if i % 2 else ("forwarded", "direct")
                for how in order:
                    t0 = time.perf_counter()
                    async with http.request(method, base["B" if how == "direct" else "F"] + path, headers=HEADERS) as r:
                        await r.read()
                    assert r.status == 200, (how, kind, r.status)
                    control[kind][how].append((time.perf_counter() - t0) * 1000)

        webhook_ms: dict[str, list[float]] = {k: [] for k in place_ms}
        for _ in range(args.webhooks):
            for key, name in (("embedded", "E"), ("redis_here", "B"), ("redis_elsewhere", "F")):
                current[0] = key
                ms, token = await webhook(name)
                webhook_ms[key].append(ms)
                if key == "redis_elsewhere":  # give B's promised slot back (the stream never comes)
                    ticket = await svc["B"].admission.claim(token)  # type: ignore[union-attr]
                    assert ticket is not None
                    ticket[1].release()
                    svc["B"].admission.ended(ticket[0].call_sid)  # type: ignore[union-attr]
                else:
                    svc[name].tokens.discard(token)
                    svc[name].admission.ended("")  # type: ignore[union-attr]
                if name == "B" or key == "redis_elsewhere":
                    await svc["B"].admission._publish()  # type: ignore[union-attr]  # the slot is free in Redis now

        await http.post(f"{base['F']}/calls/{sid}/hangup", headers=HEADERS)
        await asyncio.wait_for(call_task, 60)
    finally:
        await http.close()
        for runner in runners:
            await runner.cleanup()
        await rest.stop()

    result: dict[str, Any] = {
        "commit": git_commit(), "machine": args.machine, "requests": args.requests, "webhooks": args.webhooks,
        "control_ms": {kind: {how: dist(v) for how, v in d.items()} for kind, d in control.items()},
        "admission_ms": {k: {"webhook": dist(webhook_ms[k]), "place": dist(place_ms[k][-args.webhooks:])}
                         for k in place_ms},
    }
    return result


def print_table(r: dict[str, Any]) -> None:
    print(f"cluster costs on {r['machine']} (commit {r['commit']})")
    print(f"{'control request':<34}{'p50 ms':>10}{'p99 ms':>10}{'n':>7}")
    for kind, d in r["control_ms"].items():
        for how, s in d.items():
            print(f"{kind + ' ' + how:<34}{s['p50']:>10}{s['p99']:>10}{s['n']:>7}")
    print(f"{'admission':<34}{'p50 ms':>10}{'p99 ms':>10}{'n':>7}")
    for key, d in r["admission_ms"].items():
        for part, s in d.items():
            print(f"{key + ' ' + part:<34}{s['p50']:>10}{s['p99']:>10}{s['n']:>7}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=None, help="control requests of each kind and way; default 500")
    parser.add_argument("--webhooks", type=int, default=None, help="webhooks of each admission kind; default 300")
    parser.add_argument("--quick", action="store_true", help="50 requests, 30 webhooks: seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--machine", default="this machine (CPU, loopback)", help="said in the report")
    args = parser.parse_args(argv)
    args.requests = args.requests or (50 if args.quick else 500)
    args.webhooks = args.webhooks or (30 if args.quick else 300)
    if shutil.which("redis-server") is None:
        print("error: redis-server is not installed (apt-get install -y redis-server)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_redis(Path(tmp))
        try:
            result = asyncio.run(_run(args, Path(tmp), url))
        finally:
            proc.terminate()
            proc.wait(10)
    print_table(result)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
