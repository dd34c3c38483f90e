"""Accuracy, exact match and BLEU of generated text against references (fractions; BLEU 0-100).

    llmkit eval eval/classification      # accuracy of the first generated line against the label
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _normalize(text: str) -> str:
    """Whitespace collapsed to single spaces."""
    return " ".join(str(text).split())


def exact_match_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where prediction and reference are equal after collapsing whitespace, else 0.0."""
    return [float(_normalize(p) == _normalize(r)) for p, r in zip(predictions, references, strict=True)]


def accuracy_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where the prediction's first line equals the label, ignoring case and surrounding whitespace."""
    out = []
    for p, r in zip(predictions, references, strict=True):
        first = str(p).strip().split("\n", 1)[0] if str(p).strip() else ""
        out.append(float(_normalize(first).casefold() == _normalize(r).casefold()))
    return out


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Classification accuracy (fraction): the first generated line equals the label, case-insensitively."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no examples to score")
    return math.fsum(accuracy_scores(predictions, references)) / len(predictions)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after collapsing whitespace."""
    if not predictions:
        raise ValueError("no examples to score")
    return math.fsum(exact_match_scores(predictions, references)) / len(predictions)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Corpus BLEU (0-100, sacrebleu's default 13a tokenizer) and sacrebleu's signature."""
    import sacrebleu

    metric = sacrebleu.metrics.BLEU()
    result = metric.corpus_score(list(predictions), [list(references)])
    return float(result.score), str(metric.get_signature())
