"""``callbridge voice build|list|show|remove``: make and manage the voice folders the service loads.

Progress goes to stderr, results (list, show) to stdout. Every refusal prints one line,
``error: ...``, and returns 2; no tracebacks for bad input.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dia2 import FRAME_RATE_HZ, Dia2, Dia2Error

from ..config import Settings, SettingsError, load_settings
from .build import (
    DEFAULT_LANGUAGE,
    DEFAULT_WHISPER_MODEL,
    PROMPT_FILE,
    VoiceBuildError,
    VoiceManifest,
    VoiceRequest,
    check_voice_name,
    prepare_voice,
    rebuild_all,
    voice_folders,
    write_voice_folder,
)
from .registry import MANIFEST_FILE, SNAPSHOT_FILE, VoiceError

USAGE = """\
callbridge voice build NAME --audio FILE [--words words.json] [--whisper-model NAME_OR_PATH]
                           [--language en|auto] [--s2-audio FILE [--s2-words words.json]]
                           [--layout s1_s2|s1_only] [--model DIR|HUB_ID|random-tiny] [--device cpu|cuda]
callbridge voice build --rebuild-all [--model ...]
callbridge voice list
callbridge voice show NAME [--model ...] [--json]
callbridge voice remove NAME
callbridge voice check NAME [--sentences FILE] [--turns N] [--report DIR] [--model ...]
(every command also takes --voices-dir DIR and --config FILE)"""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--voices-dir", default=None, help="voice folders (default: [voices] dir of the config)")
    p.add_argument("--config", default=None, help="TOML config (default: $CALLBRIDGE_CONFIG or config/callbridge.toml)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Dia2 model folder, hub id or random-tiny (default: [model] model of the config)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: [model] device of the config)")


Command = Callable[[argparse.Namespace], int]
AfterBuild = Callable[[argparse.Namespace, Settings, Path, Dia2], int]


@dataclass(frozen=True)
class VoiceCliExtension:
    """What a higher layer adds to ``callbridge voice`` without this module importing it (the
    voice check sits above voices): more subcommands, more options on the existing ones, a step
    after a build (given the args, settings, the new folder and the loaded runtime; returns the
    exit status), and the errors it reports as one line."""

    add_arguments: Callable[[argparse._SubParsersAction, dict[str, argparse.ArgumentParser]], None]
    commands: dict[str, Command] = field(default_factory=dict)
    after_build: AfterBuild | None = None
    errors: tuple[type[Exception], ...] = ()


def build_parser(extension: VoiceCliExtension | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callbridge voice", description="Build and manage cloned voices.",
                                     usage=USAGE)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", prog="callbridge voice build", help="build a voice folder from a recording (or rebuild all for a new model)")
    build.add_argument("name", nargs="?", help="the voice name (a folder under the voices dir)")
    build.add_argument("--audio", type=Path, help="the S1 recording of the voice to clone: record 5-20 s of one speaker (3-30 s accepted; "
                       "WAV, FLAC, OGG, MP3)")
    build.add_argument("--words", type=Path, help='word timings JSON [{"word", "start", "end"}] in seconds; '
                       "skips transcription")
    build.add_argument("--whisper-model", default=DEFAULT_WHISPER_MODEL,
                       help=f"Whisper model name (downloaded once) or checkpoint path (default: {DEFAULT_WHISPER_MODEL})")
    build.add_argument("--language", default=DEFAULT_LANGUAGE, help="spoken language for Whisper, or auto")
    build.add_argument("--s2-audio", type=Path, help="a short clip of another speaker, placed after the S1 prompt")
    build.add_argument("--s2-words", type=Path, help="word timings of the S2 clip")
    build.add_argument("--layout", choices=("s1_s2", "s1_only"), default=None,
                       help="default: s1_s2 with an S2 clip, else s1_only")
    build.add_argument("--rebuild-all", action="store_true",
                       help="rebuild every voice from its stored prompt and words for the current model")
    _model_args(build)
    _common(build)

    ls = sub.add_parser("list", prog="callbridge voice list", help="list the voices")
    _common(ls)

    show = sub.add_parser("show", prog="callbridge voice show", help="show a voice's manifest and whether it fits the configured model")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print the manifest as JSON")
    _model_args(show)
    _common(show)

    rm = sub.add_parser("remove", prog="callbridge voice remove", help="delete a voice folder (asks nothing)")
    rm.add_argument("name")
    _common(rm)
    if extension is not None:
        extension.add_arguments(sub, {"build": build, "list": ls, "show": show, "remove": rm})
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    if getattr(args, "model", None):
        settings = settings.with_(model={"model": args.model})
    return settings


def _voices_dir(args: argparse.Namespace, settings: Settings) -> Path:
    return Path(args.voices_dir or settings.voices.dir)


def _model_label(settings: Settings) -> str:
    """The model as the manifest records it: a local folder as an absolute path, else as named."""
    source = settings.model.model
    path = Path(source).expanduser()
    return str(path.resolve()) if path.is_dir() else source


def _load_runtime(args: argparse.Namespace, settings: Settings) -> Dia2:
    from ..startup import resolve_model

    source = resolve_model(settings, _say)
    m = settings.model
    device = args.device or m.device
    return Dia2.load(source, device=None if device == "auto" else device, dtype=m.dtype, mimi=m.mimi or None,
                     progress=sys.stderr.isatty(), say=_say)


def cmd_build(args: argparse.Namespace, after_build: AfterBuild | None = None) -> int:
    settings = _settings(args)
    voices_dir = _voices_dir(args, settings)
    if args.rebuild_all:
        given = [flag for flag, value in (("NAME", args.name), ("--audio", args.audio), ("--words", args.words),
                                          ("--s2-audio", args.s2_audio), ("--s2-words", args.s2_words),
                                          ("--layout", args.layout)) if value]
        if given:
            raise VoiceBuildError(f"--rebuild-all rebuilds every voice from its stored files; drop {', '.join(given)}")
        runtime = _load_runtime(args, settings)
        report = rebuild_all(runtime, voices_dir, model_source=_model_label(settings), say=_say)
        _say(f"rebuilt {len(report.rebuilt)}, skipped {len(report.skipped)}, failed {len(report.failed)}")
        if report.failed:
            raise VoiceBuildError(f"{len(report.failed)} voice(s) failed to rebuild: {', '.join(sorted(report.failed))}")
        return 0
    if not args.name or args.audio is None:
        raise VoiceBuildError("voice build needs NAME and --audio FILE (or --rebuild-all)")
    request = VoiceRequest(
        name=args.name,
        audio=args.audio,
        words=args.words,
        whisper_model=args.whisper_model,
        language=None if args.language == "auto" else args.language,
        s2_audio=args.s2_audio,
        s2_words=args.s2_words,
        layout=args.layout,
    )
    # Audio and words first: a bad recording is refused before the model is loaded.
    voice = prepare_voice(request, _say)
    runtime = _load_runtime(args, settings)
    folder = write_voice_folder(voices_dir, voice, runtime, model_source=_model_label(settings), say=_say)
    use = ("it is the default voice" if voice.name == settings.voices.default else
           f"calls use it when the voice webhook URL has ?voice={voice.name}")
    _say(f"done: {folder} ({use}; the service loads voices when it starts)")
    return after_build(args, settings, folder, runtime) if after_build is not None else 0


def cmd_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    voices_dir = _voices_dir(args, settings)
    folders = voice_folders(voices_dir)
    if not folders:
        _say(f"no voices in {voices_dir}/ (build one: callbridge voice build NAME --audio FILE)")
        return 0
    for folder in folders:
        default = " (default)" if folder.name == settings.voices.default else ""
        try:
            m = VoiceManifest.read(folder)
        except VoiceBuildError as exc:
            print(f"{folder.name}{default}\tbroken: {exc}")
            continue
        text = m.transcript if len(m.transcript) <= 60 else m.transcript[:57] + "..."
        s2 = f" + S2 {m.s2.duration_s:.1f} s" if m.s2 is not None else ""
        print(f"{folder.name}{default}\t{m.prompt_s:.1f} s{s2}\t{m.layout}\tbuilt {m.built_at}\t{text!r}")
    return 0


def _model_match(m: VoiceManifest, source: str) -> str:
    """Whether the voice fits ``source`` by weights file and config, without loading the model."""
    from dia2 import load_config, resolve_checkpoint, weights_identity

    path = Path(source).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, local_files_only=True,
                                          allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
        except (OSError, ValueError) as exc:
            return f"not checked: {source} is not a local folder nor in the hub cache ({type(exc).__name__})"
    try:
        files = resolve_checkpoint(path)
        model_id, config_hash = weights_identity(files.weights), load_config(files.config).content_hash()
    except (Dia2Error, OSError) as exc:
        return f"not checked: {exc}"
    if (model_id, config_hash) == (m.model.model_id, m.model.config_hash):
        return f"matches {source}"
    return (f"DOES NOT MATCH {source} (model {model_id}, config {config_hash}; the voice has model "
            f"{m.model.model_id}, config {m.model.config_hash}): rebuild it with "
            f"`callbridge voice build --rebuild-all --model {source}`")


def cmd_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    name = check_voice_name(args.name)
    folder = _voices_dir(args, settings) / name
    if not folder.is_dir():
        raise VoiceBuildError(f"no voice {name!r} in {folder.parent}/")
    m = VoiceManifest.read(folder)
    if args.json:
        print(json.dumps(m.to_dict(), indent=2, ensure_ascii=False))
        return 0
    from ..startup import RANDOM_TINY, resolve_model

    configured = settings.model.model
    # The random model is written on first use; do that quietly rather than print its banner here.
    source = resolve_model(settings, lambda _msg: None) if configured == RANDOM_TINY else configured
    lines = [
        f"voice:       {m.name}" + (" (default)" if m.name == settings.voices.default else ""),
        f"folder:      {folder}",
        f"duration:    {m.prompt_s:.2f} s S1 prompt ({m.prompt.file}, from {m.prompt.source})",
        f"transcript:  {m.transcript}",
        f"words:       {m.prompt.words_file}, from {m.prompt.words_source}"
        + (f" (whisper {m.whisper_model})" if m.prompt.words_source == "whisper" else ""),
        "S2 clip:     " + (f"{m.s2.duration_s:.2f} s ({m.s2.file}): {m.s2.transcript}" if m.s2 else "none"),
        f"layout:      {m.layout}",
        f"snapshot:    {m.snapshot_file}, {m.prompt_frames} frames ({m.prompt_frames / FRAME_RATE_HZ:.2f} s: "
        f"S1 {m.s1_frames} + S2 {m.s2_frames})",
        f"built:       {m.built_at} for {m.model.source} (model {m.model.model_id}, config {m.model.config_hash})",
        f"model:       {_model_match(m, source)}",
    ]
    lines += [f"warning:     {w}" for w in m.warnings]
    if not (folder / SNAPSHOT_FILE).exists():
        lines.append(f"missing:     {SNAPSHOT_FILE}: rebuild with `callbridge voice build --rebuild-all`")
    print("\n".join(lines))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    settings = _settings(args)
    name = check_voice_name(args.name)
    folder = _voices_dir(args, settings) / name
    if not folder.is_dir():
        raise VoiceBuildError(f"no voice {name!r} in {folder.parent}/")
    if not any((folder / f).exists() for f in (MANIFEST_FILE, SNAPSHOT_FILE, PROMPT_FILE)):
        # Only voice folders: never delete some other directory someone keeps there.
        raise VoiceBuildError(f"{folder} is not a voice folder (no {MANIFEST_FILE}, {SNAPSHOT_FILE} or {PROMPT_FILE})")
    shutil.rmtree(folder)
    print(f"removed voice {name!r} ({folder})")
    if name == settings.voices.default:
        _say(f"warning: {name!r} was the default voice; the service will not start until a voice of that "
             "name is built or [voices] default names another")
    return 0


COMMANDS = {"build": cmd_build, "list": cmd_list, "show": cmd_show, "remove": cmd_remove}


def main_voice(argv: list[str], extension: VoiceCliExtension | None = None) -> int:
    """Run ``callbridge voice ...``; returns the exit status (2 for any refused input)."""
    try:
        args = build_parser(extension).parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and the reason already
        return int(exc.code or 0)
    commands: dict[str, Command] = dict(COMMANDS)
    errors: tuple[type[Exception], ...] = (VoiceBuildError, VoiceError, SettingsError, Dia2Error)
    if extension is not None:
        commands.update(extension.commands)
        errors += extension.errors
        if extension.after_build is not None:
            after = extension.after_build
            commands["build"] = lambda a: cmd_build(a, after)
    try:
        return commands[args.command](args)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
