"""Generative tasks: a few-shot prompt, a generated answer, the answer extracted and matched (GSM8K-style).

    llmkit eval eval/gsm8k --set model.path=runs/finetune-tiny --set data.test=gsm8k_test.jsonl
    llmkit eval eval/arithmetic --set model.path=runs/pretrain-tiny     # built-in, offline

Semantics follow lm-evaluation-harness's gsm8k task: the prompt is the few-shot examples
(prompt_template + target_delimiter + answer + fewshot_delimiter each) then the question's
prompt_template; generation is greedy (or sampled) until a stop string or EOS; each filter of
answer.filters extracts an answer (llmkit/metrics/answers.py) and exact_match compares it with the
reference after regexes_to_ignore, case and punctuation rules. One score per filter.
"""

from __future__ import annotations

import math
import string
import time
from typing import Any

from llmkit import dist
from llmkit.data.sources import describe, iter_located_records, source_names
from llmkit.errors import DataError, RecipeError
from llmkit.evals import prompting
from llmkit.evals.base import Evaluator, Plan, Scored, check_fewshot_pool, no_progress, require_test
from llmkit.generation import generate_ids
from llmkit.metrics.answers import exact_match, extract, numeric_match
from llmkit.metrics.choice import mean_stderr
from llmkit.models import max_positions
from llmkit.prompts import encode_prompts


def template_fields(template: str) -> list[str]:
    """The {field} names of a prompt template (RecipeError for a malformed one)."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError as exc:
        raise RecipeError(f"answer.prompt_template: {exc}; write record fields as {{field}} and literal braces as {{{{ }}}}") from None


def _check(record: Any, where: str, fields: list[str], answer_field: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with fields {', '.join(fields + [answer_field])}")
    for name in [*fields, answer_field]:
        if name not in record:
            have = ", ".join(map(str, record)) or "none"
            key = "answer.answer_field" if name == answer_field else "answer.prompt_template"
            raise DataError(f"{where}: no field {name!r} (record fields: {have}); set {key} to name the right field")


class GenerativeEvaluator(Evaluator):
    """Exact (or numeric) match of answers extracted from generations, one score per filter."""

    metrics = ("generative",)
    protocol_key = "generative"

    def __init__(self, task, metric_names, context):
        super().__init__(task, metric_names, context)
        self.questions: list[tuple[str, str, str]] = []  # (where, question text, reference)
        self.solved: list[list[tuple[str, str]]] = []  # per question, its few-shot (question, answer) pairs

    @property
    def score_name(self) -> str:
        """exact_match or numeric_match."""
        return "exact_match" if self.task.answer.match == "exact" else "numeric_match"

    @property
    def headline(self) -> str:  # type: ignore[override]
        """The first filter's score."""
        return f"{self.score_name}/{self.task.answer.filters[0].name}"

    def _read(self, sources, max_samples: int | None) -> list[tuple[str, str, str]]:
        spec, data = self.task.answer, self.task.data
        fields = template_fields(spec.prompt_template)
        out = []
        for where, record in iter_located_records(sources, max_samples=max_samples, encoding_errors=data.encoding_errors):
            _check(record, where, fields, spec.answer_field)
            question = spec.prompt_template.format(**{f: str(record[f]) for f in fields})
            out.append((where, question, str(record[spec.answer_field])))
        return out

    def check(self) -> None:
        """Read every question and reference, draw each question's few-shot examples."""
        require_test(self.task, "generative")
        spec, data = self.task.answer, self.task.data
        self.questions = self._read(data.test, data.max_samples)
        if not self.questions:
            raise DataError(f"data.test: {source_names(data.test)} holds no records")
        same_split = spec.fewshot_split is None
        pool = self.questions if same_split else self._read(spec.fewshot_split, None)
        if spec.num_fewshot:
            check_fewshot_pool(spec.num_fewshot, len(pool), "answer.num_fewshot", source_names(spec.fewshot_split or data.test), same_split)
        for i in range(len(self.questions)):
            chosen = prompting.draw_fewshot(len(pool), spec.num_fewshot, spec.fewshot_seed, i, same_split)
            self.solved.append([(pool[j][1], pool[j][2]) for j in chosen])

    def plan(self, path: str, config, where: str) -> Plan:
        """The prompt budget: the model's positions minus generation.max_new_tokens."""
        limit = max_positions(config)
        new_tokens = self.task.generation.max_new_tokens
        if limit is not None and new_tokens >= limit:
            raise RecipeError(
                f"generation.max_new_tokens ({new_tokens}) leaves no room for the prompt in the {limit} positions of {path}; "
                f"set it below {limit}"
            )
        return Plan(path, where, limit, {"max_prompt_tokens": None if limit is None else limit - new_tokens})

    def prompts(self, tokenizer) -> list[str]:
        """Every question's full prompt text under the prompt protocol."""
        spec = self.task.answer
        return [
            prompting.render(self.task.prompt, tokenizer, question, solved, target_delimiter=spec.target_delimiter, fewshot_delimiter=spec.fewshot_delimiter)
            for (_, question, _), solved in zip(self.questions, self.solved, strict=True)
        ]

    def score(self, model, tokenizer, plan: Plan, progress=no_progress) -> Scored:
        """Generate for this process's share of the questions, gather, extract and match."""
        spec = self.task.answer
        world, rank = dist.world()
        prompts = self.prompts(tokenizer)
        mine = [i for i in range(len(prompts)) if i % world == rank]
        if spec.add_bos:
            ids = encode_prompts(tokenizer, [prompts[i] for i in mine])
        else:
            ids = [tokenizer(prompts[i], add_special_tokens=False, verbose=False)["input_ids"] for i in mine]
        budget = plan.settings["max_prompt_tokens"]
        started = time.perf_counter()
        bar = progress(len(mine), "generating", "question")
        texts = [t[0] for t in generate_ids(model, tokenizer, ids, self.task.generation, self.task.data.batch_size, on_batch=bar.update)]
        bar.close()
        rows = []
        for i, prompt_ids, text in zip(mine, ids, texts, strict=True):
            where, _, reference = self.questions[i]
            answers = {f.name: extract(text, f.extract, regex=f.regex, group_select=f.group_select, fallback=f.fallback) for f in spec.filters}
            rows.append({
                "id": i, "where": where, "input": prompts[i], "reference": reference, "generation": text, "answers": answers,
                "scores": {name: self.match(answer, reference) for name, answer in answers.items()},
                "truncated": budget is not None and len(prompt_ids) > budget,
            })  # fmt: skip
        rows = sorted(dist.gather_lists(rows), key=lambda r: r["id"])
        metrics: dict[str, Any] = {}
        for f in spec.filters:
            hits = [r["scores"][f.name] for r in rows]
            metrics[f"{self.score_name}/{f.name}"] = math.fsum(hits) / len(hits)
            metrics[f"{self.score_name}_stderr/{f.name}"] = mean_stderr(hits)
        metrics["examples"] = len(rows)
        metrics["truncated"] = sum(r["truncated"] for r in rows)
        return Scored(metrics, rows, {"examples_per_second": len(rows) / max(time.perf_counter() - started, 1e-9)})

    def match(self, answer: str, reference: str) -> float:
        """1.0 when the extracted answer matches the reference under answer.match, else 0.0."""
        spec = self.task.answer
        if spec.match == "numeric":
            return numeric_match(answer, reference, spec.regexes_to_ignore)
        return exact_match(answer, reference, spec.regexes_to_ignore, spec.ignore_case, spec.ignore_punctuation)

    def protocol(self, plan: Plan, tokenizer) -> dict[str, Any]:
        """Prompt, decoding, extraction and matching rules."""
        spec = self.task.answer
        return {
            "generative": {
                "prompt_template": spec.prompt_template,
                "answer_field": spec.answer_field,
                "num_fewshot": spec.num_fewshot,
                "fewshot_source": (describe(spec.fewshot_split) if spec.fewshot_split else "data.test, each question left out of its own prompt")
                if spec.num_fewshot else None,
                "fewshot_seed": spec.fewshot_seed if spec.num_fewshot else None,
                "add_bos": spec.add_bos,
                "generation": self.task.generation.model_dump(mode="json"),
                "stop": "at the first of generation.stop or the EOS token (lm-eval generate_until)",
                "max_prompt_tokens": plan.settings["max_prompt_tokens"],
                "truncation": "prompts longer than max_prompt_tokens lose their beginning and are counted in 'truncated'",
                "filters": [f.model_dump(mode="json") for f in spec.filters],
                "take_first": "one generation per question, so lm-eval's take_first keeps it",
                "match": spec.match,
                "exact_match": "lm-eval exact_match: regexes_to_ignore removed from answer and reference (re.sub, in order), "
                "then lowercased if ignore_case, punctuation dropped if ignore_punctuation, then equal",
                "numeric_match": "answer and reference (after regexes_to_ignore) read as numbers, ',' and '$' dropped, equal within 1e-9",
                "regexes_to_ignore": spec.regexes_to_ignore,
                "ignore_case": spec.ignore_case,
                "ignore_punctuation": spec.ignore_punctuation,
                "dtype": self.context.dtype,
            }
        }  # fmt: skip

    def prompt_protocol(self, plan: Plan) -> dict[str, Any]:
        """The prompt protocol."""
        spec = self.task.answer
        return prompting.protocol(self.task.prompt, spec.num_fewshot, target_delimiter=spec.target_delimiter, fewshot_delimiter=spec.fewshot_delimiter)

    def summary(self, metrics: dict[str, Any]) -> str:
        """One score per filter and the count."""
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in metrics if "/" in k and "_stderr" not in k)
        return f"{shown}  ({metrics['examples']} questions, {metrics['truncated']} prompts cut to fit)"

    def metrics_shown(self) -> tuple[str, ...]:
        """Comparison columns: one per filter."""
        return tuple(f"{self.score_name}/{f.name}" for f in self.task.answer.filters)
