"""The aiohttp application: routes, start-up (model, voices, TTS worker) and shutdown, health, metrics.

App-wide objects hang on the app under typed keys (:mod:`.services`) and live in
``cleanup_ctx``: the speech-to-text worker (its own thread, when ``[speech]`` is enabled), the
Dia2 runtime, the TTS worker (its own thread), the voice registry, the
call registry, the one-time stream tokens and the metrics. Twilio's routes are in
:mod:`.twilio_routes`, the control API in :mod:`.control` and :mod:`.text_socket`, the plain
TTS socket in :mod:`.tts_socket`."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import WSCloseCode, web

from dia2 import Dia2, StreamRunner

from ..calls.agent import Agent, load_agent
from ..calls.call import CallState
from ..calls.fallback import load_fallback_audio
from ..cluster import build_admission
from ..config import Settings, SettingsError
from ..metrics import Metrics
from ..speech import speech_worker
from ..transports.websocket import close_socket
from ..tts import RunnerFactory, TtsWorker, WorkerFaulted
from .control import delete_turn, get_call, list_calls, post_hangup, post_interrupt, post_turn
from .forwarding import cluster_context, merged_calls, owner_answers
from .services import AGENT, SERVICES, Services, _install_log_redaction, services
from .sip_calls import SIP, SipService, sip_context
from .stream_tokens import StreamTokens
from .text_socket import call_text_socket
from .tts_socket import stream_tts_handler
from .twilio_routes import STREAM_PATH, twilio_stream, twilio_stream_status, twilio_voice
from .worker_supervisor import WorkerSupervisor

log = logging.getLogger(__name__)

SPEECH_LOAD_TIMEOUT_S = 300.0  # a speech model still loading after this fails the start-up


async def healthz(request: web.Request) -> web.Response:
    """200 only while calls are admitted: started, the TTS worker warmed up (its CUDA graphs
    captured) and serving, not shutting down. Else 503 with ``status`` (starting, restarting,
    failed, stopping) and ``reason``."""
    svc = services(request)
    readiness = svc.readiness()
    body = {
        "status": readiness.status,
        "reason": readiness.reason,
        "calls": len(svc.calls),
        "tts_streams_active": svc.worker.active if svc.worker else 0,
        "tts_capacity": svc.worker.capacity if svc.worker else 0,
        "voices": svc.voices.names() if svc.voices else [],
    }
    if svc.admission is not None and svc.admission.clustered:  # which instance, and whether Redis answers
        body["instance"] = svc.admission.me.id
        body["redis"] = "ok" if svc.admission.redis_reachable else "unreachable"
    return web.json_response(body, status=200 if readiness.ready else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    svc = services(request)
    svc.readiness()  # refreshes callbridge_tts_worker_ready
    if svc.worker is not None:
        svc.metrics.tts_streams_active.set(svc.worker.active)
    return web.Response(body=svc.metrics.render(), content_type="text/plain")


def build_app(
    settings: Settings, *, runtime: Dia2 | None = None, say: Any = None, agent: Agent | None = None,
    wait_for_worker: bool = True, runner_factory: RunnerFactory = StreamRunner,
    supervisor_options: dict[str, float] | None = None,
) -> web.Application:
    """The service. ``runtime`` may be given (tests share one); else it is loaded at start-up.
    ``agent``: an in-process agent hook (else the ``[agent]`` settings decide).

    ``wait_for_worker``: start-up returns once the TTS worker is warmed up (True), or at once
    with ``/healthz`` answering 503 "starting" and calls refused until it is (False: ``serve``,
    so a probe sees why). ``runner_factory`` and ``supervisor_options`` (max_restarts,
    window_s, backoff_s) exist for tests that inject worker faults."""
    _install_log_redaction()
    app = web.Application(client_max_size=256 * 1024)
    if agent is not None:
        app[AGENT] = agent
    svc = Services(settings=settings, metrics=Metrics(), tokens=StreamTokens(settings.twilio.stream_token_ttl_s))
    svc.admission = build_admission(settings, worker=lambda: svc.worker, ready=lambda: svc.readiness().ready,
                                    expire=svc.tokens.expire)
    app[SERVICES] = svc
    app.router.add_post("/twilio/voice", twilio_voice)
    app.router.add_post("/twilio/stream-status", twilio_stream_status)
    app.router.add_get(STREAM_PATH + "{token}", twilio_stream)
    # With [cluster] on, any instance answers for any call (forwarding.py).
    app.router.add_get("/calls", functools.partial(merged_calls, local=list_calls))
    app.router.add_get("/calls/{call_sid}", owner_answers(get_call))
    app.router.add_post("/calls/{call_sid}/turns", owner_answers(post_turn))
    app.router.add_delete("/calls/{call_sid}/turns/{turn_id}", owner_answers(delete_turn))
    app.router.add_post("/calls/{call_sid}/interrupt", owner_answers(post_interrupt))
    app.router.add_post("/calls/{call_sid}/hangup", owner_answers(post_hangup))
    app.router.add_get("/calls/{call_sid}/text", owner_answers(call_text_socket))
    app.router.add_get("/ws/stream_tts", stream_tts_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    app.cleanup_ctx.append(_speech_context)  # before the TTS: stopped after every call has ended
    app.cleanup_ctx.append(_tts_context(runtime, say, wait_for_worker, runner_factory, supervisor_options or {}))
    app[SIP] = SipService()
    app.cleanup_ctx.append(sip_context)  # after the worker and voices: it admits calls onto them
    app.cleanup_ctx.append(cluster_context)  # after the TTS: this instance leaves the cluster first
    app.on_shutdown.append(_close_sockets)
    return app


async def _speech_context(app: web.Application) -> AsyncIterator[None]:
    """The speech-to-text worker thread, when ``[speech]`` is enabled; its model loads before the
    service is ready, and a model that does not load stops the start-up with one line."""
    svc = app[SERVICES]
    s = svc.settings.speech
    if not s.enabled:
        yield
        return
    worker = speech_worker(s)
    worker.start()
    await asyncio.to_thread(worker.wait_ready, SPEECH_LOAD_TIMEOUT_S)
    if not worker.available:
        await asyncio.to_thread(worker.stop)
        raise SettingsError(f"speech.model = {s.model!r}: {worker.load_error or 'did not load in time'}")
    svc.speech = worker
    try:
        yield
    finally:
        svc.speech = None
        await asyncio.to_thread(worker.stop)


def _tts_context(runtime: Dia2 | None, say: Any, wait_for_worker: bool, runner_factory: RunnerFactory,
                 supervisor_options: dict[str, float]):  # type: ignore[no-untyped-def]
    async def context(app: web.Application) -> AsyncIterator[None]:
        from ..startup import load_runtime_and_voices

        svc = app[SERVICES]
        loop = asyncio.get_running_loop()
        # Model loading and the voice snapshot are heavy: keep them off the event loop.
        svc.fallback_ulaw8k = await loop.run_in_executor(None, load_fallback_audio, svc.settings.calls.fallback_audio)
        svc.runtime, svc.voices = await loop.run_in_executor(
            None, load_runtime_and_voices, svc.settings, runtime, say
        )
        svc.worker = TtsWorker(svc.runtime, svc.settings.tts.max_streams, runner_factory=runner_factory)
        svc.supervisor = WorkerSupervisor(svc.worker, svc.metrics, **supervisor_options)  # type: ignore[arg-type]
        svc.supervisor.start()
        svc.worker.start()  # the thread builds the runner (CUDA graphs) and warms up: not ready before
        a = svc.settings.agent
        svc.agent = app.get(AGENT) or load_agent(a.callable, a.webhook_url, a.secret, a.timeout_s)
        svc.ready = True  # start-up done; calls are admitted once the worker is ready too
        try:
            if wait_for_worker:
                readiness = await svc.supervisor.settled()
                if not readiness.ready:
                    raise WorkerFaulted(f"the TTS worker did not start: {readiness.reason}")
            yield
        finally:
            svc.ready = False
            for call in [*svc.calls.values(), *svc.connecting]:
                await call.end("shutdown")
            links = list(svc.app_links.values())
            if links:  # each sends call_ended and closes; bounded like any socket close
                _, late = await asyncio.wait(links, timeout=svc.settings.audio.send_timeout_s)
                for task in late:
                    task.cancel()
            await svc.worker.stop()
            await svc.supervisor.stop()
            if svc.agent is not None:
                await svc.agent.close()

    return context


async def drain_calls(app: web.Application, timeout_s: float | None = None) -> None:
    """Graceful shutdown, first half: run it *before* ``AppRunner.cleanup()`` (on SIGTERM).

    No new call is admitted (``/healthz`` answers 503) and live calls take no new turns
    (409); queued turns play out until their marks echo, for up to ``timeout_s`` (default
    ``server.shutdown_timeout_s``); then every call ends and its socket closes with
    GOING_AWAY (1001). It must run while the sockets are still read: ``cleanup()`` first makes
    aiohttp ignore all incoming data (``Server.pre_shutdown``), so echoes would never arrive.
    """
    svc = app[SERVICES]
    svc.ready = False
    svc.shutting_down = True
    timeout = svc.settings.server.shutdown_timeout_s if timeout_s is None else timeout_s
    calls = list(svc.calls.values())
    for call in calls:
        call.stop_taking_turns()  # new turns get 409; queued ones still play
    await asyncio.gather(*(c.drain(timeout) for c in calls), return_exceptions=True)
    # Ending a call closes its media socket with 1001 (see twilio_stream).
    await asyncio.gather(*(c.end("shutdown") for c in calls), return_exceptions=True)


async def _close_sockets(app: web.Application) -> None:
    """on_shutdown: calls still open (no :func:`drain_calls` before) send what they have queued,
    for up to ``server.shutdown_timeout_s`` (aiohttp reads nothing any more, so no echo can
    come), then end; every socket closes with GOING_AWAY (1001), each close bounded so a
    stalled peer cannot hold shutdown up."""
    svc = app[SERVICES]
    svc.ready = False
    svc.shutting_down = True
    calls = [c for c in svc.calls.values() if c.state is not CallState.ENDED]
    for call in calls:
        call.stop_taking_turns()
    timeout = svc.settings.server.shutdown_timeout_s
    await asyncio.gather(*(c.drain(timeout, heard=False) for c in calls), return_exceptions=True)
    await asyncio.gather(*(c.end("shutdown") for c in calls), return_exceptions=True)
    close_s = svc.settings.audio.send_timeout_s
    await asyncio.gather(*(close_socket(ws, None, WSCloseCode.GOING_AWAY, "server shutdown", close_s)
                           for ws in list(svc.sockets)), return_exceptions=True)
