"""ROUGE, accuracy, exact match and BLEU of generations for a fine-tuning task's records (one generation pass).

    llmkit eval eval/tiny --set model.path=runs/finetune-tiny-summarization

The prompt is the task's (task in the eval recipe, else the one in the checkpoint's run recipe.yaml,
else, in train.evals, the run's own), so a fine-tuned model is asked exactly as it was trained.
Prompts are shortened to fit the model's positions minus generation.max_new_tokens.
"""

from __future__ import annotations

import math
import time
from typing import Any

from llmkit import dist, prompts
from llmkit.errors import RecipeError
from llmkit.evals.base import Evaluator, Plan, Scored, no_progress, task_records
from llmkit.generation import generate_ids
from llmkit.metrics.rouge import aggregate, per_example_scores
from llmkit.metrics.text import accuracy_scores, bleu, exact_match_scores
from llmkit.models import max_positions
from llmkit.recipes import TaskSpec

PROTOCOLS = {
    "accuracy": "first generated line equals the label, ignoring case and surrounding whitespace",
    "exact_match": "prediction equals reference after collapsing whitespace",
    "bleu": "sacrebleu corpus BLEU (0-100), see bleu_signature",
}


def task_with_labels(task: TaskSpec, records: list[dict]) -> TaskSpec:
    """The task with its defaults filled, and a classification task's labels taken from the records when unset."""
    task = prompts.task_defaults(task)
    if task.type == "classification" and not task.labels:
        task = task.model_copy(update={"labels": prompts.label_set(task, records)})
    return task


class TaskGenerationEvaluator(Evaluator):
    """Generate a completion for each record's prompt and score it against the record's target."""

    metrics = ("rouge", "accuracy", "exact_match", "bleu")
    protocol_key = "task"
    headline = "accuracy"

    def __init__(self, task, metric_names, context):
        super().__init__(task, metric_names, context)
        self.located: list[tuple[str, dict]] = []

    def check(self) -> None:
        """sacrebleu for bleu; read the records (data.test, or in training the validation records)."""
        if "bleu" in self.names:
            try:
                import sacrebleu  # noqa: F401
            except ImportError:
                raise RecipeError("metrics: bleu needs sacrebleu; pip install 'llmkit[bleu]' or drop bleu") from None
        self.located = task_records(self.task, self.context, ", ".join(self.names), "test records", "records")
        if self.task.task is not None:
            self._check_task(self.task.task, "eval recipe")
        elif self.context.run_task is not None:
            self._check_task(self.context.run_task, "the run's task")

    def _check_task(self, task: TaskSpec, source: str) -> TaskSpec:
        if task.type == "text":
            raise RecipeError(
                "task.type: 'text' has no prompt to generate from; ROUGE, accuracy, exact_match and bleu "
                "need a summarization, instruction or classification task"
            )
        for where, record in self.located:
            prompts.check_record(task, record, where)
        return task

    def plan(self, path: str, config, where: str) -> Plan:
        """The task (the recipe's, else the checkpoint's run's) and the prompt budget: positions minus max_new_tokens."""
        limit = max_positions(config)
        if self.task.task is not None:
            task, source = self.task.task, "eval recipe"
        elif self.context.run_task is not None:
            task, source = self.context.run_task, "the training run's task"
        else:
            task, source = self.context.resolve_task(path, where)
            self._check_task(task, source)
        if task.type == "text":
            self._check_task(task, source)
        new_tokens = self.task.generation.max_new_tokens
        if limit is not None and new_tokens >= limit:
            raise RecipeError(
                f"generation.max_new_tokens ({new_tokens}) leaves no room for the prompt "
                f"in the {limit} positions of {path}; set it below {limit}"
            )
        task = task_with_labels(task, [record for _, record in self.located])
        budget = None if limit is None else max(1, limit - new_tokens)
        return Plan(path, where, limit, {"task": task, "task_source": source, "max_prompt_tokens": budget})

    def score(self, model, tokenizer, plan: Plan, progress=no_progress) -> Scored:
        """Generate for every record (each process its share), gather, score."""
        world, rank = dist.world()
        task, budget = plan.settings["task"], plan.settings["max_prompt_tokens"]
        mine = [(i, where, rec) for i, (where, rec) in enumerate(self.located) if i % world == rank]
        formatted = [prompts.format_record(task, rec, tokenizer, max_prompt_tokens=budget, where=where) for _, where, rec in mine]
        prompt_ids = prompts.encode_prompts(tokenizer, [f.prompt for f in formatted])
        started = time.perf_counter()
        bar = progress(len(mine), "generating", "example")
        texts = [t[0] for t in generate_ids(model, tokenizer, prompt_ids, self.task.generation, self.task.data.batch_size, on_batch=bar.update)]
        bar.close()
        rows = [
            {"id": i, "input": f.prompt, "reference": f.target, "prediction": text.strip()}
            for (i, _, _), f, text in zip(mine, formatted, texts, strict=True)
        ]
        rows = sorted(dist.gather_lists(rows), key=lambda r: r["id"])
        metrics = self._metrics(rows)
        return Scored(metrics, rows, {"examples_per_second": len(rows) / max(time.perf_counter() - started, 1e-9)})

    def _metrics(self, rows: list[dict]) -> dict[str, Any]:
        predictions = [r["prediction"] for r in rows]
        references = [r["reference"] for r in rows]
        metrics: dict[str, Any] = {"examples": len(rows)}
        per_example: dict[str, list[float]] = {}
        if "rouge" in self.names:
            scores = per_example_scores(predictions, references)
            spec = self.task.rouge
            metrics.update(aggregate(scores, spec.bootstrap_samples, spec.confidence, spec.seed))
            for key in scores[0] if scores else ():
                per_example[key] = [s[key] for s in scores]
        if "accuracy" in self.names:
            per_example["accuracy"] = accuracy_scores(predictions, references)
            metrics["accuracy"] = math.fsum(per_example["accuracy"]) / len(rows)
        if "exact_match" in self.names:
            per_example["exact_match"] = exact_match_scores(predictions, references)
            metrics["exact_match"] = math.fsum(per_example["exact_match"]) / len(rows)
        if "bleu" in self.names:
            import sacrebleu

            metrics["bleu"], metrics["bleu_signature"] = bleu(predictions, references)
            per_example["bleu"] = [float(sacrebleu.sentence_bleu(p, [r]).score) for p, r in zip(predictions, references, strict=True)]
        for n, row in enumerate(rows):
            row["scores"] = {k: v[n] for k, v in per_example.items()}
        return metrics

    def protocol(self, plan: Plan, tokenizer) -> dict[str, Any]:
        """The task and its source, decoding settings, and each metric's rule."""
        task = plan.settings["task"]
        out: dict[str, Any] = {
            "task": {**task.model_dump(mode="json"), "source": plan.settings["task_source"]},
            "generation": self.task.generation.model_dump(mode="json"),
        }
        if "rouge" in self.names:
            rouge = self.task.rouge
            out["rouge"] = {
                "implementation": "rouge_score RougeScorer(use_stemmer=True) F-measure, averaged over examples",
                "rougeLsum": "one sentence per line",
                "non_latin": "pairs with letters outside the Latin script use a script-preserving tokenizer "
                "(one token per Han/kana/Thai character, words otherwise)",
                "bootstrap_samples": rouge.bootstrap_samples,
                "confidence": rouge.confidence if rouge.bootstrap_samples else None,
                "seed": rouge.seed if rouge.bootstrap_samples else None,
            }
        for name in ("accuracy", "exact_match", "bleu"):
            if name in self.names:
                out[name] = PROTOCOLS[name]
        return out

    def prompt_protocol(self, plan: Plan) -> dict[str, Any]:
        """How prompts were built: the task's template (through the chat template for instructions)."""
        task = plan.settings["task"]
        return {
            "format": f"the {task.type} task's prompt (the prompt a run fine-tuned on it was trained with)",
            "chat_template": task.type == "instruction",
            "fewshot": 0,
            "system_prompt": None,
            "max_prompt_tokens": plan.settings["max_prompt_tokens"],
        }

    def chance(self) -> float:
        """1 / labels for classification accuracy; 0 otherwise (or the recipe's chance)."""
        if self.task.chance is not None:
            return self.task.chance
        return 0.0

    def summary(self, metrics: dict[str, Any]) -> str:
        """ROUGE, accuracy, exact match, BLEU and the count."""
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "accuracy", "exact_match") if k in metrics)
        return f"{shown}  ({metrics['examples']} examples)" + (f"  bleu {metrics['bleu']:.2f}" if "bleu" in metrics else "")

    def metrics_shown(self) -> tuple[str, ...]:
        """Comparison columns."""
        return ("rouge1", "rouge2", "rougeL", "rougeLsum", "accuracy", "exact_match", "bleu")
