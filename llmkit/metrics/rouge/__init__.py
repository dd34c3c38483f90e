"""ROUGE for llmkit: pure scoring functions, plus an `evaluate` module (rouge.py) loadable offline.

    python -c "import evaluate, llmkit.metrics.rouge as r; print(evaluate.load(r.MODULE_PATH).compute(predictions=['a b'], references=['a b']))"

`rouge_scores(predictions, references)` is the fast path used by llmkit itself; importing this
package does not import `evaluate` or `datasets`.
"""

from pathlib import Path

from llmkit.metrics.rouge.scoring import (
    ROUGE_TYPES,
    RougeScorer,
    aggregate,
    bootstrap_interval,
    lcs_length,
    needs_unicode_tokenizer,
    per_example_scores,
    rouge_scores,
    tokenize,
)

MODULE_PATH = str(Path(__file__).resolve().parent)
"""Directory to pass to `evaluate.load` (it finds rouge.py inside)."""

__all__ = [
    "MODULE_PATH",
    "ROUGE_TYPES",
    "RougeScorer",
    "aggregate",
    "bootstrap_interval",
    "lcs_length",
    "needs_unicode_tokenizer",
    "per_example_scores",
    "rouge_scores",
    "tokenize",
]
