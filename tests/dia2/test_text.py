"""Text front end: tiny tokenizer files, tokenizer wrapper, normaliser, script parsing, prompt words."""

from __future__ import annotations

import json
import logging
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dia2.config import DataConfig
from dia2.errors import CheckpointError, PromptError, ScriptError
from dia2.state_machine import Entry
from dia2.text import (
    ScriptCursor,
    TextTokenizer,
    WordTiming,
    normalize_text,
    parse_script,
    prompt_entries,
)
from dia2.tiny_tokenizer import BASE_VOCAB_SIZE, SPECIAL_TOKENS, write_tiny_tokenizer

FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        out = tmp_path_factory.mktemp("tiny_tok")
        write_tiny_tokenizer(out)
        yield out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> TextTokenizer:
    return TextTokenizer.from_pretrained(tok_dir)


# ---------------------------------------------------------------------------- tiny tokenizer


def test_tiny_tokenizer_is_deterministic_and_complete(tmp_path: Path, tok_dir: Path) -> None:
    total = write_tiny_tokenizer(tmp_path / "again")
    assert {p.name for p in tok_dir.iterdir()} == FILES
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (tok_dir / name).read_bytes(), name
    assert total == BASE_VOCAB_SIZE + 2 <= 512
    assert json.loads((tok_dir / "added_tokens.json").read_text()) == {
        "[S1]": BASE_VOCAB_SIZE,
        "[S2]": BASE_VOCAB_SIZE + 1,
    }


def test_tiny_tokenizer_loads_with_auto_tokenizer(tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    assert len(hf) == BASE_VOCAB_SIZE + 2
    assert hf.convert_ids_to_tokens(list(range(8))) == list(SPECIAL_TOKENS)
    assert hf.bos_token_id == 0
    ids = hf.encode("[S1] Hello", add_special_tokens=False)
    assert ids[0] == BASE_VOCAB_SIZE
    assert ids[1:] == hf.encode(" Hello", add_special_tokens=False)
    assert hf.convert_ids_to_tokens(ids[1]).startswith("Ġ")  # the space-prefixed piece


# ---------------------------------------------------------------------------- TextTokenizer


def test_text_tokenizer_ids(tok: TextTokenizer) -> None:
    assert (tok.speaker1_id, tok.speaker2_id) == (BASE_VOCAB_SIZE, BASE_VOCAB_SIZE + 1)
    assert tok.has_speaker_tokens
    assert tok.bos_id == 1  # the file's BOS is 0, which means 1
    assert tok.vocab_size == BASE_VOCAB_SIZE + 2
    data = DataConfig(
        channels=4,
        text_vocab_size=512,
        audio_vocab_size=2050,
        action_vocab_size=2,
        text_pad_token_id=3,
        text_new_word_token_id=2,
        action_pad_token_id=0,
        action_new_word_token_id=1,
    )
    ids = tok.token_ids(data)
    assert (ids.new_word, ids.pad, ids.zero, ids.bos, ids.speaker1, ids.speaker2) == (
        2,
        3,
        7,
        1,
        BASE_VOCAB_SIZE,
        BASE_VOCAB_SIZE + 1,
    )


def test_encode_word_with_and_without_speaker(tok: TextTokenizer) -> None:
    bare = tok.encode_word("Hello")
    tagged = tok.encode_word("Hello", 1)
    assert tagged[0] == tok.speaker1_id
    assert tagged[1:] == tok.encode(" Hello") != bare
    assert tok.encode_word("Hello", 2)[0] == tok.speaker2_id
    assert tok.speaker_id(2) == tok.speaker2_id
    with pytest.raises(ValueError):
        tok.encode_word("Hello", 3)


class _NoTagsTokenizer:
    """A fake with no [S1]/[S2]: what save_pretrained leaves behind."""

    bos_token_id = 5

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def convert_tokens_to_ids(self, tokens: str) -> int:
        return 0

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(300)}

    def __len__(self) -> int:
        return 300


def test_missing_speaker_tokens_fall_back_to_new_word_and_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dia2.text"):
        t = TextTokenizer(_NoTagsTokenizer(), new_word_id=2)
    assert (t.speaker1_id, t.speaker2_id) == (2, 2)
    assert not t.has_speaker_tokens
    assert t.bos_id == 5
    assert t.vocab_size == 300
    assert "[S1]/[S2]" in caplog.text


def test_from_pretrained_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found") as err:
        TextTokenizer.from_pretrained(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    assert "tokenizer.json" in str(err.value)


def test_from_pretrained_empty_folder_names_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no tokenizer") as err:
        TextTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "vocab.json" in str(err.value)


@pytest.mark.parametrize(
    ("broken", "content"),
    [("tokenizer.json", "{ not json"), ("tokenizer.json", '{"model": {"type": "BPE"}}')],
)
def test_from_pretrained_corrupt_tokenizer(tmp_path: Path, tok_dir: Path, broken: str, content: str) -> None:
    for name in FILES:
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    (tmp_path / broken).write_text(content)
    with pytest.raises(CheckpointError) as err:
        TextTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_from_pretrained_corrupt_merges_without_tokenizer_json(tmp_path: Path, tok_dir: Path) -> None:
    for name in FILES - {"tokenizer.json"}:
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    (tmp_path / "merges.txt").write_text("garbage")
    with pytest.raises(CheckpointError, match="merges|cannot load"):
        TextTokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- normalize_text


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  Hello   world \n", "Hello world"),
        ("it’s", "it's"),
        ("Note: time 10:30", "Note time 10 30"),
        ("a\x00b\u200bc", "abc"),
        ("tab\there\r\nnow", "tab here now"),
        ("ｆｕｌｌ ［Ｓ１］ １２", "full [S1] 12"),
        ("e\u0301", "\u00e9"),
        ("\x1c\x1d", ""),
        ("", ""),
    ],
)
def test_normalize_text_examples(raw: str, clean: str) -> None:
    assert normalize_text(raw) == clean


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_normalize_text_never_raises_and_is_clean(raw: str) -> None:
    out = normalize_text(raw)
    assert normalize_text(out) == out
    assert out == out.strip()
    assert "  " not in out and ":" not in out and "\u2019" not in out
    for ch in out:
        assert ch == " " or not ch.isspace()
        assert unicodedata.category(ch) not in ("Cc", "Cf", "Cs")


# ---------------------------------------------------------------------------- parse_script


def words(entries: list[Entry]) -> list[str]:
    return [e.text for e in entries]


def test_untagged_script_opens_with_s1(tok: TextTokenizer) -> None:
    entries = parse_script(tok, "Hello there, friend.")
    assert words(entries) == ["Hello", "there,", "friend."]
    assert entries[0].tokens == (tok.speaker1_id, *tok.encode("Hello"))
    assert entries[1].tokens == tuple(tok.encode("there,"))
    assert all(e.padding == len(e.tokens) for e in entries)


def test_explicit_s1_is_not_doubled(tok: TextTokenizer) -> None:
    entries = parse_script(tok, "[S1] Hello [S2] Hi")
    assert entries[0].tokens == tuple(tok.encode_word("Hello", 1))
    assert entries[1].tokens == tuple(tok.encode_word("Hi", 2))
    assert words(entries) == ["Hello", "Hi"]


def test_script_opening_with_s2_gets_s1_then_s2(tok: TextTokenizer) -> None:
    """Upstream quirk kept: the S1 tag is inserted in front of an [S2]-tagged first word."""
    entries = parse_script(tok, "[S2] Hello")
    assert entries[0].tokens == (tok.speaker1_id, *tok.encode_word("Hello", 2))


def test_open_with_s1_false_drops_leading_s1_and_inserts_nothing(tok: TextTokenizer) -> None:
    assert parse_script(tok, "Hello there", open_with_s1=False)[0].tokens == tuple(tok.encode("Hello"))
    assert parse_script(tok, "[S1] Hello there", open_with_s1=False)[0].tokens == tuple(tok.encode("Hello"))
    assert parse_script(tok, "[S2] Hello", open_with_s1=False)[0].tokens == tuple(tok.encode_word("Hello", 2))
    later = parse_script(tok, "Hi [S1] Hello", open_with_s1=False)
    assert later[1].tokens == tuple(tok.encode_word("Hello", 1))


@pytest.mark.parametrize(
    ("tag", "frames"),
    [
        ('<break time="1s"/>', 12),  # 12.5 → 12 (half to even)
        ('<break time="1.5s"/>', 19),  # 18.75
        ('<break time="0.2s">', 2),  # 2.5 → 2, slash optional
        ('<break time="1,5s" />', 19),  # comma separator, space before the slash
        ('<break time="3.s"/>', 38),  # 37.5 → 38
        ('<break time="0.04s"/>', None),  # 0.5 → 0: no entry
    ],
)
def test_break_tags_become_pauses(tok: TextTokenizer, tag: str, frames: int | None) -> None:
    entries = parse_script(tok, f"Hello {tag} there")
    pauses = [e for e in entries if e.is_pause]
    assert words([e for e in entries if not e.is_pause]) == ["Hello", "there"]
    assert [p.padding for p in pauses] == ([] if frames is None else [frames])


def test_break_tag_touching_words_and_colons(tok: TextTokenizer) -> None:
    entries = parse_script(tok, 'one<break time="1s"/>two: three’s')
    assert [(e.text, e.is_pause) for e in entries] == [
        ("one", False),
        ("", True),
        ("two", False),
        ("three's", False),
    ]


def test_speaker_tag_survives_a_break(tok: TextTokenizer) -> None:
    entries = parse_script(tok, 'Hi [S2] <break time="1s"/> there')
    assert entries[-1].tokens == tuple(tok.encode_word("there", 2))


def test_list_of_lines_is_one_script(tok: TextTokenizer) -> None:
    assert parse_script(tok, ["Hello", "there"]) == parse_script(tok, "Hello\nthere")


@pytest.mark.parametrize("text", ["Hello [S3] there", "[s1] Hello", "[S1]Hello", "Hi [S2],"])
def test_unknown_speaker_tags_raise(tok: TextTokenizer, text: str) -> None:
    with pytest.raises(ScriptError, match=r"speaker tag '\[[sS]\d\]'"):
        parse_script(tok, text)


@pytest.mark.parametrize("text", ['Hi <break time="soon"/>', "Hi <break>", 'a<BREAK time="1s"/>'])
def test_malformed_break_tags_raise(tok: TextTokenizer, text: str) -> None:
    with pytest.raises(ScriptError, match="break"):
        parse_script(tok, text)


def test_break_longer_than_the_context_raises(tok: TextTokenizer) -> None:
    with pytest.raises(ScriptError, match="longer"):
        parse_script(tok, 'Hi <break time="121s"/>')
    with pytest.raises(ScriptError, match="longer"):
        parse_script(tok, f'Hi <break time="{"9" * 400}s"/>')


@pytest.mark.parametrize("text", ["", "   \n", "[S1]", "[S1] [S2]", '<break time="1s"/>', ":::"])
def test_empty_script_raises(tok: TextTokenizer, text: str) -> None:
    with pytest.raises(ScriptError, match="empty text"):
        parse_script(tok, text)


def test_trailing_speaker_tag_is_dropped(tok: TextTokenizer) -> None:
    assert parse_script(tok, "Hello [S2]") == parse_script(tok, "Hello")


# ---------------------------------------------------------------------------- ScriptCursor


def test_cursor_buffers_split_words_and_tags(tok: TextTokenizer) -> None:
    chunks = ["Hel", "lo wor", "ld <bre", 'ak time="0.5s"/> ok']
    cursor = ScriptCursor(tok)
    got = [words(cursor.feed(c)) for c in chunks]
    assert got == [[], ["Hello"], ["world"], [""]]
    assert words(cursor.close()) == ["ok"]


def test_cursor_misuse_and_empty(tok: TextTokenizer) -> None:
    cursor = ScriptCursor(tok)
    cursor.feed("   ")
    with pytest.raises(ScriptError, match="empty text"):
        cursor.close()
    assert cursor.closed
    with pytest.raises(ScriptError):
        cursor.feed("more")
    with pytest.raises(ScriptError):
        cursor.close()


_FRAGMENTS = [
    "Hello",
    "there,",
    "it’s",
    "ok.",
    "10:30",
    " ",
    "  ",
    "\n",
    "\t",
    "\u00a0",
    "\u3000",
    '<break time="0.5s"/>',
    '<break time="1s">',
    '<break  time="0,2s" />',
    '<break time="0.04s"/>',
    "[S1]",
    "[S2]",
    "[S3]",
    "<",
    "<br",
    "<break",
    'time="1s"',
    "\x00",
    "\u200b",
    "e\u0301",
    "\u0301",
    "ｈｉ",
    "´",
]


def _outcome(run: Callable[[], list[Entry]]) -> list[Entry] | str:
    """The entries, or the ScriptError message: both paths must agree on either."""
    try:
        return run()
    except ScriptError as exc:
        return f"ScriptError: {exc}"


def _streamed(tok: TextTokenizer, chunks: list[str], open_with_s1: bool = True) -> list[Entry]:
    cursor = ScriptCursor(tok, open_with_s1)
    return [e for c in chunks for e in cursor.feed(c)] + cursor.close()


_PIECE = st.tuples(
    st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=4)),
    st.sampled_from(["", " ", " ", "  ", "\n"]),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(_PIECE, max_size=14),
    cuts=st.lists(st.integers(0, 200), max_size=8),
    open_with_s1=st.booleans(),
)
def test_cursor_equals_whole_parse_for_any_split(
    tok: TextTokenizer, pieces: list[tuple[str, str]], cuts: list[int], open_with_s1: bool
) -> None:
    text = "".join(f + sep for f, sep in pieces)
    points = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    whole = _outcome(lambda: parse_script(tok, text, open_with_s1))
    assert _outcome(lambda: _streamed(tok, chunks, open_with_s1)) == whole


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.sampled_from(["Hi", "there", " ", " ", '<break time="1s"/>', "[S2]", "<break"]), max_size=10)
)
def test_cursor_one_character_at_a_time(tok: TextTokenizer, parts: list[str]) -> None:
    text = "".join(parts) + " end"
    assert _outcome(lambda: _streamed(tok, list(text))) == _outcome(lambda: parse_script(tok, text))


# ---------------------------------------------------------------------------- prompt words


def test_prompt_entries_follow_the_prefix_plan(tok: TextTokenizer) -> None:
    s1_words = [WordTiming("Hello", 0.1, 0.4), WordTiming("there", 0.5, 0.9)]
    entries, steps = prompt_entries(tok, s1_words, speaker=1)
    hello, there = tok.encode_word("Hello", 1), tok.encode_word("there")
    assert [e.tokens for e in entries] == [tuple(hello), tuple(there)]
    # Hello: start max(1, round(1.25)=1) = 1, end 1 + 2 = 3, next max(4, round(6.25)=6) = 6 → padding 4.
    # there: start max(3 + 1, 6) = 6, end 6 + 3 = 9, next max(10, round(11.25)=11) = 11 → padding 4.
    assert len(hello) == 2 and len(there) == 3
    assert [e.padding for e in entries] == [4, 4]
    assert steps == [0 + 3, 5 + 3]  # start − 1, S1 shifted by 3

    s2_words = [WordTiming("Hi", 0.0, 0.2)]
    entries2, steps2 = prompt_entries(tok, s2_words, speaker=2, frame_offset=40)
    hi = tok.encode_word("Hi", 2)
    assert entries2[0].tokens == tuple(hi)
    # start max(1, 0) = 1; S2 gets the S1 frame count and no +3.
    assert steps2 == [0 + 40]
    assert entries2[0].padding == max(0, max(1 + len(hi) + 1, round(0.2 * 12.5)) - 1 - 1)


def test_prompt_entries_crowded_words_are_pushed_back(tok: TextTokenizer) -> None:
    ws = [WordTiming("a", 0.0, 0.0), WordTiming("b", 0.0, 0.0), WordTiming("c", 0.0, 0.0)]
    entries, steps = prompt_entries(tok, ws, speaker=1, step_shift=0)
    starts = [s + 1 for s in steps]
    ends = [s + len(e.tokens) for s, e in zip(starts, entries)]
    assert starts[0] == 1
    for i in range(1, 3):
        assert starts[i] == ends[i - 1] + 1
    assert all(e.padding == len(e.tokens) for e in entries)


def test_prompt_entries_empty_clip() -> None:
    assert prompt_entries(TextTokenizer(_NoTagsTokenizer()), [], speaker=1) == ([], [])


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (WordTiming("x", -0.1, 0.2), "negative"),
        (WordTiming("x", 0.5, 0.4), "after it ends"),
        (WordTiming("x", 0.1, 0.2), "before the previous"),
        (WordTiming("  ", 0.5, 0.6), "empty"),
        (WordTiming("x", float("nan"), 0.6), "finite"),
    ],
)
def test_prompt_entries_validate_timings(tok: TextTokenizer, bad: WordTiming, match: str) -> None:
    ws = [WordTiming("first", 0.2, 0.3), bad]
    with pytest.raises(PromptError, match=match) as err:
        prompt_entries(tok, ws, speaker=1)
    assert "prompt word 1" in str(err.value)
    assert repr(bad.word) in str(err.value)


def test_prompt_entries_reject_unknown_speaker(tok: TextTokenizer) -> None:
    with pytest.raises(ValueError):
        prompt_entries(tok, [WordTiming("x", 0, 1)], speaker=3)
