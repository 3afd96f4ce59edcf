"""One phone call: its lifecycle, its parts, its events, and what its leg tells it.

The call knows its carrier only through the :class:`~callbridge.calls.leg.Leg` interface.
Its parts, each with one job:

- :class:`~.turns.TurnQueue`: turns, their limits and their ends (``turn_done``);
- :class:`~.speaker.Speaker` (a task): turns → TTS worker → chunks and markers;
- :class:`~.playout.Playout` (the writer task): the only sender into the leg, paced; markers,
  playback epochs, the fade-out, what the caller heard;
- caller-audio consumers (:attr:`Call.caller_audio`): every caller frame goes to each, in order,
  speech or silence; :class:`~.bargein.BargeIn` is one, :class:`~callbridge.speech.CallerSpeech`
  (endpointing and transcripts, when ``[speech]`` is enabled) the other;
- the agent hook (a task), if one is configured.

The carrier's side (a handler reading the leg's socket) hands every caller event to
:meth:`Call.on_leg_event`, in order. Every state change goes through :meth:`Call._move`
(the transition table): connecting → active (the leg started) → ending (a hang-up drains, or
shutdown) → ended. Whatever ends a call (the leg ended, a send timeout, a hang-up, shutdown)
cancels its TTS turn at once, so its stream slot is free before the worker's next step.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

from ..config import Settings
from ..metrics import Metrics
from ..speech import CallerSpeech, SpeechWorker, endpointer_config
from ..tts import Reservation, TtsWorker
from ..voices import Voice
from .agent import Agent, AgentReply, run_agent
from .bargein import BargeIn
from .fallback import load_fallback_audio
from .leg import CallerAudio, CallerDigit, Leg, LegEnded, LegEvent, MarkerPlayed
from .playout import CallStats, Playout, SendTimeout
from .speaker import Speaker
from .turns import Turn, TurnQueue, TurnRejected, TurnState

__all__ = ["Call", "CallState", "CallerAudioConsumer"]

log = logging.getLogger(__name__)

CallerAudioConsumer = Callable[[CallerAudio], None]


class CallState(enum.Enum):
    CONNECTING = "connecting"  # the leg is open, its media has not started
    ACTIVE = "active"
    ENDING = "ending"  # no new turns; what is queued still plays (hang-up, shutdown)
    ENDED = "ended"


_TRANSITIONS: dict[CallState, frozenset[CallState]] = {
    CallState.CONNECTING: frozenset({CallState.ACTIVE, CallState.ENDED}),
    CallState.ACTIVE: frozenset({CallState.ENDING, CallState.ENDED}),
    CallState.ENDING: frozenset({CallState.ENDED}),
    CallState.ENDED: frozenset(),
}


class Call:
    """State and tasks of one call. Built by a carrier's handler when its leg opens."""

    def __init__(
        self,
        *,
        leg: Leg,
        voice: Voice,
        settings: Settings,
        worker: TtsWorker,
        metrics: Metrics,
        greeting: str = "",
        reservation: Reservation | None = None,
        fallback_ulaw8k: bytes | None = None,
        agent: Agent | None = None,
        speech: SpeechWorker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.leg = leg
        self.call_sid = leg.info.carrier_call_id
        self.voice = voice
        self.settings = settings
        self.metrics = metrics
        self.greeting = greeting
        self.reservation = reservation  # the call's TTS slot; released when the call ends
        self.agent = agent
        self.log = logging.LoggerAdapter(log, {"call_sid": self.call_sid})
        self.stats = CallStats()
        self._state = CallState.CONNECTING
        self.listeners: set[asyncio.Queue[dict[str, Any]]] = set()
        self.ended = asyncio.Event()
        self.end_reason = ""
        # Set on each message sent, marker played, turn ended, and the call's end: drain() waits on it.
        self._progress = asyncio.Event()
        self.turns = TurnQueue(self.call_sid, settings.calls, metrics, self.emit, self.log,
                               on_turn_ended=self._progress.set)
        self.playout = Playout(
            leg, fade_out_ms=settings.audio.fade_out_ms, send_timeout_s=settings.audio.send_timeout_s,
            stats=self.stats, metrics=metrics, log=self.log, clock=clock,
            on_first_audio=self._first_audio, on_heard=self._heard, on_turn_played=self._turn_played,
            on_progress=self._progress.set,
        )
        self.speaker = Speaker(
            worker=worker, voice=voice, settings=settings, reservation=reservation, turns=self.turns,
            playout=self.playout, stats=self.stats, emit=self.emit, log=self.log,
            # Played when a turn fails (load_fallback_audio); None: 300 ms of silence.
            fallback_ulaw8k=load_fallback_audio("") if fallback_ulaw8k is None else fallback_ulaw8k,
            speaking=lambda: self._state in (CallState.ACTIVE, CallState.ENDING),
            on_progress=self._progress.set,
        )
        #: Every frame of caller audio goes to each of these, in order, speech or silence, from
        #: the leg's reader task (so a consumer must not block: queue to a task of its own).
        #: The place a transcriber subscribes. A consumer that raises is logged and removed.
        self.caller_audio: list[CallerAudioConsumer] = []
        self.bargein: BargeIn | None = None
        if settings.bargein.enabled:
            self.bargein = BargeIn(settings.bargein, bot_audible=self._bot_is_audible,
                                   cut=lambda: self.cut("caller speech"))
            self.caller_audio.append(self.bargein.on_caller_audio)
        # Caller speech: utterances and transcripts as events (speech worker shared by all calls).
        self.speech: CallerSpeech | None = None
        if settings.speech.enabled and speech is not None:
            self.speech = CallerSpeech(self.emit, speech, endpointer_config(settings.speech),
                                       bot_audible=self._bot_is_audible, logger=self.log)
            self.caller_audio.append(self.speech.on_caller_audio)
        self._tasks: list[asyncio.Task[None]] = []
        self._end_tasks: set[asyncio.Task[None]] = set()  # strong refs: the loop keeps only weak ones
        self._agent_task: asyncio.Task[None] | None = None
        self._hangup: asyncio.Task[None] | None = None
        self._hangup_reason = ""
        self._hangup_asked = False  # the carrier has been asked to end the call

    # ------------------------------------------------------------------ lifecycle

    @property
    def state(self) -> CallState:
        return self._state

    def _move(self, new: CallState) -> None:
        if new not in _TRANSITIONS[self._state]:
            raise RuntimeError(f"call {self.call_sid}: illegal transition {self._state.value} -> {new.value}")
        self._state = new

    def begin(self) -> None:
        """The leg's media started: spawn the writer and the speaker (and agent), queue the greeting."""
        self._move(CallState.ACTIVE)
        self.metrics.calls_active.inc()
        self.log.info("call started: %s media %s, voice %s", self.leg.info.carrier, self.leg.info.media_id,
                      self.voice.name)
        self._tasks = [
            asyncio.create_task(self._run_writer(), name=f"writer-{self.call_sid}"),
            asyncio.create_task(self._run_speaker(), name=f"speaker-{self.call_sid}"),
        ]
        if self.agent is not None:  # subscribed before call_started, so it sees it
            events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
            self.listeners.add(events)
            self._agent_task = asyncio.create_task(
                run_agent(self.agent, events, self.view, self._agent_acts, self.call_sid), name=f"agent-{self.call_sid}")
        self.emit(self.started_event())
        if self.greeting:
            self.add_turn(self.greeting, close=True, source="greeting")

    def started_event(self) -> dict[str, Any]:
        """``call_started``: what every listener learns first. ``from``/``to`` are caller data
        (sent to the app, never logged); ``custom`` is the carrier's custom parameters."""
        info = self.leg.info
        return {"event": "call_started", "call_sid": self.call_sid, "carrier": info.carrier,
                "from": info.from_number, "to": info.to_number, "voice": self.voice.name,
                "custom": dict(info.custom)}

    def stop_taking_turns(self) -> None:
        """No new turns (409); what is queued still plays. For a hang-up's drain and shutdown."""
        if self._state is CallState.ACTIVE:
            self._move(CallState.ENDING)

    async def end(self, reason: str) -> None:
        """Stop everything of this call (idempotent): turns cancelled, tasks joined, leg closed, summary logged."""
        if self._state is CallState.ENDED:
            return
        was_live = self._state in (CallState.ACTIVE, CallState.ENDING)
        self._move(CallState.ENDED)
        self.end_reason = reason
        for turn in [self.turns.current, *self.turns.queued]:
            if turn is not None and turn.handle is not None:
                # Before anything awaits: the worker frees the slot before its next step.
                turn.handle.cancel()
            if turn is not None and not turn.ended:
                self.turns.finish(turn, TurnState.CANCELLED if turn.state is TurnState.QUEUED else TurnState.INTERRUPTED)
        self.turns.queued.clear()
        self.turns.wake()
        self.playout.stop()
        self._progress.set()
        if self.speech is not None:
            self.speech.close()  # transcripts still in the worker are not emitted after call_ended
        current = asyncio.current_task()
        if self._hangup is not None and not self._hangup_asked and self._hangup is not current:
            self._hangup.cancel()  # still draining: the call ended another way first
        others = [task for task in self._tasks if task is not current]
        for task in others:
            task.cancel()
        if others:
            # asyncio.wait, not `suppress(CancelledError): await task`: that would also swallow
            # a cancel of whoever awaits end() (a shutdown's bound could then never fire).
            await asyncio.wait(others)
            for task in others:
                if not task.cancelled() and task.exception() is not None:
                    self.log.warning("task %s failed: %r", task.get_name(), task.exception())
        if self.reservation is not None:
            self.reservation.release()
        if was_live:
            self.metrics.calls_active.dec()
        self.metrics.calls_total.labels(outcome=reason.split(":")[0]).inc()
        s = self.stats
        self.log.info(
            "call ended (%s): %.1f s, %d turns, first ttfa %s ms, %d chunks, %d/%d marks echoed, %d underruns, "
            "%d barge-ins",
            reason, time.monotonic() - s.started_at, s.turns,
            "-" if s.first_ttfa_ms is None else f"{s.first_ttfa_ms:.0f}",
            s.chunks_sent, s.marks_echoed, s.marks_sent, s.underruns, s.barge_ins,
        )
        self.emit({"event": "call_ended", "call_sid": self.call_sid, "reason": reason})
        try:
            await self.leg.close(reason, self.settings.audio.send_timeout_s)
        except Exception as exc:  # the leg is already gone one way or another
            self.log.debug("closing the leg: %s", exc)
        finally:
            self.ended.set()
        await self._join_agent()

    def end_soon(self, reason: str) -> None:
        """End the call from one of its own tasks (which :meth:`end` would otherwise cancel)."""
        task = asyncio.get_running_loop().create_task(self.end(reason), name=f"end-{self.call_sid}")
        self._end_tasks.add(task)
        task.add_done_callback(self._end_tasks.discard)

    async def _run_writer(self) -> None:
        try:
            await self.playout.run()
        except SendTimeout:
            self.log.warning("the %s leg accepted nothing for %.1f s: ending the call", self.leg.info.carrier,
                             self.settings.audio.send_timeout_s)
            self.end_soon("error: send timeout")
        except ConnectionError as exc:
            self.log.info("leg closed while sending: %s", exc)
            self.end_soon("hangup: socket closed")

    async def _run_speaker(self) -> None:
        try:
            await self.speaker.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("speaker task failed")
            self.end_soon("error: speaker failed")

    # ------------------------------------------------------------------ hang-up

    def hang_up(self, reason: str, drain_timeout_s: float | None = None) -> asyncio.Task[None] | None:
        """Let the last audio play (bounded), then ask the carrier to end the call; ``reason``
        (``api``, ``agent``, ``text socket``…) becomes the end reason ``hangup: <reason>``.

        One hang-up per call: a second request returns the first one's task (no second drain,
        no second request to the carrier). None when the call has already ended.
        """
        if self._hangup is None and self._state is not CallState.ENDED:
            self._hangup_reason = reason
            timeout_s = self.settings.calls.hangup_drain_timeout_s if drain_timeout_s is None else drain_timeout_s
            self._hangup = asyncio.get_running_loop().create_task(self._hang_up(timeout_s),
                                                                  name=f"hangup-{self.call_sid}")
        return self._hangup

    def say_and_hang_up(self, text: str, reason: str, drain_timeout_s: float) -> None:
        """Cut what plays, say ``text``, hang up once it has played (bounded): never a silent
        line when something the call depends on (the app) is gone."""
        if self._state is CallState.ACTIVE:
            try:
                self.add_turn(text, close=True, interrupt=True, source="service")
            except TurnRejected as exc:  # still hang up: a call nobody controls must end
                self.log.warning("could not queue the closing message: %s", exc)
        self.hang_up(reason, drain_timeout_s)

    async def _hang_up(self, timeout_s: float) -> None:
        self.stop_taking_turns()
        if not await self.drain(timeout_s):
            self.log.info("hang-up: audio still playing after %.1f s, hanging up anyway", timeout_s)
        if self._state is CallState.ENDED:
            return
        self._hangup_asked = True
        try:
            await self.leg.hang_up()
        except Exception as exc:  # the carrier refusing must not leave the call open
            self.log.warning("%s hang-up failed (%s); closing the leg instead", self.leg.info.carrier, exc)
        await self.end(f"hangup: {self._hangup_reason}")

    # ------------------------------------------------------------------ the leg's events

    def on_leg_event(self, event: LegEvent) -> None:
        """One caller event from the leg, in order (the :class:`~.leg.LegEventSink` of this call)."""
        if isinstance(event, CallerAudio):
            for consumer in list(self.caller_audio):
                try:
                    consumer(event)
                except Exception as exc:  # one consumer's bug must not end the call or starve the others
                    self.log.warning("caller-audio consumer %r failed and is removed: %s", consumer, exc)
                    self.caller_audio.remove(consumer)
        elif isinstance(event, MarkerPlayed):
            self.playout.marker_played(event.name)
        elif isinstance(event, CallerDigit):
            # Digits are caller data (PINs, card numbers): the API listener gets them, logs do not.
            self.log.debug("dtmf received")
            self.emit({"event": "dtmf", "digit": event.digit})
        elif isinstance(event, LegEnded):
            # The carrier ending the leg after we asked it to is our hang-up, with its reason.
            self.end_soon(f"hangup: {self._hangup_reason}" if self._hangup_asked else event.reason)

    def _bot_is_audible(self) -> bool:
        """Our audio is being made, or playing or queued at the far end."""
        current = self.turns.current
        return (current is not None and current.state is TurnState.SPEAKING) or self.playout.audible

    # ------------------------------------------------------------------ playout's reports

    def _first_audio(self, turn: Turn, ttfa_ms: float) -> None:
        self.emit({"event": "first_audio", "turn_id": turn.id, "ttfa_ms": round(ttfa_ms, 1)})

    def _heard(self, turn: Turn, words: list[str]) -> None:
        self.emit({"event": "heard", "turn_id": turn.id, "words": words})

    def _turn_played(self, turn: Turn) -> None:
        if turn.state is TurnState.SENT:
            self.turns.finish(turn, TurnState.DONE)

    # ------------------------------------------------------------------ turns

    def add_turn(self, text: str | None, *, close: bool, interrupt: bool = False, source: str = "api") -> Turn:
        """Queue a turn (``text`` may be None for a streamed turn whose text follows)."""
        if self._state is not CallState.ACTIVE:
            raise TurnRejected(409, f"call {self.call_sid} is {self._state.value}; it takes no turns")
        self.turns.check_text(text)
        if interrupt:
            self.interrupt(reason="new turn with interrupt")
        turn = self.turns.add(text, close=close, interrupt=interrupt, source=source)
        self.stats.turns += 1
        return turn

    def push_text(self, turn: Turn, text: str) -> None:
        self.turns.push_text(turn, text)

    def close_text(self, turn: Turn) -> None:
        self.turns.close_text(turn)

    def interrupt(self, reason: str) -> list[str]:
        """Stop what is playing and drop queued turns; returns the words heard of the turn cut."""
        heard = self.cut(reason, emit_event=False)
        self.turns.cancel_queued()
        return heard

    def cut(self, reason: str, emit_event: bool = True) -> list[str]:
        """Cut what is playing (a new playback epoch, ``clear``, the TTS turn cancelled).

        Returns the words the caller heard of the turn at the playhead: the oldest turn whose
        audio was still playing, which is not the turn being generated when that one is
        already queued behind the previous turn's last seconds of audio.
        """
        current = self.turns.current
        if current is None and not self._bot_is_audible():
            return []
        playing = self.playout.playing_turn() or current
        self.playout.cut()
        if current is not None and current.state in (TurnState.SPEAKING, TurnState.SENT):
            if current.handle is not None:
                current.handle.cancel()
            self.turns.finish(current, TurnState.INTERRUPTED)
        # Earlier turns whose audio was all sent but not all played are cut too.
        for marker in list(self.playout.pending.values()):
            if marker.turn.state is TurnState.SENT:
                self.turns.finish(marker.turn, TurnState.INTERRUPTED)
        heard = list(playing.heard) if playing is not None else []
        self.stats.barge_ins += 1
        self.metrics.barge_ins_total.inc()
        self.log.info("barge-in (%s): heard %d words", reason, len(heard))
        if emit_event:
            self.emit({"event": "barge_in", "turn_id": playing.id if playing else None, "heard": heard,
                       "reason": reason})
        return heard

    def cancel_turn(self, turn_id: str) -> bool:
        current = self.turns.current
        if current is not None and current.id == turn_id:
            self.cut(reason="cancelled by the API", emit_event=False)
            return True
        turn = self.turns.find_queued(turn_id)
        if turn is None:
            return False
        self.turns.cancel_queued(turn)
        return True

    # ------------------------------------------------------------------ agent

    async def _agent_acts(self, reply: AgentReply) -> None:
        if self._state is not CallState.ACTIVE:
            return
        try:
            if reply.say:
                self.add_turn(reply.say, close=True, interrupt=reply.interrupt, source="agent")
            elif reply.interrupt:
                self.interrupt(reason="interrupted by the agent")
        except TurnRejected as exc:
            self.log.warning("agent turn refused: %s", exc)
        if reply.hangup:
            self.hang_up("agent")

    async def _join_agent(self) -> None:
        """The agent has been sent ``call_ended``: let it take it (bounded), then stop it."""
        task = self._agent_task
        if task is None or task is asyncio.current_task():
            return
        done, _ = await asyncio.wait({task}, timeout=self.settings.agent.timeout_s)
        if not done:
            self.log.warning("the agent took more than %.1f s over call_ended; stopped", self.settings.agent.timeout_s)
            task.cancel()
        elif not task.cancelled() and task.exception() is not None:
            self.log.warning("agent task failed: %s", task.exception())

    # ------------------------------------------------------------------ events out

    def emit(self, event: dict[str, Any]) -> None:
        """Send an event to every listener (control API, agent); a listener that stops reading is dropped."""
        event.setdefault("call_sid", self.call_sid)
        for queue in list(self.listeners):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.listeners.discard(queue)
                self.log.warning("dropping an event listener that stopped reading")

    async def drain(self, timeout_s: float, *, heard: bool = True) -> bool:
        """Wait until every queued turn has played (its markers played), up to ``timeout_s``.

        ``heard=False``: only until everything has been *sent*, for when marker echoes can no
        longer arrive (aiohttp stops reading every connection before its on_shutdown hooks run).
        """
        def busy() -> bool:
            if self._state is CallState.ENDED:
                return False
            current = self.turns.current
            speaking = current is not None and current.state is TurnState.SPEAKING
            # Queued audio counts either way: a failed turn's fallback is queued after the turn
            # has ended, and its marker is pending only once the writer has sent it.
            unsent = speaking or bool(self.turns.queued) or not self.playout.all_sent
            if not heard:
                return unsent
            return unsent or current is not None or self.playout.audible

        # Woken by progress (something sent, a marker played, a turn ended, the call ended),
        # never by a clock.
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    self._progress.clear()  # before looking: a change after the look is kept
                    if not busy():
                        break
                    await self._progress.wait()
        except TimeoutError:
            return False
        return True

    def view(self) -> dict[str, Any]:
        s = self.stats
        current = self.turns.current
        return {
            "call_sid": self.call_sid,
            "carrier": self.leg.info.carrier,
            "media_id": self.leg.info.media_id or None,  # Twilio StreamSid, SIP Call-ID
            "state": self._state.value,
            "voice": self.voice.name,
            "duration_s": round(time.monotonic() - s.started_at, 2),
            "current_turn": current.summary() if current else None,
            "queued_turns": [t.id for t in self.turns.queued],
            "recent_turns": [t.summary() for t in self.turns.history],
            "stats": {
                "turns": s.turns,
                "chunks_sent": s.chunks_sent,
                "marks_sent": s.marks_sent,
                "marks_echoed": s.marks_echoed,
                "underruns": s.underruns,
                "barge_ins": s.barge_ins,
                "first_ttfa_ms": None if s.first_ttfa_ms is None else round(s.first_ttfa_ms, 1),
            },
        }
