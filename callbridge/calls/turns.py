"""A call's turns: what a turn is, its states, the text limits, and the queue they wait in.

A turn is text to speak (whole, or streamed as an LLM writes it) and what became of it:
queued → speaking → sent (all audio handed to the leg, its end marker not yet played) → done,
or interrupted / failed / cancelled. The queue holds the turns not yet started, the one in
progress (``current``) and a short history; it checks every limit on text before anything
reaches the TTS, and is the one place a turn ends (``finish``: metrics, log, ``turn_done``).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dia2 import normalize_text

from ..config import CallSettings
from ..metrics import Metrics
from ..tts import TurnHandle

__all__ = ["Turn", "TurnQueue", "TurnRejected", "TurnState", "open_word_after", "whole_turn_text"]

_WHITESPACE = re.compile(r"\s+")


class TurnState(enum.Enum):
    QUEUED = "queued"
    SPEAKING = "speaking"  # audio is being generated and sent
    SENT = "sent"  # all audio handed to the leg; waiting for its end marker to play
    DONE = "done"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    CANCELLED = "cancelled"


ENDED_TURN_STATES = frozenset({TurnState.DONE, TurnState.INTERRUPTED, TurnState.FAILED, TurnState.CANCELLED})


def open_word_after(open_chars: int, text: str, limit: int) -> int:
    """Characters of the word still open after appending ``text`` to a stream whose last word had
    ``open_chars``; ValueError if any word reaches over ``limit`` characters."""
    runs = _WHITESPACE.split(text)
    longest = max([open_chars + len(runs[0]), *(len(r) for r in runs[1:])])
    if longest > limit:
        raise ValueError(f"a word of {longest} characters; the limit is {limit} (separate words with spaces)")
    return len(runs[-1]) if len(runs) > 1 else open_chars + len(runs[0])


class TurnRejected(Exception):
    """A turn cannot be accepted (queue full, text too long, call not active); ``status`` is the HTTP one."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def whole_turn_text(text: object) -> str:
    """A whole turn's text, or :class:`TurnRejected` (400).

    Control, format and surrogate characters are dropped later by the TTS front end
    (``dia2.normalize_text``); a text with nothing left to speak after that is refused
    here instead of failing on the worker. Any script is accepted (the tokenizer is
    byte-level); markup errors such as ``[S3]`` fail the turn on the worker (a ``failed``
    turn, the fallback plays, the call goes on).
    """
    if not isinstance(text, str) or not text.strip():
        raise TurnRejected(400, "'text' must be a non-empty string")
    if not normalize_text(text):
        raise TurnRejected(400, "'text' has nothing to speak once control and format characters are removed")
    return text


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
    heard: list[str] = field(default_factory=list)  # words whose markers have played
    words_sent: list[str] = field(default_factory=list)
    handle: TurnHandle | None = None
    error: str | None = None
    chunks: int = 0
    underruns: int = 0

    @property
    def ended(self) -> bool:
        return self.state in ENDED_TURN_STATES

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


class TurnQueue:
    """The turns of one call: queued ones, the one in progress, the last 50 ended."""

    def __init__(self, call_sid: str, limits: CallSettings, metrics: Metrics,
                 emit: Callable[[dict[str, Any]], None], log: logging.LoggerAdapter[logging.Logger],
                 on_turn_ended: Callable[[], None] = lambda: None) -> None:
        self.call_sid = call_sid
        self.limits = limits
        self.metrics = metrics
        self._emit = emit
        self._log = log
        self._on_turn_ended = on_turn_ended  # a call's drain looks again
        self.queued: deque[Turn] = deque()
        self.current: Turn | None = None  # speaking, or sent and still playing
        self.history: deque[Turn] = deque(maxlen=50)
        self._ids = itertools.count(1)
        self._ready = asyncio.Event()

    # ---- text limits

    def check_text(self, text: str | None) -> None:
        """A whole turn's text against the limits (413 too long, 400 a word too long)."""
        if text is not None and len(text) > self.limits.max_turn_chars:
            raise TurnRejected(413, f"turn text is {len(text)} characters; the limit is {self.limits.max_turn_chars}")
        if text:
            self._word_chars_after(0, text)

    def _word_chars_after(self, open_chars: int, text: str) -> int:
        """Length of the word left open after ``text``; :class:`TurnRejected` (400) if any word in
        it (counting ``open_chars`` already pushed) is over ``calls.max_word_chars``.

        The TTS speaks a turn in parts that each fit the model's context; one word too long to
        fit any part (a paragraph with no spaces: a URL, a script written without spaces) would
        never end, so it is refused here.
        """
        try:
            return open_word_after(open_chars, text, self.limits.max_word_chars)
        except ValueError as exc:
            raise TurnRejected(400, str(exc)) from None

    # ---- queueing

    def add(self, text: str | None, *, close: bool, interrupt: bool, source: str) -> Turn:
        """Queue a new turn (429 when ``calls.max_queued_turns`` already wait)."""
        if len(self.queued) >= self.limits.max_queued_turns:
            self.metrics.rejected_total.labels(reason="turn_queue_full").inc()
            raise TurnRejected(
                429, f"{len(self.queued)} turns already wait on call {self.call_sid}; send fewer or use interrupt"
            )
        seq = next(self._ids)  # 1, 2, … over the call: in the turn id, the marker names and the seed
        turn = Turn(id=f"{self.call_sid[-6:]}-{seq}", seq=seq, interrupt=interrupt, source=source)
        if text:
            self.push_text(turn, text)
        if close:
            self.close_text(turn)
        self.queued.append(turn)
        self._ready.set()
        self._emit({"event": "turn_queued", "turn_id": turn.id, "source": source})
        return turn

    def push_text(self, turn: Turn, text: str) -> None:
        if turn.text_closed:
            raise TurnRejected(409, f"turn {turn.id} is closed; start a new turn")
        if turn.state not in (TurnState.QUEUED, TurnState.SPEAKING):
            raise TurnRejected(409, f"turn {turn.id} is {turn.state.value}")
        word_chars = self._word_chars_after(turn.word_chars, text)
        turn.chars += len(text)
        if turn.chars > self.limits.max_turn_chars:
            raise TurnRejected(413, f"turn {turn.id} passed the {self.limits.max_turn_chars}-character limit")
        turn.word_chars = word_chars
        turn.text_parts.put_nowait(text)

    def close_text(self, turn: Turn) -> None:
        if not turn.text_closed:
            turn.text_closed = True
            turn.text_parts.put_nowait(None)

    def ahead_of(self, turn: Turn) -> int:
        """Turns that will play before ``turn``: the one in progress (if any) and those queued before it."""
        before = list(itertools.takewhile(lambda t: t is not turn, self.queued))
        return len(before) + (self.current is not None and not self.current.ended)

    async def next(self) -> Turn | None:
        """The next queued turn to speak, waiting for one; None when woken by :meth:`wake` with none."""
        while self.queued:
            turn = self.queued.popleft()
            if turn.state is TurnState.QUEUED:
                return turn
        self._ready.clear()
        await self._ready.wait()
        return None

    def wake(self) -> None:
        self._ready.set()

    def find_queued(self, turn_id: str) -> Turn | None:
        return next((t for t in self.queued if t.id == turn_id), None)

    def cancel_queued(self, turn: Turn | None = None) -> None:
        """Cancel one queued turn, or all of them."""
        for queued in [turn] if turn is not None else list(self.queued):
            if queued in self.queued:
                self.queued.remove(queued)
            self.finish(queued, TurnState.CANCELLED)

    # ---- ending

    def finish(self, turn: Turn, state: TurnState) -> None:
        """End ``turn`` in ``state`` (no-op if it has ended): history, metrics, log, ``turn_done``."""
        if turn.ended:
            return
        turn.state = state
        if self.current is turn:
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
        self._log.info("turn %s %s: ttfa %s ms, %d chunks, heard %d words", turn.id, state.value,
                       event["ttfa_ms"], turn.chunks, len(turn.heard))
        self._emit(event)
        self._on_turn_ended()
