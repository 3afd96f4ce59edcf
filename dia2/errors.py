"""Named errors of the dia2 runtime. Each message says what was wrong and, where it can, what to do."""

from __future__ import annotations


class Dia2Error(Exception):
    """Base class: anything the runtime rejects on purpose (bad input, bad files)."""


class ConfigError(Dia2Error):
    """config.json is missing a key, has a wrong type or an inconsistent value."""


class CheckpointError(Dia2Error):
    """A model folder or weights file is missing, corrupt, or does not match the config."""


class ScriptError(Dia2Error):
    """The text script cannot be generated (empty, unknown speaker tag, too long)."""


class PromptError(Dia2Error):
    """Voice prompt audio or its word timings are unusable."""


class SnapshotError(Dia2Error):
    """A voice snapshot is corrupt or was made for another model or format."""


class StreamError(Dia2Error):
    """A stream was used in a way its lifecycle does not allow (e.g. text after close)."""


class DeviceLost(Dia2Error):
    """The accelerator context is unusable (a device-side assert, an illegal address, a lost device).

    Not a stream's fault and not retryable in this process: every tensor on the device is
    suspect and every later CUDA call fails. Whoever owns the runtime must stop using it and
    build a new one in a fresh process (callbridge: restart the TTS worker). Raised by
    :meth:`dia2.engine.StepEngine.step` and :meth:`dia2.stream.StreamRunner.step`, never
    swallowed by their per-stream fault isolation.
    """


def is_device_lost(exc: BaseException) -> bool:
    """True for the errors that poison a CUDA context (PyTorch raises them as
    ``torch.AcceleratorError``, a RuntimeError, with the CUDA error text)."""
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA error" in text or "device-side assert" in text)


def raise_if_device_lost(device: object, exc: BaseException, where: str) -> None:
    """Raise :class:`DeviceLost` (from ``exc``) when ``exc`` lost ``device``'s CUDA context; any
    other error is left to the caller. ``where``: what was running ("during a step", …)."""
    if getattr(device, "type", None) == "cuda" and is_device_lost(exc):
        raise DeviceLost(f"the {device} context failed {where} ({exc}); "
                         "restart the process that owns this runtime") from exc
