"""Word error rate with a small English text normaliser, for tests, benches and the simulator.

Whisper writes "9", "nine" or "9:00" as it likes, and punctuates freely; comparing words
fairly needs both sides normalised the same way: lower case, numbers spelled out (0 to
999,999, decimals digit by digit), ordinals ("14th" → "fourteenth"), clock times ("3:30" →
"three thirty", "9:00" → "nine", "9:05" → "nine oh five"), amounts ("$25" → "twenty five
dollars"), "&" and "%" as words, every other punctuation mark gone, apostrophes kept inside
words ("don't"). The voice check (``callbridge voice check``) and the speech tests use this one
normaliser.
"""

from __future__ import annotations

import re

__all__ = ["normalise", "number_words", "ordinal_words", "wer", "word_errors"]

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> list[str]:
    """0 ≤ n < 1,000,000 as English words: 42 → ["forty", "two"]."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number out of range: {n}")
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        return [_TENS[n // 10]] + ([_ONES[n % 10]] if n % 10 else [])
    if n < 1000:
        return [_ONES[n // 100], "hundred"] + (number_words(n % 100) if n % 100 else [])
    return number_words(n // 1000) + ["thousand"] + (number_words(n % 1000) if n % 1000 else [])


def _spell(match: re.Match[str]) -> str:
    digits = match.group(0).replace(",", "")
    whole, _, frac = digits.partition(".")
    words = number_words(int(whole)) if len(whole) <= 6 else [_ONES[int(d)] for d in whole]
    if frac:
        words += ["point"] + [_ONES[int(d)] for d in frac]
    return " " + " ".join(words) + " "


_ORDINAL_ENDINGS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                    "nine": "ninth", "twelve": "twelfth"}


def ordinal_words(n: int) -> list[str]:
    """0 ≤ n < 1,000,000 as an English ordinal: 14 → ["fourteenth"], 21 → ["twenty", "first"]."""
    words = number_words(n)
    last = words[-1]
    if last in _ORDINAL_ENDINGS:
        words[-1] = _ORDINAL_ENDINGS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return words


def _spell_ordinal(match: re.Match[str]) -> str:
    return " " + " ".join(ordinal_words(int(match.group(1)))) + " "


def _spell_time(match: re.Match[str]) -> str:
    hours, minutes = int(match.group(1)), int(match.group(2))
    words = number_words(hours)
    if minutes:
        words += (["oh"] if minutes < 10 else []) + number_words(minutes)
    return " " + " ".join(words) + " "


def _spell_amount(match: re.Match[str]) -> str:
    whole, _, cents = match.group(1).replace(",", "").partition(".")
    words = number_words(int(whole)) + ["dollar" if int(whole) == 1 else "dollars"]
    if cents and int(cents):
        words += ["and"] + number_words(int(cents)) + ["cents"]
    return " " + " ".join(words) + " "


_ORDINAL = re.compile(r"\b(\d{1,6})(?:st|nd|rd|th)\b")
_TIME = re.compile(r"\b(\d{1,2}):(\d{2})\b")
_AMOUNT = re.compile(r"\$(\d{1,3}(?:,\d{3})+(?:\.\d{2})?|\d{1,6}(?:\.\d{2})?)")
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
_NOT_WORD = re.compile(r"[^\w' ]+")
_EDGE_APOSTROPHES = re.compile(r"(?<!\w)'|'(?!\w)")


def normalise(text: str) -> list[str]:
    """Words of ``text``, normalised for comparison."""
    text = text.lower().replace("&", " and ").replace("%", " percent ").replace("’", "'")
    text = _AMOUNT.sub(_spell_amount, text)
    text = _TIME.sub(_spell_time, text)
    text = _ORDINAL.sub(_spell_ordinal, text)
    text = _NUMBER.sub(_spell, text)
    text = _NOT_WORD.sub(" ", text.replace("-", " ").replace("_", " "))
    text = _EDGE_APOSTROPHES.sub(" ", text)
    return text.split()


def word_errors(reference: list[str], hypothesis: list[str]) -> int:
    """Substitutions + deletions + insertions turning ``reference`` into ``hypothesis`` (Levenshtein)."""
    prev = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        cur = [i] + [0] * len(hypothesis)
        for j, hyp_word in enumerate(hypothesis, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ref_word != hyp_word))
        prev = cur
    return prev[-1]


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate of ``hypothesis`` against ``reference`` after :func:`normalise` (0 = perfect)."""
    ref = normalise(reference)
    if not ref:
        raise ValueError("the reference has no words")
    return word_errors(ref, normalise(hypothesis)) / len(ref)
