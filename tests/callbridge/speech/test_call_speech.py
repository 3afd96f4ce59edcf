"""Caller speech inside a call: frames from the leg → endpointer → worker → events out to the
text-socket listeners and the agent hook; never logged at INFO (caller data)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from callbridge.calls.agent import AgentReply, CallableAgent
from callbridge.calls.call import Call
from callbridge.calls.leg import CallerAudio
from callbridge.calls.turns import Turn, TurnState
from callbridge.config import Settings
from callbridge.metrics import Metrics
from callbridge.speech import CallerSpeech, SpeechWorker

from ..recording_leg import RecordingLeg
from .samples import silence, speechlike
from .test_worker import FakeTranscriber, started_worker

VOICE = SimpleNamespace(name="test", snapshot=None)
SECRET_WORDS = " Please send the parcel to forty two Elm Street."


def make_call(worker: SpeechWorker | None, *, enabled: bool = True, agent: Any = None) -> Call:
    base = Settings()
    settings = replace(base, bargein=replace(base.bargein, enabled=False),
                       speech=replace(base.speech, enabled=enabled, model="fake"))
    return Call(leg=RecordingLeg(), voice=VOICE, settings=settings, worker=None,  # type: ignore[arg-type]
                metrics=Metrics(), agent=agent, speech=worker)


def feed(call: Call, pcm: np.ndarray) -> None:
    for start in range(0, pcm.size, 160):
        call.on_leg_event(CallerAudio(pcm[start : start + 160], 8000))


async def next_event(events: asyncio.Queue[dict[str, Any]], name: str) -> dict[str, Any]:
    while True:
        event = await events.get()
        if event["event"] == name:
            return event


async def test_a_call_emits_speech_events_and_the_transcript_to_its_listeners() -> None:
    worker = started_worker(lambda: FakeTranscriber(SECRET_WORDS))
    call = make_call(worker)
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    call.listeners.add(events)
    call.begin()
    try:
        assert isinstance(call.speech, CallerSpeech) and call.speech.on_caller_audio in call.caller_audio
        feed(call, np.concatenate([silence(0.5), speechlike(1.0), silence(0.8)]))
        started = await next_event(events, "caller_speech_started")
        stopped = await next_event(events, "caller_speech_stopped")
        final = await next_event(events, "caller_transcript")
    finally:
        await call.end("hangup: test")
        worker.stop()
    assert started["call_sid"] == call.call_sid and started["during_bot"] is False
    assert stopped["utterance_id"] == final["utterance_id"] == "u1"
    assert final["text"] == SECRET_WORDS.strip() and final["during_bot"] is False and final["eos_to_final_ms"] >= 0


async def test_during_bot_when_the_caller_talks_over_the_bot() -> None:
    worker = started_worker(FakeTranscriber)
    call = make_call(worker)
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    call.listeners.add(events)
    call.begin()
    try:
        turn = Turn(id="t1", seq=1, interrupt=False, source="api", state=TurnState.SENT)
        await call.playout.put_marker(0, "t1-g0-m1", turn, ["hello"])
        leg = call.leg
        assert isinstance(leg, RecordingLeg)
        while ("marker", "t1-g0-m1") not in leg.sent:  # the bot is audible once its marker is out
            leg.changed.clear()
            await leg.changed.wait()
        feed(call, np.concatenate([speechlike(1.0), silence(0.8)]))
        started = await next_event(events, "caller_speech_started")
        final = await next_event(events, "caller_transcript")
    finally:
        await call.end("hangup: test")
        worker.stop()
    assert started["during_bot"] is True and final["during_bot"] is True


async def test_the_agent_hook_answers_a_transcript_with_a_turn() -> None:
    seen: list[str] = []

    def agent(call: dict[str, Any], event: dict[str, Any]) -> AgentReply | None:
        seen.append(event["event"])
        if event["event"] == "caller_transcript":
            return AgentReply(say=f"You said {len(event['text'].split())} words.")
        return None

    worker = started_worker(FakeTranscriber)
    call = make_call(worker, agent=CallableAgent(agent))
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    call.listeners.add(events)
    call.begin()
    try:
        feed(call, np.concatenate([speechlike(1.0), silence(0.8)]))
        queued = await next_event(events, "turn_queued")
    finally:
        await call.end("hangup: test")
        worker.stop()
    assert queued["source"] == "agent"
    assert seen[:4] == ["call_started", "caller_speech_started", "caller_speech_stopped", "caller_transcript"]


async def test_speech_disabled_adds_no_consumer() -> None:
    call = make_call(None, enabled=False)
    assert call.speech is None and call.caller_audio == []
    await call.end("hangup: test")


async def test_no_transcript_after_the_call_ended_and_none_in_info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    worker = started_worker(lambda: FakeTranscriber(SECRET_WORDS))
    call = make_call(worker)
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    call.listeners.add(events)
    call.begin()
    try:
        feed(call, np.concatenate([speechlike(1.0), silence(0.8)]))
        await next_event(events, "caller_transcript")
        feed(call, np.concatenate([speechlike(1.0, seed=1), silence(0.8)]))
        await next_event(events, "caller_speech_stopped")
        await call.end("hangup: test")  # u2 may still be in the worker
        await asyncio.to_thread(worker.stop)  # its outcome, if any, is handled before this returns
    finally:
        worker.stop()
    after = [events.get_nowait()["event"] for _ in range(events.qsize())]
    end = after.index("call_ended")
    assert "caller_transcript" not in after[end:]
    # u2's outcome came back before the end (emitted) or after it (counted, not emitted).
    assert call.speech is not None and after[:end].count("caller_transcript") + call.speech.late_outcomes == 1
    for record in caplog.records:
        if record.levelno >= logging.INFO:
            assert "Elm" not in record.getMessage(), record.getMessage()
