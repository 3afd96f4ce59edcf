"""The text state machine: turns the model's per-step action into the two text tokens it reads next.

Dia2 does not read a pre-aligned transcript. At each step the model samples an action
("keep padding" or "start the next word"); this machine pops the next word when asked, feeds
its tokens over the following steps on the main text stream, and feeds the tokens of a word
further ahead on the second ("look-ahead") stream. Same design as Kyutai's TTS state machine.

Rules (fixed ids and limits, :class:`StateRules`) are kept apart from per-stream state
(:class:`TextState`); :func:`process` is a plain function of (rules, state, step, token) and
is tested with no model at all.

Streaming text: a state whose text is still *open* (more words may come) never ends. When it
runs out of words it *holds*: it outputs pad without spending the padding budget, so the model
keeps voicing what it already has and picks up where it was as soon as words arrive
(:func:`needs_text`, :func:`push_entries`, :func:`close_text`). Units: one step is one 80 ms
Mimi frame (12.5 Hz).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from .config import DataConfig
from .errors import StreamError

# The action head's two classes, mapped onto text ids before anything else (upstream compares
# with these literals and never reads the config's action ids).
_ACTION_PAD = 0
_ACTION_NEW_WORD = 1


@dataclass(frozen=True)
class TokenIds:
    """Text-stream ids the machine emits. Released checkpoints: new_word 2, pad 3, zero 7, bos 1."""

    new_word: int
    pad: int
    zero: int
    bos: int
    speaker1: int
    speaker2: int

    def __post_init__(self) -> None:
        if self.new_word == self.pad:
            raise ValueError(f"new_word and pad must differ, both are {self.pad}")


@dataclass(frozen=True)
class StateRules:
    """Fixed per runtime: ids and limits, all counted in steps (80 ms frames).

    ``max_padding`` is 6 as hard-coded upstream (the config's ``max_pad`` is ignored there);
    ``initial_padding`` is the forced pad at the start of a turn (generation default 2).
    ``second_stream_ahead`` = k: when word i is consumed the look-ahead stream is loaded with
    word i + k (k = 0: no second stream, both outputs are equal).
    """

    ids: TokenIds
    second_stream_ahead: int = 0
    max_padding: int = 6
    initial_padding: int = 2

    def __post_init__(self) -> None:
        for name in ("second_stream_ahead", "max_padding", "initial_padding"):
            if getattr(self, name) < 0:
                raise ValueError(f"StateRules.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_config(
        cls, data: DataConfig, ids: TokenIds, *, max_padding: int = 6, initial_padding: int = 2
    ) -> StateRules:
        """Rules for a checkpoint: ``second_stream_ahead`` from ``config.json``, limits as upstream."""
        return cls(
            ids=ids,
            second_stream_ahead=data.second_stream_ahead,
            max_padding=max_padding,
            initial_padding=initial_padding,
        )


@dataclass(frozen=True)
class Entry:
    """One word (or pause) of the script.

    ``tokens`` are the word's text ids (empty = a pause); ``padding`` is how many steps the
    next word must wait after this one is consumed (for a pause: its length in steps).
    """

    tokens: tuple[int, ...]
    text: str = ""
    padding: int = 0

    def __post_init__(self) -> None:
        # Accept any iterable of ints but store a tuple: entries are shared between copies.
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        if self.padding < 0:
            raise ValueError(f"Entry {self.text!r}: padding must be >= 0, got {self.padding}")

    @property
    def is_pause(self) -> bool:
        return not self.tokens


@dataclass
class TextState:
    """Per-stream state of the machine. Build with :func:`new_text_state`.

    ``padding_budget``: pad steps the model may still choose before a word is forced.
    ``forced_padding``: pad steps still imposed (initial padding, a word's padding, a pause).
    ``pending_tokens``: tokens of the current word not yet fed on the main stream.
    ``lookahead_tokens``: tokens not yet fed on the second stream.
    ``end_step``: the step at which the machine ran past the last word (closed text only).
    ``transcript``: (word text, consuming step) for each consumed word.
    ``consumption_steps``: consuming step of every entry, pauses included.
    ``held_steps``: steps spent holding for text (a streaming underrun counter).
    """

    entries: deque[Entry]
    padding_budget: int
    forced_padding: int
    initial_padding: int
    pending_tokens: deque[int] = field(default_factory=deque)
    lookahead_tokens: deque[int] = field(default_factory=deque)
    end_step: int | None = None
    transcript: list[tuple[str, int]] = field(default_factory=list)
    consumption_steps: list[int] = field(default_factory=list)
    text_closed: bool = True
    held_steps: int = 0

    def copy(self) -> TextState:
        """An independent snapshot: no container is shared (entries themselves are immutable)."""
        return TextState(
            entries=deque(self.entries),
            padding_budget=self.padding_budget,
            forced_padding=self.forced_padding,
            initial_padding=self.initial_padding,
            pending_tokens=deque(self.pending_tokens),
            lookahead_tokens=deque(self.lookahead_tokens),
            end_step=self.end_step,
            transcript=list(self.transcript),
            consumption_steps=list(self.consumption_steps),
            text_closed=self.text_closed,
            held_steps=self.held_steps,
        )

    @property
    def finished(self) -> bool:
        """True once the machine has run past the last word of a closed text."""
        return self.end_step is not None


def new_text_state(
    rules: StateRules,
    entries: Iterable[Entry] = (),
    initial_padding: int | None = None,
    closed: bool = True,
) -> TextState:
    """A fresh state; ``initial_padding`` overrides the rules' value for this stream.

    ``closed=False`` starts a streaming turn: add words with :func:`push_entries` and end it
    with :func:`close_text`.
    """
    pad = rules.initial_padding if initial_padding is None else initial_padding
    if pad < 0:
        raise ValueError(f"initial_padding must be >= 0, got {pad}")
    return TextState(
        entries=deque(entries),
        padding_budget=pad,
        forced_padding=pad,
        initial_padding=pad,
        text_closed=closed,
    )


def push_entries(state: TextState, entries: Iterable[Entry]) -> None:
    """Append words to a running stream; raises :class:`StreamError` once its text is closed."""
    if state.text_closed:
        raise StreamError(
            "cannot push text: the stream's text is closed (close_text was called or it was built closed); "
            "start a new turn to speak more"
        )
    state.entries.extend(entries)


def close_text(state: TextState) -> None:
    """Declare that no more words will come: the stream may now run past its last word and end."""
    state.text_closed = True


def needs_text(rules: StateRules, state: TextState, *, forced: bool = False) -> bool:
    """True when the next call could start a word but the queue cannot back it yet.

    That is: the text is open, nothing forces pad at the next call (no pending tokens, no
    forced padding unless ``forced``), and either nothing is queued, or the head is a word
    without the ``second_stream_ahead`` further words its look-ahead will load. A pause at the
    head needs nothing behind it. While this is True, call :func:`process` with ``hold=True``
    (or push more words first). Pushing before it would become True keeps the outputs
    identical to a run that had the whole text from the start.
    """
    if state.text_closed or state.pending_tokens:
        return False
    if state.forced_padding > 0 and not forced:
        return False
    if not state.entries:
        return True
    if state.entries[0].is_pause:
        return False
    return _words_after_head(state.entries, rules.second_stream_ahead) < rules.second_stream_ahead


def action_decides(state: TextState, *, hold: bool = False) -> bool:
    """Whether the sampled action can change what :func:`process` does (unforced): False while
    a word's tokens are pending, padding is forced, the padding budget is spent (a word is due)
    or the step holds. Then pad and new word give the same outputs and the same state, and a
    caller planning both outcomes of an unread action plans one."""
    return not (hold or state.pending_tokens or state.forced_padding > 0 or state.padding_budget <= 0)


def _words_after_head(entries: deque[Entry], limit: int) -> int:
    count = 0
    for i, entry in enumerate(entries):
        if count >= limit:
            break
        if i > 0 and entry.tokens:
            count += 1
    return count


def _peek_word(entries: deque[Entry], ahead: int) -> tuple[int, ...]:
    """Tokens of the ``ahead``-th queued entry that has tokens (1-based), or () if none."""
    for entry in entries:
        if entry.tokens:
            ahead -= 1
            if ahead == 0:
                return entry.tokens
    return ()


def process(
    rules: StateRules,
    state: TextState,
    step: int,
    token: int,
    forced: bool = False,
    *,
    hold: bool = False,
) -> tuple[int, int]:
    """Advance ``state`` by one step given the sampled action; return (main, second) text ids.

    ``token``: the sampled action (1 = new word, 0 = pad) or, for a forced call, the text id
    new_word/pad itself; anything else counts as pad. ``forced``: a prompt-prefill call, which keeps
    the given token whatever the padding counters say (pending tokens still win).
    ``hold``: treat this step as pad without spending the padding budget (use it while
    :func:`needs_text` is True). An open text that runs dry holds by itself and never ends.
    The outputs are what the model reads at step + 1.
    """
    ids = rules.ids
    # 1. Normalise: action 1/0 → new_word/pad; anything else → pad.
    if token == _ACTION_NEW_WORD:
        token = ids.new_word
    elif token == _ACTION_PAD:
        token = ids.pad
    if token != ids.new_word:
        token = ids.pad

    # 2. Constraints, first match wins.
    if hold or state.pending_tokens:
        token = ids.pad
    elif forced:
        pass
    elif state.forced_padding > 0:
        token = ids.pad
    elif state.padding_budget <= 0:
        token = ids.new_word

    # 3. New word: pop the next entry, or hold (open text) / end (closed text) when dry.
    if token == ids.new_word:
        if state.entries:
            token = _consume(rules, state, step)
        elif not state.text_closed:
            token = ids.pad
            hold = True
        else:
            # The first attempt past the last word is the end marker (second stream only).
            if not (rules.second_stream_ahead and state.end_step is None):
                token = ids.pad
            if state.end_step is None:
                state.end_step = step

    # 4. Output on the main stream.
    if hold:
        state.held_steps += 1
    if token == ids.pad:
        if state.padding_budget > 0 and not hold:
            state.padding_budget -= 1
        if state.forced_padding > 0:
            state.forced_padding -= 1
        main = state.pending_tokens.popleft() if state.pending_tokens else ids.pad
    else:
        main = ids.new_word

    # 5. Multiplex: new_word moves to the second stream and the word's first token goes out at once.
    if not rules.second_stream_ahead:
        return main, main
    if main == ids.new_word:
        main = state.pending_tokens.popleft() if state.pending_tokens else ids.pad
        return main, ids.new_word
    second = state.lookahead_tokens.popleft() if state.lookahead_tokens else ids.pad
    return main, second


def _consume(rules: StateRules, state: TextState, step: int) -> int:
    """Pop the head entry at ``step``; return the token the step continues with."""
    ids = rules.ids
    entry = state.entries.popleft()
    state.consumption_steps.append(step)
    state.forced_padding = entry.padding
    if entry.is_pause:
        # A pause is consumed like a word but fed as pad; the budget keeps running.
        return ids.pad
    state.transcript.append((entry.text, step))
    state.pending_tokens.extend(entry.tokens)
    if rules.second_stream_ahead:
        state.lookahead_tokens.extend(_peek_word(state.entries, rules.second_stream_ahead))
    state.padding_budget = rules.max_padding
    return ids.new_word
