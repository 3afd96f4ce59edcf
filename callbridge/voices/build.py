"""Building a voice folder: prompt audio checked and normalised, word timings, snapshot, manifest.

``voices/NAME/`` holds ``prompt.wav`` (24 kHz mono 16-bit, trimmed and level-normalised),
``words.json`` (``[{"word", "start", "end"}]``, seconds from the start of ``prompt.wav``),
optionally the other-speaker clip ``s2.wav`` + ``s2_words.json``, the snapshot
(``snapshot.safetensors``) and ``manifest.json``. The snapshot is always built from the files
as written (16-bit audio, rounded timings), so ``rebuild_all`` on the same model reproduces
it exactly and a rebuild for a new model needs nothing but the folder.

The pieces are plain functions so each can be tested alone: :func:`check_prompt_audio`
(mono, 24 kHz, limits, silence, clipping, one-speaker hint, trim, level), :func:`transcribe`
(openai-whisper word timestamps, imported lazily), :func:`read_words_file`,
:func:`write_voice_folder`, :func:`build_voice` and :func:`rebuild_all`.

The audio checks live in :mod:`callbridge.voices.prompt_audio`, words files and Whisper in
:mod:`callbridge.voices.words`; this module builds, writes and rebuilds voice folders and
re-exports the names its callers import from it.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from dia2 import (
    LAYOUTS,
    Dia2,
    Dia2Error,
    Layout,
    PromptClip,
    VoicePrompt,
    VoiceSnapshot,
    WordTiming,
    build_snapshot,
    identity_of,
)

from .prompt_audio import (
    S1_LIMITS,
    S2_LIMITS,
    SAMPLE_RATE,
    AudioLimits,
    VoiceBuildError,
    prepare_prompt_audio,
    read_source_audio,
)
from .prompt_audio import check_prompt_audio as check_prompt_audio
from .registry import MANIFEST_FILE, SNAPSHOT_FILE
from .words import (
    DEFAULT_LANGUAGE,
    DEFAULT_WHISPER_MODEL,
    Transcript,
    load_whisper,
    read_words_file,
    shift_words,
    tidy_words,
    transcribe_with,
    words_to_json,
)

Say = Callable[[str], None]

PROMPT_FILE = "prompt.wav"
WORDS_FILE = "words.json"
S2_FILE = "s2.wav"
S2_WORDS_FILE = "s2_words.json"
VOICE_FORMAT = 1  # version of manifest.json (the snapshot file has its own)

LOW_CONFIDENCE = 0.5  # mean whisper word probability below this is reported
MAX_WORDS_PER_S = 6.0  # fast speech is about 4 words/s; more means the words do not fit the clip

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_voice_name(name: str) -> str:
    """A voice name is a plain folder name: letters, digits, ``_ . -``; no path separators."""
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise VoiceBuildError(
            f"invalid voice name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a "
            "letter or digit (no path separators)"
        )
    return name


# ---------------------------------------------------------------------------- whisper


# Kept here, not in voice_words: it looks ``load_whisper`` up in this module, where tests monkeypatch it.
def transcribe(pcm24k: np.ndarray, whisper_model: str, *, language: str | None = DEFAULT_LANGUAGE) -> Transcript:
    """Load ``whisper_model`` (a name such as ``base.en`` or a checkpoint path) and transcribe."""
    return transcribe_with(load_whisper(whisper_model), pcm24k, language=language, model_name=whisper_model)


# ---------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ModelIdentity:
    """The model a snapshot was built for: what the user named and the ids snapshots check."""

    source: str
    model_id: str
    config_hash: str
    mimi_id: str


@dataclass(frozen=True)
class ClipInfo:
    """One clip of a voice folder and where it came from (durations in seconds)."""

    file: str
    words_file: str
    duration_s: float
    transcript: str
    words_source: str  # "whisper", "file" (--words) or "stored" (a folder built by hand)
    source: str  # the audio file it was made from
    source_sample_rate: int
    source_channels: int
    trimmed_start_s: float


@dataclass(frozen=True)
class VoiceManifest:
    """``manifest.json`` of a voice folder."""

    format_version: int
    name: str
    model: ModelIdentity
    layout: str
    transcript: str  # the S1 words, joined
    prompt: ClipInfo
    s2: ClipInfo | None
    whisper_model: str | None  # None when no clip was transcribed
    language: str | None
    prompt_frames: int  # Mimi frames (80 ms) the snapshot holds, S1 + S2
    s1_frames: int
    s2_frames: int
    dropped_prompt_words: int
    snapshot_file: str
    built_at: str  # ISO 8601 UTC
    warnings: list[str] = field(default_factory=list)

    @property
    def prompt_s(self) -> float:
        return self.prompt.duration_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VoiceManifest:
        version = raw.get("format_version")
        if version != VOICE_FORMAT:
            raise VoiceBuildError(
                f"{MANIFEST_FILE}: voice format {version!r}, this version reads {VOICE_FORMAT}; build the voice again"
            )
        try:
            values = dict(raw)
            values["model"] = ModelIdentity(**raw["model"])
            values["prompt"] = ClipInfo(**raw["prompt"])
            values["s2"] = ClipInfo(**raw["s2"]) if raw.get("s2") else None
            return cls(**values)
        except (KeyError, TypeError) as exc:
            raise VoiceBuildError(f"{MANIFEST_FILE}: not a voice manifest ({type(exc).__name__}: {exc})") from None

    def write(self, folder: Path) -> Path:
        path = folder / MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)  # a reader never sees half a manifest
        return path

    @classmethod
    def read(cls, folder: Path) -> VoiceManifest:
        path = folder / MANIFEST_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VoiceBuildError(f"{folder}: no {MANIFEST_FILE}") from None
        except json.JSONDecodeError as exc:
            raise VoiceBuildError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise VoiceBuildError(f"{path}: not a voice manifest (expected a JSON object)")
        return cls.from_dict(raw)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------- building


@dataclass(frozen=True)
class VoiceRequest:
    """What ``callbridge voice build NAME`` was asked for."""

    name: str
    audio: Path
    words: Path | None = None
    whisper_model: str = DEFAULT_WHISPER_MODEL
    language: str | None = DEFAULT_LANGUAGE
    s2_audio: Path | None = None
    s2_words: Path | None = None
    layout: str | None = None  # None: s1_s2 with an S2 clip, else s1_only


@dataclass(frozen=True)
class PreparedClip:
    """A clip ready to write: normalised audio, its words and where it came from."""

    pcm24k: np.ndarray
    words: tuple[WordTiming, ...]
    info: ClipInfo


@dataclass(frozen=True)
class PreparedVoice:
    """Everything of a voice but the snapshot (no model needed to get here)."""

    name: str
    layout: str
    s1: PreparedClip
    s2: PreparedClip | None
    whisper_model: str | None
    language: str | None
    warnings: tuple[str, ...]


def _prepare_clip(
    audio: Path,
    words_path: Path | None,
    *,
    what: str,
    limits: AudioLimits,
    files: tuple[str, str],
    words_flag: str,
    whisper_model: str,
    language: str | None,
    say: Say,
) -> tuple[PreparedClip, list[str]]:
    source = read_source_audio(audio)
    layout = "mono" if source.channels == 1 else f"{source.channels} channels, mixed to mono"
    say(f"{what}: read {source.path} ({source.format}, {source.sample_rate} Hz, {layout}, {source.duration_s:.2f} s)")
    prepared = prepare_prompt_audio(source.samples, source.sample_rate, limits=limits, what=what)
    resampled = "" if source.sample_rate == SAMPLE_RATE else f", resampled {source.sample_rate} -> {SAMPLE_RATE} Hz"
    say(f"{what}: {prepared.duration_s:.2f} s after trimming silence "
        f"({prepared.trim_start_s:.2f} s cut at the start{resampled}), level normalised")
    found = list(prepared.warnings)
    if words_path is not None:
        raw_words = shift_words(read_words_file(words_path), prepared, source=str(words_path))
        words_source = "file"
        hint = f"{words_path} holds no speech words"
        say(f"{what}: {len(raw_words)} word timings from {words_path}")
    else:
        say(f"{what}: transcribing with whisper {whisper_model} (CPU)")
        try:
            transcript = transcribe(prepared.pcm24k, whisper_model, language=language)
        except VoiceBuildError as exc:
            if words_flag == "--words":
                raise  # its message already names --words
            raise VoiceBuildError(f"the {what} has no word timings and Whisper could not transcribe it: pass "
                                  f"{words_flag} words.json (Whisper said: {exc})") from None
        raw_words = transcript.words
        words_source = "whisper"
        hint = (f"whisper ({whisper_model}) heard none in {prepared.duration_s:.1f} s; check that the clip holds "
                f"speech, try a larger --whisper-model, or give the word timings with {words_flag} words.json")
        if transcript.mean_probability is not None and transcript.mean_probability < LOW_CONFIDENCE:
            found.append(
                f"whisper is unsure of the {what} transcript (mean word probability "
                f"{transcript.mean_probability:.2f}); check {files[1]} or pass {words_flag}"
            )
    words, marks = tidy_words(raw_words, what=what, hint=hint)
    found += marks
    if len(words) / prepared.duration_s > MAX_WORDS_PER_S:
        found.append(
            f"the {what} transcript has {len(words)} words for {prepared.duration_s:.1f} s of audio (more than "
            f"{MAX_WORDS_PER_S:g} words/s): the words do not look like this clip's; check {files[1]}"
        )
    text = " ".join(w.word for w in words)
    say(f"{what}: {len(words)} words: {text[:200]}{'…' if len(text) > 200 else ''}")
    info = ClipInfo(
        file=files[0],
        words_file=files[1],
        duration_s=round(prepared.duration_s, 3),
        transcript=text,
        words_source=words_source,
        source=str(source.path.resolve()),
        source_sample_rate=source.sample_rate,
        source_channels=source.channels,
        trimmed_start_s=round(prepared.trim_start_s, 3),
    )
    return PreparedClip(prepared.pcm24k, words, info), found


def prepare_voice(request: VoiceRequest, say: Say = lambda _msg: None) -> PreparedVoice:
    """Read, check and normalise the clip(s) and get their words; no model is loaded.

    Raises :class:`VoiceBuildError` for unusable input. Warnings are said as they are found
    and kept for the manifest."""
    name = check_voice_name(request.name)
    layout = request.layout or ("s1_s2" if request.s2_audio is not None else "s1_only")
    if layout not in LAYOUTS:
        raise VoiceBuildError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if layout == "s1_only" and request.s2_audio is not None:
        raise VoiceBuildError("--layout s1_only places nothing after the S1 prompt: drop --s2-audio or use s1_s2")
    if request.s2_words is not None and request.s2_audio is None:
        raise VoiceBuildError("--s2-words needs --s2-audio (the other speaker's clip)")
    s1, found = _prepare_clip(
        request.audio, request.words, what="S1 prompt", limits=S1_LIMITS, files=(PROMPT_FILE, WORDS_FILE),
        words_flag="--words", whisper_model=request.whisper_model, language=request.language, say=say,
    )
    s2: PreparedClip | None = None
    if request.s2_audio is not None:
        s2, more = _prepare_clip(
            request.s2_audio, request.s2_words, what="S2 clip", limits=S2_LIMITS, files=(S2_FILE, S2_WORDS_FILE),
            words_flag="--s2-words", whisper_model=request.whisper_model, language=request.language, say=say,
        )
        found += more
    else:
        found.append(
            "no --s2-audio: the snapshot holds the S1 prompt alone, which reportedly clones the voice less "
            "reliably (Dia2 may drift to a random voice); add a short clip of another speaker with --s2-audio"
        )
    for message in found:
        say(f"warning: {message}")
    transcribed = s1.info.words_source == "whisper" or (s2 is not None and s2.info.words_source == "whisper")
    return PreparedVoice(
        name=name,
        layout=layout,
        s1=s1,
        s2=s2,
        whisper_model=request.whisper_model if transcribed else None,
        language=request.language if transcribed else None,
        warnings=tuple(found),
    )


def _read_clip(folder: Path, audio_file: str, words_file: str) -> PromptClip:
    """A stored clip (24 kHz mono, as ``write_voice_folder`` writes it) and its words."""
    import soundfile as sf

    path = folder / audio_file
    try:
        pcm, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise VoiceBuildError(f"{path}: cannot read ({exc})") from None
    if rate != SAMPLE_RATE or pcm.shape[1] != 1:
        raise VoiceBuildError(f"{path}: expected {SAMPLE_RATE} Hz mono, found {rate} Hz with {pcm.shape[1]} channels")
    return PromptClip(np.ascontiguousarray(pcm[:, 0]), read_words_file(folder / words_file))


def snapshot_from_folder(folder: Path, runtime: Dia2, layout: str) -> VoiceSnapshot:
    """Build the snapshot of a voice folder's stored clip(s) for ``runtime``."""
    s1 = _read_clip(folder, PROMPT_FILE, WORDS_FILE)
    s2 = None
    if layout == "s1_s2" and (folder / S2_FILE).exists():
        s2 = _read_clip(folder, S2_FILE, S2_WORDS_FILE)
    try:
        return build_snapshot(runtime, VoicePrompt(s1=s1, s2=s2), layout=cast(Layout, layout))
    except Dia2Error as exc:
        raise VoiceBuildError(f"{folder.name}: the model refused the prompt: {exc}") from None


def _model_identity(runtime: Dia2, source: str) -> ModelIdentity:
    model_id, config_hash, mimi_id = identity_of(runtime)
    return ModelIdentity(source=source, model_id=model_id, config_hash=config_hash, mimi_id=mimi_id)


def _with_snapshot(manifest: VoiceManifest, snap: VoiceSnapshot, identity: ModelIdentity) -> VoiceManifest:
    m = snap.manifest
    return replace(
        manifest,
        model=identity,
        layout=m.layout,
        prompt_frames=m.prompt_frames,
        s1_frames=m.s1_frames,
        s2_frames=m.s2_frames,
        dropped_prompt_words=m.dropped_prompt_words,
        built_at=_now(),
    )


def write_voice_folder(voices_dir: Path, voice: PreparedVoice, runtime: Dia2, *, model_source: str, say: Say) -> Path:
    """Write ``voices_dir/NAME/`` (clips, words, snapshot, manifest); returns the folder.

    Everything is written to a hidden staging folder first and swapped in at the end, so a
    failed build leaves an existing voice of that name as it was."""
    from dia2 import write_wav

    voices_dir.mkdir(parents=True, exist_ok=True)
    final = voices_dir / voice.name
    staging = voices_dir / f".{voice.name}.building"
    shutil.rmtree(staging, ignore_errors=True)  # a previous build that died half-way
    staging.mkdir()
    try:
        clips = [voice.s1] + ([voice.s2] if voice.s2 is not None else [])
        for clip in clips:
            write_wav(staging / clip.info.file, clip.pcm24k, SAMPLE_RATE)
            text = json.dumps(words_to_json(clip.words), indent=1, ensure_ascii=False)
            (staging / clip.info.words_file).write_text(text + "\n", encoding="utf-8")
        say(f"snapshot: building for {model_source} (layout {voice.layout})")
        # From the files as written (16-bit, 1 ms timings): a rebuild for the same model then
        # reproduces this snapshot exactly.
        snap = snapshot_from_folder(staging, runtime, voice.layout)
        snap.save(staging / SNAPSHOT_FILE)
        m = snap.manifest
        found = list(voice.warnings)
        if m.dropped_prompt_words:
            # Each word needs at least one 80 ms frame per token; words that do not fit were
            # never fed, so the prompt's text and audio part ways at the end.
            found.append(
                f"{m.dropped_prompt_words} word(s) at the end of the transcript did not fit the prompt audio "
                f"({m.prompt_frames} frames): check {WORDS_FILE} (too many words for the clip?)"
            )
            say(f"warning: {found[-1]}")
        VoiceManifest(
            format_version=VOICE_FORMAT,
            name=voice.name,
            model=_model_identity(runtime, model_source),
            layout=m.layout,
            transcript=voice.s1.info.transcript,
            prompt=voice.s1.info,
            s2=voice.s2.info if voice.s2 is not None else None,
            whisper_model=voice.whisper_model,
            language=voice.language,
            prompt_frames=m.prompt_frames,
            s1_frames=m.s1_frames,
            s2_frames=m.s2_frames,
            dropped_prompt_words=m.dropped_prompt_words,
            snapshot_file=SNAPSHOT_FILE,
            built_at=_now(),
            warnings=found,
        ).write(staging)
        if final.exists():
            old = voices_dir / f".{voice.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            say(f"replaced the earlier voice {voice.name!r}")
        else:
            staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"wrote {final}/ ({m.prompt_frames} frames = {m.prompt_frames / runtime.frame_rate:.2f} s of prompt)")
    return final


def build_voice(
    request: VoiceRequest,
    runtime: Dia2,
    voices_dir: Path,
    *,
    model_source: str,
    say: Say = lambda _msg: None,
) -> Path:
    """:func:`prepare_voice` then :func:`write_voice_folder`; returns ``voices_dir/NAME``."""
    return write_voice_folder(voices_dir, prepare_voice(request, say), runtime, model_source=model_source, say=say)


# ---------------------------------------------------------------------------- rebuild


@dataclass
class RebuildReport:
    """Which voice folders ``rebuild_all`` rebuilt, skipped (not a voice) or failed (why)."""

    rebuilt: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def voice_folders(voices_dir: Path) -> list[Path]:
    """Voice folders: visible sub-folders with a manifest, a snapshot or a prompt."""
    if not voices_dir.is_dir():
        return []
    marks = (MANIFEST_FILE, SNAPSHOT_FILE, PROMPT_FILE)
    return sorted(
        p for p in voices_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any((p / m).exists() for m in marks)
    )


def _manifest_for_stored(folder: Path) -> VoiceManifest:
    """The manifest of a folder built by hand (prompt + words, no manifest): a fresh one."""
    import soundfile as sf

    def clip(audio_file: str, words_file: str) -> ClipInfo:
        info = sf.info(str(folder / audio_file))
        words = read_words_file(folder / words_file)
        return ClipInfo(audio_file, words_file, round(info.duration, 3), " ".join(w.word for w in words),
                        "stored", str(folder / audio_file), info.samplerate, info.channels, 0.0)

    s1 = clip(PROMPT_FILE, WORDS_FILE)
    s2 = clip(S2_FILE, S2_WORDS_FILE) if (folder / S2_FILE).exists() else None
    return VoiceManifest(
        format_version=VOICE_FORMAT, name=folder.name, model=ModelIdentity("", "", "", ""),
        layout="s1_s2" if s2 is not None else "s1_only", transcript=s1.transcript, prompt=s1, s2=s2,
        whisper_model=None, language=None, prompt_frames=0, s1_frames=0, s2_frames=0, dropped_prompt_words=0,
        snapshot_file=SNAPSHOT_FILE, built_at="",
    )


def rebuild_voice(folder: Path, runtime: Dia2, *, model_source: str) -> VoiceManifest:
    """Rebuild one folder's snapshot from its stored clip(s) and words (no transcription)."""
    if not (folder / PROMPT_FILE).exists() or not (folder / WORDS_FILE).exists():
        raise VoiceBuildError(f"{folder}: no {PROMPT_FILE} + {WORDS_FILE} to rebuild from; build it again with --audio")
    manifest = VoiceManifest.read(folder) if (folder / MANIFEST_FILE).exists() else _manifest_for_stored(folder)
    if manifest.layout == "s1_s2" and manifest.s2 is not None and not (folder / S2_FILE).exists():
        raise VoiceBuildError(f"{folder}: the manifest names an S2 clip but {S2_FILE} is missing")
    snap = snapshot_from_folder(folder, runtime, manifest.layout)
    snap.save(folder / SNAPSHOT_FILE)
    updated = _with_snapshot(manifest, snap, _model_identity(runtime, model_source))
    updated.write(folder)
    return updated


def rebuild_all(runtime: Dia2, voices_dir: Path, *, model_source: str, say: Say = lambda _msg: None) -> RebuildReport:
    """Rebuild every voice folder in ``voices_dir`` for ``runtime``; one failure does not stop the rest."""
    report = RebuildReport()
    folders = voice_folders(voices_dir)
    if not folders:
        say(f"no voice folders in {voices_dir}/")
    for folder in folders:
        if not (folder / PROMPT_FILE).exists():
            report.skipped.append(folder.name)
            say(f"{folder.name}: skipped (no {PROMPT_FILE} to rebuild from)")
            continue
        try:
            m = rebuild_voice(folder, runtime, model_source=model_source)
        except VoiceBuildError as exc:
            report.failed[folder.name] = str(exc)
            say(f"{folder.name}: FAILED: {exc}")
            continue
        report.rebuilt.append(folder.name)
        say(f"{folder.name}: rebuilt ({m.prompt_s:.2f} s prompt, layout {m.layout})")
    return report
