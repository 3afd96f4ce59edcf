"""The text state machine, rule by rule, with no model (doc section 6)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dia2.config import DataConfig
from dia2.errors import StreamError
from dia2.state_machine import (
    Entry,
    StateRules,
    TextState,
    TokenIds,
    action_decides,
    close_text,
    needs_text,
    new_text_state,
    process,
    push_entries,
)

IDS = TokenIds(new_word=2, pad=3, zero=7, bos=1, speaker1=480, speaker2=481)
NW, PAD = IDS.new_word, IDS.pad
A = Entry((10, 11), "A", padding=2)
B = Entry((20,), "B", padding=1)
C = Entry((30, 31, 32), "C", padding=3)
D = Entry((40,), "D", padding=1)


def rules(ahead: int = 2, max_padding: int = 6, initial_padding: int = 2) -> StateRules:
    return StateRules(
        IDS, second_stream_ahead=ahead, max_padding=max_padding, initial_padding=initial_padding
    )


def run(r: StateRules, state: TextState, actions: list[int], first_step: int = 0) -> list[tuple[int, int]]:
    return [process(r, state, first_step + i, a) for i, a in enumerate(actions)]


# ---------------------------------------------------------------------------- worked examples


def test_worked_example_with_look_ahead_stream() -> None:
    """Actions all 1 (the model always wants the next word): the full trace, derived by hand from 6.2."""
    r = rules(ahead=2)
    state = new_text_state(r, [A, B, C, D])
    out = run(r, state, [1] * 15)
    assert out == [
        (PAD, PAD),  # 0, 1: initial forced padding
        (PAD, PAD),
        (10, NW),  # 2: A consumed; its first token goes out at once; look-ahead loads C
        (11, 30),
        (PAD, 31),  # 4: A's padding (2) still forces pad
        (20, NW),  # 5: B consumed; look-ahead loads D
        (PAD, 32),
        (30, NW),  # 7: C consumed; nothing two words ahead
        (31, 40),
        (32, PAD),
        (PAD, PAD),
        (40, NW),  # 11: D consumed
        (PAD, PAD),
        (PAD, NW),  # 13: ran past the last word: end marker on the second stream
        (PAD, PAD),
    ]
    assert state.transcript == [("A", 2), ("B", 5), ("C", 7), ("D", 11)]
    assert state.consumption_steps == [2, 5, 7, 11]
    assert state.end_step == 13


def test_worked_example_without_second_stream_outputs_are_equal() -> None:
    r = rules(ahead=0)
    state = new_text_state(r, [A, B, C, D])
    out = run(r, state, [1] * 14)
    mains = [m for m, _ in out]
    assert all(m == s for m, s in out)
    assert mains == [PAD, PAD, NW, 10, 11, NW, 20, NW, 30, 31, 32, NW, 40, PAD]
    assert state.end_step == 13
    assert not state.lookahead_tokens


# ---------------------------------------------------------------------------- single rules


@pytest.mark.parametrize(("action", "expected"), [(1, NW), (0, PAD), (5, PAD), (2049, PAD), (-1, PAD)])
def test_actions_are_normalised_to_new_word_or_pad(action: int, expected: int) -> None:
    r = rules(ahead=0, initial_padding=0)
    state = new_text_state(r, [B])
    state.padding_budget = 6  # a spent budget would force new_word
    main, _ = process(r, state, 0, action)
    assert main == expected
    assert state.consumption_steps == ([0] if expected == NW else [])


def test_text_ids_new_word_and_pad_pass_through() -> None:
    """Warm-up feeds the text ids 2/3 themselves; they must keep their meaning."""
    r = rules(ahead=0, initial_padding=0)
    state = new_text_state(r, [B, D])
    assert process(r, state, 0, NW) == (NW, NW)
    assert process(r, state, 1, PAD) == (20, 20)


def test_initial_padding_forces_pad_then_the_model_chooses() -> None:
    r = rules(ahead=0, initial_padding=3)
    state = new_text_state(r, [B])
    assert run(r, state, [1, 1, 1]) == [(PAD, PAD)] * 3
    assert state.consumption_steps == []
    assert process(r, state, 3, 1) == (NW, NW)
    assert state.consumption_steps == [3]


def test_initial_padding_override_per_state() -> None:
    r = rules(ahead=0, initial_padding=2)
    state = new_text_state(r, [B], initial_padding=0)
    assert process(r, state, 0, 1) == (NW, NW)


def test_forced_padding_of_a_word_blocks_new_word() -> None:
    r = rules(ahead=0, initial_padding=0)
    word = Entry((10,), "w", padding=4)
    state = new_text_state(r, [word, B])
    run(r, state, [1])  # consume w at 0
    # Step 1 drains the token; steps 2..4 are the rest of its forced padding.
    assert run(r, state, [1, 1, 1, 1], first_step=1) == [(10, 10), (PAD, PAD), (PAD, PAD), (PAD, PAD)]
    assert process(r, state, 5, 1) == (NW, NW)
    assert state.consumption_steps == [0, 5]


def test_new_word_pops_entry_and_resets_budget_and_forced_padding() -> None:
    r = rules(ahead=0, max_padding=6, initial_padding=0)
    state = new_text_state(r, [C, D])
    process(r, state, 0, 1)
    assert list(state.entries) == [D]
    assert state.padding_budget == 6
    assert state.forced_padding == C.padding
    assert list(state.pending_tokens) == [30, 31, 32]
    assert state.transcript == [("C", 0)]


def test_consuming_step_does_not_count_down_padding() -> None:
    r = rules(ahead=0, max_padding=6, initial_padding=0)
    state = new_text_state(r, [C])
    process(r, state, 0, 1)
    assert (state.padding_budget, state.forced_padding) == (6, 3)
    process(r, state, 1, 0)
    assert (state.padding_budget, state.forced_padding) == (5, 2)


def test_pending_tokens_drain_one_per_step_whatever_the_action() -> None:
    r = rules(ahead=0, initial_padding=0)
    word = Entry((10, 11, 12, 13), "long", padding=0)
    state = new_text_state(r, [word, B])
    process(r, state, 0, 1)
    assert run(r, state, [1, 1, 1, 1], first_step=1) == [(10, 10), (11, 11), (12, 12), (13, 13)]
    assert state.consumption_steps == [0]
    assert process(r, state, 5, 1) == (NW, NW)


def test_pending_tokens_win_over_forced_calls() -> None:
    r = rules(ahead=0, initial_padding=0)
    state = new_text_state(r, [C, D])
    process(r, state, 0, NW, forced=True)
    assert process(r, state, 1, NW, forced=True) == (30, 30)
    assert state.consumption_steps == [0]


def test_forced_calls_bypass_padding_rules() -> None:
    r = rules(ahead=0, initial_padding=5)
    state = new_text_state(r, [B, D])
    assert process(r, state, 0, NW, forced=True) == (NW, NW)  # initial padding ignored
    assert process(r, state, 1, PAD, forced=True) == (20, 20)
    assert process(r, state, 2, NW, forced=True) == (NW, NW)  # B's forced padding ignored
    r0 = rules(ahead=0, max_padding=1, initial_padding=0)
    state = new_text_state(r0, [B, D])
    process(r0, state, 0, NW, forced=True)
    run(r0, state, [0], first_step=1)
    assert state.padding_budget <= 0
    # A forced pad stays pad even with the budget spent.
    assert process(r0, state, 2, PAD, forced=True) == (PAD, PAD)
    assert state.consumption_steps == [0]


def test_budget_running_out_forces_new_word() -> None:
    """After a 1-token word the model may pad at most max_padding steps in all (gap max(n, 6) + 1)."""
    r = rules(ahead=0, max_padding=6, initial_padding=0)
    state = new_text_state(r, [B, D])
    process(r, state, 0, 1)
    out = run(r, state, [0] * 7, first_step=1)
    assert out[:6] == [(20, 20)] + [(PAD, PAD)] * 5
    assert out[6] == (NW, NW)
    assert state.consumption_steps == [0, 7]


def test_budget_of_a_long_word_is_spent_while_its_tokens_drain() -> None:
    r = rules(ahead=0, max_padding=6, initial_padding=0)
    long = Entry(tuple(range(10, 18)), "long", padding=8)
    state = new_text_state(r, [long, B])
    process(r, state, 0, 1)
    run(r, state, [0] * 8, first_step=1)  # 7 tokens drain, then one forced pad
    assert state.consumption_steps == [0]
    assert process(r, state, 9, 0) == (NW, NW)  # gap n + 1 = 9
    assert state.consumption_steps == [0, 9]


def test_look_ahead_loads_word_i_plus_2() -> None:
    r = rules(ahead=2, initial_padding=0)
    e = [Entry((10 * k, 10 * k + 1), f"w{k}", padding=0) for k in range(1, 6)]
    state = new_text_state(r, e)
    assert process(r, state, 0, 1) == (10, NW)
    assert list(state.lookahead_tokens) == [30, 31]  # w3, never w2
    assert process(r, state, 1, 0) == (11, 30)
    assert process(r, state, 2, 1) == (20, NW)
    assert list(state.lookahead_tokens) == [31, 40, 41]


def test_look_ahead_counts_only_words_not_pauses() -> None:
    r = rules(ahead=2, initial_padding=0)
    pause = Entry((), "", padding=3)
    state = new_text_state(r, [A, pause, B, pause, C])
    process(r, state, 0, 1)
    assert list(state.lookahead_tokens) == list(C.tokens)


def test_look_ahead_is_empty_near_the_end() -> None:
    r = rules(ahead=2, initial_padding=0)
    state = new_text_state(r, [A, B])
    process(r, state, 0, 1)
    assert not state.lookahead_tokens


def test_pause_entry_is_pad_for_its_length_and_keeps_budget_running() -> None:
    r = rules(ahead=2, max_padding=6, initial_padding=0)
    pause = Entry((), "", padding=4)
    state = new_text_state(r, [pause, B])
    state.padding_budget = 3
    # The consuming step counts as one pad step of the pause.
    assert process(r, state, 0, 1) == (PAD, PAD)
    assert state.consumption_steps == [0]
    assert state.transcript == []
    assert (state.forced_padding, state.padding_budget) == (3, 2)
    assert run(r, state, [1, 1, 1], first_step=1) == [(PAD, PAD)] * 3
    # The budget ran out during the pause: the next word is forced at once.
    assert state.padding_budget == 0
    assert process(r, state, 4, 0) == (20, NW)
    assert state.transcript == [("B", 4)]


def test_end_marker_once_and_end_step_set_once() -> None:
    r = rules(ahead=2, initial_padding=0)
    state = new_text_state(r, [B])
    process(r, state, 0, 1)
    process(r, state, 1, 0)
    assert process(r, state, 2, 1) == (PAD, NW)
    assert state.end_step == 2
    assert process(r, state, 3, 1) == (PAD, PAD)
    assert state.end_step == 2


def test_end_without_second_stream_is_plain_pad() -> None:
    r = rules(ahead=0, initial_padding=0)
    state = new_text_state(r, [])
    assert process(r, state, 0, 1) == (PAD, PAD)
    assert state.end_step == 0


def test_flush_after_end_is_all_pad_even_with_the_budget_spent() -> None:
    """The runtime keeps stepping 24 frames after end_step; the machine must stay quiet."""
    r = rules(ahead=2, initial_padding=0)
    state = new_text_state(r, [B])
    run(r, state, [1, 0, 1])
    assert state.end_step == 2
    out = run(r, state, [0, 1] * 15, first_step=3)
    assert out == [(PAD, PAD)] * 30
    assert state.end_step == 2
    assert state.padding_budget <= 0


def test_empty_closed_state_ends_at_first_new_word() -> None:
    r = rules(ahead=2, initial_padding=2)
    state = new_text_state(r)
    assert run(r, state, [1, 1, 1]) == [(PAD, PAD), (PAD, PAD), (PAD, NW)]
    assert state.end_step == 2


# ---------------------------------------------------------------------------- streaming


def test_push_after_close_raises_stream_error() -> None:
    r = rules()
    state = new_text_state(r, [A], closed=False)
    push_entries(state, [B])
    close_text(state)
    close_text(state)  # closing twice is harmless
    with pytest.raises(StreamError, match="closed"):
        push_entries(state, [C])
    with pytest.raises(StreamError):
        push_entries(new_text_state(r, [A]), [B])  # built closed


def test_open_text_running_dry_holds_and_never_ends() -> None:
    r = rules(ahead=2, initial_padding=0)
    state = new_text_state(r, closed=False)
    state.padding_budget = 0  # even a forced new_word must not end an open stream
    assert run(r, state, [1, 0, 1]) == [(PAD, PAD)] * 3
    assert state.end_step is None
    assert state.held_steps == 3
    assert state.padding_budget == 0
    push_entries(state, [B, C, D])
    assert process(r, state, 3, 0) == (20, NW)  # budget spent: B starts at once
    close_text(state)
    run(r, state, [1] * 20, first_step=4)
    assert state.end_step is not None
    assert [w for w, _ in state.transcript] == ["B", "C", "D"]


def test_needs_text_conditions() -> None:
    r = rules(ahead=2, initial_padding=0)
    pause = Entry((), "", padding=2)
    assert needs_text(r, new_text_state(r, closed=False))
    assert not needs_text(r, new_text_state(r, closed=True))
    assert needs_text(r, new_text_state(r, [A, B], closed=False))  # A needs 2 words behind it
    assert not needs_text(r, new_text_state(r, [A, B, C], closed=False))
    assert needs_text(r, new_text_state(r, [A, pause, B], closed=False))  # pauses do not count
    assert not needs_text(r, new_text_state(r, [pause], closed=False))  # a pause needs no look-ahead
    assert not needs_text(r, new_text_state(r, [A], closed=False, initial_padding=2))  # forced pad
    assert needs_text(r, new_text_state(r, [A], closed=False, initial_padding=2), forced=True)
    r0 = rules(ahead=0, initial_padding=0)
    assert not needs_text(r0, new_text_state(r0, [A], closed=False))
    state = new_text_state(r0, [A], closed=False)
    process(r0, state, 0, 1)
    assert not needs_text(r0, state)  # A's tokens are still pending


def test_hold_pads_without_spending_the_budget() -> None:
    r = rules(ahead=2, max_padding=6, initial_padding=0)
    state = new_text_state(r, [A], closed=False)
    assert needs_text(r, state)
    state.padding_budget = 2
    assert run_held(r, state, 5) == [(PAD, PAD)] * 5
    assert state.padding_budget == 2
    assert state.consumption_steps == []
    assert state.held_steps == 5
    push_entries(state, [B, C])
    assert not needs_text(r, state)
    assert process(r, state, 5, 1) == (10, NW)
    assert list(state.lookahead_tokens) == list(C.tokens)


def run_held(r: StateRules, state: TextState, n: int) -> list[tuple[int, int]]:
    return [process(r, state, i, 1, hold=True) for i in range(n)]


def test_hold_still_drains_the_look_ahead_stream() -> None:
    r = rules(ahead=2, initial_padding=0)
    state = new_text_state(r, [A, B, C], closed=False)
    process(r, state, 0, 1)  # A; look-ahead holds C
    process(r, state, 1, 0)
    assert process(r, state, 2, 0, hold=True) == (PAD, 31)


_entry = st.one_of(
    st.builds(
        Entry,
        st.lists(st.integers(10, 99), min_size=1, max_size=4).map(tuple),
        st.sampled_from(["a", "b", "c"]),
        st.integers(0, 5),
    ),
    st.builds(Entry, st.just(()), st.just(""), st.integers(1, 8)),
)


@settings(max_examples=300, deadline=None)
@given(
    entries=st.lists(_entry, max_size=12),
    ahead=st.integers(0, 3),
    max_padding=st.integers(1, 6),
    initial_padding=st.integers(0, 3),
    warmup=st.lists(st.sampled_from([NW, PAD]), max_size=6),
    actions=st.lists(st.sampled_from([0, 1, 1, 2, 3, 5]), max_size=80),
    batch=st.integers(1, 3),
)
def test_streamed_entries_give_the_same_outputs_as_the_whole_text(
    entries: list[Entry],
    ahead: int,
    max_padding: int,
    initial_padding: int,
    warmup: list[int],
    actions: list[int],
    batch: int,
) -> None:
    """Pushing words just before needs_text would be True is indistinguishable from having them all."""
    r = StateRules(IDS, second_stream_ahead=ahead, max_padding=max_padding, initial_padding=initial_padding)
    whole = new_text_state(r, entries)
    streamed = new_text_state(r, closed=False)
    queue = list(entries)
    calls = [(t, True) for t in warmup] + [(a, False) for a in actions]
    for step, (token, forced) in enumerate(calls):
        while needs_text(r, streamed, forced=forced):
            if queue:
                push_entries(streamed, queue[:batch])
                del queue[:batch]
            else:
                close_text(streamed)
        assert process(r, streamed, step, token, forced) == process(r, whole, step, token, forced), step
    assert streamed.transcript == whole.transcript
    assert streamed.consumption_steps == whole.consumption_steps
    assert streamed.end_step == whole.end_step
    assert streamed.held_steps == 0


@settings(max_examples=150, deadline=None)
@given(
    entries=st.lists(st.sampled_from([A, B, C, D, Entry((), "", padding=2)]), max_size=6),
    ahead=st.integers(0, 3),
    closed=st.booleans(),
    actions=st.lists(st.sampled_from([0, 1]), max_size=40),
)
def test_when_the_action_does_not_decide_pad_and_new_word_give_the_same_step(
    entries: list[Entry], ahead: int, closed: bool, actions: list[int]
) -> None:
    """Where action_decides is False, process ignores the action: same outputs, same state (the
    engine then plans one outcome for both)."""
    r = StateRules(IDS, second_stream_ahead=ahead, max_padding=3, initial_padding=1)
    state = new_text_state(r, entries, closed=closed)
    for step, action in enumerate(actions):
        held = needs_text(r, state)
        pad, word = state.copy(), state.copy()
        out_pad = process(r, pad, step, 0, hold=held)
        out_word = process(r, word, step, 1, hold=held)
        if not action_decides(state, hold=held):
            assert (out_pad, pad) == (out_word, word), step
        process(r, state, step, action, hold=held)


# ---------------------------------------------------------------------------- state lifecycle


def test_copy_is_independent_and_replays_identically() -> None:
    r = rules(ahead=2)
    state = new_text_state(r, [A, B, C, D], closed=False)
    run(r, state, [1, 1, 1, 0])
    snap = state.copy()
    before = (
        list(snap.entries),
        list(snap.pending_tokens),
        list(snap.lookahead_tokens),
        list(snap.transcript),
    )
    live = run(r, state, [1, 0, 1, 1, 1, 0], first_step=4)
    push_entries(state, [A])
    assert (
        list(snap.entries),
        list(snap.pending_tokens),
        list(snap.lookahead_tokens),
        list(snap.transcript),
    ) == before
    replay = run(r, snap, [1, 0, 1, 1, 1, 0], first_step=4)
    assert replay == live


def test_entry_stores_tokens_as_a_tuple_and_rejects_negative_padding() -> None:
    e = Entry([1, 2], "x", 2)  # type: ignore[arg-type]
    assert e.tokens == (1, 2)
    assert Entry((), "", 3).is_pause
    with pytest.raises(ValueError):
        Entry((1,), "x", -1)


def test_rules_from_config_take_second_stream_ahead_and_hard_coded_max_padding() -> None:
    data = DataConfig(
        channels=34,
        text_vocab_size=49280,
        audio_vocab_size=2050,
        action_vocab_size=2,
        text_pad_token_id=3,
        text_new_word_token_id=2,
        action_pad_token_id=0,
        action_new_word_token_id=1,
        max_pad=8,
        second_stream_ahead=2,
    )
    r = StateRules.from_config(data, IDS)
    assert (r.second_stream_ahead, r.max_padding, r.initial_padding) == (2, 6, 2)
    with pytest.raises(ValueError):
        StateRules(IDS, second_stream_ahead=-1)
    with pytest.raises(ValueError):
        TokenIds(new_word=3, pad=3, zero=7, bos=1, speaker1=4, speaker2=5)
