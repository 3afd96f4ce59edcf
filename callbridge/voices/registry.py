"""The voice registry: every voice folder's snapshot loaded and checked at start.

A voice folder (``voices/NAME/``) holds the normalised prompt audio, ``words.json``, the
snapshot file and ``manifest.json`` (see ``callbridge voice build``). A call carries only
the voice name. With the random tiny model and no voice on disk, a throwaway demo voice is
built from generated audio so the demo and the tests need no set-up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dia2 import (
    Dia2,
    Dia2Error,
    PromptClip,
    VoicePrompt,
    VoiceSnapshot,
    WordTiming,
    build_snapshot,
    load_snapshot,
    synthetic_speechlike,
)

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "snapshot.safetensors"
MANIFEST_FILE = "manifest.json"
DEMO_VOICE = "demo"


class VoiceError(Exception):
    """A voice is missing, broken, or was built for another model; the message says how to fix it."""


@dataclass(frozen=True)
class Voice:
    name: str
    snapshot: VoiceSnapshot
    folder: Path | None  # None for the generated demo voice


def demo_voice_prompt() -> VoicePrompt:
    """Generated S1 + S2 clips with made-up word timings (for the random model only)."""
    s1_words = ("Hello", "and", "welcome.", "This", "is", "the", "demo", "voice.")
    s1 = tuple(WordTiming(w, 0.1 + 0.3 * i, 0.35 + 0.3 * i) for i, w in enumerate(s1_words))
    s2 = (WordTiming("Hi", 0.1, 0.4), WordTiming("there.", 0.5, 0.9))
    return VoicePrompt(
        s1=PromptClip(synthetic_speechlike(2.8, seed=1), s1),
        s2=PromptClip(synthetic_speechlike(1.0, seed=2, f0_hz=210.0), s2),
    )


class VoiceRegistry:
    def __init__(self, voices: dict[str, Voice], default: str) -> None:
        if default not in voices:
            raise VoiceError(f"default voice {default!r} is not loaded (have: {', '.join(sorted(voices)) or 'none'})")
        self.voices = voices
        self.default = default

    def get(self, name: str | None) -> Voice:
        key = name or self.default
        if key not in self.voices:
            raise VoiceError(f"unknown voice {key!r} (available: {', '.join(sorted(self.voices))})")
        return self.voices[key]

    def names(self) -> list[str]:
        return sorted(self.voices)

    @classmethod
    def load(
        cls,
        runtime: Dia2,
        voices_dir: Path,
        default: str,
        *,
        allow_demo: bool,
        say: Callable[[str], None] = log.info,
    ) -> VoiceRegistry:
        """Load every voice folder. A broken or mismatched default voice is a start-up error;
        other broken voices are skipped with a warning. ``allow_demo`` (random model only):
        build a throwaway demo voice when the default is absent."""
        voices: dict[str, Voice] = {}
        for folder in sorted(p for p in voices_dir.glob("*") if (p / SNAPSHOT_FILE).exists()):
            try:
                snap = load_snapshot(folder / SNAPSHOT_FILE, runtime)
            except Dia2Error as exc:
                msg = (f"voice {folder.name!r}: {exc}. Rebuild it: callbridge voice build {folder.name} "
                       f"--audio {folder / 'prompt.wav'} --words {folder / 'words.json'} "
                       "(or `callbridge voice build --rebuild-all` for every voice)")
                if folder.name == default:
                    raise VoiceError(msg) from None
                log.warning("%s", msg)
                continue
            voices[folder.name] = Voice(folder.name, snap, folder)
            say(f"voice {folder.name!r}: {snap.prompt_frames / runtime.frame_rate:.1f} s prompt, layout {snap.layout}")
        if default not in voices:
            if not allow_demo:
                raise VoiceError(
                    f"default voice {default!r} not found in {voices_dir}/. Build it with: "
                    f"callbridge voice build {default} --audio your_voice.wav"
                )
            say(f"*** no voice {default!r} on disk: building a throwaway DEMO voice from generated audio "
                "(random model; it is not a real voice) ***")
            voices[default] = Voice(default, build_snapshot(runtime, demo_voice_prompt()), None)
        return cls(voices, default)
