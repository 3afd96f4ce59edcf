"""Keeps the TTS worker serving: restarts it after a fault (bounded, loudly), and says whether
the service may admit calls now, and if not, why.

The worker says when it faults (:meth:`TtsWorker.add_state_listener`): its live turns have
failed already (their calls play the fallback audio) and it admits nothing. The supervisor,
a task on the event loop, then restarts it: at most ``max_restarts`` times within
``window_s``, waiting ``backoff_s`` × (restarts in the window) before each try, with an ERROR
line per fault. Past that bound it gives up with a CRITICAL line and the service stays
unready (``/healthz`` 503, ``failed``), so that a liveness probe restarts the process.

A fault on :class:`dia2.DeviceLost` (the CUDA context is gone) is not restarted at all: a
process cannot get its context back, so a restart in it would only fail again. The supervisor
goes straight to ``failed`` with a CRITICAL line saying the process must be restarted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from ..metrics import Metrics
from ..tts import TtsError, TtsWorker, WorkerClosed, WorkerState

log = logging.getLogger(__name__)

DEFAULT_MAX_RESTARTS = 3
DEFAULT_WINDOW_S = 600.0
DEFAULT_BACKOFF_S = 1.0


@dataclass(frozen=True)
class Readiness:
    """What ``/healthz`` says: ``status`` is ok, starting, restarting or failed."""

    status: str
    reason: str | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ok"


class WorkerSupervisor:
    """Watches one worker; build it before ``worker.start()`` so it sees every change."""

    def __init__(self, worker: TtsWorker, metrics: Metrics, *, max_restarts: int = DEFAULT_MAX_RESTARTS,
                 window_s: float = DEFAULT_WINDOW_S, backoff_s: float = DEFAULT_BACKOFF_S) -> None:
        self.worker = worker
        self.metrics = metrics
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.gave_up: str | None = None  # the fault it stopped restarting after
        self.device_lost = False  # it gave up because the device is lost (no restart was tried)
        self.restarts = 0
        self._restart_times: deque[float] = deque()
        self._loop = asyncio.get_running_loop()
        self._changes: asyncio.Queue[tuple[WorkerState, str | None]] = asyncio.Queue()
        self._changed = asyncio.Event()  # set on every change: settled() waits on it
        self._task: asyncio.Task[None] | None = None
        worker.add_state_listener(self._on_change)

    def _on_change(self, state: WorkerState, reason: str | None) -> None:  # any thread
        self._loop.call_soon_threadsafe(self._changes.put_nowait, (state, reason))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"supervise-{self.worker.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])

    def readiness(self) -> Readiness:
        state = self.worker.state
        self.metrics.tts_worker_ready.set(state is WorkerState.READY)
        if state is WorkerState.READY:
            return Readiness("ok")
        if self.device_lost:
            return Readiness("failed", f"the TTS worker lost its device ({self.gave_up}); "
                                       "restart the process: no restart inside it can recover the device")
        if self.gave_up is not None:
            return Readiness("failed", f"the TTS worker failed {self.restarts + 1} times and is not restarted "
                                       f"any more (last: {self.gave_up}); restart the service")
        if state is WorkerState.STOPPED:
            return Readiness("failed", "the TTS worker is stopped")
        if self.restarts == 0 and state is WorkerState.STARTING:
            return Readiness("starting", "the TTS worker is warming up")
        if state is WorkerState.STARTING:
            return Readiness("restarting", "the TTS worker is warming up again after a fault")
        return Readiness("restarting", f"the TTS worker faulted: {self.worker.fault}")

    async def settled(self) -> Readiness:
        """Wait until the worker is READY, or the supervisor has given up on starting it."""
        while True:
            readiness = self.readiness()
            if readiness.ready or readiness.status == "failed":
                return readiness
            self._changed.clear()
            await self._changed.wait()

    async def _run(self) -> None:
        while True:
            state, reason = await self._changes.get()
            self.metrics.tts_worker_ready.set(state is WorkerState.READY)
            if state is WorkerState.FAULTED and self.worker.device_lost:
                self._give_up_device_lost(reason or "device lost")
            elif state is WorkerState.FAULTED:
                await self._restart(reason or "unknown fault")
            self._changed.set()
            if state is WorkerState.STOPPED:
                return

    def _give_up_device_lost(self, reason: str) -> None:
        self.metrics.tts_worker_faults_total.inc()
        self.gave_up = reason
        self.device_lost = True
        log.critical("tts worker %s lost its device (%s): unrecoverable in this process, not restarting it; "
                     "the service admits no calls: the process must be restarted", self.worker.name, reason)

    async def _restart(self, reason: str) -> None:
        self.metrics.tts_worker_faults_total.inc()
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > self.window_s:
            self._restart_times.popleft()
        if len(self._restart_times) >= self.max_restarts:
            self.gave_up = reason
            log.critical("tts worker %s faulted again (%s) after %d restarts in %.0f s: not restarting it; "
                         "the service admits no calls until it is restarted", self.worker.name, reason,
                         len(self._restart_times), self.window_s)
            return
        attempt = len(self._restart_times) + 1
        log.error("tts worker %s faulted (%s): admission paused, restarting it (attempt %d of %d)",
                  self.worker.name, reason, attempt, self.max_restarts)
        self._changed.set()  # readiness changed: settled() and /healthz see "restarting"
        if self.backoff_s > 0 and attempt > 1:
            await asyncio.sleep(self.backoff_s * (attempt - 1))  # a real back-off, not a wait for an event
        self._restart_times.append(time.monotonic())
        self.restarts += 1
        self.metrics.tts_worker_restarts_total.inc()
        try:
            await asyncio.to_thread(self.worker.restart)
        except WorkerClosed:
            return  # stopped meanwhile: nothing to serve
        except TtsError as exc:  # the faulted thread would not exit: nothing more can be done here
            self.gave_up = f"{reason}; then the restart failed: {exc}"
            log.critical("tts worker %s: restart failed (%s): the service admits no calls until it is restarted",
                         self.worker.name, exc)
