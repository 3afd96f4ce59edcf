"""Ending a call while its writer is mid-send, and draining a call, without a clock.

The shutdown test that once hung for 240 s (test_hardening.py
``test_shutdown_cuts_a_call_that_does_not_drain_in_time``) hung here: ``Call.end`` cancels the
writer and waits for it, and the writer sent each message through ``asyncio.wait_for``, which in
Python 3.11 swallows a cancellation that lands in the loop iteration where the send itself
completes. The writer then went on to wait for its next item forever, and so did ``end``. The
first test makes that iteration happen on purpose instead of by chance; the second checks that
``end`` no longer swallows a cancel of its own caller (a shutdown's bound must be able to fire).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from callbridge.calls.call import Call, CallState
from callbridge.calls.leg import MarkerPlayed
from callbridge.config import Settings
from callbridge.metrics import Metrics
from callbridge.tts import TurnFailed

from .recording_leg import RecordingLeg

pytestmark = pytest.mark.timeout(60)

WAIT_S = 20.0  # bound on each wait: only a hang fails it


class RefusingWorker:
    """Every turn fails to start: the call plays its fallback audio through the writer."""

    async def open_turn(self, *args: Any, **kwargs: Any) -> Any:
        raise TurnFailed("refused by the test")


class GatedLeg(RecordingLeg):
    """The first audio send stays in flight until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.blocked = asyncio.Event()

    async def send_audio(self, ulaw8k: bytes) -> None:
        if not self.gate.done():
            self.blocked.set()
            await self.gate
        await super().send_audio(ulaw8k)


def started_call(leg: RecordingLeg) -> Call:
    """A call past its start (the voice is never used: every turn fails to start)."""
    base = Settings()
    settings = replace(base, bargein=replace(base.bargein, enabled=False))
    call = Call(leg=leg, voice=SimpleNamespace(name="test", snapshot=None),  # type: ignore[arg-type]
                settings=settings, worker=RefusingWorker(), metrics=Metrics())  # type: ignore[arg-type]
    call.begin()
    return call


async def test_end_returns_when_the_cancel_lands_as_a_send_completes() -> None:
    leg = GatedLeg()
    call = started_call(leg)
    call.add_turn("Hello.", close=True)
    async with asyncio.timeout(WAIT_S):
        await leg.blocked.wait()
    leg.gate.set_result(None)  # the send completes in the next loop iteration...
    async with asyncio.timeout(WAIT_S) as bound:
        await call.end("shutdown")  # ...the very iteration in which end()'s cancel reaches the writer
    assert not bound.expired(), "end() hung waiting for its writer"
    assert call.state is CallState.ENDED and call.ended.is_set()


async def test_end_does_not_swallow_a_cancel_of_its_caller() -> None:
    """Whoever awaits ``end()`` can still be cancelled while end() joins the call's tasks."""
    leg = GatedLeg()
    call = started_call(leg)
    call.add_turn("Hello.", close=True)
    async with asyncio.timeout(WAIT_S):
        await leg.blocked.wait()  # the writer is mid-send and stays there
    ending = asyncio.create_task(call.end("shutdown"))
    await asyncio.sleep(0)  # end() runs up to its join of the writer
    ending.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(WAIT_S):
            await ending
    assert ending.cancelled()


async def test_drain_returns_once_the_last_queued_audio_is_sent() -> None:
    """``drain(heard=False)`` wakes on the writer's progress (no polling): the fallback audio of a
    failed turn is all sent, so it returns True well before its bound."""
    leg = RecordingLeg()
    call = started_call(leg)
    call.add_turn("Hello.", close=True)
    assert await call.drain(WAIT_S, heard=False)
    kinds = [kind for kind, _ in leg.sent]
    assert "audio" in kinds and kinds[-1] == "marker"
    await call.end("hangup: test")


async def test_drain_waits_for_the_fallback_queued_after_its_turn_ended() -> None:
    """A failed turn ends before its fallback audio is sent: ``drain()`` (heard=True) still waits
    for that audio to be sent and its marker to be played, woken by the marker."""
    leg = RecordingLeg()
    call = started_call(leg)
    call.add_turn("Hello.", close=True)
    draining = asyncio.create_task(call.drain(WAIT_S))
    async with asyncio.timeout(WAIT_S):
        while not leg.markers():
            leg.changed.clear()
            await leg.changed.wait()
    assert not draining.done()  # sent, not yet heard
    call.on_leg_event(MarkerPlayed(leg.markers()[-1]))
    async with asyncio.timeout(WAIT_S):
        assert await draining
    await call.end("hangup: test")
