"""The sentences a voice check speaks: a fixed telephone-like set, or the user's file.

The default set covers what a phone line says and a voice gets wrong: a greeting and a
question (rising end), digits read one by one, a date and a clock time, an amount, names,
and one long sentence that the TTS speaks in parts (each restarted from the snapshot, where a
prompt leak or a voice drift shows first).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_SENTENCES", "SentenceError", "choose_sentences", "read_sentences"]

DEFAULT_SENTENCES: tuple[str, ...] = (
    "Thank you for calling. How can I help you today?",
    "Your order number is 4 7 2 9, and it ships on Friday.",
    "Your appointment is on March 14th at 3:30 in the afternoon.",
    "I have you down as Maria Gonzalez, at 22 Baker Street.",
    "The balance on your account is $45.20.",
    "Would you like me to send a confirmation to your phone?",
    "Before we finish, let me read back what we agreed today: the replacement part ships on Monday, "
    "a driver will call you an hour before he arrives, and if nobody is at home he will leave a card "
    "with a number you can call to choose another day that suits you better.",
)

MAX_SENTENCE_CHARS = 600  # a turn, not a speech


class SentenceError(ValueError):
    """The sentences file cannot be used; the message names the file and the line."""


def read_sentences(path: Path) -> tuple[str, ...]:
    """One sentence per line; blank lines and lines starting with ``#`` are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SentenceError(f"--sentences {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SentenceError(f"--sentences {path}: cannot read it as UTF-8 text ({exc})") from None
    out: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not any(c.isalnum() for c in line):
            raise SentenceError(f"--sentences {path}:{number}: no words in {line!r}")
        if len(line) > MAX_SENTENCE_CHARS:
            raise SentenceError(f"--sentences {path}:{number}: {len(line)} characters; keep a sentence under "
                                f"{MAX_SENTENCE_CHARS} (one turn each)")
        out.append(line)
    if not out:
        raise SentenceError(f"--sentences {path}: no sentences (one per line; # starts a comment)")
    return tuple(out)


def choose_sentences(sentences: tuple[str, ...], turns: int | None) -> tuple[str, ...]:
    """``turns`` sentences: the first ones, or the set repeated round when more turns are asked for."""
    if turns is None:
        return sentences
    if turns < 1:
        raise SentenceError(f"--turns {turns}: give at least 1")
    return tuple(sentences[i % len(sentences)] for i in range(turns))
