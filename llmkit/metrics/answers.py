"""Answers read out of generations and compared with references, with lm-evaluation-harness's filter semantics.

    python -c "from llmkit.metrics.answers import extract; print(extract('so 3 + 4 = 7.\\n#### 7', 'regex', regex=r'#### (\\-?[0-9\\.\\,]+)'))"

extract(..., "regex") is lm-eval's RegexFilter: re.findall, take match[group_select]; a match with
groups keeps its first non-empty group; strip; nothing found -> fallback ("[invalid]").
"last_number" is lm-eval gsm8k's flexible-extract: that regex with `(-?[$0-9.,]{2,})|(-?[0-9]+)` and
group_select -1. lm-eval's take_first keeps the first of several sampled responses; llmkit generates
one response per question, so it is the identity here. exact_match is lm-eval's
exact_match_hf_evaluate: each of regexes_to_ignore removed (re.sub) from prediction and reference,
then lowercased (ignore_case) and punctuation deleted (ignore_punctuation), then string equality.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

FLEXIBLE_NUMBER = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"  # lm-eval gsm8k flexible-extract
CHOICE_LETTER = r"\b([A-Z])\b"


def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = "[invalid]") -> str:
    """lm-eval's RegexFilter on one response."""
    found = re.findall(pattern, text)
    if not found:
        return fallback
    try:
        match = found[group_select]
    except IndexError:
        return fallback
    if isinstance(match, tuple):
        parts = [m for m in match if m]
        if not parts:
            return fallback
        match = parts[0]
    return match.strip()


def extract(text: str, how: str, *, regex: str | None = None, group_select: int = 0, fallback: str = "[invalid]") -> str:
    """The answer in a generation: regex, last_number, first_line, choice_letter or whole (see the module docstring)."""
    if how == "regex":
        return regex_extract(text, regex or "", group_select, fallback)
    if how == "last_number":
        return regex_extract(text, FLEXIBLE_NUMBER, -1, fallback)
    if how == "first_line":
        line = text.strip().split("\n", 1)[0].strip()
        return line if line else fallback
    if how == "choice_letter":
        return regex_extract(text, CHOICE_LETTER, 0, fallback)
    if how == "whole":
        return text.strip()
    raise ValueError(f"unknown extraction {how!r}")


def normalize(text: str, regexes_to_ignore: Sequence[str] = (), ignore_case: bool = False, ignore_punctuation: bool = False) -> str:
    """The string exact_match compares: patterns removed in order, then case and punctuation dropped as asked."""
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def exact_match(prediction: str, reference: str, regexes_to_ignore: Sequence[str] = (), ignore_case: bool = False, ignore_punctuation: bool = False) -> float:
    """1.0 when the normalised prediction equals the normalised reference (lm-eval exact_match), else 0.0."""
    options = dict(regexes_to_ignore=regexes_to_ignore, ignore_case=ignore_case, ignore_punctuation=ignore_punctuation)
    return float(normalize(prediction, **options) == normalize(reference, **options))


def parse_number(text: str) -> float | None:
    """The number a string writes ('1,234', '$5', '-3.50', '7.'), or None."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def numeric_match(prediction: str, reference: str, regexes_to_ignore: Sequence[str] = ()) -> float:
    """1.0 when both (after regexes_to_ignore) read as the same number, within 1e-9 relative, else 0.0."""
    got = parse_number(normalize(prediction, regexes_to_ignore))
    want = parse_number(normalize(reference, regexes_to_ignore))
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12))
