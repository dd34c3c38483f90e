"""train.evals: the evaluators of `llmkit eval`, scored on the model being trained at every eval.

    llmkit pretrain pretrain/tiny --set 'train.evals=[{name: choice, metrics: [multiple_choice], data: {test: builtin:docsum-choice/validation, max_samples: 50}}]'

Records are read and checked when the hook is built (before the model), plans are made from the
model's config before the first step, and each eval event gets every task's numeric metrics,
prefixed with the task's name (choice_acc, choice_acc_norm) or bare when it has none (rougeL).
The scoring is llmkit/evals/scoring.py's, the same calls `llmkit eval` makes, so the numbers of a
saved checkpoint equal those `llmkit eval` gives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmkit.errors import RecipeError
from llmkit.evals.base import EvalContext
from llmkit.evals.scoring import plan_tasks, prepare_tasks, score_task
from llmkit.recipes import EvalTask, TaskSpec

NOT_LOGGED = {"n", "examples", "truncated", "tokens", "bytes", "documents", "target_tokens"}  # counts, not scores


class TrainingEvals:
    """An `extra_eval(model, step)` for the training loop that scores train.evals' tasks."""

    def __init__(
        self, specs: Sequence[EvalTask], tokenizer, *, run_task: TaskSpec | None = None, validation: Sequence[tuple[str, dict]] | None = None
    ):
        unnamed = [i for i, s in enumerate(specs) if not s.name]
        if len(specs) > 1 and unnamed:
            raise RecipeError(f"train.evals.{unnamed[0]}.name: with several evals each needs a name (it prefixes its logged metrics)")
        self.tokenizer = tokenizer
        self.runs = prepare_tasks(specs, EvalContext(stage="train", run_task=run_task, validation=validation))
        self.plans: list | None = None

    def plan(self, config) -> None:
        """Resolve windows and prompt budgets from the model's config (RecipeError before training when they cannot fit)."""
        self.plans = plan_tasks(self.runs, "the model being trained", config, "train.evals")

    def __call__(self, model, step: int) -> dict[str, float]:
        """Every task's numeric metrics, keyed NAME_METRIC (or METRIC for an unnamed task)."""
        if self.plans is None:
            self.plan(model.config)
        out: dict[str, Any] = {}
        for run, plans in zip(self.runs, self.plans, strict=True):
            prefix = f"{run.task.name}_" if run.task.name else ""
            metrics = score_task(run, plans, model, self.tokenizer)["metrics"]
            for key, value in metrics.items():
                if isinstance(value, float) and key not in NOT_LOGGED:
                    out[prefix + key] = value
        return out


def training_evals(specs: Sequence[EvalTask], tokenizer, **context) -> TrainingEvals | None:
    """The hook for train.evals, its records checked now; None when the list is empty."""
    return TrainingEvals(specs, tokenizer, **context) if specs else None
