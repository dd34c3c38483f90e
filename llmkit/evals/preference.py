"""Preference accuracy and margin of a model on held-out {prompt or messages, chosen, rejected} pairs.

    llmkit eval eval/preference --set model.path=runs/finetune-lora-dpo

Each pair is tokenized as preference training tokenizes it (llmkit/data/preference.py: the prompt as
every llmkit prompt is encoded, a completion + EOS, or a reply as the chat template writes the turn)
and scored by llmkit/metrics/preference.py, the same log-probs the DPO family trains on. Reference-free
by default (margin = log p(chosen) - log p(rejected)); with `preference.reference` the margin is the
difference of log-ratios against that model, the DPO implicit reward margin divided by beta.
"""

from __future__ import annotations

import time
from typing import Any

from llmkit import dist, models, prompts
from llmkit.data.preference import check_pair_record
from llmkit.errors import RecipeError
from llmkit.evals.base import Evaluator, Plan, Scored, chunks, no_progress, task_records
from llmkit.metrics.preference import margins, pair_logps, preference_summary, tokenize_test_pairs
from llmkit.models import max_positions
from llmkit.recipes import TaskSpec

PAIRS_PER_CHUNK = 32
DEFAULT_TASK = TaskSpec(type="preference")


class PreferenceEvaluator(Evaluator):
    """preference_accuracy (share of pairs whose chosen completion has the larger margin) and mean margin."""

    metrics = ("preference",)
    protocol_key = "preference"
    headline = "preference_accuracy"

    def __init__(self, task, metric_names, context):
        super().__init__(task, metric_names, context)
        self.located: list[tuple[str, dict]] = []

    def _pair_task(self, task: TaskSpec | None) -> TaskSpec:
        """The preference task that formats the pairs: the recipe's or the run's when it is one, else plain {prompt}."""
        return task if task is not None and task.type == "preference" else DEFAULT_TASK

    def check(self) -> None:
        """Read data.test (in training: the run's validation pairs) and check every pair, before any weights load."""
        self.located = task_records(self.task, self.context, "preference", "{prompt, chosen, rejected} test records", "pairs")
        if self.task.task is not None and self.task.task.type != "preference":
            raise RecipeError(f"task.type: the preference metric reads preference pairs; set task.type: preference (got {self.task.task.type!r})")
        task = self._pair_task(self.task.task or self.context.run_task)
        for where, record in self.located:
            check_pair_record(task, record, where)
        reference = self.task.preference.reference
        if reference is not None:
            models.check_model_dir(reference, where="preference.reference", needs_tokenizer=False)

    def plan(self, path: str, config, where: str) -> Plan:
        """The pair task and the token budget of a pair: data.seq_len, else the model's positions."""
        limit = max_positions(config)
        seq_len = self.task.data.seq_len or limit or 1024
        if limit is not None and seq_len > limit:
            raise RecipeError(f"data.seq_len ({seq_len}) is larger than the {limit} positions of {path}; set data.seq_len to at most {limit}")
        if self.task.task is not None:
            task, source = self.task.task, "eval recipe"
        elif self.context.run_task is not None:
            task, source = self.context.run_task, "the training run's task"
        else:  # a preference fine-tune formats its pairs as it trained; any other model (a base model) reads them plainly
            trained = prompts.run_prompt(path)
            task, source = (trained.task, trained.source) if trained.task is not None else (DEFAULT_TASK, "plain {prompt} pairs")
        if task.type != "preference":
            task, source = DEFAULT_TASK, "plain {prompt} pairs"
        return Plan(path, where, limit, {"task": task, "task_source": source, "seq_len": seq_len})

    def score(self, model, tokenizer, plan: Plan, progress=no_progress) -> Scored:
        """Log-probs of every pair under the model (and the reference), each process its share, gathered in order."""
        world, rank = dist.world()
        task, seq_len = plan.settings["task"], plan.settings["seq_len"]
        pairs, kept, skipped = tokenize_test_pairs(task, self.located, tokenizer, seq_len)
        mine = [i for i in range(len(pairs)) if i % world == rank]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batch_size = self.task.data.batch_size
        reference = self._reference(model)
        started = time.perf_counter()
        bar = progress(len(mine), "preference", "pair")
        rows: list[dict] = []
        try:
            for part in chunks(len(mine), PAIRS_PER_CHUNK):
                chunk = [pairs[mine[i]] for i in part]
                policy = pair_logps(model, chunk, pad_id, batch_size)
                ref = pair_logps(reference, chunk, pad_id, batch_size) if reference is not None else None
                for j, ((c, r), m) in enumerate(zip(policy, margins(policy, ref), strict=True)):
                    index = mine[part[j]]
                    row = {"id": index, "input": kept[index], "chosen_logp": c, "rejected_logp": r, "margin": m, "preferred": m > 0}
                    if ref is not None:
                        row["ref_chosen_logp"], row["ref_rejected_logp"] = ref[j]
                    rows.append(row)
                bar.update(len(part))
        finally:
            bar.close()
            del reference
        rows = sorted(dist.gather_lists(rows), key=lambda r: r["id"])
        metrics = {**preference_summary([r["margin"] for r in rows]), "skipped": len(skipped)}
        return Scored(metrics, rows, {"pairs_per_second": len(rows) / max(time.perf_counter() - started, 1e-9)})

    def _reference(self, model):
        """The reference model named by preference.reference (on the policy's device and dtype), or None."""
        path = self.task.preference.reference
        if path is None:
            return None
        parameter = next(model.parameters())
        reference, _ = models.load_model(path, dtype=self.context.dtype, device=str(parameter.device), where="preference.reference")
        return reference

    def protocol(self, plan: Plan, tokenizer) -> dict[str, Any]:
        """How pairs are tokenized and what the margin is."""
        reference = self.task.preference.reference
        return {
            "preference": {
                "task_source": plan.settings["task_source"],
                "seq_len": plan.settings["seq_len"],
                "completion": "text + EOS, or the assistant turn as the chat template writes it (end-of-turn included); prompt tokens never scored",
                "logp": "sum of the completion tokens' log-probs given the prompt (float32 softmax)",
                "margin": (
                    "(log p - log p_ref)(chosen) - (log p - log p_ref)(rejected)" if reference else "log p(chosen) - log p(rejected)"
                ),
                "reference": reference,
                "preference_accuracy": "share of pairs with a positive margin",
                "skipped": "pairs whose prompt plus longer completion exceed seq_len are not scored and are counted here",
                "tokenizer": getattr(tokenizer, "name_or_path", None),
                "dtype": self.context.dtype,
            }
        }

    def chance(self) -> float:
        """A blind guess prefers the right completion half the time."""
        return self.task.chance if self.task.chance is not None else 0.5

    def summary(self, metrics: dict[str, Any]) -> str:
        """Accuracy, margin, counts."""
        return (
            f"preference_accuracy {metrics['preference_accuracy']:.4f}  preference_margin {metrics['preference_margin']:.4f}  "
            f"({metrics['pairs']} pairs, {metrics['skipped']} too long for seq_len)"
        )

    def metrics_shown(self) -> tuple[str, ...]:
        """Comparison columns."""
        return ("preference_accuracy", "preference_margin")
