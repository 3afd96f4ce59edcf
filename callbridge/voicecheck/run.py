"""The voice check's edge: synthesize each sentence as a call would, hear it, embed it, judge it.

Synthesis runs through the calls' own path: a :class:`~callbridge.tts.TtsWorker` restores the
voice snapshot for each turn (seeded as the calls seed their turns), and the 24 kHz frames go
through the calls' :class:`~callbridge.audio.OutboundAudio` (soxr 24k→8k, mu-law, 20 ms
chunks). Time to first audio is from opening the turn to the first chunk a call could send.
The speech-to-text hears the 8 kHz audio decoded from those chunks, as a caller would; the
speaker model hears the 24 kHz audio (what the voice is, before the phone line narrows it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dia2 import Dia2, Dia2Error, VoiceSnapshot, load_snapshot

from ..audio import LINE_RATE, TTS_RATE, OutboundAudio, ulaw_to_pcm16
from ..config import Settings
from ..speech.factory import transcriber_factory
from ..speech.transcriber import Transcriber, TranscriberError, Word
from ..speech.worker import to_stt_audio
from ..tts import TtsWorker, TurnFailed, generation_config
from ..voices.build import PROMPT_FILE, VoiceBuildError, VoiceManifest
from ..voices.registry import SNAPSHOT_FILE
from .analysis import CheckResult, PromptInput, TurnInput, analyse
from .speaker import SpeakerEncoder

__all__ = ["CheckError", "Synthesized", "VoiceUnderCheck", "hear", "load_transcriber", "load_voice",
           "run_check", "synthesize"]

Say = Callable[[str], None]


class CheckError(Exception):
    """The check cannot run (no such voice, no STT model, a turn failed); the message says what to do."""


@dataclass(frozen=True)
class VoiceUnderCheck:
    name: str
    folder: Path
    manifest: VoiceManifest
    prompt24k: np.ndarray  # float32 [N], the stored prompt.wav


@dataclass(frozen=True)
class Synthesized:
    """One turn as the calls' path produced it."""

    text: str
    pcm24k: np.ndarray  # float32 [N]
    ulaw8k: bytes  # the 20 ms chunks, joined
    ttfa_s: float | None
    first_frame_s: float | None
    parts: int

    @property
    def pcm8k(self) -> np.ndarray:
        return ulaw_to_pcm16(self.ulaw8k).astype(np.float32) / 32768.0


def load_voice(voices_dir: Path, name: str) -> VoiceUnderCheck:
    import soundfile as sf

    folder = voices_dir / name
    if not (folder / SNAPSHOT_FILE).is_file():
        raise CheckError(f"no built voice {name!r} in {voices_dir}/ (build it: callbridge voice build {name} "
                         "--audio FILE)")
    try:
        manifest = VoiceManifest.read(folder)
    except VoiceBuildError as exc:
        raise CheckError(f"voice {name!r}: {exc}") from None
    try:
        pcm, rate = sf.read(str(folder / PROMPT_FILE), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise CheckError(f"{folder / PROMPT_FILE}: cannot read ({exc})") from None
    if rate != TTS_RATE:
        raise CheckError(f"{folder / PROMPT_FILE}: {rate} Hz, a voice folder holds {TTS_RATE} Hz; build it again")
    return VoiceUnderCheck(name, folder, manifest, np.ascontiguousarray(pcm[:, 0]))


def load_transcriber(settings: Settings) -> Transcriber:
    """The project's speech-to-text as ``[speech]`` configures it, on ``[voice_check] stt_model``
    when set; always with word timings (the report draws them). :class:`CheckError` when none."""
    model = settings.voice_check.stt_model or settings.speech.model
    if not model:
        raise CheckError("no speech-to-text model: set [voice_check] stt_model or [speech] model "
                         "(a faster-whisper model folder; see config/callbridge.toml)")
    speech = replace(settings.speech, model=model, word_timestamps=True)
    try:
        return transcriber_factory(speech)()
    except TranscriberError as exc:
        raise CheckError(str(exc)) from None


async def synthesize(runtime: Dia2, snapshot: VoiceSnapshot, sentences: Sequence[str], settings: Settings,
                     say: Say) -> list[Synthesized]:
    """Each sentence as its own turn from ``snapshot``, one after another, through the calls' path."""
    worker = TtsWorker(runtime, 1, name="voice-check")
    worker.start()
    out: list[Synthesized] = []
    try:
        await worker.ready()
        for i, text in enumerate(sentences, 1):
            outbound = OutboundAudio(quality=settings.audio.resampler_quality)
            pcm: list[np.ndarray] = []
            chunks: list[bytes] = []
            first_chunk_at: float | None = None
            opened = time.monotonic()
            handle = await worker.open_turn(
                snapshot, generation_config(settings.tts, seed=settings.tts.seed + i),
                turn_id=f"check-{i}", text=text, close=True,
            )
            try:
                async for frame in handle.frames():
                    pcm.append(frame.pcm24k)
                    ready = outbound.push(frame.pcm24k)
                    if ready and first_chunk_at is None:
                        first_chunk_at = time.monotonic()
                    chunks += ready
            except TurnFailed as exc:
                raise CheckError(f"turn {i} failed in the TTS worker: {exc}") from None
            finally:
                handle.cancel()
            chunks += outbound.finish()
            timing = handle.timing
            audio = np.concatenate(pcm) if pcm else np.zeros(0, dtype=np.float32)
            out.append(Synthesized(
                text=text,
                pcm24k=audio.astype(np.float32, copy=False),
                ulaw8k=b"".join(chunks),
                ttfa_s=None if first_chunk_at is None else first_chunk_at - opened,
                first_frame_s=timing.time_to_first_frame_s,
                parts=timing.parts,
            ))
            say(f"turn {i}/{len(sentences)}: {audio.size / TTS_RATE:.2f} s of audio"
                + (f", first audio after {out[-1].ttfa_s:.2f} s" if out[-1].ttfa_s is not None else ""))
    finally:
        await worker.stop()
    return out


def hear(transcriber: Transcriber, pcm8k: np.ndarray) -> tuple[tuple[Word, ...], str]:
    """Every word the STT hears in ``pcm8k`` (float [-1, 1], 8 kHz), seconds from its start, and its text.

    No segment guards here: the check wants everything said, a babble included; the guards
    exist to keep line noise out of a live conversation."""
    if pcm8k.size == 0:
        return (), ""
    pcm16 = np.rint(np.clip(pcm8k, -1.0, 1.0) * 32767.0).astype(np.int16)
    segments = transcriber.decode(to_stt_audio(pcm16, LINE_RATE))
    words = tuple(w for seg in segments for w in seg.words if any(c.isalnum() for c in w.word))
    return words, " ".join(seg.text.strip() for seg in segments if seg.text.strip())


def run_check(
    runtime: Dia2,
    voice: VoiceUnderCheck,
    sentences: Sequence[str],
    settings: Settings,
    *,
    transcriber: Transcriber,
    encoder: SpeakerEncoder | None,
    say: Say,
) -> tuple[CheckResult, list[Synthesized]]:
    """Synthesize, hear, embed, judge. The caller writes the report."""
    try:
        snapshot = load_snapshot(voice.folder / SNAPSHOT_FILE, runtime)
    except Dia2Error as exc:  # the snapshot is of another model, or broken
        raise CheckError(f"voice {voice.name!r}: {exc} (rebuild it: callbridge voice build --rebuild-all)") from None
    say(f"synthesizing {len(sentences)} turn(s) of voice {voice.name!r}")
    turns = asyncio.run(synthesize(runtime, snapshot, sentences, settings, say))
    say(f"hearing them with {transcriber.name}" + (f"; speaker model {encoder.name}" if encoder else ""))
    inputs = []
    for t in turns:
        words, text = hear(transcriber, t.pcm8k)
        inputs.append(TurnInput(
            text=t.text,
            pcm24k=t.pcm24k,
            pcm8k=t.pcm8k,
            heard=words,
            heard_text=text,
            embedding=encoder.embed(t.pcm24k, TTS_RATE) if encoder else None,
            ttfa_s=t.ttfa_s,
            first_frame_s=t.first_frame_s,
            parts=t.parts,
        ))
    prompt = PromptInput(voice.manifest.transcript,
                         encoder.embed(voice.prompt24k, TTS_RATE) if encoder else None)
    return analyse(inputs, prompt, settings.voice_check), turns
