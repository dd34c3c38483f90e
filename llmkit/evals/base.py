"""The evaluator interface: check data without weights, plan per checkpoint, score, state the protocol once.

    python -c "from llmkit.evals.registry import EVALUATORS; print(sorted(EVALUATORS))"

An evaluator serves one or several metric names of a recipe (`metrics: [rouge, accuracy]` share one
generation pass). `llmkit eval` (llmkit/stages/evaluate.py) and the training loop's `train.evals`
(llmkit/evals/training.py) drive the same objects in the same order, so a checkpoint gets the same
numbers from both:

    evaluator = EVALUATORS[name](task, metrics, context)
    evaluator.check()                      # read and parse every record; DataError / RecipeError, no weights
    plan = evaluator.plan(config, where)   # per checkpoint: windows, prompt budget, limits
    scored = evaluator.score(model, tokenizer, plan, progress)
    evaluator.protocol(plan, tokenizer)    # what the numbers mean, next to them in metrics.json
"""

from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llmkit import dist
from llmkit.data.sources import iter_located_records, source_names
from llmkit.errors import DataError, RecipeError
from llmkit.models import max_positions
from llmkit.recipes import EvalTask, TaskSpec


@dataclass
class EvalContext:
    """What an evaluator may need beyond its task: the model's dtype, the training run's task and validation records."""

    dtype: str = "float32"
    stage: str = "eval"  # "eval" (`llmkit eval`) or "train" (train.evals)
    run_task: TaskSpec | None = None  # train.evals in fine-tuning: the run's task
    validation: Sequence[tuple[str, dict]] | None = None  # train.evals in fine-tuning: the held-out records
    resolve_task: Callable[[str, str], tuple[TaskSpec, str]] | None = None  # llmkit eval: the task a checkpoint was trained on


@dataclass
class Plan:
    """One checkpoint's resolved settings for one evaluator (windows, prompt budget, task)."""

    path: str
    where: str
    positions: int | None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scored:
    """An evaluator's numbers for one checkpoint: headline metrics, per-example rows, throughput."""

    metrics: dict[str, Any]
    rows: list[dict] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


class Progress:
    """Progress of a long scoring pass on stderr (main process only): a bar on a terminal, else a line every 30 s.

    `update(n)` after each chunk of work; a disabled one does nothing.
    """

    LINE_EVERY_SECONDS = 30.0

    def __init__(self, total: int, description: str, unit: str, enabled: bool = True):
        self.bar = None
        self.total, self.description, self.unit, self.done = total, description, unit, 0
        self.enabled = enabled and total > 0 and dist.rank() == 0
        self.started = self.last_line = time.monotonic()
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=1.0, leave=False)

    def update(self, n: int) -> None:
        """Advance by n units."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last_line >= self.LINE_EVERY_SECONDS and self.done < self.total:
            self.last_line = time.monotonic()
            elapsed = self.last_line - self.started
            print(f"  {self.description}: {self.done:,}/{self.total:,} {self.unit}s ({elapsed:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Remove the bar."""
        if self.bar is not None:
            self.bar.close()


ProgressFactory = Callable[[int, str, str], Progress]


def no_progress(total: int, description: str, unit: str) -> Progress:
    """A disabled progress bar (training: the loop's own bar is on screen)."""
    return Progress(total, description, unit, enabled=False)


def chunks(count: int, size: int) -> list[range]:
    """Index ranges of at most `size` items covering range(count); progress advances once per chunk."""
    return [range(i, min(i + size, count)) for i in range(0, count, size)]


class Evaluator(ABC):
    """One family of metrics; subclasses set `metrics` and `protocol_key` and implement the four steps."""

    metrics: ClassVar[tuple[str, ...]] = ()
    protocol_key: ClassVar[str] = ""
    headline: ClassVar[str | None] = None  # the accuracy-like number a suite averages (None: not averaged)

    def __init__(self, task: EvalTask, metric_names: Sequence[str], context: EvalContext):
        self.task, self.names, self.context = task, list(metric_names), context

    def check(self) -> None:
        """Read and parse the records, check options; DataError / RecipeError before any weights load."""

    def plan(self, path: str, config, where: str) -> Plan:
        """Resolve this checkpoint's settings from its config (RecipeError when they cannot fit)."""
        return Plan(path, where, max_positions(config))

    @abstractmethod
    def score(self, model, tokenizer, plan: Plan, progress: ProgressFactory = no_progress) -> Scored:
        """Score the model; every process returns the same metrics."""

    @abstractmethod
    def protocol(self, plan: Plan, tokenizer) -> dict[str, Any]:
        """{section: what the numbers mean}, merged into metrics.json's protocol."""

    def prompt_protocol(self, plan: Plan) -> dict[str, Any]:
        """How the model's input was built (metrics.json protocol.prompt); raw text by default."""
        return {"format": "raw text: no prompt, no template", "chat_template": False, "num_fewshot": 0, "system_prompt": None}

    def chance(self) -> float:
        """Accuracy of a blind guess at the headline metric (the suite's centered accuracy subtracts it)."""
        return self.task.chance if self.task.chance is not None else 0.0

    def summary(self, metrics: dict[str, Any]) -> str:
        """One line of the headline numbers for the log."""
        shown = [f"{k} {metrics[k]:.4f}" for k in self.metrics_shown() if isinstance(metrics.get(k), float)]
        return "  ".join(shown)

    def metrics_shown(self) -> tuple[str, ...]:
        """Metric keys worth a log line and a comparison column."""
        return tuple(self.names)


def check_fewshot_pool(k: int, pool_size: int, key: str, pool: str, same_split: bool) -> None:
    """RecipeError naming the key and the pool when k solved examples cannot be drawn for every question."""
    available = pool_size - 1 if same_split else pool_size
    if k > available:
        left = " (each question is left out of its own prompt)" if same_split else ""
        noun = "example" if available == 1 else "examples"
        split_key = key.rsplit(".", 1)[0] + ".fewshot_split"
        raise RecipeError(
            f"{key} ({k}) is larger than the {available} {noun} left in the few-shot pool of {pool}{left}; "
            f"lower it or give {split_key}"
        )


def require_test(task: EvalTask, metric: str) -> None:
    """DataError when an evaluator that has no training default is given no data.test."""
    if task.data.test is None:
        raise DataError(f"data.test: {metric} needs test sources; set data.test (a file, glob or builtin:NAME)")


def task_records(task: EvalTask, context: EvalContext, metric: str, records: str, unit: str) -> list[tuple[str, dict]]:
    """(where, record) to score: data.test, or in training the run's validation records; RecipeError when there are none.

    `metric` names the metric and `records` what it reads, for the messages; `unit` is what one record is.
    """
    data = task.data
    if data.test is not None:
        located = list(iter_located_records(data.test, max_samples=data.max_samples, encoding_errors=data.encoding_errors))
    elif context.validation is not None:
        located = list(context.validation)[: data.max_samples]
    else:
        raise RecipeError(f"data.test: {metric} needs {records}; set data.test")
    if not located:
        where = source_names(data.test) if data.test else "the run's validation records (none held out)"
        raise RecipeError(f"data.test: {metric} has no {unit} to score in {where}; set data.test or hold out validation data")
    return located
