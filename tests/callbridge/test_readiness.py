"""Readiness over the real service: /healthz, the voice webhook and /metrics follow the TTS
worker (warming up, faulted, restarting, given up); a fault plays the fallback on the live call
and the service restarts the worker by itself. Faults are injected into the worker's runner."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from callbridge.sim import FakeTwilioRest, simulate_call
from callbridge.sim.ports import free_tcp_port
from callbridge.tts import TtsError, TurnFailed, WorkerState
from callbridge.web.app import build_app
from dia2 import DeviceLost, Dia2, GenerationConfig

from .test_hardening import (
    HEALTHY_TEXT,
    Service,
    admit,
    clean,
    holding_turn,
    no_slot_left,
    raw_call,
    sid,
    until,
)
from .test_service import ACCOUNT, AUTH, settings_for
from .test_worker_faults import WAIT_S, Faults, States

pytestmark = pytest.mark.timeout(240)


@contextlib.asynccontextmanager
async def running(tiny_runtime: Dia2, tmp: Path, faults: Faults, **build: Any) -> AsyncIterator[Service]:
    rest = FakeTwilioRest(account_sid=ACCOUNT, auth_token=AUTH)
    rest_url = await rest.start()
    port = free_tcp_port()
    app = build_app(settings_for(port, tmp, rest_url), runtime=tiny_runtime, runner_factory=faults.factory, **build)
    runner = web.AppRunner(app, shutdown_timeout=5.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    service = Service(f"http://127.0.0.1:{port}", port, app, runner, rest)
    try:
        yield service
    finally:
        faults.gate.set()
        await service.shutdown()
        await rest.stop()


async def health(service: Service) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{service.base}/healthz") as resp:
        return resp.status, await resp.json()


async def metric(service: Service, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{service.base}/metrics") as resp:
        text = await resp.text()
    [line] = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])


async def webhook(service: Service, n: int) -> str:
    async with aiohttp.ClientSession() as http:
        return await admit(http, service, sid("CA", n))


async def test_not_ready_and_refusing_calls_until_the_worker_is_warmed_up(tiny_runtime: Dia2, tmp_path: Path) -> None:
    faults = Faults(tiny_runtime)
    faults.gate.clear()  # the worker's runner build (graph capture on a GPU) is still going on
    async with running(tiny_runtime, tmp_path, faults, wait_for_worker=False) as service:
        await asyncio.to_thread(faults.building.wait, WAIT_S)
        status, body = await health(service)
        assert status == 503 and body["status"] == "starting" and "warming up" in body["reason"]
        assert "<Reject" in await webhook(service, 1)
        assert await metric(service, "callbridge_tts_worker_ready") == 0
        async with aiohttp.ClientSession(headers=service.headers) as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{service.base}/ws/stream_tts")
            assert refused.value.status == 503
        faults.gate.set()
        assert service.svc.worker is not None
        await service.svc.worker.ready()
        status, body = await health(service)
        assert status == 200 and body["status"] == "ok"
        assert "<Connect>" in await webhook(service, 2)
        assert await metric(service, "callbridge_tts_worker_ready") == 1


async def test_a_worker_fault_plays_the_fallback_pauses_admission_and_the_service_restarts_it(
    tiny_runtime: Dia2, tmp_path: Path
) -> None:
    faults = Faults(tiny_runtime)
    async with running(tiny_runtime, tmp_path, faults) as service:
        worker = service.svc.worker
        assert worker is not None
        states = States(worker)
        async with raw_call(service, 800) as call:
            await holding_turn(call)
            faults.gate.clear()  # hold the restart's warm-up, to see the service while it restarts
            faults.building.clear()  # set by the first build: wait for the restart's own
            faults.escape = RuntimeError("injected fault")
            await states.reach(WorkerState.FAULTED)
            faults.escape = None
            await asyncio.to_thread(faults.building.wait, WAIT_S)  # the supervisor is rebuilding it
            status, body = await health(service)
            assert status == 503 and body["status"] == "restarting"
            assert "<Reject" in await webhook(service, 801)
            assert await metric(service, "callbridge_tts_worker_faults_total") == 1
            assert await metric(service, "callbridge_tts_worker_restarts_total") == 1
            # The live call heard the fallback for its failed turn and is still up.
            await until(lambda: ("mark", "t1-g0-fallback") in call.sent, "the fallback plays")
            [failed] = call.turn_done(0)
            assert failed["state"] == "failed" and "tts worker fault" in failed["error"]
            faults.gate.set()
            await states.reach(WorkerState.READY)
            status, body = await health(service)
            assert status == 200
            # The same call speaks again, on the reservation it kept across the restart.
            await call.say(type="turn", text="Back again.")
            await until(lambda: call.turn_done(1) != [], "the next turn ends")
            assert call.turn_done(1)[0]["state"] == "done"
        report = (await simulate_call(service.sim(texts=[HEALTHY_TEXT]), 0)).to_json()
        clean(report)
        no_slot_left(service)


async def test_the_service_gives_up_after_bounded_restarts_and_says_so(tiny_runtime: Dia2, tmp_path: Path) -> None:
    faults = Faults(tiny_runtime)
    async with running(tiny_runtime, tmp_path, faults,
                       supervisor_options={"max_restarts": 2, "backoff_s": 0.0}) as service:
        supervisor = service.svc.supervisor
        assert supervisor is not None and service.svc.worker is not None
        worker, voices = service.svc.worker, service.svc.voices
        assert voices is not None
        faults.fail_builds_from = faults.builds + 1  # every rebuild fails from now on
        faults.escape = RuntimeError("injected fault")  # at the next step
        states = States(worker)
        turn = await worker.open_turn(voices.get(None).snapshot, GenerationConfig(), turn_id="t", text="Hi.",
                                      close=True)
        await states.reach(WorkerState.FAULTED)
        with pytest.raises(TurnFailed, match="injected fault"):
            async for _ in turn.frames():
                pass
        readiness = await supervisor.settled()
        assert readiness.status == "failed" and supervisor.restarts == 2
        status, body = await health(service)
        assert status == 503 and body["status"] == "failed" and "restart the service" in body["reason"]
        assert "<Reject" in await webhook(service, 900)
        assert await metric(service, "callbridge_tts_worker_faults_total") == 3


async def test_a_lost_device_is_not_restarted_in_process_and_the_service_says_restart_it(
    tiny_runtime: Dia2, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """dia2.DeviceLost (the CUDA context is gone) cannot be recovered in this process: the
    supervisor does not rebuild the runner, goes straight to failed and says the process must be
    restarted (CRITICAL). Injected through the runner factory, on the CPU."""
    faults = Faults(tiny_runtime)
    async with running(tiny_runtime, tmp_path, faults) as service:
        supervisor, worker, voices = service.svc.supervisor, service.svc.worker, service.svc.voices
        assert supervisor is not None and worker is not None and voices is not None
        builds = faults.builds
        faults.escape = DeviceLost("the cuda:0 context failed during a step (injected)")
        states = States(worker)
        turn = await worker.open_turn(voices.get(None).snapshot, GenerationConfig(), turn_id="t", text="Hi.",
                                      close=True)
        await states.reach(WorkerState.FAULTED)
        with pytest.raises(TurnFailed, match="DeviceLost"):
            async for _ in turn.frames():
                pass
        readiness = await supervisor.settled()
        assert readiness.status == "failed" and supervisor.restarts == 0 and worker.device_lost
        assert faults.builds == builds  # no runner was rebuilt on the lost device
        with pytest.raises(TtsError, match="device is lost"):
            worker.restart()
        status, body = await health(service)
        assert status == 503 and body["status"] == "failed" and "restart the process" in body["reason"]
        assert "<Reject" in await webhook(service, 901)
        assert await metric(service, "callbridge_tts_worker_faults_total") == 1
        assert await metric(service, "callbridge_tts_worker_restarts_total") == 0
        critical = [r for r in caplog.records if r.levelname == "CRITICAL" and r.name.endswith("worker_supervisor")]
        assert len(critical) == 1 and "the process must be restarted" in critical[0].getMessage()
