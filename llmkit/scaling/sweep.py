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
4. the learning rate, batch and warmup by `lr_rule`, `batch_rule` and `warmup_rule` (llmkit/scaling/rules.py:
   the base's, inverse_sqrt, the published laws, or the user's own rule fitted by `llmkit scale hp`), min_lr
   scaled with the lr; with `branch: true` one stable phase per size and a WSD cooldown per budget.

IsoFLOP grids (`grid.flops`): for each budget C the sizes are `sizes_per_budget` values log-spaced
from N_opt / size_spread to N_opt x size_spread around the law's optimum N_opt(C) (Epoch AI's
Chinchilla refit, or `grid.center_fit`), and each size N trains on D = C / (6 N) tokens, N being the
count of the shape actually built, so that 6 N D = C in the sweep's convention. Two sizes that give
the same shape are one point.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
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
    wsd_decay_steps,
)
from llmkit.scaling import conventions, laws, rules, shapes
from llmkit.scaling.fit import MIN_POINTS_CHINCHILLA, MIN_POINTS_ONE_VARIABLE, compute_optimal

POINTS = "points"
TRUNKS = "trunks"  # branched sweeps: one stable-phase run directory per size
RECORD = "scale-point.json"  # in each point's run directory once it has finished
MIN_STEPS = 10
RECORD_FIELDS = (
    "name", "N", "D", "C", "loss", "param_convention", "params_total", "params_non_embedding", "params_matmul",
    "target_params", "budget_flops", "layers", "hidden", "heads", "kv_heads", "intermediate", "steps",
    "tokens_per_step", "lr", "muon_lr", "warmup_steps", "epochs", "val_tokens", "flops_per_token", "C_6N", "C_6N_output", "C_6N_attention",
    "C_M", "trunk", "branch_step", "trained_tokens", "wall_s", "tokens_per_s", "resumed_from", "run_dir",
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
    per_token: dict[str, float] = field(default_factory=dict)  # training FLOPs per token under every convention
    trunk: str | None = None  # branched sweeps: the stable-phase run this point's cooldown branches from
    branch_step: int | None = None  # ... at this step (the last step at the peak learning rate)

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
    trunks: dict[str, PretrainRecipe] = field(default_factory=dict)  # branched sweeps: name -> stable-phase recipe
    rules: list[str] = field(default_factory=list)  # the lr / batch / warmup rules in use, one line each

    def trained_tokens(self) -> tuple[int, int]:
        """(tokens this plan trains, tokens the same points would train as independent runs)."""
        independent = sum(p.steps * tokens_per_step(p.recipe) for p in self.points)
        if not self.trunks:
            return independent, independent
        trunk_steps = {name: max(p.branch_step for p in self.points if p.trunk == name) for name in self.trunks}
        trunk_tokens = sum(trunk_steps[name] * tokens_per_step(recipe) for name, recipe in self.trunks.items())
        cooldowns = sum((p.steps - p.branch_step) * tokens_per_step(p.recipe) for p in self.points)
        return trunk_tokens + cooldowns, independent

    def trained_flops(self) -> tuple[float, float]:
        """(training FLOPs of this plan, of independent runs), each token at its model's 6N_attention cost."""
        independent = sum(p.steps * tokens_per_step(p.recipe) * p.per_token["6N_attention"] for p in self.points)
        if not self.trunks:
            return independent, independent
        total = 0.0
        for name in self.trunks:
            mine = [p for p in self.points if p.trunk == name]
            total += max(p.branch_step for p in mine) * tokens_per_step(mine[0].recipe) * mine[0].per_token["6N_attention"]
        total += sum((p.steps - p.branch_step) * tokens_per_step(p.recipe) * p.per_token["6N_attention"] for p in self.points)
        return total, independent


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


def _per_token(sized: shapes.SizedModel, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token of a sized model under every convention."""
    s = sized.shape
    return conventions.flops_per_token(sized.counts, s.layers, s.hidden, seq_len, sized.convention)


def _depends_on_tokens(recipe: ScaleRecipe) -> str | None:
    """The rule of a branched sweep that would give the budgets of one size different settings (they share a stable phase)."""
    for key, rule in (("lr_rule", recipe.lr_rule), ("batch_rule", recipe.batch_rule)):
        if rule in ("deepseek", "step_law"):
            return f"{key}: {rule}"
    return None


def plan(recipe: ScaleRecipe, vocab_size: int | None) -> Plan:
    """Every point of a sweep with its recipe and shape; RecipeError for a grid that cannot be fitted or run."""
    base, where = base_recipe(recipe)
    unsized, _ = base_recipe(recipe, keep_sizes=False)
    convention = recipe.param_convention
    base_per_step = tokens_per_step(base)
    warmup_fraction = base.train.warmup_steps / _base_steps(base)
    base_params = model_size(base, vocab_size, convention) if recipe.lr_rule == "inverse_sqrt" else None
    hp = rules.load_hp(recipe.hp_fit) if recipe.hp_fit is not None else None
    if hp is None and "fitted" in (recipe.lr_rule, recipe.batch_rule):
        which = "lr_rule" if recipe.lr_rule == "fitted" else "batch_rule"
        raise RecipeError(f"{which}: fitted needs hp_fit: the hp.json written by `llmkit scale hp` (set hp_fit: PATH)")
    if recipe.branch:
        shared = _depends_on_tokens(recipe)
        if shared:
            raise RecipeError(
                f"{shared}: depends on the token budget, but branch: true trains the budgets of one size from one shared "
                "stable phase (one learning rate and batch per size); use porian, fitted, inverse_sqrt or constant, or branch: false"
            )
    seq_len = base.data.seq_len
    points: list[Point] = []
    notes: list[str] = []
    seen: dict[tuple, str] = {}
    for target, budget, tokens in _targets(recipe):
        dial = unsized.model.model_copy(update={"target_params": target, "param_convention": convention})
        sized_base = unsized.model_copy(update={"model": dial})
        sized = shapes.choose(sized_base, vocab_size)
        N = sized.counts[convention]
        per_token = _per_token(sized, seq_len)
        if budget is not None:
            tokens = max(1, int(round(budget / per_token[recipe.flop_convention])))
            name = f"c{budget:.3g}_n{_short(N)}".replace("+", "")
        else:
            name = f"n{_short(target)}_d{_short(tokens)}"
        key = (budget or tokens, sized.shape)
        if key in seen:
            notes.append(f"size {target:,} gives the same shape as point {seen[key]}: one point")
            continue
        seen[key] = name
        inputs = rules.PointInputs(
            counts=sized.counts, tokens=tokens, M_per_token=per_token["M"], convention=convention,
            base_lr=base.train.lr, base_batch_tokens=base_per_step, base_params=base_params,
        )
        micro, accum = base.train.micro_batch_size, base.train.grad_accum_steps
        if recipe.batch_rule != "constant":
            micro, accum = rules.batch_layout(rules.batch_tokens_for(recipe.batch_rule, inputs, hp), seq_len, base.train.micro_batch_size)
        per_step = micro * accum * seq_len * dist.world_size()
        steps = math.ceil(tokens / per_step)
        if steps < MIN_STEPS:
            raise RecipeError(
                f"grid: point {name} trains {tokens:,} tokens = {steps} optimizer step(s) of {per_step:,} tokens; "
                f"give it {MIN_STEPS}+ steps: more tokens, or a smaller batch (overrides train.micro_batch_size, or batch_rule)"
            )
        lr = rules.lr_for(recipe.lr_rule, inputs, hp)
        lr_scale = lr / base.train.lr
        train = {
            "max_tokens": tokens, "max_steps": None, "micro_batch_size": micro, "grad_accum_steps": accum,
            "warmup_steps": rules.warmup_steps_for(recipe.warmup_rule, warmup_fraction, steps, sized.counts[convention], per_step),
            "lr": lr, "min_lr": base.train.min_lr * lr_scale, "eval_every": steps,
        }
        if recipe.lr_rule == "fitted" and hp is not None and hp.optimizer == "muon":
            # A rule fitted on Muon runs gives Muon's learning rate; AdamW's (embeddings, norms) stays the base's.
            train.update(lr=base.train.lr, min_lr=base.train.min_lr, muon_lr=lr)
        if recipe.branch:
            train["schedule"] = "wsd"
        point_recipe = shapes.sized_recipe(sized_base, vocab_size).model_copy(update={
            "output_dir": Path(recipe.output_dir) / POINTS / name,
            "train": base.train.model_copy(update=train),
        })
        points.append(Point(name, target, budget, point_recipe, sized, tokens, steps, per_token))
    if hp is not None and "fitted" in (recipe.lr_rule, recipe.batch_rule):
        note = rules.extrapolation_note(hp, [p.N for p in points])
        notes += [note] if note else []
    trunks: dict[str, PretrainRecipe] = {}
    if recipe.branch:
        trunks = _branch(recipe, points, where)
    points = [_validated(p, where) for p in points]
    trunks = {name: _validated_recipe(r, f"{where}, stable phase {name}") for name, r in trunks.items()}
    _check_enough(points, recipe)
    return Plan(base, where, base_params, points, notes, trunks, rules.describe(recipe.lr_rule, recipe.batch_rule, recipe.warmup_rule, hp))


def _validated_recipe(recipe: PretrainRecipe, where: str) -> PretrainRecipe:
    """The recipe validated as a whole (model_copy does not): the same checks `llmkit pretrain` makes."""
    return recipe_from_dict(json.loads(json.dumps(recipe.model_dump(mode="json"))), where=where)


def _validated(point: Point, where: str) -> Point:
    point.recipe = _validated_recipe(point.recipe, f"{where}, point {point.name}")
    return point


def _branch(recipe: ScaleRecipe, points: list[Point], where: str) -> dict[str, PretrainRecipe]:
    """Group a branched sweep's points by shape: one stable-phase recipe each; set every point's branch step.

    Every point of a size has the same warmup (that of the size's shortest budget, by the warmup rule), so
    that its first branch_step steps (warmup, then the peak learning rate) are exactly those of the stable
    phase: the point is the stable run resumed from its checkpoint at branch_step with the WSD cooldown.
    """
    trunks: dict[str, PretrainRecipe] = {}
    by_shape: dict[Any, list[Point]] = {}
    for p in points:
        by_shape.setdefault(p.sized.shape, []).append(p)
    for group in by_shape.values():
        shortest = min(group, key=lambda p: p.steps)
        warmup = shortest.recipe.train.warmup_steps
        name = f"n{_short(group[0].N)}"
        for p in group:
            cfg = p.recipe.train
            decay = wsd_decay_steps(p.steps, cfg.decay_fraction)
            branch_step = p.steps - decay
            if branch_step < max(1, warmup):
                raise RecipeError(
                    f"grid: point {p.name}: its {p.steps} steps leave {branch_step} before the wsd cooldown "
                    f"({decay} steps = train.decay_fraction {cfg.decay_fraction}), fewer than the {warmup} warmup steps its size "
                    "shares; give the smallest token budget more tokens, or lower the warmup (overrides train.warmup_steps, warmup_rule)"
                )
            p.recipe = p.recipe.model_copy(update={"train": cfg.model_copy(update={"warmup_steps": warmup})})
            p.trunk, p.branch_step = name, branch_step
        top = max(group, key=lambda p: p.branch_step)
        trunks[name] = top.recipe.model_copy(update={
            "output_dir": Path(recipe.output_dir) / TRUNKS / name,
            "train": top.recipe.train.model_copy(update={
                "schedule": "constant", "max_tokens": None, "max_steps": top.branch_step, "eval_every": top.branch_step,
                "keep_checkpoints": 1,
            }),
        })
    return trunks


HP = "hp"  # `llmkit scale hp`: SWEEP-hp/hp/NAME run directories and SWEEP-hp/hp.json


def hp_dir(recipe: ScaleRecipe) -> Path:
    """Where `llmkit scale hp` runs its grid: beside the sweep's directory, SWEEP-hp."""
    out = Path(recipe.output_dir)
    return out.with_name(out.name + "-hp")


def hp_points(recipe: ScaleRecipe, vocab_size: int | None) -> list[Point]:
    """The runs of `llmkit scale hp`: every hp.sizes x hp.lrs x hp.batch_tokens, each on tokens_per_param x N tokens."""
    if recipe.hp is None:
        raise RecipeError("hp: missing from the recipe; give hp.sizes, hp.lrs and hp.batch_tokens (the grid `llmkit scale hp` runs)")
    base, where = base_recipe(recipe)
    unsized, _ = base_recipe(recipe, keep_sizes=False)
    convention, seq_len = recipe.param_convention, base.data.seq_len
    warmup_fraction = base.train.warmup_steps / _base_steps(base)
    muon = base.train.optimizer == "muon"
    points = []
    for target in recipe.hp.sizes:
        dial = unsized.model.model_copy(update={"target_params": target, "param_convention": convention})
        sized_base = unsized.model_copy(update={"model": dial})
        sized = shapes.choose(sized_base, vocab_size)
        N = sized.counts[convention]
        tokens = max(1, int(round(recipe.hp.tokens_per_param * N)))
        for batch in recipe.hp.batch_tokens:
            micro, accum = rules.batch_layout(batch, seq_len, base.train.micro_batch_size)
            per_step = micro * accum * seq_len * dist.world_size()
            steps = math.ceil(tokens / per_step)
            for lr in recipe.hp.lrs:
                name = f"n{_short(N)}_b{_short(per_step)}_lr{lr:.3g}"
                if steps < MIN_STEPS:
                    raise RecipeError(
                        f"hp: run {name} trains {tokens:,} tokens = {steps} step(s) of {per_step:,} tokens; give it {MIN_STEPS}+ "
                        "steps: a larger hp.tokens_per_param or smaller hp.batch_tokens"
                    )
                train = {
                    "max_tokens": tokens, "max_steps": None, "micro_batch_size": micro, "grad_accum_steps": accum,
                    "warmup_steps": int(round(warmup_fraction * steps)), "eval_every": steps,
                }
                if muon:
                    train["muon_lr"] = lr
                else:
                    train.update(lr=lr, min_lr=base.train.min_lr * lr / base.train.lr)
                point_recipe = shapes.sized_recipe(sized_base, vocab_size).model_copy(update={
                    "output_dir": Path(recipe.output_dir) / HP / name, "train": base.train.model_copy(update=train),
                })
                point = Point(name, target, None, point_recipe, sized, tokens, steps, _per_token(sized, seq_len))
                points.append(_validated(point, where))
    return points


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
        # With Muon, lr is AdamW's (embeddings, norms) and the hidden matrices train at muon_lr, which a fitted rule sets.
        "muon_lr": point.recipe.train.muon_lr if point.recipe.train.optimizer == "muon" else None,
        "warmup_steps": point.recipe.train.warmup_steps,
        **{f"C_{name}": float(f"{point.per_token[name] * D:.6g}") for name in conventions.FLOP_CONVENTIONS},
        "trunk": point.trunk, "branch_step": point.branch_step,
        "trained_tokens": D - (point.branch_step or 0) * tokens_per_step(point.recipe),
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
