"""``callbridge voice check NAME``, and the short check at the end of ``callbridge voice build``.

Exit status: 0 every threshold passed, 1 one failed (the report says which), 2 the check could
not run (one ``error:`` line that says what to do). ``voice build`` runs the first
``[voice_check] build_check_turns`` sentences after writing the voice and exits 1 when they
fail (the voice is written either way); ``--no-check`` skips it, and a missing speech-to-text
or speaker model skips it with a one-line note.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dia2 import Dia2

from ..config import Settings
from ..voices.build import check_voice_name
from ..voices.cli import (
    VoiceCliExtension,
    _common,
    _load_runtime,
    _model_args,
    _model_label,
    _say,
    _settings,
    _voices_dir,
)
from ..voices.cli import main_voice as _main_voice
from .analysis import CheckResult
from .report import write_report
from .run import CheckError, VoiceUnderCheck, load_transcriber, load_voice, run_check
from .sentences import DEFAULT_SENTENCES, SentenceError, choose_sentences, read_sentences
from .speaker import SpeakerModelMissing, load_speaker_encoder

__all__ = ["main_voice"]

REPORT_SUBDIR = "check"  # default report folder, inside the voice folder


def _add_arguments(sub: argparse._SubParsersAction, parsers: dict[str, argparse.ArgumentParser]) -> None:
    check = sub.add_parser("check", prog="callbridge voice check",
                           help="speak test sentences in a voice and check the words, the speaker and the audio")
    check.add_argument("name", help="the voice to check")
    check.add_argument("--sentences", type=Path, help="a text file, one sentence (turn) per line (default: "
                       "a built-in telephone-like set)")
    check.add_argument("--turns", type=int, default=None, help="turns to speak (default: one per sentence)")
    check.add_argument("--report", type=Path, default=None,
                       help=f"folder for report.json, index.html and the audio (default: voices/NAME/{REPORT_SUBDIR})")
    _model_args(check)
    _common(check)
    parsers["build"].add_argument("--no-check", action="store_true",
                                  help="skip the short voice check after building")


def _summary(result: CheckResult) -> list[str]:
    lines = []
    for f in result.turns:
        sim = "" if f.prompt_similarity is None else f"  similarity {f.prompt_similarity:.2f}"
        leak = "  LEAK" if f.leak else ""
        lines.append(f"turn {f.index}: WER {f.wer:.2f}{sim}  level {f.level.rms_dbfs:.1f} dBFS{leak}  "
                     f"heard: {f.heard_text!r}")
    lines.append(f"overall WER {result.wer:.2f}; {result.leak_turns} leaking turn(s)")
    lines.append("PASS" if result.passed else "FAIL:\n  " + "\n  ".join(result.failures))
    return lines


def _check(settings: Settings, voice: VoiceUnderCheck, runtime: Dia2,
           sentences: tuple[str, ...], report_dir: Path, *, transcriber: Any, encoder: Any) -> CheckResult:
    result, turns = run_check(runtime, voice, sentences, settings, transcriber=transcriber, encoder=encoder,
                              say=_say)
    meta = {
        "model": _model_label(settings),
        "stt_model": settings.voice_check.stt_model or settings.speech.model,
        "stt_backend": transcriber.name,
        "speaker_model": encoder.name if encoder is not None else None,
    }
    page = write_report(report_dir, result, voice=voice.name, turns_pcm24k=[t.pcm24k for t in turns],
                        turns_pcm8k=[t.pcm8k for t in turns], meta=meta)
    _say(f"report: {page} (and {page.parent / 'report.json'})")
    return result


def cmd_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    name = check_voice_name(args.name)
    sentences = read_sentences(args.sentences) if args.sentences else DEFAULT_SENTENCES
    sentences = choose_sentences(sentences, args.turns)
    voice = load_voice(_voices_dir(args, settings), name)
    # The listeners first: a missing model is refused before Dia2 loads.
    transcriber = load_transcriber(settings)
    try:
        encoder = load_speaker_encoder()
    except SpeakerModelMissing as exc:
        raise CheckError(str(exc)) from None
    runtime = _load_runtime(args, settings)
    report_dir = args.report or voice.folder / REPORT_SUBDIR
    result = _check(settings, voice, runtime, sentences, report_dir, transcriber=transcriber, encoder=encoder)
    print("\n".join(_summary(result)))
    return 0 if result.passed else 1


def after_build(args: argparse.Namespace, settings: Settings, folder: Path, runtime: Dia2) -> int:
    """The short check that ends ``voice build``: its verdict, or why it was skipped."""
    if args.no_check:
        _say("voice check: skipped (--no-check)")
        return 0
    try:
        transcriber = load_transcriber(settings)
        encoder = load_speaker_encoder()
    except (CheckError, SpeakerModelMissing) as exc:
        _say(f"voice check: skipped: {exc}")
        return 0
    voice = load_voice(folder.parent, folder.name)
    sentences = choose_sentences(DEFAULT_SENTENCES, settings.voice_check.build_check_turns)
    result = _check(settings, voice, runtime, sentences, folder / REPORT_SUBDIR,
                    transcriber=transcriber, encoder=encoder)
    for line in _summary(result):
        _say(f"voice check: {line}")
    if not result.passed:
        _say(f"the voice is written but failed its check; see the report, or run `callbridge voice check "
             f"{folder.name}` for the full set")
    return 0 if result.passed else 1


EXTENSION = VoiceCliExtension(
    add_arguments=_add_arguments,
    commands={"check": cmd_check},
    after_build=after_build,
    errors=(CheckError, SentenceError),
)


def main_voice(argv: list[str]) -> int:
    """``callbridge voice ...`` with ``check`` and the build's check: what ``callbridge`` runs."""
    return _main_voice(argv, EXTENSION)


if __name__ == "__main__":
    sys.exit(main_voice(sys.argv[1:]))
