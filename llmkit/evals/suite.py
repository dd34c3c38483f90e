"""A benchmark suite's score: the macro average of its tasks' accuracies, and the same centered on chance.

    llmkit eval eval/suite-tiny

centered = (accuracy - chance) / (1 - chance) per task, as nanochat's CORE metric centers each task
(0 = guessing, 1 = perfect), so a 4-way multiple-choice task at 0.25 and a generative task at 0.0
count alike. Tasks without an accuracy (perplexity, ROUGE) are shown but not averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmkit.evals.scoring import TaskRun, headline


def suite_score(runs: Sequence[TaskRun], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{suite_score, suite_centered, and per task its accuracy, chance and centered value} from each task's metrics."""
    parts: dict[str, dict[str, float]] = {}
    for run in runs:
        found = headline(run)
        if found is None:
            continue
        key, chance = found
        value = results[run.label]["metrics"].get(key)
        if not isinstance(value, (int, float)):
            continue
        parts[run.label] = {"metric": key, "value": float(value), "chance": chance, "centered": (value - chance) / (1 - chance)}
    out: dict[str, Any] = {}
    if parts:
        out["suite_score"] = sum(p["value"] for p in parts.values()) / len(parts)
        out["suite_centered"] = sum(p["centered"] for p in parts.values()) / len(parts)
    out["suite_tasks"] = parts
    return out


SUITE_PROTOCOL = {
    "suite_score": "macro average over the tasks with an accuracy: each task's headline metric counts once",
    "suite_centered": "macro average of (accuracy - chance) / (1 - chance) (nanochat CORE's centering); chance = "
    "mean 1/choices for multiple choice, 0 for cloze and generative, or the task's `chance`",
}
