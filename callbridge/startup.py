"""Start-up work done off the event loop: secrets check, model load, voice registry."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from dia2 import MAX_TOP_K, Dia2, is_random_checkpoint, resolve_random_model

from .config import Settings, SettingsError, default_cache_dir
from .voices import VoiceRegistry

log = logging.getLogger(__name__)

RANDOM_TINY = "random-tiny"

BANNER = """
************************************************************************
*  RANDOM TINY MODEL: no real Dia2 weights are configured.             *
*  The service runs end to end, but the "voice" is babble from random  *
*  weights. Set CALLBRIDGE_MODEL to a Dia2 folder or hub id for speech.*
************************************************************************"""


def check_secrets(settings: Settings) -> None:
    """Fail at start, naming the variable, rather than at the first call."""
    if settings.auth.enabled and not settings.auth.api_token:
        raise SettingsError("auth.enabled is true but CALLBRIDGE_API_TOKEN is not set "
                            "(set it, or auth.enabled = false for local use only)")
    if settings.twilio.validate_signatures and not settings.twilio.auth_token:
        raise SettingsError("twilio.validate_signatures is true but TWILIO_AUTH_TOKEN is not set")


def check_sampling(settings: Settings) -> None:
    """The step cuts top-k with one fixed-width ``topk`` (dia2.MAX_TOP_K): a larger cut would fail
    every turn, so refuse it at start (config.py stays torch-free, so the bound is checked here)."""
    if settings.tts.top_k > MAX_TOP_K:
        raise SettingsError(f"tts.top_k = {settings.tts.top_k} is above the engine's limit {MAX_TOP_K}: "
                            f"use 1…{MAX_TOP_K}, or 0 for no cut")


PUBLIC_URL_WARNING = """
************************************************************************
* WARNING: CALLBRIDGE_PUBLIC_BASE_URL is not set, and Twilio signatures
* are checked. The stream URL handed to Twilio will be ws://, which
* Twilio cannot reach, and each signature is checked against the URL the
* request arrived with (http://{local}/...), not the https:// URL Twilio
* signed: behind a tunnel or proxy every call gets 403.
* Set it to the URL Twilio uses: export CALLBRIDGE_PUBLIC_BASE_URL=https://...
************************************************************************"""


def public_url_warning(settings: Settings) -> str | None:
    """The loud start-up warning when Twilio could neither reach us nor pass our signature check."""
    if settings.server.public_base_url or not settings.twilio.validate_signatures:
        return None
    return PUBLIC_URL_WARNING.format(local=f"{settings.server.host}:{settings.server.port}")


def resolve_model(settings: Settings, say: Callable[[str], None]) -> str:
    """The model source to load; ``random-tiny`` becomes a checkpoint in the cache folder,
    written on first use (dia2 writes it; we choose where)."""
    source = settings.model.model
    if source != RANDOM_TINY:
        return source
    say(BANNER)
    folder = random_tiny_dir(settings)
    if (folder / "config.json").exists():
        say(f"random tiny checkpoint: {folder}")
    try:
        return resolve_random_model(source, folder, say=say)
    except OSError as exc:
        raise SettingsError(f"cannot write the random tiny checkpoint to {folder} ({exc.strerror or exc}): "
                            "set CALLBRIDGE_CACHE_DIR to a writable folder") from None


def random_tiny_dir(settings: Settings) -> Path:
    return Path(settings.model.cache_dir or default_cache_dir()) / RANDOM_TINY


def check_device(settings: Settings) -> None:
    """``cuda`` means a GPU or nothing: fail at start, never fall back to the CPU silently."""
    device = settings.model.device
    if not device.startswith("cuda"):
        return
    import torch  # here, not at import: the check is the only torch use of start-up

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise SettingsError(
            f"model.device = {device!r} (CALLBRIDGE_DEVICE) but no CUDA GPU is visible (torch {torch.__version__}, "
            f"{build}): run on a GPU host (docker: the NVIDIA container toolkit), or set CALLBRIDGE_DEVICE=cpu"
        )


def load_runtime_and_voices(
    settings: Settings, runtime: Dia2 | None = None, say: Callable[[str], None] | None = None
) -> tuple[Dia2, VoiceRegistry]:
    tell = say or (lambda msg: log.info("%s", msg))
    if runtime is None:
        check_device(settings)
        source = resolve_model(settings, tell)
        m = settings.model
        runtime = Dia2.load(
            source,
            device=None if m.device == "auto" else m.device,
            dtype=m.dtype,
            mimi=m.mimi or None,
            progress=False,
            say=tell,
        )
    voices = VoiceRegistry.load(
        runtime,
        Path(settings.voices.dir),
        settings.voices.default,
        allow_demo=is_random_checkpoint(runtime.files.root),
        say=tell,
    )
    return runtime, voices
