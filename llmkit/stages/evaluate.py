"""`llmkit eval`: score one or several checkpoints with the evaluators of llmkit/evals/, reproducibly.

    llmkit eval eval/tiny
    llmkit eval eval/perplexity --set model.path=runs/pretrain-tiny --set data.stride=128
    llmkit eval eval/choice-tiny        # multiple choice on a built-in task, as lm-evaluation-harness scores it
    llmkit eval eval/arithmetic         # a generative task: few-shot prompt, generated answer, extracted number
    llmkit eval eval/suite-tiny         # several tasks, one suite score per checkpoint
    accelerate launch -m llmkit eval eval/perplexity     # several processes: sums are reduced

This stage orchestrates: check every task (records parsed, no weights), plan every checkpoint
(windows, prompt budgets), load one model at a time and score every task with the same evaluators the
training loop's train.evals uses (llmkit/evals/scoring.py), then write the outputs. What each number
means is stated once, by its evaluator, in metrics.json's protocol.

Outputs in output_dir: metrics.json (values and the exact protocol), predictions.jsonl (per-example
rows), recipe.yaml, and for several checkpoints or a suite comparison.md / comparison.json. Files are
written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import typer

from llmkit import dist, prompts, rundir
from llmkit.data.sources import iter_located_records, source_names
from llmkit.errors import RecipeError
from llmkit.evals.base import EvalContext
from llmkit.evals.scoring import TaskRun, plan_tasks, prepare_tasks, progress_bars, prompt_label, score_task
from llmkit.evals.suite import SUITE_PROTOCOL, suite_score
from llmkit.models import check_causal, check_model_dir, checkpoint_config, load_model
from llmkit.recipes import EvalRecipe, EvalTask, TaskSpec
from llmkit.training import parallelism
from llmkit.training.hardware import threads_note

OUTPUT_FILES = ("metrics.json", "predictions.jsonl", "comparison.md", "comparison.json", "recipe.yaml")


def task_from_run(path: str, where: str) -> tuple[TaskSpec, str]:
    """The task a fine-tuning run was trained on, read the one way (llmkit/prompts.py `run_prompt`)."""
    trained = prompts.run_prompt(path)  # an intermediate checkpoint's task is its run's
    if trained.task is None:
        raise RecipeError(
            f"task: not set, and {where} ({path}) is not a fine-tuning run to read it from ({trained.reason}); "
            "add e.g. 'task: {type: summarization}' to the eval recipe"
        )
    return trained.task, trained.source


def check_checkpoints(recipe: EvalRecipe) -> list[tuple[str, str]]:
    """(path, where) of every checkpoint, each checked to be a causal model directory (no weights read)."""
    paths = recipe.model.paths
    if not paths:
        raise RecipeError("model.path: the list of checkpoints is empty")
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise RecipeError(f"model.path: {dup} is listed twice")
    out = []
    for i, path in enumerate(paths):
        where = "model.path" if isinstance(recipe.model.path, str) else f"model.path[{i}]"
        check_model_dir(path, where, recipe.tokenizer)
        check_causal(checkpoint_config(path, where), where, path)  # an encoder's perplexity would be scored with the answer in view
        out.append((path, where))
    return out


def test_records(task: EvalTask) -> dict[str, Any] | None:
    """When data.max_samples caps the test set: how many records are scored out of how many there are.

    Local and built-in sources are counted whole; a hub dataset only up to one past the cap
    ("available": null means it holds more than the cap). None when nothing caps the test set.
    """
    cap = task.data.max_samples
    if cap is None or task.data.test is None:
        return None
    hub = any(not isinstance(s, str) or s.startswith("hub:") for s in task.data.test)
    located = iter_located_records(task.data.test, max_samples=cap + 1 if hub else None, encoding_errors=task.data.encoding_errors)
    available = sum(1 for _ in located)
    if hub and available > cap:
        return {"max_samples": cap, "scored": cap, "available": None}
    return {"max_samples": cap, "scored": min(cap, available), "available": available}


# ----------------------------------------------------------------------------------------------
# Scoring one checkpoint
# ----------------------------------------------------------------------------------------------


def _suite_metrics(runs: list[TaskRun], tasks: dict[str, dict]) -> dict[str, Any]:
    """The flat metrics of a suite: suite_score, suite_centered, then TASK/METRIC for each task's shown metrics."""
    suite = suite_score(runs, tasks)
    flat = {k: v for k, v in suite.items() if k != "suite_tasks"}
    for run in runs:
        shown = [k for e in run.evaluators for k in e.metrics_shown()]
        for key in shown:
            value = tasks[run.label]["metrics"].get(key)
            if isinstance(value, (int, float)):
                flat[f"{run.label}/{key}"] = value
    return {"metrics": flat, "suite": suite}


def evaluate_model(recipe: EvalRecipe, runs: list[TaskRun], path: str, where: str, log) -> tuple[dict, list[dict]]:
    """Load one checkpoint and score every task: ({model, metrics, timing, protocol[, tasks, suite]}, prediction rows)."""
    import torch

    config = checkpoint_config(path, where)
    plans = plan_tasks(runs, path, config, where)
    device = dist.process_state().device if dist.world()[0] > 1 else None
    started = time.perf_counter()
    model, tokenizer = load_model(path, recipe.tokenizer, recipe.model.dtype, recipe.model.attn_implementation, device=device, where=where)
    tasks: dict[str, dict] = {}
    rows: list[dict] = []
    for run, task_plans in zip(runs, plans, strict=True):
        if recipe.suite:
            log(f" task {run.label}")
        result = score_task(run, task_plans, model, tokenizer, progress_bars, log)
        records = test_records(run.task)
        if records is not None:
            result["protocol"]["test_records"] = records  # what max_samples left out, next to the numbers
        rows += [{"task": run.label, **r} for r in result.pop("rows")] if recipe.suite else result.pop("rows")
        tasks[run.label] = result
    seconds = time.perf_counter() - started
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # Timings live apart from the metrics, so two runs of one eval give identical "metrics".
    if not recipe.suite:
        only = tasks[runs[0].label]
        return {"model": path, "metrics": only["metrics"], "timing": {**only["timing"], "seconds": seconds}, "protocol": only["protocol"]}, rows
    suite = _suite_metrics(runs, tasks)
    result = {
        "model": path,
        "metrics": suite["metrics"],
        "timing": {"seconds": seconds},
        "protocol": {"suite": SUITE_PROTOCOL, "prompts": {label: prompt_label(t["protocol"].get("prompt")) for label, t in tasks.items()}},
        "suite": suite["suite"],
        "tasks": tasks,
    }
    log(f"  suite_score {suite['metrics'].get('suite_score', float('nan')):.4f}  suite_centered {suite['metrics'].get('suite_centered', float('nan')):.4f}")
    return result, rows


# ----------------------------------------------------------------------------------------------
# Comparison of several checkpoints
# ----------------------------------------------------------------------------------------------

COMPARISON_KEYS = (
    "perplexity", "nll", "bits_per_byte", "rouge1", "rouge2", "rougeL", "rougeLsum",
    "accuracy", "exact_match", "bleu", "acc", "acc_norm", "target_perplexity",
)  # fmt: skip
TIMING_KEYS = ("tokens_per_second", "examples_per_second")
LOWER_IS_BETTER = {"perplexity", "nll", "bits_per_byte", "target_perplexity"}
NOT_RANKED = set(TIMING_KEYS)


def _lower_is_better(key: str) -> bool:
    return key in LOWER_IS_BETTER or key.rsplit("/", 1)[-1] in LOWER_IS_BETTER


def comparison_keys(results: list[dict]) -> list[str]:
    """The table's columns: headline metrics present in any result (suite and per-task ones in order), then throughput."""
    values = [{**r["metrics"], **r.get("timing", {})} for r in results]
    first = results[0]["metrics"]
    if "suite" in results[0]:
        return [k for k in first if isinstance(first[k], (int, float))]
    keys = [k for k in COMPARISON_KEYS if any(k in v for v in values)]
    keys += [k for k in first if k.startswith(("exact_match/", "numeric_match/"))]
    return keys + [k for k in TIMING_KEYS if any(k in v for v in values)]


def comparison(results: list[dict], prompts: dict[str, str] | None = None) -> dict[str, Any]:
    """Rows of each model's headline metrics, the best model per metric, and each task's prompt protocol."""
    values = [{**r["metrics"], **r.get("timing", {})} for r in results]
    keys = comparison_keys(results)
    rows = [{"model": r["model"], **{k: v.get(k) for k in keys}} for r, v in zip(results, values, strict=True)]
    best = {}
    for k in keys:
        if k in NOT_RANKED:
            continue
        scored = [(row[k], row["model"]) for row in rows if isinstance(row[k], (int, float)) and not math.isnan(row[k])]
        if not scored:
            continue
        top = (min if _lower_is_better(k) else max)(v for v, _ in scored)
        winners = [model for v, model in scored if v == top]
        if len(winners) == 1:  # a tie (e.g. every model at 0.0) has no best
            best[k] = winners[0]
    return {
        "metrics": keys,
        "models": rows,
        "best": best,
        "lower_is_better": [k for k in keys if _lower_is_better(k)],
        "prompts": prompts or {},
    }


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("per_second"):
        return f"{value:,.1f}"
    if key.rsplit("/", 1)[-1] == "bleu":
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
    prompts = "; ".join(f"{task}: {label}" for task, label in table.get("prompts", {}).items())
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(keys)) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        note = "Best value per metric in bold; lower is better for " + (", ".join(table["lower_is_better"]) or "none") + "."
        if prompts:
            note += f"\n\nPrompt protocol: {prompts}."
        return "\n".join(lines) + "\n\n" + note + "\n"
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    lines = [
        "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        for cells in [header, *body]
    ]
    return "\n".join(lines) + "\n(* best)" + (f"\nprompt protocol: {prompts}" if prompts else "")


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def run(recipe: EvalRecipe, overwrite: bool = False) -> dict[str, Any]:
    """`llmkit eval`: score every checkpoint of the recipe and write metrics.json, predictions.jsonl, comparison."""
    parallelism.check_replicated("eval")  # before output_dir is touched
    # One eval per output_dir at a time; taking the lock also proves output_dir writable before any scoring.
    with rundir.locked(recipe.output_dir):
        return _run(recipe, overwrite)


def _run(recipe: EvalRecipe, overwrite: bool) -> dict[str, Any]:
    world, rank = dist.world()
    is_main = rank == 0

    def log(message: str) -> None:
        if is_main:
            typer.echo(message, err=True)

    # 1. Validate everything cheap first: output_dir, checkpoints, every task's records and options.
    rundir.claim(recipe, overwrite, what="eval")
    checkpoints = check_checkpoints(recipe)
    context = EvalContext(dtype=recipe.model.dtype, resolve_task=task_from_run)
    runs = prepare_tasks(recipe.tasks(), context)
    for path, where in checkpoints:  # windows and budgets of every checkpoint, before any weights load
        plan_tasks(runs, path, checkpoint_config(path, where), where)
    for run in runs:
        records = test_records(run.task)
        if records is not None and records["available"] != records["scored"]:
            of = f"{records['available']:,}" if records["available"] is not None else "more"
            log(
                f"note: data.max_samples ({records['max_samples']:,}) caps the test set: scoring the first "
                f"{records['scored']:,} of {of} records of {source_names(run.task.data.test)}; set data.max_samples=null to score them all"
            )

    if threads_note():
        log(f"threads: {threads_note()}")

    # 2. Score each checkpoint in turn (one model in memory at a time).
    results, all_rows = [], []
    for path, where in checkpoints:
        log(f"scoring {path}" + (f" on {world} processes" if world > 1 else ""))
        result, rows = evaluate_model(recipe, runs, path, where, log)
        results.append(result)
        all_rows += [{"model": path, **row} if len(checkpoints) > 1 else row for row in rows]

    # 3. Write the outputs (main process only), each atomically; metrics.json last marks completion.
    if not is_main:
        return {}
    out = recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    written = {"metrics.json", "recipe.yaml"}
    if all_rows:
        rundir.write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in all_rows))
        written.add("predictions.jsonl")
    summary: dict[str, Any]
    if len(results) == 1 and not recipe.suite:
        summary = results[0]
    else:
        prompts = results[0]["protocol"]["prompts"] if recipe.suite else {runs[0].label: prompt_label(results[0]["protocol"].get("prompt"))}
        table = comparison(results, prompts)
        rundir.write_text_atomic(out / "comparison.json", json.dumps(table, indent=2) + "\n")
        rundir.write_text_atomic(out / "comparison.md", comparison_table(table, markdown=True))
        written |= {"comparison.json", "comparison.md"}
        summary = results[0] if len(results) == 1 else {"models": results}
        summary = {**summary, "comparison": table}
        typer.echo(comparison_table(table, markdown=False))
    for stale in set(OUTPUT_FILES) - written:
        # Files of an earlier, different eval in this directory would now describe the wrong run.
        (out / stale).unlink(missing_ok=True)
    rundir.write_resolved(recipe, out)
    rundir.write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if len(results) == 1 and not recipe.suite:
        for key, value in {**results[0]["metrics"], **results[0]["timing"]}.items():
            if isinstance(value, float):
                typer.echo(f"{key:<20} {_fmt(key, value)}")
            elif isinstance(value, int):
                typer.echo(f"{key:<20} {value:,}")
    log(f"wrote {out / 'metrics.json'}")
    return summary
