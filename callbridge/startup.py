"""Start-up work done off the event loop: secrets check, model load, voice registry."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from dia2 import Dia2, is_random_checkpoint, write_random_checkpoint

from .config import Settings, SettingsError
from .voices import VoiceRegistry

log = logging.getLogger(__name__)

RANDOM_TINY = "random-tiny"
RANDOM_TINY_DIR = Path("out") / "random-tiny"

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


def resolve_model(settings: Settings, say: Callable[[str], None]) -> str:
    source = settings.model.model
    if source != RANDOM_TINY:
        return source
    say(BANNER)
    if not (RANDOM_TINY_DIR / "config.json").exists():
        say(f"writing a tiny random checkpoint to {RANDOM_TINY_DIR}")
        write_random_checkpoint(RANDOM_TINY_DIR, "tiny", seed=0)
    return str(RANDOM_TINY_DIR)


def load_runtime_and_voices(
    settings: Settings, runtime: Dia2 | None = None, say: Callable[[str], None] | None = None
) -> tuple[Dia2, VoiceRegistry]:
    tell = say or (lambda msg: log.info("%s", msg))
    if runtime is None:
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
