"""LAMBADA-style cloze: is the last word the greedy continuation, and its perplexity (llmkit/metrics/choice.py).

    llmkit eval eval/lambada --set model.path=runs/pretrain-tiny
"""

from __future__ import annotations

import time
from typing import Any

from llmkit.data.sources import source_names
from llmkit.errors import RecipeError
from llmkit.evals import prompting
from llmkit.evals.base import Evaluator, Plan, Scored, chunks, no_progress, require_test
from llmkit.evals.choice import choice_window
from llmkit.metrics.choice import TARGET_DELIMITER, cloze_metrics
from llmkit.metrics.choice_tasks import load_cloze_texts, score_cloze_shared

TEXTS_PER_CHUNK = 64


class ClozeEvaluator(Evaluator):
    """acc (last word greedy), target and example perplexity of data.test's texts."""

    metrics = ("cloze",)
    protocol_key = "cloze"
    headline = "acc"

    def __init__(self, task, metric_names, context):
        super().__init__(task, metric_names, context)
        self.texts: list[tuple[str, str]] = []

    def check(self) -> None:
        """Every text splits into a context and a last word (DataError naming the record otherwise)."""
        require_test(self.task, "cloze")
        if not prompting.is_plain(self.task.prompt):
            raise RecipeError("prompt: a cloze text is scored as raw text; leave prompt at its defaults with metrics [cloze]")
        data = self.task.data
        self.texts = load_cloze_texts(data.test, data.text_field, max_samples=data.max_samples, encoding_errors=data.encoding_errors)

    def plan(self, path: str, config, where: str) -> Plan:
        """choice.max_length at most the model's positions."""
        return choice_window(self.task, path, config, where)

    def score(self, model, tokenizer, plan: Plan, progress=no_progress) -> Scored:
        """Score every text (each process its share)."""
        spec = self.task.choice
        texts = [text for _, text in self.texts]
        started = time.perf_counter()
        bar = progress(len(texts), "cloze", "text")
        examples: list[dict] = []
        for part in chunks(len(texts), TEXTS_PER_CHUNK):
            scored = score_cloze_shared(
                model, tokenizer, [texts[i] for i in part], batch_size=spec.batch_size, max_length=spec.max_length,
                pair_encoding=spec.pair_encoding, add_special_tokens=spec.add_bos,
            )  # fmt: skip
            examples += scored["examples"]
            bar.update(len(part))
        bar.close()
        metrics = cloze_metrics(examples)
        rows = [
            {"index": i, "where": where, "target": text.rpartition(" ")[2], **row}
            for i, ((where, text), row) in enumerate(zip(self.texts, examples, strict=True))
        ]
        metrics["examples"] = metrics["n"]
        return Scored(metrics, rows, {"examples_per_second": metrics["examples"] / max(time.perf_counter() - started, 1e-9)})

    def protocol(self, plan: Plan, tokenizer) -> dict[str, Any]:
        """The split rule and the scores' definitions."""
        spec = self.task.choice
        return {
            "cloze": {
                "tasks": [source_names(self.task.data.test)],
                "score": "sum of the continuation tokens' log-probs given the context (lm-eval loglikelihood); context tokens never scored",
                "target_delimiter": TARGET_DELIMITER,
                "pair_encoding": spec.pair_encoding,
                "tokenizer": getattr(tokenizer, "name_or_path", None),
                "add_bos": spec.add_bos,
                "dtype": self.context.dtype,
                "window_tokens": spec.max_length or plan.positions,
                "truncation": "contexts longer than the window are cut from the left and counted in 'truncated'",
                "batch_size": spec.batch_size,
                "text_field": self.task.data.text_field,
                "split": "context = the text before its last space, target = ' ' + the last word (lm-eval lambada)",
                "acc": "the target is the greedy continuation (every target token is the argmax)",
                "target_perplexity": "exp(sum NLL / target tokens)",
                "example_perplexity": "exp(-mean per-text log-prob) (lm-eval's perplexity)",
            }
        }

    def prompt_protocol(self, plan: Plan) -> dict[str, Any]:
        """Raw text."""
        return {"format": "raw text: the context before the last word, no template", "chat_template": False, "num_fewshot": 0, "system_prompt": None}

    def summary(self, metrics: dict[str, Any]) -> str:
        """acc, target perplexity, counts."""
        return f"acc {metrics['acc']:.4f}  target_perplexity {metrics['target_perplexity']:.4f}  ({metrics['examples']} examples, {metrics['truncated']} contexts cut to fit the window)"

    def metrics_shown(self) -> tuple[str, ...]:
        """Comparison columns."""
        return ("acc", "target_perplexity")
