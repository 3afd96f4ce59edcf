"""The TTS worker's named errors (what a caller of :mod:`callbridge.tts` may catch)."""

from __future__ import annotations


class TtsError(Exception):
    """Base class of the worker's named errors."""


class WorkerFull(TtsError):
    """No stream slot is free (or a reservation already has a running turn); refuse or retry later."""


class WorkerClosed(TtsError):
    """The worker was stopped; it takes no new turns."""


class WorkerFaulted(TtsError):
    """The worker's start-up failed or its runner faulted; ``reason`` says why (it awaits a restart)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TurnFailed(TtsError):
    """The turn failed on the worker (a step raised, bad text, a dead reader); ``message`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

