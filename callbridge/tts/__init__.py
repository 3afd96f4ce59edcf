"""The TTS worker: one per GPU, its own thread steps every active turn together.

- :mod:`.worker`: :class:`TtsWorker`, its thread, admission counted in stream slots, lifecycle
  (:class:`WorkerState`) and faults;
- :mod:`.turn`: :class:`TurnHandle` (the loop's end of a turn), :class:`Reservation` (a call's
  slot), and the commands and events between the loop and the worker thread;
- :mod:`.generation`: the ``[tts]`` settings as a turn's :class:`dia2.GenerationConfig`;
- :mod:`.errors`: the named errors.
"""

from .errors import TtsError, TurnFailed, WorkerClosed, WorkerFaulted, WorkerFull
from .generation import generation_config
from .turn import Reservation, TurnHandle, TurnTiming
from .worker import (
    DEFAULT_MAX_BACKLOG_FRAMES,
    FAULT_AFTER_FAILED_STEPS,
    RunnerFactory,
    TtsWorker,
    WorkerState,
)

__all__ = [
    "DEFAULT_MAX_BACKLOG_FRAMES",
    "FAULT_AFTER_FAILED_STEPS",
    "Reservation",
    "RunnerFactory",
    "TtsError",
    "TtsWorker",
    "TurnFailed",
    "TurnHandle",
    "TurnTiming",
    "WorkerClosed",
    "WorkerFaulted",
    "WorkerFull",
    "WorkerState",
    "generation_config",
]
