"""A built-in multiple-choice task made from text every Python ships: pick a docstring's real summary.

    python -c "from llmkit.metrics.choice_builtin import docsum_choice_examples as d; e = d()[0]; print(e.context[-120:], e.choices, e.label)"

Each builtin:docsum record (a standard-library docstring: its summary line and the rest) becomes one
question. Context: "{document}\\n\\nSummary:" with the document cut to 600 characters at a word
boundary (CPU scoring stays fast); choices: the record's summary and num_choices - 1 distractors,
other records' summaries from the same split, each scored as " {summary}" (the target delimiter).
Distractors and the right answer's position are drawn by random.Random(f"{seed}/{record id}"), so a
seed gives the same questions in every run on the same Python version (the stdlib is the corpus).
The records themselves are built by llmkit/data/builtin.py (`docsum_choice_split`); with the default
settings they are the source `builtin:docsum-choice/SPLIT` that `llmkit eval` reads.
"""

from __future__ import annotations

from llmkit.data.builtin import DOCSUM_CHOICE_DOCUMENT_CHARS, docsum_choice_split
from llmkit.metrics.choice import ChoiceExample, parse_choice_record

DOCUMENT_CHARS = DOCSUM_CHOICE_DOCUMENT_CHARS


def docsum_choice_examples(
    split: str = "test",
    num_choices: int = 4,
    seed: int = 0,
    *,
    limit: int | None = None,
    document_chars: int = DOCUMENT_CHARS,
) -> list[ChoiceExample]:
    """Multiple-choice questions from builtin:docsum: choose a stdlib docstring's summary line among num_choices."""
    # The records are built in llmkit/data/builtin.py (builtin:docsum-choice is the default settings).
    records = docsum_choice_split(split, num_choices, seed, document_chars)[:limit]
    return [parse_choice_record(r, f"builtin:docsum/{split}:{r['id']}") for r in records]
