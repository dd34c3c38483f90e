"""A sweep's points: one pretrain recipe per (size, tokens), derived from a base recipe, and their records.

    llmkit validate scale/cpu-tiny            # the points this plans, without running any
    llmkit scale sweep scale/cpu-tiny         # runs them (llmkit/stages/scale.py)

How a point's recipe is made from the sweep recipe (llmkit/recipes.py `ScaleRecipe`):

1. the base pretrain recipe, with the sweep's `overrides` set by dotted key;
2. its size keys removed (layers, hidden, heads, kv heads, intermediate, head_dim: put any size that
   must stay fixed in `overrides`) and the size dial set: model.target_params = the point's size,
   counted as the sweep's param_convention (llmkit/scaling/shapes.py picks the shape);
3. train.max_tokens = the point's tokens (max_steps dropped); warmup the same fraction of the steps as
   in the base; validation only at the end (eval_every = the point's steps: the fit uses the final
   loss); output_dir = SWEEP/points/NAME;
4. the learning rate by `lr_rule`: constant (the base's train.lr), or inverse_sqrt:
   lr = base lr x (N_base / N)^0.5, N_base the base model's size in the same convention (min_lr alike).
   The batch is the base's for every point.

IsoFLOP grids (`grid.flops`): for each budget C the sizes are `sizes_per_budget` values log-spaced
from N_opt / size_spread to N_opt x size_spread around the law's optimum N_opt(C) (Epoch AI's
Chinchilla refit, or `grid.center_fit`), and each size N trains on D = C / (6 N) tokens, N being the
count of the shape actually built, so that 6 N D = C in the sweep's convention. Two sizes that give
the same shape are one point.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from llmkit import dist
from llmkit.errors import RecipeError
from llmkit.models import meta_model, model_config, parameter_counts
from llmkit.recipes import (
    DuplicateKeyError,
    PretrainRecipe,
    ScaleRecipe,
    load_yaml,
    recipe_from_dict,
    resolve_recipe_path,
)
from llmkit.scaling import laws, shapes
from llmkit.scaling.fit import MIN_POINTS_CHINCHILLA, MIN_POINTS_ONE_VARIABLE, compute_optimal

POINTS = "points"
RECORD = "scale-point.json"  # in each point's run directory once it has finished
MIN_STEPS = 10
RECORD_FIELDS = (
    "name", "N", "D", "C", "loss", "param_convention", "params_total", "params_non_embedding", "params_matmul",
    "target_params", "budget_flops", "layers", "hidden", "heads", "kv_heads", "intermediate", "steps",
    "tokens_per_step", "lr", "epochs", "val_tokens", "flops_per_token", "wall_s", "tokens_per_s", "resumed_from", "run_dir",
)
"""The columns of sweep.jsonl and sweep.csv, in order (N, D, C, loss are what `llmkit scale fit` reads)."""


@dataclass
class Point:
    """One run of the sweep."""

    name: str
    target_params: int
    budget_flops: float | None
    recipe: PretrainRecipe  # sizes explicit, as trained
    sized: shapes.SizedModel
    tokens: int  # planned D (train.max_tokens)
    steps: int

    @property
    def N(self) -> int:
        """Parameters in the sweep's convention."""
        return self.sized.counts[self.sized.convention]


@dataclass
class Plan:
    """The base recipe as the sweep uses it, and every point."""

    base: PretrainRecipe
    base_where: str
    base_params: int | None  # the base model's size in the sweep's convention (for lr_rule inverse_sqrt)
    points: list[Point]
    notes: list[str]


def _short(value: float) -> str:
    """2.5e6 -> '2.5m', 50000 -> '50k': compact, stable point names."""
    for suffix, scale in (("t", 1e12), ("b", 1e9), ("m", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def set_dotted(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set data[a][b][c] for key 'a.b.c', creating sections as needed; a mapping value is merged into a section."""
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise RecipeError(f"{where}: overrides.{key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        # {data: {cache_dir: x}} (what --set overrides.data.cache_dir=x makes) changes one key of data, not all of it.
        for sub, sub_value in value.items():
            set_dotted(node[last], str(sub), sub_value, where)
    else:
        node[last] = value


def base_mapping(recipe: ScaleRecipe, keep_sizes: bool = True) -> tuple[dict[str, Any], str]:
    """The base recipe as a raw mapping with the sweep's overrides set, and a label naming both for errors.

    keep_sizes=False drops the base's own model sizes and size dial first (the overrides may set some again).
    """
    path = resolve_recipe_path(recipe.base, "pretrain")
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except DuplicateKeyError as exc:
        raise RecipeError(f"base: {path}:{exc.line}: {exc.key}: duplicate key (first at line {exc.first})") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"base: {path}: cannot read it as YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"base: {path}: a recipe must be a YAML mapping")
    where = f"{path} (base of {recipe.output_dir}, with its overrides)"
    model = data.get("model")
    if not keep_sizes and isinstance(model, dict) and model.get("type"):
        drop = shapes.size_keys(str(model["type"])) | {"target_params", "depth"}
        data["model"] = {k: v for k, v in model.items() if k not in drop}
    for key, value in recipe.overrides.items():
        set_dotted(data, key, value, where)
        if key in ("train.max_steps", "train.max_tokens") and isinstance(data.get("train"), dict):
            data["train"].pop("max_tokens" if key.endswith("max_steps") else "max_steps", None)
    return data, where


def base_recipe(recipe: ScaleRecipe, keep_sizes: bool = True) -> tuple[PretrainRecipe, str]:
    """The validated base pretrain recipe of a sweep (overrides applied), and where it came from."""
    path = resolve_recipe_path(recipe.base, "pretrain")
    stage = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stage", "pretrain")
    if stage != "pretrain":
        raise RecipeError(f"base: {path} is a {stage} recipe; a sweep's base is a pretrain recipe")
    data, where = base_mapping(recipe, keep_sizes)
    if (data.get("model") or {}).get("path") is not None:
        raise RecipeError(f"base: {where} continues a checkpoint (model.path); a sweep builds its models from model.type")
    base = recipe_from_dict(data, where=where, stage="pretrain")
    if not base.data.validation and not base.data.validation_fraction:
        raise RecipeError(
            f"base: {where} has no held-out text; every point is scored on the same validation data: "
            "set data.validation (or data.validation_fraction) in the base or the overrides"
        )
    shapes.family_of(base.model.type, "base: model.type")
    return base, where


def tokens_per_step(recipe: PretrainRecipe, world_size: int | None = None) -> int:
    """Tokens of one optimizer step over all processes."""
    train = recipe.train
    return train.micro_batch_size * train.grad_accum_steps * recipe.data.seq_len * (world_size or dist.world_size())


def _base_steps(base: PretrainRecipe) -> int:
    return base.train.max_steps or math.ceil(base.train.max_tokens / tokens_per_step(base))


def model_size(recipe: PretrainRecipe, vocab_size: int | None, convention: str) -> int:
    """A recipe's model size in a convention (its dial resolved), counted on the meta device."""
    sized = shapes.sized_recipe(recipe, vocab_size)
    return parameter_counts(meta_model(model_config(sized, vocab_size)))[convention]


def center_law(recipe: ScaleRecipe) -> laws.Law:
    """The law that places an IsoFLOP grid's sizes: grid.center_fit, or Epoch AI's constants."""
    return laws.load_law(Path(recipe.grid.center_fit)) if recipe.grid.center_fit else laws.epoch_law()


def _targets(recipe: ScaleRecipe) -> list[tuple[int, float | None, int | None]]:
    """(target size, FLOP budget or None, tokens or None-for-IsoFLOP) per planned point, in grid order."""
    grid = recipe.grid
    if grid.flops is None:
        return [(size, None, tokens) for size in grid.sizes for tokens in grid.tokens]
    law = center_law(recipe)
    out = []
    for C in grid.flops:
        center = compute_optimal(law.fit, C).N_params
        for exponent in np.linspace(-1.0, 1.0, grid.sizes_per_budget):
            out.append((max(1, int(round(center * grid.size_spread**exponent))), float(C), None))
    return out


def plan(recipe: ScaleRecipe, vocab_size: int | None) -> Plan:
    """Every point of a sweep with its recipe and shape; RecipeError for a grid that cannot be fitted or run."""
    base, where = base_recipe(recipe)
    unsized, _ = base_recipe(recipe, keep_sizes=False)
    convention = recipe.param_convention
    per_step = tokens_per_step(base)
    warmup_fraction = base.train.warmup_steps / _base_steps(base)
    base_params = model_size(base, vocab_size, convention) if recipe.lr_rule == "inverse_sqrt" else None
    points: list[Point] = []
    notes: list[str] = []
    seen: dict[tuple, str] = {}
    for target, budget, tokens in _targets(recipe):
        dial = unsized.model.model_copy(update={"target_params": target, "param_convention": convention})
        sized_base = unsized.model_copy(update={"model": dial})
        sized = shapes.choose(sized_base, vocab_size)
        N = sized.counts[convention]
        if budget is not None:
            tokens = max(1, int(round(budget / (6.0 * N))))
            name = f"c{budget:.3g}_n{_short(N)}".replace("+", "")
        else:
            name = f"n{_short(target)}_d{_short(tokens)}"
        key = (budget or tokens, sized.shape)
        if key in seen:
            notes.append(f"size {target:,} gives the same shape as point {seen[key]}: one point")
            continue
        seen[key] = name
        steps = math.ceil(tokens / per_step)
        if steps < MIN_STEPS:
            raise RecipeError(
                f"grid: point {name} trains {tokens:,} tokens = {steps} optimizer step(s) of {per_step:,} tokens; "
                f"give it {MIN_STEPS}+ steps: more tokens, or a smaller batch in overrides (train.micro_batch_size)"
            )
        lr_scale = 1.0 if base_params is None else math.sqrt(base_params / N)
        train = {
            "max_tokens": tokens, "max_steps": None, "warmup_steps": int(round(warmup_fraction * steps)),
            "lr": base.train.lr * lr_scale, "min_lr": base.train.min_lr * lr_scale, "eval_every": steps,
        }
        point_recipe = shapes.sized_recipe(sized_base, vocab_size).model_copy(update={
            "output_dir": Path(recipe.output_dir) / POINTS / name,
            "train": base.train.model_copy(update=train),
        })
        # Validate the point as a whole (model_copy does not): the same checks `llmkit pretrain` makes.
        point_recipe = recipe_from_dict(json.loads(json.dumps(point_recipe.model_dump(mode="json"))), where=f"{where}, point {name}")
        points.append(Point(name, target, budget, point_recipe, sized, tokens, steps))
    _check_enough(points, recipe)
    return Plan(base, where, base_params, points, notes)


def _check_enough(points: list[Point], recipe: ScaleRecipe) -> None:
    """RecipeError when the grid has too few points for the law it can fit."""
    sizes = {p.sized.shape for p in points}
    tokens = {p.tokens for p in points}
    if len(sizes) > 1 and len(tokens) > 1:
        need, law = MIN_POINTS_CHINCHILLA, "L(N, D) (5 constants)"
    else:
        need, law = MIN_POINTS_ONE_VARIABLE, f"a one-variable law in {'N' if len(sizes) > 1 else 'D'} (3 constants)"
    if len(points) < need:
        raise RecipeError(
            f"grid: {len(points)} point(s) ({len(sizes)} shape(s) x {len(tokens)} token budget(s)); fitting {law} "
            f"needs at least {need}: add sizes, tokens or FLOP budgets"
        )


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


def point_dir(recipe: ScaleRecipe, name: str) -> Path:
    """SWEEP/points/NAME."""
    return Path(recipe.output_dir) / POINTS / name


def tokens_per_second(metrics_path: Path) -> float | None:
    """Training throughput of a run: its tokens over the time of its logged train windows (evaluation and saving excluded)."""
    if not metrics_path.is_file():
        return None
    seen = total = seconds = 0.0
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") != "train" or not event.get("tokens_per_s"):
            continue
        window = event["tokens"] - seen
        seen = event["tokens"]
        total += window
        seconds += window / event["tokens_per_s"]
    return total / seconds if seconds > 0 else None


def last_eval(metrics_path: Path) -> dict[str, Any]:
    """The last eval event of a run's metrics.jsonl ({} when there is none)."""
    found: dict[str, Any] = {}
    if metrics_path.is_file():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "eval":
                found = event
    return found


def make_record(point: Point, summary: dict[str, Any], wall_s: float, available_tokens: int | None) -> dict[str, Any]:
    """The row of sweep.jsonl for a finished point (RECORD_FIELDS), from its pretrain summary and metrics."""
    run_dir = Path(point.recipe.output_dir)
    counts, shape = point.sized.counts, point.sized.shape
    D = int(summary["tokens"])
    evaluation = last_eval(run_dir / "metrics.jsonl")
    if summary.get("val_loss") is None:
        raise RecipeError(f"point {point.name}: the run has no validation loss; the base recipe needs data.validation")
    record = {
        "name": point.name, "N": point.N, "D": D, "C": 6.0 * point.N * D, "loss": float(summary["val_loss"]),
        "param_convention": point.sized.convention, "params_total": counts["total"],
        "params_non_embedding": counts["non_embedding"], "params_matmul": counts["matmul"],
        "target_params": point.target_params, "budget_flops": point.budget_flops, "layers": shape.layers,
        "hidden": shape.hidden, "heads": shape.heads, "kv_heads": shape.kv_heads, "intermediate": shape.intermediate,
        "steps": int(summary["step"]), "tokens_per_step": tokens_per_step(point.recipe), "lr": point.recipe.train.lr,
        "epochs": float(f"{D / available_tokens:.6g}") if available_tokens else None, "val_tokens": evaluation.get("val_tokens"),
        "flops_per_token": summary.get("flops_per_token"), "wall_s": round(wall_s, 2),
        "tokens_per_s": _rounded(tokens_per_second(run_dir / "metrics.jsonl")),
        "resumed_from": summary.get("resumed_from"), "run_dir": str(run_dir),
    }
    return {key: record[key] for key in RECORD_FIELDS}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def read_record(point: Point) -> dict[str, Any] | None:
    """The saved record of a finished point, or None when the point has not finished (or its record is unreadable)."""
    path = Path(point.recipe.output_dir) / RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("name") == point.name else None


def csv_text(records: list[dict[str, Any]]) -> str:
    """sweep.csv: a header of RECORD_FIELDS and one row per record (empty cells for None)."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(RECORD_FIELDS), lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: ("" if record.get(k) is None else record[k]) for k in RECORD_FIELDS})
    return out.getvalue()


def jsonl_text(records: list[dict[str, Any]]) -> str:
    """sweep.jsonl: one record per line."""
    return "".join(json.dumps(record) + "\n" for record in records)
