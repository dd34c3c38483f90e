"""Score a recipe's evaluation tasks on one model: shared by `llmkit eval` and the training loop's train.evals.

    python -c "from llmkit.evals.scoring import prepare_tasks; help(prepare_tasks)"

prepare_tasks builds and checks every evaluator (no weights); plan_tasks resolves one checkpoint's
settings; score_tasks runs them on a loaded model. Both callers go through these three functions, so
a checkpoint scored during training and by `llmkit eval` gets the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmkit import __version__
from llmkit.data.sources import describe
from llmkit.errors import RecipeError
from llmkit.evals.base import EvalContext, Evaluator, Plan, Progress, ProgressFactory, Scored, no_progress
from llmkit.evals.registry import build_evaluators
from llmkit.recipes import EvalTask


def task_label(task: EvalTask, index: int = 0) -> str:
    """A task's name: `name`, else its test sources (file stem, builtin name), else its metrics."""
    if task.name:
        return task.name
    if task.data.test:
        names = []
        for source in task.data.test:
            text = source if isinstance(source, str) else f"hub:{getattr(source, 'hub', source)}"
            stem = text.removeprefix("builtin:").removeprefix("hub:").rstrip("/").rsplit("/", 1)
            names.append(stem[0] if text.startswith("builtin:") else stem[-1].rsplit(".", 1)[0])
        return "+".join(names)
    return "+".join(task.metrics)


@dataclass
class TaskRun:
    """One evaluation task with its checked evaluators and, per checkpoint, their plans."""

    label: str
    task: EvalTask
    evaluators: list[Evaluator]
    plans: list[Plan] = field(default_factory=list)


def prepare_tasks(tasks: Sequence[EvalTask], context: EvalContext) -> list[TaskRun]:
    """Build and check every task's evaluators: records read and parsed, options checked; no weights loaded."""
    runs = []
    for i, task in enumerate(tasks):
        evaluators = build_evaluators(task, context)
        for evaluator in evaluators:
            evaluator.check()
        runs.append(TaskRun(task_label(task, i), task, evaluators))
    labels = [r.label for r in runs]
    twice = next((n for i, n in enumerate(labels) if n in labels[:i]), None)
    if twice is not None:
        raise RecipeError(f"two evaluation tasks are both named {twice!r}; give each a distinct name")
    return runs


def plan_tasks(runs: Sequence[TaskRun], path: str, config, where: str) -> list[list[Plan]]:
    """Every evaluator's plan for one checkpoint (RecipeError when a window or budget cannot fit)."""
    return [[e.plan(path, config, where) for e in run.evaluators] for run in runs]


def prompt_label(protocol: dict[str, Any] | None) -> str:
    """A prompt protocol in a few words for tables: 'chat, 5-shot as turns, system prompt'."""
    if not protocol:
        return "-"
    if "chat_template" not in protocol or "fewshot_as" not in protocol:
        return protocol.get("format", "-").split(":")[0]
    shots = protocol.get("num_fewshot") or 0
    parts = ["chat template" if protocol["chat_template"] else "plain text", f"{shots}-shot" + (f" as {protocol['fewshot_as']}" if shots else "")]
    if protocol.get("system_prompt"):
        parts.append("system prompt")
    return ", ".join(parts)


def score_task(
    run: TaskRun, plans: Sequence[Plan], model, tokenizer, progress: ProgressFactory = no_progress, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """One task's {metrics, timing, protocol, rows} on a loaded model."""
    metrics: dict[str, Any] = {}
    timing: dict[str, float] = {}
    rows: list[dict] = []
    task = run.task
    protocol: dict[str, Any] = {
        "llmkit_version": __version__,
        "data": describe(task.data.test) if task.data.test else "the run's validation records",
        "max_samples": task.data.max_samples,
        "dtype": run.evaluators[0].context.dtype,
    }
    prompts: dict[str, Any] = {}
    for evaluator, plan in zip(run.evaluators, plans, strict=True):
        scored: Scored = evaluator.score(model, tokenizer, plan, progress)
        metrics.update(scored.metrics)
        timing.update(scored.timing)
        rows = rows or scored.rows
        protocol.update(evaluator.protocol(plan, tokenizer))
        prompts[evaluator.protocol_key] = evaluator.prompt_protocol(plan)
        if log is not None:
            log(f"  {evaluator.summary(scored.metrics)}")
    protocol["prompt"] = next(iter(prompts.values())) if len(prompts) == 1 else prompts
    return {"metrics": metrics, "timing": timing, "protocol": protocol, "rows": rows}


def headline(run: TaskRun) -> tuple[str, float] | None:
    """(metric key, chance) of the task's accuracy-like number that a suite averages; None for perplexity or ROUGE alone."""
    for evaluator in run.evaluators:
        key = evaluator.headline
        if key is not None and (key != "accuracy" or "accuracy" in evaluator.names):
            return key, evaluator.chance()
    return None


def progress_bars(total: int, description: str, unit: str) -> Progress:
    """An enabled progress bar on stderr (main process only)."""
    return Progress(total, description, unit, enabled=True)
