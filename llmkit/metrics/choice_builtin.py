"""A built-in multiple-choice task made from text every Python ships: pick a docstring's real summary.

    python -c "from llmkit.metrics.choice_builtin import docsum_choice_examples as d; e = d()[0]; print(e.context[-120:], e.choices, e.label)"

Each builtin:docsum record (a standard-library docstring: its summary line and the rest) becomes one
question. Context: "{document}\\n\\nSummary:" with the document cut to 600 characters at a word
boundary (CPU scoring stays fast); choices: the record's summary and num_choices - 1 distractors,
other records' summaries from the same split, each scored as " {summary}" (the target delimiter).
Distractors and the right answer's position are drawn by random.Random(f"{seed}/{record id}"), so a
seed gives the same questions in every run on the same Python version (the stdlib is the corpus).
"""

from __future__ import annotations

import random

from llmkit.data.builtin import docsum_records
from llmkit.errors import DataError
from llmkit.metrics.choice import ChoiceExample

DOCSUM_TEMPLATE = "{document}\n\nSummary:"
DOCUMENT_CHARS = 600
SPLITS = ("train", "validation", "test")


def shorten(text: str, max_chars: int) -> str:
    """`text` cut to at most max_chars at the last whitespace before the limit (whole words only)."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]  # a space right after the limit still ends a whole word
    boundary = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
    return (cut[:boundary] if boundary > 0 else text[:max_chars]).rstrip()


def docsum_choice_examples(
    split: str = "test",
    num_choices: int = 4,
    seed: int = 0,
    *,
    limit: int | None = None,
    document_chars: int = DOCUMENT_CHARS,
) -> list[ChoiceExample]:
    """Multiple-choice questions from builtin:docsum: choose a stdlib docstring's summary line among num_choices."""
    if split not in SPLITS:
        raise DataError(f"builtin:docsum has splits {', '.join(SPLITS)}, not {split!r}")
    if num_choices < 2:
        raise DataError(f"num_choices ({num_choices}) must be at least 2")
    records = [r for s, r in docsum_records() if s == split]
    summaries = sorted(
        {r["summary"] for r in records}
    )  # distinct, in an order that does not depend on the walk
    if len(summaries) < num_choices:
        raise DataError(
            f"builtin:docsum/{split} has {len(summaries)} distinct summaries, fewer than num_choices ({num_choices})"
        )
    examples = []
    for record in records[:limit]:
        rng = random.Random(f"{seed}/{record['id']}")
        right = record["summary"]
        # num_choices draws always hold num_choices - 1 that differ from the right summary.
        distractors = [s for s in rng.sample(summaries, num_choices) if s != right][: num_choices - 1]
        label = rng.randrange(num_choices)
        examples.append(
            ChoiceExample(
                context=DOCSUM_TEMPLATE.format(document=shorten(record["document"], document_chars)),
                choices=distractors[:label] + [right] + distractors[label:],
                label=label,
                where=f"builtin:docsum/{split}:{record['id']}",
            )
        )
    return examples
