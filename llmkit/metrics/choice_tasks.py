"""Multiple-choice and cloze tasks read from data sources, scored on this process's share, reduced.

    python -c "from llmkit.metrics.choice_tasks import load_choice_examples as l; print(len(l(['builtin:docsum-choice/test'])))"

Used by the multiple-choice and cloze evaluators (llmkit/evals/choice.py, cloze.py) of `llmkit eval`
and train.evals. Reading and parsing happen here, before any
model is loaded, so a bad record is a DataError (exit 2) naming the record and the fields it has.
Scoring and metrics are llmkit/metrics/choice.py's.

Several processes: each scores examples i with i % world == rank and the scores are gathered in
rank order, so every process ends with the same metrics. Shares are padded to the same number of
examples (the padding is scored and dropped), so a sharded model (FSDP) makes the same number of
forward passes on every process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmkit import dist
from llmkit.data.sources import iter_located_records
from llmkit.errors import DataError
from llmkit.metrics.choice import (
    ChoiceExample,
    ChoiceScores,
    cloze_metrics,
    cloze_split,
    parse_choice_record,
    score_choices,
    score_cloze,
)


def load_choice_examples(
    sources: Sequence,
    *,
    layout: str = "auto",
    fields: dict[str, str] | None = None,
    max_samples: int | None = None,
    encoding_errors: str = "strict",
) -> list[ChoiceExample]:
    """Every record of `sources` parsed as a multiple-choice question (DataError naming the first bad one)."""
    located = iter_located_records(list(sources), max_samples=max_samples, encoding_errors=encoding_errors)
    return [parse_choice_record(record, where, fields or None, layout) for where, record in located]


def load_cloze_texts(
    sources: Sequence, text_field: str = "text", *, max_samples: int | None = None, encoding_errors: str = "strict"
) -> list[tuple[str, str]]:
    """(where, text) of every record, each checked to split into a context and a last word (LAMBADA's rule)."""
    out = []
    for where, record in iter_located_records(list(sources), max_samples=max_samples, encoding_errors=encoding_errors):
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            fields = ", ".join(str(k) for k in record) if isinstance(record, dict) else "none"
            raise DataError(f"{where}: no string field {text_field!r} (record fields: {fields}); set data.text_field")
        cloze_split(text, where)
        out.append((where, text))
    return out


def _share(count: int) -> tuple[list[int], int]:
    """This process's indices (i % world == rank) and how many padding slots even out the shares."""
    world, rank = dist.world()
    mine = list(range(rank, count, world))
    longest = -(-count // world)
    return mine, longest - len(mine)


def score_choices_shared(model, tokenizer, examples: Sequence[ChoiceExample], **kwargs: Any) -> list[ChoiceScores]:
    """score_choices over all processes: each scores its share, every process gets all scores in order."""
    mine, pad = _share(len(examples))
    batch = [examples[i] for i in mine] + [examples[-1]] * pad if examples else []
    scores = score_choices(model, tokenizer, batch, **kwargs)[: len(mine)]
    gathered = dist.gather_lists(
        [(i, s.logprobs, s.is_greedy, s.continuation_tokens, s.truncated_tokens) for i, s in zip(mine, scores, strict=True)]
    )
    return [ChoiceScores(list(lp), list(g), list(t), cut) for _, lp, g, t, cut in sorted(gathered, key=lambda r: r[0])]


def score_cloze_shared(model, tokenizer, texts: Sequence[str], **kwargs: Any) -> dict[str, Any]:
    """score_cloze over all processes, reduced: the metrics of all texts and their per-text rows ("examples"), in order."""
    mine, pad = _share(len(texts))
    batch = [texts[i] for i in mine] + [texts[-1]] * pad if texts else []
    rows = score_cloze(model, tokenizer, batch, **kwargs)["examples"][: len(mine)]
    gathered = dist.gather_lists([(i, row) for i, row in zip(mine, rows, strict=True)])
    ordered = [row for _, row in sorted(gathered, key=lambda r: r[0])]
    return {**cloze_metrics(ordered), "examples": ordered}
