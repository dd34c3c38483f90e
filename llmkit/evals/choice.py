"""Multiple choice scored by log-likelihood, as lm-evaluation-harness scores it (llmkit/metrics/choice.py).

    llmkit eval eval/choice-tiny
    llmkit eval eval/arc-easy --set prompt.chat_template=true --set choice.num_fewshot=5 --set prompt.fewshot_as=turns
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from llmkit.data.sources import describe, source_names
from llmkit.errors import RecipeError
from llmkit.evals import prompting
from llmkit.evals.base import Evaluator, Plan, Scored, check_fewshot_pool, chunks, no_progress, require_test
from llmkit.metrics.choice import (
    FEWSHOT_DELIMITER,
    TARGET_DELIMITER,
    ChoiceExample,
    aggregate,
    choice_metrics,
    metrics_by_subject,
    prediction_rows,
    with_fewshot,
)
from llmkit.metrics.choice_tasks import load_choice_examples, score_choices_shared
from llmkit.models import max_positions

QUESTIONS_PER_CHUNK = 64  # the progress bar advances per chunk; questions are scored independently

NORMALIZATION = {
    "acc": "argmax of the summed log-probs (ties: first choice)",
    "acc_norm": "argmax of log-prob / characters of the choice text (lm-eval acc_norm)",
    "acc_bytes": "argmax of log-prob / UTF-8 bytes of the choice text (lm-eval acc_bytes)",
}


def macro(parts: dict[str, dict], unit: str) -> dict[str, Any]:
    """The macro average of several tasks' (or subjects') metrics, with the parts and how it averaged."""
    agg = aggregate(parts, "macro")
    out = {k: v for k, v in agg.items() if k not in ("n", "tasks", "how")}
    out["examples"] = agg["n"]
    out["average"] = f"macro over {len(parts)} {unit}: each counts once; stderr = sqrt(sum of squared stderrs) / {len(parts)}"
    out[unit] = parts
    return out


@dataclass
class ChoiceGroup:
    """One multiple-choice task of the recipe (a source, or all sources pooled), parsed before any model loads."""

    name: str
    examples: list[ChoiceExample]
    solved: list[list[tuple[str, str]]] | None = None  # per question, its few-shot (context, answer) pairs when prompted



def choice_window(task, path: str, config, where: str) -> Plan:
    """A likelihood evaluator's plan: choice.max_length, refused above the model's positions (report N8)."""
    limit = max_positions(config)
    spec = task.choice
    if spec.max_length is not None and limit is not None and spec.max_length > limit:
        raise RecipeError(
            f"choice.max_length ({spec.max_length}) is larger than the {limit} positions of {path}; "
            f"set choice.max_length to at most {limit} (or null for the model's window)"
        )
    return Plan(path, where, limit)


class MultipleChoiceEvaluator(Evaluator):
    """acc, acc_norm and acc_bytes of multiple-choice questions (MMLU-style subjects macro-averaged)."""

    metrics = ("multiple_choice",)
    protocol_key = "multiple_choice"
    headline = "acc"

    def __init__(self, task, metric_names, context):
        super().__init__(task, metric_names, context)
        self.groups: list[ChoiceGroup] = []

    def check(self) -> None:
        """Parse every question (DataError naming the first bad record) and draw the few-shot examples."""
        require_test(self.task, "multiple_choice")
        spec, data, prompt = self.task.choice, self.task.data, self.task.prompt
        if prompt.chat_template and spec.pair_encoding == "joint":
            raise RecipeError("choice.pair_encoding: joint re-splits context and choice; use separate with prompt.chat_template")
        sources = [[s] for s in data.test] if spec.tasks == "per_source" else [list(data.test)]
        read = dict(layout=spec.layout, fields=spec.field_names(), encoding_errors=data.encoding_errors)
        for group in sources:
            examples = load_choice_examples(group, max_samples=data.max_samples, **read)
            same_split = spec.fewshot_split is None
            pool = examples if same_split else load_choice_examples(spec.fewshot_split, **read)
            if spec.num_fewshot:
                check_fewshot_pool(spec.num_fewshot, len(pool), "choice.num_fewshot", source_names(spec.fewshot_split or group), same_split)
            if any(e.continuation is not None for e in examples) and not prompting.is_plain(prompt):
                raise RecipeError(
                    "prompt: Winogrande-style partial scoring puts each choice inside the context, which a chat "
                    "template or system prompt would split; leave prompt at its defaults for this task"
                )
            if prompting.is_plain(prompt):
                if spec.num_fewshot:
                    examples = with_fewshot(examples, pool, spec.num_fewshot, spec.fewshot_seed, same_split=same_split)
                self.groups.append(ChoiceGroup(source_names(group), examples))
                continue
            # Under a chat template the context is rendered at scoring time (it needs the tokenizer).
            solved = []
            for i in range(len(examples)):
                chosen = prompting.draw_fewshot(len(pool), spec.num_fewshot, spec.fewshot_seed, i, same_split)
                solved.append([(pool[j].context, pool[j].choices[pool[j].label]) for j in chosen])
            self.groups.append(ChoiceGroup(source_names(group), examples, solved))

    def plan(self, path: str, config, where: str) -> Plan:
        """The scoring window: choice.max_length, at most the model's positions (N8: refused above them)."""
        return choice_window(self.task, path, config, where)

    def _examples(self, group: ChoiceGroup, tokenizer) -> tuple[list[ChoiceExample], str]:
        """The group's questions ready to score, and the target delimiter (lm-eval drops it after a chat template)."""
        prompt = self.task.prompt
        if group.solved is None:
            return group.examples, TARGET_DELIMITER
        examples = []
        for example, solved in zip(group.examples, group.solved, strict=True):
            context = prompting.render(
                prompt, tokenizer, example.context, solved, description=example.description,
                target_delimiter=TARGET_DELIMITER, fewshot_delimiter=FEWSHOT_DELIMITER,
            )  # fmt: skip
            examples.append(replace(example, context=context, description=""))
        return examples, "" if prompt.chat_template else TARGET_DELIMITER

    def score(self, model, tokenizer, plan: Plan, progress=no_progress) -> Scored:
        """Score each group's questions (each process its share), then per-group and macro metrics."""
        spec = self.task.choice
        started = time.perf_counter()
        total = sum(len(g.examples) for g in self.groups)
        bar = progress(total, "multiple choice", "question")
        results, all_rows = {}, []
        for group in self.groups:
            examples, delimiter = self._examples(group, tokenizer)
            scores = []
            for part in chunks(len(examples), QUESTIONS_PER_CHUNK):
                scores += score_choices_shared(
                    model, tokenizer, [examples[i] for i in part], batch_size=spec.batch_size, max_length=spec.max_length,
                    pair_encoding=spec.pair_encoding, add_special_tokens=spec.add_bos, target_delimiter=delimiter,
                )  # fmt: skip
                bar.update(len(part))
            rows = prediction_rows(scores, examples)
            for row, example in zip(rows, examples, strict=True):
                if example.subject is not None:
                    row["subject"] = example.subject
            if any(e.subject is not None for e in examples):  # MMLU: the usual number is the macro over subjects
                metrics = macro(metrics_by_subject(scores, examples), "subjects")
            else:
                metrics = choice_metrics(scores, examples)
                metrics["examples"] = metrics["n"]
            results[group.name] = metrics
            all_rows += [{"task": group.name, **r} for r in rows] if len(self.groups) > 1 else rows
        bar.close()
        metrics = results[self.groups[0].name] if len(self.groups) == 1 else macro(results, "tasks")
        return Scored(metrics, all_rows, {"examples_per_second": metrics["examples"] / max(time.perf_counter() - started, 1e-9)})

    def protocol(self, plan: Plan, tokenizer) -> dict[str, Any]:
        """Scoring rule, encoding, window and few-shot settings."""
        spec = self.task.choice
        several = len(self.groups) > 1
        return {
            "multiple_choice": {
                "tasks": [g.name for g in self.groups],
                "task_grouping": spec.tasks,
                "average": "macro over tasks (each counts once); MMLU-style records with a subject: macro over subjects"
                if several else "one task; records with a subject: macro over subjects",
                "score": "sum of the continuation tokens' log-probs given the context (lm-eval loglikelihood); context tokens never scored",
                "target_delimiter": "" if self.task.prompt.chat_template else TARGET_DELIMITER,
                "pair_encoding": spec.pair_encoding,
                "tokenizer": getattr(tokenizer, "name_or_path", None),
                "add_bos": spec.add_bos,
                "dtype": self.context.dtype,
                "window_tokens": spec.max_length or plan.positions,
                "truncation": "contexts longer than the window are cut from the left and counted in 'truncated'",
                "batch_size": spec.batch_size,
                "layout": spec.layout,
                "fields": spec.field_names() or None,
                "num_fewshot": spec.num_fewshot,
                "fewshot_source": (describe(spec.fewshot_split) if spec.fewshot_split else "data.test, each question left out of its own prompt")
                if spec.num_fewshot else None,
                "fewshot_seed": spec.fewshot_seed if spec.num_fewshot else None,
                "fewshot_sampler": ("first_n" if spec.fewshot_seed is None else "random.Random(seed + i).sample") if spec.num_fewshot else None,
                "fewshot_delimiter": FEWSHOT_DELIMITER,
                "normalization": NORMALIZATION,
                "stderr": "lm-eval mean_stderr: sample standard deviation (n - 1) / sqrt(n)",
            }
        }  # fmt: skip

    def prompt_protocol(self, plan: Plan) -> dict[str, Any]:
        """The prompt protocol (chat template, few-shot form, system prompt)."""
        return prompting.protocol(
            self.task.prompt, self.task.choice.num_fewshot,
            target_delimiter="" if self.task.prompt.chat_template else TARGET_DELIMITER, fewshot_delimiter=FEWSHOT_DELIMITER,
        )  # fmt: skip

    def chance(self) -> float:
        """Mean over questions of 1 / number of choices (or the recipe's chance)."""
        if self.task.chance is not None:
            return self.task.chance
        examples = [e for g in self.groups for e in g.examples]
        return sum(1 / len(e.choices) for e in examples) / len(examples) if examples else 0.0

    def summary(self, metrics: dict[str, Any]) -> str:
        """acc, acc_norm, counts."""
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in ("acc", "acc_norm") if k in metrics)
        return f"{shown}  ({metrics['examples']} examples, {metrics['truncated']} contexts cut to fit the window)"

    def metrics_shown(self) -> tuple[str, ...]:
        """Comparison columns."""
        return ("acc", "acc_norm")
