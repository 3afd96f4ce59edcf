"""Text front end: normalisation, the tokenizer wrapper, script parsing (whole or streamed), prompt words.

A script is words separated by whitespace, with two kinds of markup:

- ``[S1]`` / ``[S2]`` as a word of its own: the next word is spoken by that speaker and is
  encoded as ``"[S1] word"`` (tag id, then the word's space-prefixed pieces).
- ``<break time="0.5s"/>``: a pause of round(0.5 × 12.5) frames (slash optional, the decimal
  separator may be ``.`` or ``,``). It may touch a word (``word<break time="1s"/>``).

Decisions where upstream is silent or lax (documented so that callers can rely on them):

- Text is NFKC-normalised and control/format characters are dropped before parsing
  (:func:`normalize_text`), so full-width ``［Ｓ１］`` is ``[S1]`` and ``１``s are digits.
- Any other speaker-looking tag (``[S3]``, ``[s1]``, or a tag glued to a word such as
  ``[S1]Hello``) raises :class:`ScriptError` naming it, instead of being read aloud.
- A word containing ``<break`` that is not a valid break tag raises :class:`ScriptError`
  (upstream would read the markup aloud, or crash on ``float()``).
- A break longer than 120 s (the model's whole context) raises :class:`ScriptError`.
- A script with no word (only tags or pauses) raises ``ScriptError("empty text ...")``.
- A trailing speaker tag with no word after it is dropped, as upstream does.
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .config import DataConfig
from .errors import CheckpointError, PromptError, ScriptError
from .state_machine import Entry, TokenIds

logger = logging.getLogger(__name__)

FRAME_RATE_HZ = 12.5
# The decoder's context is 1500 frames (120 s); a longer pause can never be generated.
_MAX_BREAK_S = 120.0
# S1 prompt words are consumed 3 steps after their measured start (upstream's "legacy offset").
S1_STEP_SHIFT = 3

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)

# ---------------------------------------------------------------------------- normalisation

# Cc (controls other than whitespace), Cf (zero-width and format marks), Cs (lone surrogates,
# which no tokenizer can encode).
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})
_WS_RUN = re.compile(r"\s+")


def _drop_controls(text: str) -> str:
    return "".join(ch for ch in text if ch.isspace() or unicodedata.category(ch) not in _DROPPED_CATEGORIES)


def _normalize_piece(text: str) -> str:
    """:func:`normalize_text` without the final strip.

    Cut at a whitespace character, it commutes with concatenation up to whitespace runs:
    every whitespace character is an NFKC starter that never composes and maps to
    whitespace, which lets :class:`ScriptCursor` normalise chunk by chunk.
    """
    text = unicodedata.normalize("NFKC", _drop_controls(text))
    text = text.replace("\u2019", "'").replace(":", " ")
    return _WS_RUN.sub(" ", text)


def normalize_text(text: str) -> str:
    """Clean text for the tokenizer: NFKC; control, format and surrogate characters removed;
    ``’`` → ``'``; every ``:`` → space; whitespace runs → one space; ends stripped.

    Never raises on a ``str``, and is idempotent.
    """
    return _normalize_piece(text).strip()


# ---------------------------------------------------------------------------- tokenizer


class _HFTokenizer(Protocol):
    """The part of a transformers tokenizer we use (a fake with these members works in tests)."""

    bos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def convert_tokens_to_ids(self, tokens: str) -> Any: ...

    def get_vocab(self) -> dict[str, int]: ...

    def __len__(self) -> int: ...


class TextTokenizer:
    """Dia2's view of the checkpoint's byte-level BPE tokenizer.

    ``new_word_id`` (config ``data.text_new_word_token_id``) stands in for a missing
    ``[S1]``/``[S2]``, as upstream does; a tokenizer that went through ``save_pretrained``
    loses those added tokens, so the fallback is logged.
    """

    def __init__(
        self, tokenizer: _HFTokenizer, *, new_word_id: int = 2, source: str = "<tokenizer object>"
    ) -> None:
        self.tokenizer = tokenizer
        self.source = source
        vocab = tokenizer.get_vocab()
        self._speaker_ids: dict[int, int] = {}
        missing = []
        for n in (1, 2):
            tag = f"[S{n}]"
            if tag in vocab:
                self._speaker_ids[n] = int(tokenizer.convert_tokens_to_ids(tag))
            else:
                self._speaker_ids[n] = new_word_id
                missing.append(tag)
        self.has_speaker_tokens = not missing
        if missing:
            logger.warning(
                "tokenizer %s has no %s token: using new_word id %d instead (copy the published tokenizer files; "
                "save_pretrained drops them)",
                source,
                "/".join(missing),
                new_word_id,
            )
        bos = tokenizer.bos_token_id
        # The released tokenizer's BOS is id 0; the model was trained with 1 there.
        self._bos_id = int(bos) if bos else 1
        self._vocab_size = len(tokenizer)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, *, new_word_id: int = 2) -> TextTokenizer:
        """Load with ``AutoTokenizer`` from a folder (or a hub id, honouring HF_HUB_OFFLINE).

        Raises :class:`CheckpointError` naming the folder and the files when the tokenizer is
        missing or unusable. ``trust_remote_code`` is never enabled.
        """
        source = str(path_or_repo)
        folder = Path(path_or_repo)
        expected = ", ".join(_TOKENIZER_FILES)
        if folder.is_dir():
            present = sorted(p.name for p in folder.iterdir() if p.name in _TOKENIZER_FILES)
            if "tokenizer.json" not in present and not {"vocab.json", "merges.txt"} <= set(present):
                raise CheckpointError(
                    f"no tokenizer in {folder}: expected tokenizer.json (or vocab.json + merges.txt) among "
                    f"{expected}; found {present or 'none of them'}"
                )
        elif folder.exists() or folder.is_absolute() or source.startswith("."):
            raise CheckpointError(f"tokenizer folder not found: {folder} (expected files: {expected})")

        from transformers import AutoTokenizer  # heavy import, only when loading

        try:
            tok = AutoTokenizer.from_pretrained(source)
        # The `tokenizers` backend raises a bare Exception on a corrupt file; this is the boundary.
        except Exception as exc:
            raise CheckpointError(
                f"cannot load the tokenizer from {source} (files {expected}): {type(exc).__name__}: {exc}"
            ) from exc
        if len(tok) < 256:
            # A byte-level BPE has at least the 256 byte symbols; fewer means a broken model file.
            raise CheckpointError(
                f"tokenizer in {source} has only {len(tok)} entries: tokenizer.json or vocab.json/merges.txt is corrupt"
            )
        return cls(tok, new_word_id=new_word_id, source=source)

    @property
    def speaker1_id(self) -> int:
        return self._speaker_ids[1]

    @property
    def speaker2_id(self) -> int:
        return self._speaker_ids[2]

    def speaker_id(self, speaker: int) -> int:
        _check_speaker(speaker)
        return self._speaker_ids[speaker]

    @property
    def bos_id(self) -> int:
        """The text BOS fed at step 0: the tokenizer's if non-zero, else 1."""
        return self._bos_id

    @property
    def vocab_size(self) -> int:
        """Entries including added tokens (``len(tokenizer)``)."""
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        """Plain encoding, no special tokens added."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_word(self, word: str, speaker: int | None = None) -> list[int]:
        """Token ids of one word; with ``speaker`` (1 or 2) it is encoded as ``"[S1] word"``.

        The tag makes the word's first piece the space-prefixed one, as in training.
        """
        if speaker is None:
            return self.encode(word)
        _check_speaker(speaker)
        return self.encode(f"[S{speaker}] {word}")

    def token_ids(self, data: DataConfig) -> TokenIds:
        """The state machine's ids for a checkpoint: text ids from its config, the rest from here."""
        return TokenIds(
            new_word=data.text_new_word_token_id,
            pad=data.text_pad_token_id,
            zero=data.text_zero_token_id,
            bos=self.bos_id,
            speaker1=self.speaker1_id,
            speaker2=self.speaker2_id,
        )


def _check_speaker(speaker: int) -> None:
    if speaker not in (1, 2):
        raise ValueError(f"speaker must be 1 or 2, got {speaker!r}")


# ---------------------------------------------------------------------------- script parsing

# One event of the scan: a break tag (group 1 = seconds) or a whitespace run.
_EVENT_RE = re.compile(r'<break\s+time="([0-9]+(?:[.,][0-9]*)?)s"\s*/?>|\s+')
# What a break tag can look like when the text seen so far ends in whitespace and the tag is not
# finished: only these prefixes contain whitespace, so only they can straddle a cut.
_OPEN_TAG_RE = re.compile(r'<break\s+(?:time="[0-9]+(?:[.,][0-9]*)?s"\s*)?')
_SPEAKER_TAG_RE = re.compile(r"\[[sS][0-9]+\]")
_SPEAKER_WORDS = {"[S1]": 1, "[S2]": 2}


class _Parser:
    """Turns normalised text into entries, carrying what spans segments (speaker, first word)."""

    def __init__(self, tokenizer: TextTokenizer, *, open_with_s1: bool, frame_rate: float) -> None:
        self.tokenizer = tokenizer
        self.open_with_s1 = open_with_s1
        self.frame_rate = frame_rate
        self.pending_speaker: int | None = None
        self.seen_word = False

    def scan(self, text: str) -> list[Entry]:
        """Entries of a complete normalised segment (it must end at a word or tag boundary)."""
        out: list[Entry] = []
        pos = 0
        for match in _EVENT_RE.finditer(text):
            self._word(text[pos : match.start()], out)
            if match.group(1) is not None:
                self._pause(match.group(0), match.group(1), out)
            pos = match.end()
        self._word(text[pos:], out)
        return out

    def finish(self) -> None:
        if not self.seen_word:
            raise ScriptError("empty text: the script has no word to speak (only whitespace, tags or pauses)")

    def _pause(self, tag: str, seconds_text: str, out: list[Entry]) -> None:
        seconds = float(seconds_text.replace(",", "."))
        if not math.isfinite(seconds) or seconds > _MAX_BREAK_S:
            raise ScriptError(f"break {tag!r} is longer than the model's {_MAX_BREAK_S:g} s context")
        frames = round(seconds * self.frame_rate)  # Python round: half to even, as upstream
        if frames > 0:
            out.append(Entry(tokens=(), text="", padding=frames))

    def _word(self, word: str, out: list[Entry]) -> None:
        if not word:
            return
        if word in _SPEAKER_WORDS:
            self.pending_speaker = _SPEAKER_WORDS[word]
            return
        tag = _SPEAKER_TAG_RE.search(word)
        if tag is not None:
            raise ScriptError(
                f"unknown speaker tag {tag.group(0)!r} in {word!r}: use [S1] or [S2], as a separate word"
            )
        if "<break" in word.lower():
            raise ScriptError(f'malformed break tag in {word!r}: write <break time="0.5s"/>')
        speaker, self.pending_speaker = self.pending_speaker, None
        if self.seen_word:
            tokens = self.tokenizer.encode_word(word, speaker)
        elif self.open_with_s1:
            tokens = self.tokenizer.encode_word(word, speaker)
            s1 = self.tokenizer.speaker1_id
            # An untagged script opens as speaker 1; one opening with [S2] gets [S1], [S2], ...
            if not tokens or tokens[0] != s1:
                tokens.insert(0, s1)
        else:
            # The turn continues speaker 1's voice: no second opening tag, even an explicit one.
            tokens = self.tokenizer.encode_word(word, None if speaker == 1 else speaker)
        self.seen_word = True
        out.append(Entry(tokens=tuple(tokens), text=word, padding=len(tokens)))


def parse_script(
    tokenizer: TextTokenizer,
    text: str | Sequence[str],
    open_with_s1: bool = True,
    *,
    frame_rate: float = FRAME_RATE_HZ,
) -> list[Entry]:
    """Entries of a whole script (a list of lines is joined with newlines).

    Each word's padding is its token count; a break of X s is a token-less entry of
    round(X × ``frame_rate``) frames (none if that is 0). ``open_with_s1=True``: the first
    word starts with an ``[S1]`` id (inserted if absent). ``open_with_s1=False`` (a turn that
    continues speaker 1, e.g. after an S1-only voice prefix): nothing is inserted and an
    explicit leading ``[S1]`` is dropped, the first word being encoded bare.
    Raises :class:`ScriptError` (empty script, bad tag).
    """
    if not isinstance(text, str):
        text = "\n".join(text)
    parser = _Parser(tokenizer, open_with_s1=open_with_s1, frame_rate=frame_rate)
    entries = parser.scan(normalize_text(text))
    parser.finish()
    return entries


class ScriptCursor:
    """Incremental :func:`parse_script` for text that arrives in arbitrary chunks (an LLM stream).

    A word, or a break tag, split across chunks is held back until whitespace follows it (or
    :meth:`close`). Whatever the split points, the entries of all :meth:`feed` calls plus
    :meth:`close` equal ``parse_script(tokenizer, "".join(chunks))``, errors included. After a
    :class:`ScriptError` the cursor is unusable.
    """

    def __init__(
        self, tokenizer: TextTokenizer, open_with_s1: bool = True, *, frame_rate: float = FRAME_RATE_HZ
    ) -> None:
        self._parser = _Parser(tokenizer, open_with_s1=open_with_s1, frame_rate=frame_rate)
        self._raw = ""  # not yet normalised: no whitespace seen after it
        self._norm = ""  # normalised, ends in whitespace, held back only for an unfinished tag
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def feed(self, chunk: str) -> list[Entry]:
        """Add text; return the entries that no later text can change."""
        if self._closed:
            raise ScriptError("ScriptCursor.feed after close")
        self._raw += chunk
        cut = _last_space_end(self._raw)
        if cut == 0:
            return []
        self._norm += _normalize_piece(self._raw[:cut])
        self._raw = self._raw[cut:]
        hold = _open_tag_start(self._norm)
        ready, self._norm = self._norm[:hold], self._norm[hold:]
        return self._parser.scan(ready)

    def close(self) -> list[Entry]:
        """Flush the held-back text; raises :class:`ScriptError` if the script had no word."""
        if self._closed:
            raise ScriptError("ScriptCursor.close called twice")
        self._closed = True
        rest = self._norm + _normalize_piece(self._raw)
        self._norm = self._raw = ""
        entries = self._parser.scan(rest)
        self._parser.finish()
        return entries


def _last_space_end(text: str) -> int:
    """Index just past the last whitespace character (0 if none)."""
    for i in range(len(text) - 1, -1, -1):
        if text[i].isspace():
            return i + 1
    return 0


def _open_tag_start(text: str) -> int:
    """Where to hold ``text`` (normalised, ending in whitespace) back: len(text) if nothing is open.

    An unfinished break tag has exactly one ``<``, so only the last one can open it; the hold
    starts where the word run holding it starts (``word<break ...`` stays one unit, since it
    becomes a word if the tag never completes).
    """
    lt = text.rfind("<")
    if lt < 0 or _OPEN_TAG_RE.fullmatch(text, lt) is None:
        return len(text)
    start = 0
    for match in _EVENT_RE.finditer(text, 0, lt):
        start = match.end()
    return start


# ---------------------------------------------------------------------------- voice prompt words


@dataclass(frozen=True)
class WordTiming:
    """One word of a voice prompt clip with its timing in seconds from the clip start."""

    word: str
    start_s: float
    end_s: float


def prompt_entries(
    tokenizer: TextTokenizer,
    words: Sequence[WordTiming],
    speaker: int,
    frame_rate: float = FRAME_RATE_HZ,
    frame_offset: int = 0,
    step_shift: int | None = None,
) -> tuple[list[Entry], list[int]]:
    """Entries and forced new-word steps of one prompt clip (the prefix plan of one speaker).

    Positions are frames of this clip: a word starts at max(pos + 1, round(start_s × rate)),
    lasts one frame per token, and its padding reaches the next word's start (or its own end
    for the last word). Its new-word step is start − 1 + ``frame_offset`` + ``step_shift``.
    Compose speakers as upstream: S1 with offset 0 and shift 3 (the default shift for
    speaker 1), then S2 with offset = S1's frame count and shift 0 (its default).
    The clip's first word carries the speaker tag (if the tokenizer has it).
    Raises :class:`PromptError` naming the index and word of a bad timing.
    """
    _check_speaker(speaker)
    if step_shift is None:
        step_shift = S1_STEP_SHIFT if speaker == 1 else 0
    texts = _validated_words(words)

    def frame(seconds: float) -> int:
        return int(round(seconds * frame_rate))

    entries: list[Entry] = []
    steps: list[int] = []
    pos = 0
    for i, (text, timing) in enumerate(zip(texts, words)):
        tag = speaker if i == 0 and tokenizer.has_speaker_tokens else None
        tokens = tokenizer.encode_word(text, tag)
        start = max(pos + 1, frame(timing.start_s))
        end = start + len(tokens)
        following = frame(words[i + 1].start_s) if i + 1 < len(words) else frame(timing.end_s)
        next_start = max(end + 1, following)
        entries.append(Entry(tokens=tuple(tokens), text=text, padding=max(0, next_start - start - 1)))
        steps.append(start - 1 + frame_offset + step_shift)
        pos = end
    return entries, steps


def _validated_words(words: Iterable[WordTiming]) -> list[str]:
    texts: list[str] = []
    previous_start = 0.0
    for i, w in enumerate(words):
        text = w.word.strip()
        where = f"prompt word {i} ({w.word!r})"
        if not text:
            raise PromptError(f"{where}: empty word")
        if not (math.isfinite(w.start_s) and math.isfinite(w.end_s)):
            raise PromptError(f"{where}: timing must be finite, got {w.start_s}..{w.end_s} s")
        if w.start_s < 0 or w.end_s < 0:
            raise PromptError(f"{where}: negative time {w.start_s}..{w.end_s} s")
        if w.start_s > w.end_s:
            raise PromptError(f"{where}: starts after it ends ({w.start_s} > {w.end_s} s)")
        if w.start_s < previous_start:
            raise PromptError(
                f"{where}: starts at {w.start_s} s, before the previous word ({previous_start} s)"
            )
        previous_start = w.start_s
        texts.append(text)
    return texts
