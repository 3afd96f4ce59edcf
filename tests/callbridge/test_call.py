"""The carrier-neutral call core over a recording leg: lifecycle, markers, caller audio, hang-up."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from callbridge.calls.call import Call, CallState
from callbridge.calls.leg import CallerAudio, CallerDigit, LegEnded, MarkerPlayed
from callbridge.calls.turns import Turn, TurnState
from callbridge.config import Settings
from callbridge.metrics import Metrics

from .recording_leg import RecordingLeg

VOICE = SimpleNamespace(name="test", snapshot=None)  # no turn is spoken in these tests


def make_call(leg: RecordingLeg | None = None, *, bargein: bool = True, **calls: Any) -> tuple[Call, RecordingLeg]:
    leg = leg or RecordingLeg()
    base = Settings()
    settings = replace(base, bargein=replace(base.bargein, enabled=bargein), calls=replace(base.calls, **calls))
    call = Call(leg=leg, voice=VOICE, settings=settings, worker=None, metrics=Metrics())  # type: ignore[arg-type]
    return call, leg


def listen(call: Call) -> asyncio.Queue[dict[str, Any]]:
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    call.listeners.add(events)
    return events


def drained(events: asyncio.Queue[dict[str, Any]]) -> list[dict[str, Any]]:
    return [events.get_nowait() for _ in range(events.qsize())]


async def test_every_state_change_goes_through_the_transition_table() -> None:
    call, leg = make_call()
    with pytest.raises(AttributeError):
        call.state = CallState.ACTIVE  # type: ignore[misc]
    call.begin()
    assert call.state is CallState.ACTIVE
    with pytest.raises(RuntimeError, match="illegal transition active -> active"):
        call.begin()
    call.stop_taking_turns()
    assert call.state is CallState.ENDING
    await call.end("hangup: test")
    assert call.state is CallState.ENDED and leg.closed_with == "hangup: test" and call.ended.is_set()
    await call.end("again")  # idempotent
    assert call.end_reason == "hangup: test"


async def test_every_caller_frame_reaches_every_consumer_bot_silent_or_not() -> None:
    """Caller audio used to be dropped while the bot was silent; now each frame goes, in order,
    to every consumer (the barge-in detector is one, a transcriber will be another)."""
    call, _ = make_call()
    got: list[CallerAudio] = []
    call.caller_audio.append(got.append)
    call.begin()
    frames = [CallerAudio(np.full(160, i, dtype=np.int16), 8000) for i in range(50)]
    for frame in frames[:25]:
        call.on_leg_event(frame)
    # The bot becomes audible: a marker of this epoch is pending at the far end.
    turn = Turn(id="t1", seq=1, interrupt=False, source="api", state=TurnState.SENT)
    await call.playout.put_marker(0, "t1-g0-m1", turn, ["hello"])
    await _until_sent(call, "t1-g0-m1")
    assert call.playout.audible
    for frame in frames[25:]:
        call.on_leg_event(frame)
    assert got == frames
    assert call.bargein is not None and call.bargein.frames_seen == 50
    await call.end("hangup: test")


async def test_a_consumer_that_raises_is_removed_and_the_others_go_on() -> None:
    call, _ = make_call(bargein=False)
    got: list[CallerAudio] = []

    def broken(_: CallerAudio) -> None:
        raise RuntimeError("bug")

    call.caller_audio[:] = [broken, got.append]
    call.begin()
    frame = CallerAudio(np.zeros(160, dtype=np.int16), 8000)
    call.on_leg_event(frame)
    call.on_leg_event(frame)
    assert got == [frame, frame] and call.caller_audio == [got.append]
    await call.end("hangup: test")


async def _until_sent(call: Call, name: str) -> None:
    leg = call.leg
    assert isinstance(leg, RecordingLeg)
    while ("marker", name) not in leg.sent:
        leg.changed.clear()
        await leg.changed.wait()


async def test_markers_from_before_a_cut_are_not_heard_and_order_is_checked() -> None:
    """A clear returns every pending marker: those chunks were dropped, not heard. Markers come
    back in send order: one skipped by a later one, or never sent, is counted."""
    call, leg = make_call(bargein=False)
    events = listen(call)
    call.begin()
    old = Turn(id="t1", seq=1, interrupt=False, source="api", state=TurnState.SENT)
    await call.playout.put_marker(0, "old", old, ["stale"])
    await _until_sent(call, "old")
    call.playout.cut()
    new = Turn(id="t2", seq=2, interrupt=False, source="api", state=TurnState.SENT)
    for name in ("a", "b", "end"):
        await call.playout.put_marker(1, name, new, [name], end_of_turn=name == "end")
    await _until_sent(call, "end")
    assert ("clear", None) in leg.sent
    for name in ("old", "a", "end", "zz"):  # "b" skipped, "zz" never sent
        call.on_leg_event(MarkerPlayed(name))
    assert old.heard == [] and new.heard == ["a", "end"] and new.state is TurnState.DONE
    s = call.stats
    assert (s.stale_echoes, s.marks_out_of_order, s.marks_unknown, s.marks_echoed) == (1, 1, 1, 3)
    assert [e["words"] for e in drained(events) if e["event"] == "heard"] == [["a"], ["end"]]
    await call.end("hangup: test")


async def test_interrupt_reports_the_words_of_the_turn_that_was_playing() -> None:
    """Turn 1 is all sent and still playing (16 words heard so far) while turn 2 is already
    being generated: the interrupt cuts both and reports turn 1's words, not turn 2's none."""
    call, _ = make_call(bargein=False)
    call.begin()
    first = Turn(id="t1", seq=1, interrupt=False, source="api", state=TurnState.SENT)
    words = [f"w{i}" for i in range(16)]
    await call.playout.put_marker(0, "t1-m1", first, words)
    await call.playout.put_marker(0, "t1-end", first, ["more"], end_of_turn=True)
    await _until_sent(call, "t1-end")
    call.on_leg_event(MarkerPlayed("t1-m1"))
    second = Turn(id="t2", seq=2, interrupt=False, source="api", state=TurnState.SPEAKING)
    call.turns.current = second
    assert call.interrupt("test") == words
    assert first.state is second.state is TurnState.INTERRUPTED
    await call.end("hangup: test")


async def test_one_hang_up_per_call_with_its_reason() -> None:
    """Two hang-ups: one drain, one request to the carrier, and the first one's reason; the
    leg ending after the carrier was asked is that hang-up, not the caller."""
    call, leg = make_call(hangup_drain_timeout_s=1.0)
    events = listen(call)
    call.begin()
    first = call.hang_up("agent")
    assert first is not None and call.hang_up("api") is first
    await first
    assert leg.hang_ups == 1 and call.end_reason == "hangup: agent" and call.state is CallState.ENDED
    assert [e["reason"] for e in drained(events) if e["event"] == "call_ended"] == ["hangup: agent"]
    assert call.hang_up("api") is first  # after the end too


async def test_leg_events_digits_and_end() -> None:
    call, leg = make_call(bargein=False)
    events = listen(call)
    call.begin()
    call.on_leg_event(CallerDigit("7"))
    call.on_leg_event(LegEnded("hangup: stop"))
    await call.ended.wait()
    kinds = [(e["event"], e.get("digit") or e.get("reason")) for e in drained(events)]
    assert ("dtmf", "7") in kinds and kinds[-1] == ("call_ended", "hangup: stop")
    assert leg.closed_with == "hangup: stop"
