"""One phone call: its turn queue, playback, marks, barge-in and events.

Three tasks per call, each with one job:
- the handler (in ``app``) is the only reader of the Twilio socket and hands each event to
  :meth:`Call.on_event`;
- the speaker turns queued text into audio through the TTS worker, one turn after another,
  and puts 20 ms mu-law chunks and marks into the outbox;
- the writer is the only sender: it paces chunks on a monotonic clock with a small lead,
  and sends marks and ``clear``.

Playback generations: every ``clear`` bumps ``generation``; chunks and marks carry the
generation they were made in, so anything from before a clear is dropped unsent and a
mark echoed after a clear is not counted as heard.

Faults: a turn that fails in the TTS worker ends as ``failed`` and the caller hears a short
fallback (``calls.fallback_audio``, or 300 ms of silence) through the same paced path; the
call stays up and takes its next turn. Whatever ends a call (stop, a dropped socket, a send
timeout, shutdown) cancels its TTS turn at once, so its stream slot is free before the
worker's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import re
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from dia2 import GenerationConfig, SamplingParams

from ..audio import BargeInDetector, InboundAudio, OutboundAudio, Pacer
from ..config import Settings, SettingsError
from ..metrics import Metrics
from ..transports.twilio import Dtmf, Mark, Media, MediaStreamProtocol, Start, Stop
from ..tts import Reservation, TtsWorker, TurnFailed, TurnHandle, WorkerClosed, WorkerFull
from ..voices import Voice

log = logging.getLogger(__name__)

CHUNK_BYTES = 160  # 20 ms of 8 kHz mu-law
CHUNK_MS = 20
ULAW_SILENCE = 0xFF
FALLBACK_SILENCE_MS = 300  # what a failed turn plays when no fallback clip is configured
MAX_FALLBACK_S = 5.0
_WHITESPACE = re.compile(r"\s+")


def load_fallback_audio(path: str) -> bytes:
    """The fallback clip as 8 kHz mu-law, padded with silence to whole 20 ms chunks.

    ``path`` is ``calls.fallback_audio``: a WAV of any rate and channel count, at most
    :data:`MAX_FALLBACK_S` long; empty gives :data:`FALLBACK_SILENCE_MS` of silence. Blocking
    (file I/O, resampling): call it at start-up, off the event loop. Raises
    :class:`SettingsError` naming the key and the file.
    """
    if not path:
        return bytes([ULAW_SILENCE]) * (FALLBACK_SILENCE_MS * CHUNK_BYTES // CHUNK_MS)
    import soundfile as sf
    import soxr

    from ..audio import pcm16_to_ulaw

    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as exc:  # LibsndfileError is a RuntimeError
        raise SettingsError(f"calls.fallback_audio = {path!r}: cannot read it as audio ({exc})") from None
    if data.shape[0] == 0 or data.shape[0] > MAX_FALLBACK_S * rate:
        raise SettingsError(f"calls.fallback_audio = {path!r}: {data.shape[0] / rate:.2f} s long; "
                            f"expected a short clip (0 < length <= {MAX_FALLBACK_S:g} s)")
    mono = data.mean(axis=1)
    pcm8k = soxr.resample(mono, rate, 8000, quality="HQ") if rate != 8000 else mono
    ulaw = pcm16_to_ulaw(np.rint(np.clip(pcm8k, -1.0, 1.0) * 32767.0).astype(np.int16))
    return ulaw + bytes([ULAW_SILENCE]) * (-len(ulaw) % CHUNK_BYTES)


class CallState(enum.Enum):
    CONNECTING = "connecting"  # socket open, waiting for `start`
    ACTIVE = "active"
    ENDING = "ending"  # hang-up requested: the last audio drains
    ENDED = "ended"


_TRANSITIONS: dict[CallState, set[CallState]] = {
    CallState.CONNECTING: {CallState.ACTIVE, CallState.ENDED},
    CallState.ACTIVE: {CallState.ENDING, CallState.ENDED},
    CallState.ENDING: {CallState.ENDED},
    CallState.ENDED: set(),
}


class TurnState(enum.Enum):
    QUEUED = "queued"
    SPEAKING = "speaking"  # audio is being generated and sent
    SENT = "sent"  # all audio handed to Twilio; waiting for its end mark
    DONE = "done"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    CANCELLED = "cancelled"


def open_word_after(open_chars: int, text: str, limit: int) -> int:
    """Characters of the word still open after appending ``text`` to a stream whose last word had
    ``open_chars``; ValueError if any word reaches over ``limit`` characters."""
    runs = _WHITESPACE.split(text)
    longest = max([open_chars + len(runs[0]), *(len(r) for r in runs[1:])])
    if longest > limit:
        raise ValueError(f"a word of {longest} characters; the limit is {limit} (separate words with spaces)")
    return len(runs[-1]) if len(runs) > 1 else open_chars + len(runs[0])


class TurnRejected(Exception):
    """A turn cannot be accepted (queue full, text too long, call not active)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Turn:
    id: str
    seq: int
    interrupt: bool
    source: str  # "api", "stream", "greeting", "agent"
    accepted_at: float = field(default_factory=time.monotonic)
    state: TurnState = TurnState.QUEUED
    text_parts: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    text_closed: bool = False
    chars: int = 0
    word_chars: int = 0  # characters since the last whitespace pushed (a word still open)
    first_chunk_at: float | None = None
    heard: list[str] = field(default_factory=list)
    words_sent: list[str] = field(default_factory=list)
    handle: TurnHandle | None = None
    error: str | None = None
    chunks: int = 0
    underruns: int = 0

    @property
    def ttfa_ms(self) -> float | None:
        return None if self.first_chunk_at is None else 1000 * (self.first_chunk_at - self.accepted_at)

    def summary(self) -> dict[str, Any]:
        return {
            "turn_id": self.id,
            "state": self.state.value,
            "source": self.source,
            "ttfa_ms": None if self.ttfa_ms is None else round(self.ttfa_ms, 1),
            "heard": list(self.heard),
            "chunks": self.chunks,
        }


@dataclass
class OutItem:
    kind: Literal["media", "mark", "wake"]
    generation: int
    data: bytes | str = b""
    turn: Turn | None = None
    words: list[str] = field(default_factory=list)
    end_of_turn: bool = False


@dataclass
class SentMark:
    turn: Turn
    generation: int
    words: list[str]
    end_of_turn: bool


@dataclass
class CallStats:
    started_at: float = field(default_factory=time.monotonic)
    turns: int = 0
    chunks_sent: int = 0
    marks_sent: int = 0
    marks_echoed: int = 0
    stale_echoes: int = 0
    underruns: int = 0
    barge_ins: int = 0
    dropped_chunks: int = 0
    failed_turns: int = 0
    first_ttfa_ms: float | None = None
    # CRC-32 chained over every media payload sent, in order: a simulator that chains what it
    # received the same way proves that nothing was lost or reordered (bench/soak.py).
    media_crc32: int = 0


class Call:
    """State and tasks of one call. Built by the app when a media stream's ``start`` is accepted."""

    def __init__(
        self,
        *,
        call_sid: str,
        voice: Voice,
        settings: Settings,
        worker: TtsWorker,
        metrics: Metrics,
        send_text: Callable[[str], Awaitable[None]],
        greeting: str = "",
        reservation: Reservation | None = None,
        fallback_ulaw8k: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.call_sid = call_sid
        self.voice = voice
        self.settings = settings
        self.worker = worker
        self.metrics = metrics
        self._send_text = send_text
        self.greeting = greeting
        self.reservation = reservation  # the call's TTS slot; released when the call ends
        # Played when a turn fails (load_fallback_audio); None: 300 ms of silence.
        self.fallback_ulaw8k = load_fallback_audio("") if fallback_ulaw8k is None else fallback_ulaw8k
        self.state = CallState.CONNECTING
        self.protocol = MediaStreamProtocol(max_message_bytes=settings.twilio.max_message_bytes)
        self.stream_sid: str | None = None
        self.log = logging.LoggerAdapter(log, {"call_sid": call_sid})
        self.stats = CallStats()
        self.generation = 0
        self.turns: deque[Turn] = deque()
        self.current: Turn | None = None
        self.history: deque[Turn] = deque(maxlen=50)
        self.pending_marks: dict[str, SentMark] = {}
        self.listeners: set[asyncio.Queue[dict[str, Any]]] = set()
        self.ended = asyncio.Event()
        self.end_reason = ""
        self._turn_ids = itertools.count(1)
        self._turn_ready = asyncio.Event()
        self._outbox: asyncio.Queue[OutItem] = asyncio.Queue(maxsize=2000)
        self._clear_pending = False
        self._pacer = Pacer(chunk_ms=CHUNK_MS, lead_ms=settings.audio.lead_ms, clock=clock)
        self._outbound = OutboundAudio(quality=settings.audio.resampler_quality)
        self._inbound = InboundAudio()
        self._vad = (
            BargeInDetector(min_speech_ms=settings.bargein.min_speech_ms, aggressiveness=settings.bargein.aggressiveness)
            if settings.bargein.enabled
            else None
        )
        self._recent_chunks: deque[bytes] = deque(maxlen=16)  # for the barge-in fade-out
        self._queued_at_clear_ms = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._end_tasks: set[asyncio.Task[None]] = set()  # strong refs: the loop keeps only weak ones

    # ------------------------------------------------------------------ lifecycle

    def _set_state(self, new: CallState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"call {self.call_sid}: illegal transition {self.state.value} -> {new.value}")
        self.state = new

    def begin(self, start: Start) -> None:
        """The stream started: spawn the speaker and writer, queue the greeting."""
        self.stream_sid = start.stream_sid
        self._set_state(CallState.ACTIVE)
        self.metrics.calls_active.inc()
        self.log.info("call started: stream %s, voice %s", start.stream_sid, self.voice.name)
        self._tasks = [
            asyncio.create_task(self._writer(), name=f"writer-{self.call_sid}"),
            asyncio.create_task(self._speaker(), name=f"speaker-{self.call_sid}"),
        ]
        self.emit({"event": "call_started", "call_sid": self.call_sid, "voice": self.voice.name})
        if self.greeting:
            self.add_turn(self.greeting, close=True, source="greeting")

    async def end(self, reason: str) -> None:
        """Stop everything of this call (idempotent): turns cancelled, tasks joined, summary logged."""
        if self.state is CallState.ENDED:
            return
        was_active = self.state in (CallState.ACTIVE, CallState.ENDING)
        self.state = CallState.ENDED
        self.end_reason = reason
        for turn in [self.current, *self.turns]:
            if turn is not None and turn.handle is not None:
                # Before anything awaits: the worker frees the slot before its next step.
                turn.handle.cancel()
            if turn is not None and turn.state in (TurnState.QUEUED, TurnState.SPEAKING, TurnState.SENT):
                self._finish_turn(turn, TurnState.CANCELLED if turn.state is TurnState.QUEUED else TurnState.INTERRUPTED)
        self.turns.clear()
        self._turn_ready.set()
        with contextlib.suppress(asyncio.QueueFull):
            self._outbox.put_nowait(OutItem("wake", self.generation))
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.reservation is not None:
            self.reservation.release()
        if was_active:
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
        self.ended.set()

    def end_soon(self, reason: str) -> None:
        """End the call from one of its own tasks (which :meth:`end` would otherwise cancel)."""
        task = asyncio.get_running_loop().create_task(self.end(reason), name=f"end-{self.call_sid}")
        self._end_tasks.add(task)
        task.add_done_callback(self._end_tasks.discard)

    # ------------------------------------------------------------------ events from Twilio

    def on_event(self, event: object) -> bool:
        """Handle one parsed inbound event; returns False when the stream has stopped."""
        if isinstance(event, Media):
            self._on_media(event)
        elif isinstance(event, Mark):
            self._on_mark(event.name)
        elif isinstance(event, Dtmf):
            # Digits are caller data (PINs, card numbers): the API listener gets them, logs do not.
            self.log.debug("dtmf received")
            self.emit({"event": "dtmf", "digit": event.digit})
        elif isinstance(event, Stop):
            return False
        return True

    def _on_media(self, media: Media) -> None:
        if self._vad is None or not self._bot_is_audible():
            if self._vad is not None:
                self._vad.reset()
            return
        pcm = self._inbound.decode(media.payload)
        if self._vad.feed(pcm):
            self.barge_in(reason="caller speech")

    def _bot_is_audible(self) -> bool:
        """Our audio is playing or queued at Twilio: any mark of this generation not yet echoed."""
        if self.current is not None and self.current.state is TurnState.SPEAKING:
            return True
        return any(m.generation == self.generation for m in self.pending_marks.values())

    def _on_mark(self, name: str) -> None:
        sent = self.pending_marks.pop(name, None)
        if sent is None:
            self.log.debug("echo of unknown mark %r ignored", name)
            return
        self.stats.marks_echoed += 1
        self.metrics.marks_echoed_total.inc()
        if sent.generation != self.generation:
            self.stats.stale_echoes += 1  # flushed by a clear, not played
            return
        turn = sent.turn
        if sent.words:
            turn.heard.extend(sent.words)
            self.emit({"event": "heard", "turn_id": turn.id, "words": sent.words})
        if sent.end_of_turn and turn.state is TurnState.SENT:
            self._finish_turn(turn, TurnState.DONE)

    # ------------------------------------------------------------------ turns

    def add_turn(self, text: str | None, *, close: bool, interrupt: bool = False, source: str = "api") -> Turn:
        """Queue a turn (``text`` may be None for a streamed turn whose text follows)."""
        if self.state is not CallState.ACTIVE:
            raise TurnRejected(409, f"call {self.call_sid} is {self.state.value}; it takes no turns")
        if text is not None and len(text) > self.settings.calls.max_turn_chars:
            raise TurnRejected(413, f"turn text is {len(text)} characters; the limit is {self.settings.calls.max_turn_chars}")
        if text:
            self._word_chars_after(0, text)
        if interrupt:
            self.interrupt(reason="new turn with interrupt")
        if len(self.turns) >= self.settings.calls.max_queued_turns:
            self.metrics.rejected_total.labels(reason="turn_queue_full").inc()
            raise TurnRejected(
                429, f"{len(self.turns)} turns already wait on call {self.call_sid}; send fewer or use interrupt"
            )
        turn = Turn(id=f"{self.call_sid[-6:]}-{next(self._turn_ids)}", seq=self.stats.turns + 1,
                    interrupt=interrupt, source=source)
        self.stats.turns += 1
        if text:
            self.push_text(turn, text)
        if close:
            self.close_text(turn)
        self.turns.append(turn)
        self._turn_ready.set()
        self.emit({"event": "turn_queued", "turn_id": turn.id, "source": source})
        return turn

    def push_text(self, turn: Turn, text: str) -> None:
        if turn.text_closed:
            raise TurnRejected(409, f"turn {turn.id} is closed; start a new turn")
        if turn.state not in (TurnState.QUEUED, TurnState.SPEAKING):
            raise TurnRejected(409, f"turn {turn.id} is {turn.state.value}")
        word_chars = self._word_chars_after(turn.word_chars, text)
        turn.chars += len(text)
        if turn.chars > self.settings.calls.max_turn_chars:
            raise TurnRejected(413, f"turn {turn.id} passed the {self.settings.calls.max_turn_chars}-character limit")
        turn.word_chars = word_chars
        turn.text_parts.put_nowait(text)

    def _word_chars_after(self, open_chars: int, text: str) -> int:
        """Length of the word left open after ``text``; :class:`TurnRejected` (400) if any word in
        it (counting ``open_chars`` already pushed) is over ``calls.max_word_chars``.

        The TTS speaks a turn in parts that each fit the model's context; one word too long to
        fit any part (a paragraph with no spaces: a URL, a script written without spaces) would
        never end, so it is refused here.
        """
        try:
            return open_word_after(open_chars, text, self.settings.calls.max_word_chars)
        except ValueError as exc:
            raise TurnRejected(400, str(exc)) from None

    def close_text(self, turn: Turn) -> None:
        if not turn.text_closed:
            turn.text_closed = True
            turn.text_parts.put_nowait(None)

    def interrupt(self, reason: str) -> list[str]:
        """Stop the current turn and drop queued ones; returns the words the caller heard."""
        heard = self.barge_in(reason=reason, emit_event=False)
        for turn in list(self.turns):
            self._finish_turn(turn, TurnState.CANCELLED)
        self.turns.clear()
        return heard

    def barge_in(self, reason: str, emit_event: bool = True) -> list[str]:
        """Cut what is playing: bump the generation, send `clear`, cancel the TTS turn."""
        turn = self.current
        audible = self._bot_is_audible()
        if turn is None and not audible:
            return []
        self.generation += 1
        self._clear_pending = True
        self._queued_at_clear_ms = self._pacer.queued_ms()
        self._pacer.reset()
        with contextlib.suppress(asyncio.QueueFull):
            self._outbox.put_nowait(OutItem("wake", self.generation))
        heard: list[str] = []
        if turn is not None and turn.state in (TurnState.SPEAKING, TurnState.SENT):
            if turn.handle is not None:
                turn.handle.cancel()
            heard = list(turn.heard)
            self._finish_turn(turn, TurnState.INTERRUPTED)
        # Earlier turns whose audio was all sent but not all played are cut too.
        for mark in list(self.pending_marks.values()):
            if mark.turn is not turn and mark.turn.state is TurnState.SENT:
                self._finish_turn(mark.turn, TurnState.INTERRUPTED)
        self.stats.barge_ins += 1
        self.metrics.barge_ins_total.inc()
        self.log.info("barge-in (%s): heard %d words", reason, len(heard))
        if emit_event:
            self.emit({"event": "barge_in", "turn_id": turn.id if turn else None, "heard": heard, "reason": reason})
        return heard

    def cancel_turn(self, turn_id: str) -> bool:
        if self.current is not None and self.current.id == turn_id:
            self.barge_in(reason="cancelled by the API", emit_event=False)
            return True
        for turn in list(self.turns):
            if turn.id == turn_id:
                self.turns.remove(turn)
                self._finish_turn(turn, TurnState.CANCELLED)
                return True
        return False

    def _finish_turn(self, turn: Turn, state: TurnState) -> None:
        if turn.state in (TurnState.DONE, TurnState.INTERRUPTED, TurnState.FAILED, TurnState.CANCELLED):
            return
        turn.state = state
        if self.current is turn and state is not TurnState.SENT:
            self.current = None
        self.history.append(turn)
        self.metrics.turns_total.labels(outcome=state.value).inc()
        event: dict[str, Any] = {
            "event": "turn_done",
            "turn_id": turn.id,
            "state": state.value,
            "interrupted": state is TurnState.INTERRUPTED,
            "heard": list(turn.heard),
            "ttfa_ms": None if turn.ttfa_ms is None else round(turn.ttfa_ms, 1),
        }
        if turn.error:
            event["error"] = turn.error
        self.log.info("turn %s %s: ttfa %s ms, %d chunks, heard %d words", turn.id, state.value,
                      event["ttfa_ms"], turn.chunks, len(turn.heard))
        self.emit(event)

    def generation_config(self, turn: Turn) -> GenerationConfig:
        t = self.settings.tts
        return GenerationConfig(
            text=SamplingParams(t.text_temperature, t.top_k),
            audio=SamplingParams(t.temperature, t.top_k),
            cfg_scale=t.cfg_scale,
            initial_padding=t.initial_padding,
            seed=t.seed + turn.seq,
        )

    # ------------------------------------------------------------------ speaker

    async def _speaker(self) -> None:
        try:
            while self.state in (CallState.ACTIVE, CallState.ENDING):
                if not self.turns:
                    self._turn_ready.clear()
                    await self._turn_ready.wait()
                    continue
                turn = self.turns.popleft()
                if turn.state is not TurnState.QUEUED:
                    continue
                await self._speak(turn)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("speaker task failed")
            self.end_soon("error: speaker failed")

    async def _speak(self, turn: Turn) -> None:
        self.current = turn
        turn.state = TurnState.SPEAKING
        gen = self.generation
        self.emit({"event": "turn_started", "turn_id": turn.id})
        try:
            handle = await self.worker.open_turn(
                self.voice.snapshot, self.generation_config(turn), turn_id=turn.id, reservation=self.reservation
            )
        except (WorkerFull, WorkerClosed, TurnFailed) as exc:
            turn.error = str(exc)
            self.log.warning("turn %s could not start in the TTS worker: %s", turn.id, exc)
            await self._fail_turn(turn, gen)
            return
        turn.handle = handle
        feeder = asyncio.create_task(self._feed_text(turn, handle), name=f"feed-{turn.id}")
        every = self.settings.audio.mark_every_frames
        words: list[str] = []
        frames = 0
        mark_no = 0
        try:
            async for frame in handle.frames():
                if gen != self.generation or turn.state is not TurnState.SPEAKING:
                    break
                words.extend(frame.words)
                turn.words_sent.extend(frame.words)
                for chunk in self._outbound.push(frame.pcm24k):
                    await self._put(OutItem("media", gen, chunk, turn))
                frames += 1
                if frames % every == 0:
                    mark_no += 1
                    await self._put(OutItem("mark", gen, f"t{turn.seq}-g{gen}-m{mark_no}", turn, words))
                    words = []
            if gen == self.generation and turn.state is TurnState.SPEAKING:
                for chunk in self._outbound.finish():
                    await self._put(OutItem("media", gen, chunk, turn))
                await self._put(OutItem("mark", gen, f"t{turn.seq}-g{gen}-end", turn, words, end_of_turn=True))
                turn.state = TurnState.SENT
            else:
                self._outbound.drop()
        except TurnFailed as exc:
            self._outbound.drop()
            turn.error = str(exc)
            self.log.warning("turn %s failed in the TTS worker: %s", turn.id, exc)
            await self._fail_turn(turn, gen)
        finally:
            # Cancelled (call ended), cut by a barge-in, or done: a no-op once the turn has
            # ended on the worker, else its slot is free before the worker's next step.
            handle.cancel()
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
            if self.current is turn and turn.state is not TurnState.SENT:
                self.current = None

    async def _fail_turn(self, turn: Turn, gen: int) -> None:
        """The turn failed on the worker: play the fallback through the normal path, end it failed.

        The fallback chunks carry no turn (they count in no turn's audio or time to first
        audio); the mark after them lets ``drain`` wait for them and barge-in cut them.
        """
        self.stats.failed_turns += 1
        if gen == self.generation and self.state in (CallState.ACTIVE, CallState.ENDING) and self.fallback_ulaw8k:
            audio = self.fallback_ulaw8k
            for i in range(0, len(audio), CHUNK_BYTES):
                await self._put(OutItem("media", gen, audio[i : i + CHUNK_BYTES]))
            await self._put(OutItem("mark", gen, f"t{turn.seq}-g{gen}-fallback", turn))
        self._finish_turn(turn, TurnState.FAILED)

    async def _feed_text(self, turn: Turn, handle: TurnHandle) -> None:
        while True:
            part = await turn.text_parts.get()
            if part is None:
                handle.close_text()
                return
            handle.push_text(part)

    async def _put(self, item: OutItem) -> None:
        await self._outbox.put(item)

    # ------------------------------------------------------------------ writer

    async def _writer(self) -> None:
        try:
            while True:
                if self._clear_pending:
                    self._clear_pending = False
                    await self._send(self.protocol.clear_message())
                    await self._send_fade_out()
                item = await self._outbox.get()
                if item.kind == "wake":
                    continue
                if item.generation != self.generation:
                    self.stats.dropped_chunks += item.kind == "media"
                    continue
                if item.kind == "media":
                    await self._send_media(item)
                else:
                    name = str(item.data)
                    assert item.turn is not None
                    self.pending_marks[name] = SentMark(item.turn, item.generation, item.words, item.end_of_turn)
                    await self._send(self.protocol.mark_message(name))
                    self.stats.marks_sent += 1
                    self.metrics.marks_sent_total.inc()
        except asyncio.CancelledError:
            raise
        except SendTimeout:
            self.log.warning("Twilio socket accepted nothing for %.1f s: ending the call",
                             self.settings.audio.send_timeout_s)
            self.end_soon("error: send timeout")
        except ConnectionError as exc:
            self.log.info("socket closed while sending: %s", exc)
            self.end_soon("hangup: socket closed")

    async def _send_media(self, item: OutItem) -> None:
        delay = self._pacer.delay_for_next()
        if delay > 0:
            await asyncio.sleep(delay)
            if item.generation != self.generation:  # a barge-in while we waited
                self.stats.dropped_chunks += 1
                return
        elif self._pacer.queued_ms() <= 0 and item.turn is not None and item.turn.chunks > 0:
            # The queue at Twilio ran dry mid-turn: the caller heard a gap.
            item.turn.underruns += 1
            self.stats.underruns += 1
            self.metrics.underruns_total.inc()
        data = bytes(item.data)
        await self._send(self.protocol.media_message(data))
        self._pacer.sent()
        self._recent_chunks.append(data)
        self.stats.chunks_sent += 1
        self.stats.media_crc32 = zlib.crc32(data, self.stats.media_crc32)
        self.metrics.chunks_sent_total.inc()
        turn = item.turn
        if turn is not None:
            turn.chunks += 1
            if turn.first_chunk_at is None:
                turn.first_chunk_at = time.monotonic()
                ttfa = turn.ttfa_ms or 0.0
                self.metrics.ttfa_seconds.observe(ttfa / 1000)
                if self.stats.first_ttfa_ms is None:
                    self.stats.first_ttfa_ms = ttfa
                self.emit({"event": "first_audio", "turn_id": turn.id, "ttfa_ms": round(ttfa, 1)})

    async def _send_fade_out(self) -> None:
        """After a clear, the rest of the chunk that was playing, ramped down (no click at the cut).

        The pacer knows how much audio Twilio still held; the chunk at the playhead is that
        many chunks back in the ring of recently sent ones.
        """
        ms = self.settings.audio.fade_out_ms
        behind = int(np.ceil(self._queued_at_clear_ms / CHUNK_MS))
        recent = list(self._recent_chunks)
        self._recent_chunks.clear()
        if ms <= 0 or behind < 1 or behind > len(recent):
            return
        from ..audio import pcm16_to_ulaw, ulaw_to_pcm16

        playing = ulaw_to_pcm16(recent[-behind]).astype(np.float32)
        n = min(len(playing), ms * 8)
        faded = np.zeros(CHUNK_BYTES, dtype=np.int16)
        faded[:n] = (playing[:n] * np.linspace(1.0, 0.0, n, dtype=np.float32)).astype(np.int16)
        data = pcm16_to_ulaw(faded)
        await self._send(self.protocol.media_message(data))
        self.stats.chunks_sent += 1
        self.stats.media_crc32 = zlib.crc32(data, self.stats.media_crc32)
        self.metrics.chunks_sent_total.inc()

    async def _send(self, text: str) -> None:
        try:
            await asyncio.wait_for(self._send_text(text), timeout=self.settings.audio.send_timeout_s)
        except TimeoutError:
            raise SendTimeout from None

    # ------------------------------------------------------------------ events out

    def emit(self, event: dict[str, Any]) -> None:
        """Send an event to every control-API listener; a listener that stops reading is dropped."""
        event.setdefault("call_sid", self.call_sid)
        for queue in list(self.listeners):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.listeners.discard(queue)
                self.log.warning("dropping an event listener that stopped reading")

    async def drain(self, timeout_s: float, *, heard: bool = True) -> bool:
        """Wait until every queued turn has played (its marks echoed), up to ``timeout_s``.

        ``heard=False``: only until everything has been *sent*, for when echoes can no longer
        arrive (aiohttp stops reading every connection before its on_shutdown hooks run).
        """
        if self.state is CallState.ENDED:
            return True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if heard:
                busy = self.current is not None or self.turns or any(
                    m.generation == self.generation for m in self.pending_marks.values()
                )
            else:
                speaking = self.current is not None and self.current.state is TurnState.SPEAKING
                busy = speaking or bool(self.turns) or not self._outbox.empty()
            if not busy:
                return True
            await asyncio.sleep(0.02)
        return False

    def view(self) -> dict[str, Any]:
        s = self.stats
        return {
            "call_sid": self.call_sid,
            "stream_sid": self.stream_sid,
            "state": self.state.value,
            "voice": self.voice.name,
            "duration_s": round(time.monotonic() - s.started_at, 2),
            "current_turn": self.current.summary() if self.current else None,
            "queued_turns": [t.id for t in self.turns],
            "recent_turns": [t.summary() for t in self.history],
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


class SendTimeout(Exception):
    """The Twilio socket did not accept a message within the send timeout (a stalled reader)."""
