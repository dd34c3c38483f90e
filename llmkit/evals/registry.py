"""The evaluator registry: metric name (as written in a recipe's `metrics`) -> evaluator class.

    python -c "from llmkit.evals.registry import EVALUATORS; print(sorted(EVALUATORS))"

Adding a metric: one module in llmkit/evals/ with an `Evaluator` subclass, one line here, and its
name in `MetricName` of llmkit/recipes.py (the recipe surface is declared there, and a test checks
that both list the same names).
"""

from __future__ import annotations

from llmkit.evals.base import EvalContext, Evaluator
from llmkit.evals.choice import MultipleChoiceEvaluator
from llmkit.evals.cloze import ClozeEvaluator
from llmkit.evals.generative import GenerativeEvaluator
from llmkit.evals.perplexity import PerplexityEvaluator
from llmkit.evals.preference import PreferenceEvaluator
from llmkit.evals.task_generation import TaskGenerationEvaluator
from llmkit.recipes import EvalTask

EVALUATORS: dict[str, type[Evaluator]] = {
    "perplexity": PerplexityEvaluator,
    "rouge": TaskGenerationEvaluator,
    "accuracy": TaskGenerationEvaluator,
    "exact_match": TaskGenerationEvaluator,
    "bleu": TaskGenerationEvaluator,
    "multiple_choice": MultipleChoiceEvaluator,
    "cloze": ClozeEvaluator,
    "generative": GenerativeEvaluator,
    "preference": PreferenceEvaluator,
}


def build_evaluators(task: EvalTask, context: EvalContext) -> list[Evaluator]:
    """One evaluator per class named by task.metrics (metrics of one class share it, e.g. one generation pass), in order."""
    grouped: dict[type[Evaluator], list[str]] = {}
    for name in task.metrics:
        grouped.setdefault(EVALUATORS[name], []).append(name)
    return [cls(task, names, context) for cls, names in grouped.items()]
