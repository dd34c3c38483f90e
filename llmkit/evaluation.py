"""`llmkit eval`: perplexity, ROUGE and task metrics of one or several checkpoints, reproducibly.

    llmkit eval eval/tiny
    llmkit eval eval/perplexity --set model.path=runs/pretrain-tiny --set data.stride=128
    accelerate launch -m llmkit eval eval/perplexity     # several processes: sums are reduced

Outputs in output_dir: metrics.json (values and the exact protocol), predictions.jsonl (input,
reference, prediction and per-example scores of generation metrics), recipe.yaml, and for several
checkpoints comparison.md / comparison.json. Files are written to a temporary name and renamed.

Perplexity protocol (DESIGN.md): each document on its own; its tokens t_0..t_{L-1} are what
`tokenizer(text)` returns; window k ends at e_k = min(seq_len + k*stride, L), starts at
s_k = max(0, e_k - seq_len) and scores t_i for max(1, e_{k-1}) <= i < e_k from t_{s_k}..t_{i-1}.
Perplexity = exp(sum NLL / scored tokens); bits per byte = sum NLL / (ln 2 * UTF-8 bytes).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmkit.errors import DataError, ModelError, RecipeError, RunDirError
from llmkit.recipes import EvalRecipe, TaskSpec

GENERATION_METRICS = ("rouge", "accuracy", "exact_match", "bleu")
OUTPUT_FILES = ("metrics.json", "predictions.jsonl", "comparison.md", "comparison.json", "recipe.yaml")
DEFAULT_MAX_SEQ_LEN = 1024


# ----------------------------------------------------------------------------------------------
# Task metrics
# ----------------------------------------------------------------------------------------------


def _normalize(text: str) -> str:
    return " ".join(str(text).split())


def exact_match_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where prediction and reference are equal after collapsing whitespace, else 0.0."""
    return [float(_normalize(p) == _normalize(r)) for p, r in zip(predictions, references, strict=True)]


def accuracy_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where the prediction's first line equals the label, ignoring case and surrounding whitespace."""
    out = []
    for p, r in zip(predictions, references, strict=True):
        first = str(p).strip().split("\n", 1)[0] if str(p).strip() else ""
        out.append(float(_normalize(first).casefold() == _normalize(r).casefold()))
    return out


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Classification accuracy (fraction): the first generated line equals the label, case-insensitively."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no examples to score")
    return math.fsum(accuracy_scores(predictions, references)) / len(predictions)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after collapsing whitespace."""
    if not predictions:
        raise ValueError("no examples to score")
    return math.fsum(exact_match_scores(predictions, references)) / len(predictions)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Corpus BLEU (0-100, sacrebleu's default 13a tokenizer) and sacrebleu's signature."""
    import sacrebleu

    metric = sacrebleu.metrics.BLEU()
    result = metric.corpus_score(list(predictions), [list(references)])
    return float(result.score), str(metric.get_signature())


# ----------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------


def perplexity_windows(length: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) of each window of a document of `length` tokens (DESIGN.md protocol)."""
    windows = []
    prev_end, k = 0, 0
    while prev_end < length:
        end = min(seq_len + k * stride, length)
        start = max(0, end - seq_len)
        first = max(1, prev_end)  # t_0 has no context, so it is never scored
        if first < end:
            windows.append((start, end, first))
        prev_end, k = end, k + 1
    return windows


@dataclass
class NllTotals:
    """Sums that combine across batches and processes by addition (never averages of averages)."""

    nll_sum: float = 0.0
    tokens: int = 0
    bytes: int = 0
    documents: int = 0

    def add(self, other: NllTotals) -> None:
        """Add another partial sum into this one."""
        self.nll_sum += other.nll_sum
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.documents += other.documents

    def metrics(self) -> dict[str, float]:
        """perplexity, nll (mean per token, nats), bits_per_byte and the counts behind them."""
        if self.tokens == 0:
            raise DataError("no tokens to score: every document is at most one token long")
        mean = self.nll_sum / self.tokens
        return {
            "perplexity": math.exp(mean),
            "nll": mean,
            "bits_per_byte": self.nll_sum / (math.log(2) * self.bytes) if self.bytes else float("nan"),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
        }


def _forward_accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def score_windows(
    model, token_ids: Sequence[Sequence[int]], windows, batch_size: int, pad_id: int = 0
) -> float:
    """Sum of NLL (float64) over the scored tokens of `windows` = [(doc, start, end, first), ...]."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    keep_logits = _forward_accepts(model, "logits_to_keep")
    use_positions = _forward_accepts(model, "position_ids")
    # Windows of equal width share a batch (most are exactly seq_len wide, so most batches need no
    # padding and no attention mask, which keeps SDPA on its fast causal kernels); within a width,
    # windows scoring a similar number of tokens go together, so the logits kept per batch (the
    # last `keep` positions of every left-padded row) are mostly needed ones.
    ordered = sorted(windows, key=lambda w: (w[2] - w[1], w[2] - w[3]), reverse=True)
    batches: list[list] = []
    for window in ordered:
        width = window[2] - window[1]
        last = batches[-1] if batches else None
        # A model that takes no position_ids would see shifted positions in a left-padded row,
        # so its batches hold windows of one width only.
        if (
            last is None
            or len(last) == batch_size
            or (not use_positions and last[0][2] - last[0][1] != width)
        ):
            batches.append([window])
        else:
            last.append(window)
    total = 0.0
    for batch in batches:
        width = max(end - start for _, start, end, _ in batch)
        keep = max(end - first for _, _, end, first in batch) + 1
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        position_ids = torch.zeros((len(batch), width), dtype=torch.long)
        targets = torch.full((len(batch), keep - 1), -100, dtype=torch.long)
        for r, (doc, start, end, first) in enumerate(batch):
            ids = torch.tensor(token_ids[doc][start:end], dtype=torch.long)
            n = end - start
            # Left padding aligns every row's scored tokens at the right edge.
            input_ids[r, width - n :] = ids
            attention_mask[r, width - n :] = 1
            position_ids[r, width - n :] = torch.arange(n)
            scored = end - first
            targets[r, keep - 1 - scored :] = ids[first - start :]
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device)}
        if not bool(attention_mask.all()):
            kwargs["attention_mask"] = attention_mask.to(device)
            if use_positions:
                kwargs["position_ids"] = position_ids.to(device)
        if keep_logits:
            kwargs["logits_to_keep"] = keep
        with torch.inference_mode():
            logits = model(**kwargs, use_cache=False).logits[:, -keep:-1, :]
            targets = targets.to(device)
            batch_nll = torch.zeros((), dtype=torch.float64, device=device)
            for r in range(logits.size(0)):
                # Per-token NLL in float32 whatever the model dtype, one row at a time so the float32
                # copy of the logits stays small with large vocabularies; ignored slots add exactly 0.
                nll = F.cross_entropy(logits[r].float(), targets[r], ignore_index=-100, reduction="none")
                batch_nll += nll.double().sum()
            total += float(batch_nll)
    return total


def perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    seq_len: int,
    stride: int,
    batch_size: int = 8,
) -> NllTotals:
    """Token-weighted NLL sums of `texts` under the sliding-window protocol (this process's share only).

    Under `accelerate launch`, each process scores documents i with i % world_size == rank; combine
    the returned totals with `reduce_totals`.
    """
    if stride >= seq_len:
        raise RecipeError(f"data.stride ({stride}) must be smaller than data.seq_len ({seq_len})")
    world, rank = _world()
    mine = [t for i, t in enumerate(texts) if i % world == rank]
    totals = NllTotals(documents=len(mine), bytes=sum(len(t.encode("utf-8")) for t in mine))
    if not mine:
        return totals
    token_ids = tokenizer(list(mine), add_special_tokens=True, verbose=False)["input_ids"]
    windows = [
        (d, *w) for d, ids in enumerate(token_ids) for w in perplexity_windows(len(ids), seq_len, stride)
    ]
    totals.tokens = sum(end - first for _, _, end, first in windows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    totals.nll_sum = score_windows(model, token_ids, windows, batch_size, pad_id)
    return totals


def _state():
    """accelerate's process state; gloo on CPU-only machines (accelerate picks no backend there unless told cpu=True)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _world() -> tuple[int, int]:
    """(world_size, rank) of an accelerate / torchrun launch, (1, 0) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        state = _state()
        return state.num_processes, state.process_index
    return 1, 0


def reduce_totals(totals: NllTotals) -> NllTotals:
    """Sum the totals of every process (a no-op in one process)."""
    world, _ = _world()
    if world == 1:
        return totals
    import torch
    import torch.distributed as dist

    state = _state()
    device = state.device if state.backend == "nccl" else "cpu"
    packed = torch.tensor(
        [totals.nll_sum, totals.tokens, totals.bytes, totals.documents], dtype=torch.float64, device=device
    )
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    nll_sum, tokens, nbytes, docs = packed.tolist()
    return NllTotals(
        nll_sum=nll_sum, tokens=int(round(tokens)), bytes=int(round(nbytes)), documents=int(round(docs))
    )


def _gather_lists(items: list) -> list:
    """Concatenate per-process lists in rank order (a no-op in one process)."""
    world, _ = _world()
    if world == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


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


def _read_config(path: str, where: str):
    from transformers import AutoConfig

    from llmkit.generation import where_failed

    local = Path(path)
    if local.is_dir() and not (local / "config.json").is_file() and (local / "adapter_config.json").is_file():
        adapter = json.loads((local / "adapter_config.json").read_text(encoding="utf-8"))
        path = adapter.get("base_model_name_or_path") or path
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{where}: {where_failed(path, exc)}") from None


def _task_from_run(path: str, where: str) -> tuple[TaskSpec, str]:
    from llmkit.recipes import load_recipe

    run_recipe = Path(path) / "recipe.yaml"
    if not run_recipe.is_file():
        raise RecipeError(
            f"task: not set, and {where} ({path}) has no recipe.yaml to read it from; "
            "add e.g. 'task: {type: summarization}' to the eval recipe"
        )
    try:
        loaded = load_recipe(run_recipe)
    except RecipeError as exc:
        raise RecipeError(
            f"task: not set, and {run_recipe} does not load ({exc}); set task in the eval recipe"
        ) from None
    task = getattr(loaded, "task", None)
    if loaded.stage != "finetune" or task is None:
        raise RecipeError(
            f"task: not set, and {run_recipe} is a {loaded.stage} recipe, not a finetune one; "
            "add e.g. 'task: {type: summarization}' to the eval recipe"
        )
    return task, str(run_recipe)


def plan_models(recipe: EvalRecipe) -> list[ModelPlan]:
    """Check every checkpoint, window and task of the recipe; RecipeError/ModelError before loading weights."""
    from llmkit.generation import check_model_dir
    from llmkit.modeling import max_positions

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
        limit = max_positions(_read_config(path, where))
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


def _check_output_dir(recipe: EvalRecipe, overwrite: bool) -> None:
    """RunDirError when output_dir holds something other than this same eval (unless overwrite)."""
    from llmkit.recipes import recipe_to_yaml

    out = recipe.output_dir
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output_dir: {out} is a file; choose a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    existing = out / "recipe.yaml"
    if existing.is_file():
        try:
            previous = yaml.safe_load(existing.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            previous = {}
        stage = previous.get("stage") if isinstance(previous, dict) else None
        if stage not in (None, "eval"):
            raise RunDirError(
                f"output_dir: {out} holds a {stage} run; write the eval to its own directory (e.g. {out / 'eval'})"
            )
        if existing.read_text(encoding="utf-8") == recipe_to_yaml(recipe):
            return  # the same eval again: recompute and replace
        if not overwrite:
            changed = _first_difference(previous, yaml.safe_load(recipe_to_yaml(recipe)))
            raise RunDirError(
                f"output_dir: {out} holds a different eval ({changed} differs); pass --overwrite or choose another output_dir"
            )
        return
    if not overwrite:
        raise RunDirError(
            f"output_dir: {out} is not empty and holds no eval recipe.yaml; pass --overwrite or choose another output_dir"
        )


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".") or "the recipe"


# ----------------------------------------------------------------------------------------------
# Generation metrics
# ----------------------------------------------------------------------------------------------


def _located_records(recipe: EvalRecipe) -> list[tuple[str, dict]]:
    """(where, record) pairs of data.test, `where` naming file and line for error messages."""
    from llmkit.sources import iter_located_records

    return list(iter_located_records(recipe.data.test, max_samples=recipe.data.max_samples))


def _task_with_labels(task: TaskSpec, records: list[dict]) -> TaskSpec:
    from llmkit.tasks import label_set, task_defaults

    task = task_defaults(task)
    if task.type == "classification" and not task.labels:
        task = task.model_copy(update={"labels": label_set(task, records)})
    return task


def generation_metrics(
    model,
    tokenizer,
    recipe: EvalRecipe,
    task: TaskSpec,
    located: list[tuple[str, dict]],
) -> tuple[dict[str, Any], list[dict]]:
    """Generate for every test record and score; returns (metrics, prediction rows)."""
    from llmkit.generation import generate_ids
    from llmkit.metrics.rouge import aggregate, per_example_scores
    from llmkit.modeling import max_positions
    from llmkit.tasks import format_record, prompt_token_ids

    world, rank = _world()
    limit = max_positions(model.config)
    max_prompt = None if limit is None else max(1, limit - recipe.generation.max_new_tokens)
    mine = [(i, where, rec) for i, (where, rec) in enumerate(located) if i % world == rank]
    formatted = [
        format_record(task, rec, tokenizer, max_prompt_tokens=max_prompt, where=where)
        for _, where, rec in mine
    ]
    prompt_ids = [prompt_token_ids(tokenizer, f.prompt) for f in formatted]
    texts = [
        t[0] for t in generate_ids(model, tokenizer, prompt_ids, recipe.generation, recipe.data.batch_size)
    ]
    rows = [
        {"id": i, "input": f.prompt, "reference": f.target, "prediction": text.strip()}
        for (i, _, _), f, text in zip(mine, formatted, texts, strict=True)
    ]
    rows = sorted(_gather_lists(rows), key=lambda r: r["id"])
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
    from llmkit import __version__
    from llmkit.sources import describe

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
    recipe: EvalRecipe, plan: ModelPlan, located: list[tuple[str, dict]] | None, log
) -> tuple[dict, list[dict]]:
    """Load one checkpoint and compute every metric of the recipe: ({model, metrics, protocol}, predictions)."""
    import torch

    from llmkit.generation import load_model
    from llmkit.sources import iter_texts

    world, rank = _world()
    device = None
    if world > 1:
        device = _state().device
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
        texts = list(iter_texts(recipe.data.test, recipe.data.text_field, recipe.data.max_samples))
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
    return result, rows


def _check_records(recipe: EvalRecipe, plans: list[ModelPlan]) -> list[tuple[str, dict]] | None:
    """Read the test records once and check each carries every field the tasks need (DataError otherwise)."""
    from llmkit.tasks import check_record

    if not any(p.task is not None for p in plans):
        return None
    located = _located_records(recipe)
    for plan in plans:
        for where, record in located:
            check_record(plan.task, record, where)
    return located


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


COMPARISON_KEYS = (
    "perplexity", "nll", "bits_per_byte", "rouge1", "rouge2", "rougeL", "rougeLsum",
    "accuracy", "exact_match", "bleu", "tokens_per_second", "examples_per_second",
)  # fmt: skip
LOWER_IS_BETTER = {"perplexity", "nll", "bits_per_byte"}
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


def evaluate_recipe(recipe: EvalRecipe, overwrite: bool = False) -> dict[str, Any]:
    """`llmkit eval`: score every checkpoint of the recipe and write metrics.json, predictions.jsonl, comparison."""
    import typer

    from llmkit.recipes import write_resolved

    world, rank = _world()
    is_main = rank == 0

    def log(message: str) -> None:
        if is_main:
            typer.echo(message, err=True)

    # 1. Validate everything cheap first: output_dir, checkpoints, windows, tasks, test records.
    _check_output_dir(recipe, overwrite)
    plans = plan_models(recipe)
    if "perplexity" in recipe.metrics:
        from llmkit.sources import check_sources

        check_sources(recipe.data.test)
    located = _check_records(recipe, plans)

    # 2. Score each checkpoint in turn (one model in memory at a time).
    results, all_rows = [], []
    for plan in plans:
        log(f"scoring {plan.path}" + (f" on {world} processes" if world > 1 else ""))
        result, rows = evaluate_model(recipe, plan, located, log)
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
        _write_atomic(
            out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in all_rows)
        )
        written.add("predictions.jsonl")
    summary: dict[str, Any]
    if len(results) == 1:
        summary = results[0]
    else:
        table = comparison(results)
        _write_atomic(out / "comparison.json", json.dumps(table, indent=2) + "\n")
        _write_atomic(out / "comparison.md", comparison_table(table, markdown=True))
        written |= {"comparison.json", "comparison.md"}
        summary = {"models": results, "comparison": table}
        typer.echo(comparison_table(table, markdown=False))
    for stale in set(OUTPUT_FILES) - written:
        # Files of an earlier, different eval in this directory would now describe the wrong run.
        (out / stale).unlink(missing_ok=True)
    write_resolved(recipe, out)
    _write_atomic(out / "metrics.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if len(results) == 1:
        for key, value in {**results[0]["metrics"], **results[0]["timing"]}.items():
            if isinstance(value, float):
                typer.echo(f"{key:<20} {_fmt(key, value)}")
            elif isinstance(value, int):
                typer.echo(f"{key:<20} {value:,}")
    log(f"wrote {out / 'metrics.json'}")
    return summary
