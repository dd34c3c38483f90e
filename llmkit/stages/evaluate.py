"""`llmkit eval`: perplexity, ROUGE, task and multiple-choice metrics of one or several checkpoints, reproducibly.

    llmkit eval eval/tiny
    llmkit eval eval/perplexity --set model.path=runs/pretrain-tiny --set data.stride=128
    llmkit eval eval/choice-tiny        # multiple choice on a built-in task, as lm-evaluation-harness scores it
    accelerate launch -m llmkit eval eval/perplexity     # several processes: sums are reduced

Outputs in output_dir: metrics.json (values and the exact protocol), predictions.jsonl (input,
reference, prediction and per-example scores of generation metrics), recipe.yaml, and for several
checkpoints comparison.md / comparison.json. Files are written to a temporary name and renamed.

Perplexity protocol (llmkit/metrics/perplexity.py, docs/evaluation.md "Metrics, defined"): each document on its own; its tokens t_0..t_{L-1} are what
`tokenizer(text)` returns; window k ends at e_k = min(seq_len + k*stride, L), starts at
s_k = max(0, e_k - seq_len) and scores t_i for max(1, e_{k-1}) <= i < e_k from t_{s_k}..t_{i-1}.
Perplexity = exp(sum NLL / scored tokens); bits per byte = sum NLL / (ln 2 * UTF-8 bytes).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import typer

from llmkit import __version__, dist, prompts, rundir
from llmkit.data.sources import check_sources, describe, iter_located_records, iter_texts, source_names
from llmkit.errors import RecipeError
from llmkit.generation import generate_ids
from llmkit.metrics.choice import (
    FEWSHOT_DELIMITER,
    TARGET_DELIMITER,
    ChoiceExample,
    choice_metrics,
    metrics_by_subject,
    prediction_rows,
    with_fewshot,
)
from llmkit.metrics.choice import aggregate as aggregate_tasks
from llmkit.metrics.choice_tasks import (
    load_choice_examples,
    load_cloze_texts,
    score_choices_shared,
    score_cloze_shared,
)
from llmkit.metrics.perplexity import perplexity, reduce_totals
from llmkit.metrics.rouge import aggregate, per_example_scores
from llmkit.metrics.text import accuracy_scores, bleu, exact_match_scores
from llmkit.models import (
    check_causal,
    check_model_dir,
    checkpoint_config,
    load_model,
    max_positions,
)
from llmkit.recipes import EvalRecipe, TaskSpec

GENERATION_METRICS = ("rouge", "accuracy", "exact_match", "bleu")
LIKELIHOOD_METRICS = ("multiple_choice", "cloze")
OUTPUT_FILES = ("metrics.json", "predictions.jsonl", "comparison.md", "comparison.json", "recipe.yaml")
DEFAULT_MAX_SEQ_LEN = 1024


# ----------------------------------------------------------------------------------------------
# Multiple-choice and cloze metrics (log-likelihood scoring, llmkit/metrics/choice.py)
# ----------------------------------------------------------------------------------------------


@dataclass
class LikelihoodTask:
    """One multiple-choice or cloze task, read and checked before any model is loaded."""

    name: str
    examples: list[ChoiceExample] = field(default_factory=list)  # multiple_choice
    texts: list[tuple[str, str]] = field(default_factory=list)  # cloze: (where, text)


def likelihood_tasks(recipe: EvalRecipe) -> list[LikelihoodTask]:
    """The recipe's multiple-choice / cloze tasks, every record parsed (DataError on the first bad one); [] without."""
    if not any(m in LIKELIHOOD_METRICS for m in recipe.metrics):
        return []
    spec, data = recipe.choice, recipe.data
    groups = [[s] for s in data.test] if spec.tasks == "per_source" else [list(data.test)]
    tasks = []
    for sources in groups:
        name = source_names(sources)
        if "cloze" in recipe.metrics:
            texts = load_cloze_texts(sources, data.text_field, max_samples=data.max_samples, encoding_errors=data.encoding_errors)
            tasks.append(LikelihoodTask(name, texts=texts))
            continue
        read = dict(layout=spec.layout, fields=spec.field_names(), encoding_errors=data.encoding_errors)
        examples = load_choice_examples(sources, max_samples=data.max_samples, **read)
        if spec.num_fewshot:
            same_split = spec.fewshot_split is None
            pool = examples if same_split else load_choice_examples(spec.fewshot_split, **read)
            examples = with_fewshot(examples, pool, spec.num_fewshot, spec.fewshot_seed, same_split=same_split)
        tasks.append(LikelihoodTask(name, examples=examples))
    return tasks


def _macro(parts: dict[str, dict], unit: str) -> dict[str, Any]:
    """The macro average of several tasks' (or subjects') metrics, with the parts and how it averaged."""
    agg = aggregate_tasks(parts, "macro")
    out = {k: v for k, v in agg.items() if k not in ("n", "tasks", "how")}
    out["examples"] = agg["n"]
    out["average"] = f"macro over {len(parts)} {unit}: each counts once; stderr = sqrt(sum of squared stderrs) / {len(parts)}"
    out[unit] = parts
    return out


def _choice_task_metrics(model, tokenizer, spec, task: LikelihoodTask) -> tuple[dict[str, Any], list[dict]]:
    scores = score_choices_shared(
        model, tokenizer, task.examples, batch_size=spec.batch_size, max_length=spec.max_length, pair_encoding=spec.pair_encoding,
        add_special_tokens=spec.add_bos,
    )
    rows = prediction_rows(scores, task.examples)
    for row, example in zip(rows, task.examples, strict=True):
        if example.subject is not None:
            row["subject"] = example.subject
    if any(e.subject is not None for e in task.examples):  # MMLU: the usual number is the macro over subjects
        return _macro(metrics_by_subject(scores, task.examples), "subjects"), rows
    metrics = choice_metrics(scores, task.examples)
    metrics["examples"] = metrics["n"]
    return metrics, rows


def _cloze_task_metrics(model, tokenizer, spec, task: LikelihoodTask) -> tuple[dict[str, Any], list[dict]]:
    texts = [text for _, text in task.texts]
    metrics = score_cloze_shared(
        model, tokenizer, texts, batch_size=spec.batch_size, max_length=spec.max_length, pair_encoding=spec.pair_encoding,
        add_special_tokens=spec.add_bos,
    )
    rows = [
        {"index": i, "where": where, "target": text.rpartition(" ")[2], **row}
        for i, ((where, text), row) in enumerate(zip(task.texts, metrics.pop("examples"), strict=True))
    ]
    metrics["examples"] = metrics["n"]
    return metrics, rows


def likelihood_metrics(model, tokenizer, recipe: EvalRecipe, tasks: list[LikelihoodTask]) -> tuple[dict[str, Any], list[dict]]:
    """Score every task; one task's metrics as they are, several tasks' macro-averaged (with each task's)."""
    score = _cloze_task_metrics if "cloze" in recipe.metrics else _choice_task_metrics
    results, all_rows = {}, []
    for task in tasks:
        results[task.name], rows = score(model, tokenizer, recipe.choice, task)
        all_rows += [{"task": task.name, **r} for r in rows] if len(tasks) > 1 else rows
    if len(tasks) == 1:
        return results[tasks[0].name], all_rows
    return _macro(results, "tasks"), all_rows


def likelihood_protocol(recipe: EvalRecipe, tasks: list[LikelihoodTask], tokenizer, window_tokens: int | None) -> dict[str, Any]:
    """What the multiple-choice / cloze numbers mean, recorded next to them in metrics.json."""
    spec = recipe.choice
    protocol: dict[str, Any] = {
        "tasks": [t.name for t in tasks],
        "task_grouping": spec.tasks,
        "average": "macro over tasks (each counts once); MMLU-style records with a subject: macro over subjects"
        if len(tasks) > 1 else "one task; records with a subject: macro over subjects",
        "score": "sum of the continuation tokens' log-probs given the context (lm-eval loglikelihood); context tokens never scored",
        "target_delimiter": TARGET_DELIMITER,
        "pair_encoding": spec.pair_encoding,
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "add_bos": spec.add_bos,
        "dtype": recipe.model.dtype,
        "window_tokens": spec.max_length or window_tokens,
        "truncation": "contexts longer than the window are cut from the left and counted in 'truncated'",
        "batch_size": spec.batch_size,
    }
    if "cloze" in recipe.metrics:
        protocol["cloze"] = {
            "text_field": recipe.data.text_field,
            "split": "context = the text before its last space, target = ' ' + the last word (lm-eval lambada)",
            "acc": "the target is the greedy continuation (every target token is the argmax)",
            "target_perplexity": "exp(sum NLL / target tokens)",
            "example_perplexity": "exp(-mean per-text log-prob) (lm-eval's perplexity)",
        }
        return protocol
    protocol.update({
        "layout": spec.layout,
        "fields": spec.field_names() or None,
        "num_fewshot": spec.num_fewshot,
        "fewshot_source": (describe(spec.fewshot_split) if spec.fewshot_split else "data.test, each question left out of its own prompt")
        if spec.num_fewshot else None,
        "fewshot_seed": spec.fewshot_seed if spec.num_fewshot else None,
        "fewshot_sampler": ("first_n" if spec.fewshot_seed is None else "random.Random(seed + i).sample") if spec.num_fewshot else None,
        "fewshot_delimiter": FEWSHOT_DELIMITER,
        "normalization": {
            "acc": "argmax of the summed log-probs (ties: first choice)",
            "acc_norm": "argmax of log-prob / characters of the choice text (lm-eval acc_norm)",
            "acc_bytes": "argmax of log-prob / UTF-8 bytes of the choice text (lm-eval acc_bytes)",
        },
        "stderr": "lm-eval mean_stderr: sample standard deviation (n - 1) / sqrt(n)",
    })  # fmt: skip
    return protocol


# ----------------------------------------------------------------------------------------------
# Task metrics
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Validation (before any model or data is loaded)
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelPlan:
    """One checkpoint to score, with everything resolved before loading it."""

    path: str
    where: str
    seq_len: int | None = None
    stride: int | None = None
    task: TaskSpec | None = None
    task_source: str = ""
    extra: dict = field(default_factory=dict)


def _task_from_run(path: str, where: str) -> tuple[TaskSpec, str]:
    """The task a fine-tuning run was trained on, read the one way (llmkit/prompts.py `run_prompt`)."""
    trained = prompts.run_prompt(path)  # an intermediate checkpoint's task is its run's
    if trained.task is None:
        raise RecipeError(
            f"task: not set, and {where} ({path}) is not a fine-tuning run to read it from ({trained.reason}); "
            "add e.g. 'task: {type: summarization}' to the eval recipe"
        )
    return trained.task, trained.source


def plan_models(recipe: EvalRecipe) -> list[ModelPlan]:
    """Check every checkpoint, window and task of the recipe; RecipeError/ModelError before loading weights."""
    paths = recipe.model.paths
    if not paths:
        raise RecipeError("model.path: the list of checkpoints is empty")
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise RecipeError(f"model.path: {dup} is listed twice")
    if "bleu" in recipe.metrics:
        try:
            import sacrebleu  # noqa: F401
        except ImportError:
            raise RecipeError(
                "metrics: bleu needs sacrebleu; pip install 'llmkit[bleu]' or drop bleu"
            ) from None
    plans = []
    for i, path in enumerate(paths):
        where = "model.path" if isinstance(recipe.model.path, str) else f"model.path[{i}]"
        check_model_dir(path, where, recipe.tokenizer)
        plan = ModelPlan(path=path, where=where)
        config = checkpoint_config(path, where)
        check_causal(config, where, path)  # an encoder's perplexity would be scored with the answer in view
        limit = max_positions(config)
        if "perplexity" in recipe.metrics:
            seq_len = recipe.data.seq_len or min(limit or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
            if limit is not None and seq_len > limit:
                raise RecipeError(
                    f"data.seq_len ({seq_len}) is larger than the {limit} positions of {path}; "
                    f"set data.seq_len to at most {limit}"
                )
            stride = recipe.data.stride or max(1, seq_len // 2)
            if stride >= seq_len:
                raise RecipeError(f"data.stride ({stride}) must be smaller than data.seq_len ({seq_len})")
            plan.seq_len, plan.stride = seq_len, stride
        if any(m in GENERATION_METRICS for m in recipe.metrics):
            if recipe.task is not None:
                plan.task, plan.task_source = recipe.task, "eval recipe"
            else:
                plan.task, plan.task_source = _task_from_run(path, where)
            if plan.task.type == "text":
                raise RecipeError(
                    "task.type: 'text' has no prompt to generate from; ROUGE, accuracy, exact_match and bleu "
                    "need a summarization, instruction or classification task"
                )
            if limit is not None and recipe.generation.max_new_tokens >= limit:
                raise RecipeError(
                    f"generation.max_new_tokens ({recipe.generation.max_new_tokens}) leaves no room for the prompt "
                    f"in the {limit} positions of {path}; set it below {limit}"
                )
        plans.append(plan)
    return plans


# ----------------------------------------------------------------------------------------------
# Generation metrics
# ----------------------------------------------------------------------------------------------


def _located_records(recipe: EvalRecipe) -> list[tuple[str, dict]]:
    """(where, record) pairs of data.test, `where` naming file and line for error messages."""
    data = recipe.data
    return list(iter_located_records(data.test, max_samples=data.max_samples, encoding_errors=data.encoding_errors))


def _task_with_labels(task: TaskSpec, records: list[dict]) -> TaskSpec:
    task = prompts.task_defaults(task)
    if task.type == "classification" and not task.labels:
        task = task.model_copy(update={"labels": prompts.label_set(task, records)})
    return task


def generation_metrics(
    model,
    tokenizer,
    recipe: EvalRecipe,
    task: TaskSpec,
    located: list[tuple[str, dict]],
) -> tuple[dict[str, Any], list[dict]]:
    """Generate for every test record and score; returns (metrics, prediction rows)."""
    world, rank = dist.world()
    limit = max_positions(model.config)
    max_prompt = None if limit is None else max(1, limit - recipe.generation.max_new_tokens)
    mine = [(i, where, rec) for i, (where, rec) in enumerate(located) if i % world == rank]
    formatted = [
        prompts.format_record(task, rec, tokenizer, max_prompt_tokens=max_prompt, where=where)
        for _, where, rec in mine
    ]
    prompt_ids = prompts.encode_prompts(tokenizer, [f.prompt for f in formatted])
    texts = [
        t[0] for t in generate_ids(model, tokenizer, prompt_ids, recipe.generation, recipe.data.batch_size)
    ]
    rows = [
        {"id": i, "input": f.prompt, "reference": f.target, "prediction": text.strip()}
        for (i, _, _), f, text in zip(mine, formatted, texts, strict=True)
    ]
    rows = sorted(dist.gather_lists(rows), key=lambda r: r["id"])
    predictions = [r["prediction"] for r in rows]
    references = [r["reference"] for r in rows]
    metrics: dict[str, Any] = {"examples": len(rows)}
    per_example: dict[str, list[float]] = {}
    if "rouge" in recipe.metrics:
        scores = per_example_scores(predictions, references)
        spec = recipe.rouge
        metrics.update(aggregate(scores, spec.bootstrap_samples, spec.confidence, spec.seed))
        for key in scores[0] if scores else ():
            per_example[key] = [s[key] for s in scores]
    if "accuracy" in recipe.metrics:
        per_example["accuracy"] = accuracy_scores(predictions, references)
        metrics["accuracy"] = math.fsum(per_example["accuracy"]) / len(rows)
    if "exact_match" in recipe.metrics:
        per_example["exact_match"] = exact_match_scores(predictions, references)
        metrics["exact_match"] = math.fsum(per_example["exact_match"]) / len(rows)
    if "bleu" in recipe.metrics:
        import sacrebleu

        metrics["bleu"], metrics["bleu_signature"] = bleu(predictions, references)
        per_example["bleu"] = [
            float(sacrebleu.sentence_bleu(p, [r]).score) for p, r in zip(predictions, references, strict=True)
        ]
    for n, row in enumerate(rows):
        row["scores"] = {k: v[n] for k, v in per_example.items()}
    return metrics, rows


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def _protocols(recipe: EvalRecipe, plan: ModelPlan, task: TaskSpec | None) -> dict[str, Any]:
    protocol: dict[str, Any] = {
        "llmkit_version": __version__,
        "data": describe(recipe.data.test),
        "max_samples": recipe.data.max_samples,
        "dtype": recipe.model.dtype,
    }
    if plan.seq_len is not None:
        protocol["perplexity"] = {
            "seq_len": plan.seq_len,
            "stride": plan.stride,
            "text_field": recipe.data.text_field,
            "tokens": "tokenizer(text) with special tokens; t_0 is never scored",
            "windows": "each document on its own; window k ends at e_k = min(seq_len + k*stride, L), "
            "starts at max(0, e_k - seq_len), scores t_i for max(1, e_{k-1}) <= i < e_k",
            "aggregation": "token-weighted: perplexity = exp(sum NLL / tokens); "
            "bits_per_byte = sum NLL / (ln 2 * UTF-8 bytes of the documents)",
        }
    if task is not None:
        protocol["task"] = {**task.model_dump(mode="json"), "source": plan.task_source}
        protocol["generation"] = recipe.generation.model_dump(mode="json")
    if "rouge" in recipe.metrics:
        protocol["rouge"] = {
            "implementation": "rouge_score RougeScorer(use_stemmer=True) F-measure, averaged over examples",
            "rougeLsum": "one sentence per line",
            "non_latin": "pairs with letters outside the Latin script use a script-preserving tokenizer "
            "(one token per Han/kana/Thai character, words otherwise)",
            "bootstrap_samples": recipe.rouge.bootstrap_samples,
            "confidence": recipe.rouge.confidence if recipe.rouge.bootstrap_samples else None,
            "seed": recipe.rouge.seed if recipe.rouge.bootstrap_samples else None,
        }
    if "accuracy" in recipe.metrics:
        protocol["accuracy"] = (
            "first generated line equals the label, ignoring case and surrounding whitespace"
        )
    if "exact_match" in recipe.metrics:
        protocol["exact_match"] = "prediction equals reference after collapsing whitespace"
    if "bleu" in recipe.metrics:
        protocol["bleu"] = "sacrebleu corpus BLEU (0-100), see bleu_signature"
    return protocol


def evaluate_model(
    recipe: EvalRecipe,
    plan: ModelPlan,
    located: list[tuple[str, dict]] | None,
    log,
    tasks: list[LikelihoodTask] | None = None,
) -> tuple[dict, list[dict]]:
    """Load one checkpoint and compute every metric of the recipe: ({model, metrics, protocol}, predictions)."""
    import torch

    world, _ = dist.world()
    device = None
    if world > 1:
        device = dist.process_state().device
    started = time.perf_counter()
    model, tokenizer = load_model(
        plan.path,
        recipe.tokenizer,
        recipe.model.dtype,
        recipe.model.attn_implementation,
        device=device,
        where=plan.where,
    )
    metrics: dict[str, Any] = {}
    timing: dict[str, float] = {}
    rows: list[dict] = []
    task = None
    if plan.seq_len is not None:
        data = recipe.data
        texts = list(iter_texts(data.test, data.text_field, data.max_samples, data.encoding_errors))
        t0 = time.perf_counter()
        totals = reduce_totals(
            perplexity(model, tokenizer, texts, plan.seq_len, plan.stride, recipe.data.batch_size)
        )
        ppl = totals.metrics()
        timing["tokens_per_second"] = totals.tokens / max(time.perf_counter() - t0, 1e-9)
        metrics.update(ppl)
        log(
            f"  perplexity {ppl['perplexity']:.4f}  bits/byte {ppl['bits_per_byte']:.4f}  ({ppl['tokens']:,} tokens, {ppl['documents']} documents)"
        )
    if plan.task is not None and located is not None:
        task = _task_with_labels(plan.task, [rec for _, rec in located])
        t0 = time.perf_counter()
        gen_metrics, rows = generation_metrics(model, tokenizer, recipe, task, located)
        timing["examples_per_second"] = len(rows) / max(time.perf_counter() - t0, 1e-9)
        metrics.update(gen_metrics)
        shown = "  ".join(
            f"{k} {gen_metrics[k]:.4f}"
            for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "accuracy", "exact_match")
            if k in gen_metrics
        )
        log(
            f"  {shown}  ({len(rows)} examples)"
            + (f"  bleu {gen_metrics['bleu']:.2f}" if "bleu" in gen_metrics else "")
        )
    scoring_protocol = None
    if tasks:
        t0 = time.perf_counter()
        scored, rows = likelihood_metrics(model, tokenizer, recipe, tasks)
        timing["examples_per_second"] = scored["examples"] / max(time.perf_counter() - t0, 1e-9)
        metrics.update(scored)
        scoring_protocol = likelihood_protocol(recipe, tasks, tokenizer, max_positions(model.config))
        shown = "  ".join(f"{k} {scored[k]:.4f}" for k in ("acc", "acc_norm", "target_perplexity") if k in scored)
        log(f"  {shown}  ({scored['examples']} examples, {scored['truncated']} contexts cut to fit the window)")
    timing["seconds"] = time.perf_counter() - started
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # Timings live apart from the metrics, so two runs of one eval give identical "metrics".
    result = {
        "model": plan.path,
        "metrics": metrics,
        "timing": timing,
        "protocol": _protocols(recipe, plan, task),
    }
    if scoring_protocol is not None:
        result["protocol"]["multiple_choice" if "multiple_choice" in recipe.metrics else "cloze"] = scoring_protocol
    return result, rows


def test_records(recipe: EvalRecipe) -> dict[str, Any] | None:
    """When data.max_samples caps the test set: how many records are scored out of how many there are.

    Local and built-in sources are counted whole; a hub dataset only up to one past the cap
    ("available": null means it holds more than the cap). None when nothing caps the test set.
    """
    cap = recipe.data.max_samples
    if cap is None:
        return None
    hub = any(not isinstance(s, str) or s.startswith("hub:") for s in recipe.data.test)
    located = iter_located_records(recipe.data.test, max_samples=cap + 1 if hub else None, encoding_errors=recipe.data.encoding_errors)
    available = sum(1 for _ in located)
    if hub and available > cap:
        return {"max_samples": cap, "scored": cap, "available": None}
    return {"max_samples": cap, "scored": min(cap, available), "available": available}


def _check_records(recipe: EvalRecipe, plans: list[ModelPlan]) -> list[tuple[str, dict]] | None:
    """Read the test records once and check each carries every field the tasks need (DataError otherwise)."""
    if not any(p.task is not None for p in plans):
        return None
    located = _located_records(recipe)
    for plan in plans:
        for where, record in located:
            prompts.check_record(plan.task, record, where)
    return located


COMPARISON_KEYS = (
    "perplexity", "nll", "bits_per_byte", "rouge1", "rouge2", "rougeL", "rougeLsum",
    "accuracy", "exact_match", "bleu", "acc", "acc_norm", "target_perplexity",
    "tokens_per_second", "examples_per_second",
)  # fmt: skip
LOWER_IS_BETTER = {"perplexity", "nll", "bits_per_byte", "target_perplexity"}
NOT_RANKED = {"tokens_per_second", "examples_per_second"}


def comparison(results: list[dict]) -> dict[str, Any]:
    """Rows of each model's headline metrics and the best model per metric."""
    values = [{**r["metrics"], **r.get("timing", {})} for r in results]
    keys = [k for k in COMPARISON_KEYS if any(k in v for v in values)]
    rows = [
        {"model": r["model"], **{k: v.get(k) for k in keys}} for r, v in zip(results, values, strict=True)
    ]
    best = {}
    for k in keys:
        if k in NOT_RANKED:
            continue
        values = [
            (row[k], row["model"])
            for row in rows
            if isinstance(row[k], (int, float)) and not math.isnan(row[k])
        ]
        if not values:
            continue
        top = (min if k in LOWER_IS_BETTER else max)(v for v, _ in values)
        winners = [model for v, model in values if v == top]
        if len(winners) == 1:  # a tie (e.g. every model at 0.0) has no best
            best[k] = winners[0]
    return {
        "metrics": keys,
        "models": rows,
        "best": best,
        "lower_is_better": sorted(LOWER_IS_BETTER & set(keys)),
    }


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("per_second"):
        return f"{value:,.1f}"
    if key == "bleu":
        return f"{value:.2f}"
    return f"{value:.4f}"


def comparison_table(table: dict[str, Any], markdown: bool = True) -> str:
    """The comparison as a Markdown table (best value in bold) or plain aligned text for the terminal."""
    keys = table["metrics"]
    header = ["model", *keys]
    body = []
    for row in table["models"]:
        cells = [row["model"]]
        for k in keys:
            cell = _fmt(k, row[k])
            if table["best"].get(k) == row["model"] and len(table["models"]) > 1:
                cell = f"**{cell}**" if markdown else f"{cell}*"
            cells.append(cell)
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(keys)) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        note = (
            "Best value per metric in bold; lower is better for "
            + (", ".join(table["lower_is_better"]) or "none")
            + "."
        )
        return "\n".join(lines) + "\n\n" + note + "\n"
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    lines = [
        "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        for cells in [header, *body]
    ]
    return "\n".join(lines) + "\n(* best)"


def run(recipe: EvalRecipe, overwrite: bool = False) -> dict[str, Any]:
    """`llmkit eval`: score every checkpoint of the recipe and write metrics.json, predictions.jsonl, comparison."""
    # One eval per output_dir at a time; taking the lock also proves output_dir writable before any scoring.
    with rundir.locked(recipe.output_dir):
        return _run(recipe, overwrite)


def _run(recipe: EvalRecipe, overwrite: bool) -> dict[str, Any]:
    world, rank = dist.world()
    is_main = rank == 0

    def log(message: str) -> None:
        if is_main:
            typer.echo(message, err=True)

    # 1. Validate everything cheap first: output_dir, checkpoints, windows, tasks, test records.
    rundir.claim(recipe, overwrite, what="eval")
    plans = plan_models(recipe)
    if "perplexity" in recipe.metrics:
        check_sources(recipe.data.test)
    located = _check_records(recipe, plans)
    tasks = likelihood_tasks(recipe)  # every multiple-choice / cloze record parsed before any model loads
    records = test_records(recipe)
    if records is not None and records["available"] != records["scored"]:
        of = f"{records['available']:,}" if records["available"] is not None else "more"
        log(
            f"note: data.max_samples ({records['max_samples']:,}) caps the test set: scoring the first "
            f"{records['scored']:,} of {of} records of {source_names(recipe.data.test)}; set data.max_samples=null to score them all"
        )

    # 2. Score each checkpoint in turn (one model in memory at a time).
    results, all_rows = [], []
    for plan in plans:
        log(f"scoring {plan.path}" + (f" on {world} processes" if world > 1 else ""))
        result, rows = evaluate_model(recipe, plan, located, log, tasks)
        if records is not None:
            result["protocol"]["test_records"] = records  # what max_samples left out, next to the numbers
        results.append(result)
        for row in rows:
            all_rows.append({"model": plan.path, **row} if len(plans) > 1 else row)

    # 3. Write the outputs (main process only), each atomically; metrics.json last marks completion.
    if not is_main:
        return {}
    out = recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    written = {"metrics.json", "recipe.yaml"}
    if all_rows:
        rundir.write_text_atomic(
            out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in all_rows)
        )
        written.add("predictions.jsonl")
    summary: dict[str, Any]
    if len(results) == 1:
        summary = results[0]
    else:
        table = comparison(results)
        rundir.write_text_atomic(out / "comparison.json", json.dumps(table, indent=2) + "\n")
        rundir.write_text_atomic(out / "comparison.md", comparison_table(table, markdown=True))
        written |= {"comparison.json", "comparison.md"}
        summary = {"models": results, "comparison": table}
        typer.echo(comparison_table(table, markdown=False))
    for stale in set(OUTPUT_FILES) - written:
        # Files of an earlier, different eval in this directory would now describe the wrong run.
        (out / stale).unlink(missing_ok=True)
    rundir.write_resolved(recipe, out)
    rundir.write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if len(results) == 1:
        for key, value in {**results[0]["metrics"], **results[0]["timing"]}.items():
            if isinstance(value, float):
                typer.echo(f"{key:<20} {_fmt(key, value)}")
            elif isinstance(value, int):
                typer.echo(f"{key:<20} {value:,}")
    log(f"wrote {out / 'metrics.json'}")
    return summary
