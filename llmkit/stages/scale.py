"""`llmkit scale sweep | hp | eval | fit | recommend`: measure a scaling law on your data, fit it, and size a model with it.

    llmkit tokenizer train tokenizer/tiny
    llmkit scale sweep scale/cpu-tiny                     # 18 tiny llamas on Python's docs, branched (CPU, minutes)
    llmkit scale fit runs/scale-cpu-tiny                  # L(N, D) with intervals -> fit.json, fit.png
    llmkit scale eval runs/scale-cpu-tiny eval/choice-tiny   # every point on a multiple-choice task, for fit --accuracy
    llmkit scale recommend --flops 1e15 --fit runs/scale-cpu-tiny --write-recipe runs/optimal.yaml

A sweep is a directory: recipe.yaml (the sweep recipe), points/NAME/ (each an ordinary `llmkit pretrain`
run directory, so each point resumes), and sweep.jsonl / sweep.csv (one row per finished point,
rewritten atomically after each point). Running the same sweep again skips the finished points and
resumes an interrupted one. The points are planned by llmkit/scaling/sweep.py, fitted by
llmkit/scaling/laws.py (on llmkit/scaling/fit.py) and drawn by llmkit/scaling/plots.py.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from llmkit import __version__, dist, models, rundir
from llmkit.data.lm import cache_key, lm_train_data
from llmkit.errors import DataError, LlmkitError, RecipeError
from llmkit.recipes import (
    EvalRecipe,
    ScaleRecipe,
    load_recipe,
    recipe_from_dict,
    recipe_to_yaml,
    resolve_recipe_path,
)
from llmkit.scaling import conventions, laws, plots, rules, shapes
from llmkit.scaling import sweep as planning
from llmkit.scaling.fit import load_points, write_fit_json
from llmkit.stages import evaluate, pretrain

DATA_FILE = "data.json"
SWEEP_FILES = ("sweep.jsonl", "sweep.csv", "fit.json", "fit.png", DATA_FILE, "hp.json", "hp.jsonl")
BUDGET_TOLERANCE = 0.05  # a written recipe may spend the budget give or take this share (whole optimizer steps)
ORDERS_BEYOND = 2.0  # warn when a budget lies more than this many orders of magnitude outside the swept C


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _vocab(recipe) -> tuple[int | None, Any, str]:
    """(padded vocab size, tokenizer, note) of a recipe's tokenizer when it is a local directory; (None, None, why) otherwise."""
    name = recipe.tokenizer
    if not Path(name).expanduser().is_dir():
        return None, None, f"tokenizer {name} not found (yet): counts use the config's vocabulary"
    tokenizer = models.load_tokenizer(name)
    return models.padded_vocab_size(len(tokenizer)), tokenizer, ""


# ----------------------------------------------------------------------------------------------
# Plan (llmkit validate) and sweep
# ----------------------------------------------------------------------------------------------


def plan_lines(recipe: ScaleRecipe, plan: planning.Plan | None = None, note: str = "") -> list[str]:
    """What a sweep will run: its base, rules and one line per point (shape, N, D, C, steps, lr); for `llmkit validate`
    (no plan given) also the hp grid of `llmkit scale hp`, checked as that command checks it."""
    hp_lines = []
    if plan is None:
        base, _ = planning.base_recipe(recipe)
        vocab, _, note = _vocab(base)
        plan = planning.plan(recipe, vocab)
        hp_lines = _hp_lines(recipe, vocab) if recipe.hp is not None else []
    base = plan.base
    grid = recipe.grid
    mode = f"{len(grid.flops)} IsoFLOP budget(s)" if grid.flops else f"{len(grid.sizes)} sizes x {len(grid.tokens)} token budgets"
    lines = [
        f"stage:            scale ({len(plan.points)} pretrain runs: {mode})",
        f"base:             {plan.base_where}",
        f"N counts:         {recipe.param_convention} parameters; the law's C = 6 N D; IsoFLOP budgets in {recipe.flop_convention} "
        f"({conventions.DESCRIPTIONS[recipe.flop_convention]})",
    ]
    lines += [f"rule:             {line}" for line in plan.rules]
    if plan.trunks:
        lines.append(
            f"branching:        {len(plan.trunks)} stable phase(s) (constant lr after warmup), each point a wsd cooldown of "
            f"train.decay_fraction {base.train.decay_fraction} of its steps from the stable phase's checkpoint (Hägele et al. 2024)"
        )
    lines.append(
        f"{'point':<22} {'layers':>6} {'hidden':>6} {'N':>10} {'D':>10} {'batch':>6} {'steps':>6} {'warmup':>6} {'branch':>6} "
        f"{'lr':>8}  {'C: ' + ' / '.join(conventions.FLOP_CONVENTIONS)}"
    )
    for p in plan.points:
        s = p.sized.shape
        c = " / ".join(f"{p.per_token[name] * p.tokens:.3g}" for name in conventions.FLOP_CONVENTIONS)
        lr = p.recipe.train.muon_lr if recipe.lr_rule == "fitted" and p.recipe.train.optimizer == "muon" else p.recipe.train.lr
        lines.append(
            f"{p.name:<22} {s.layers:>6} {s.hidden:>6} {p.N:>10,} {p.tokens:>10,} {planning.tokens_per_step(p.recipe):>6,} "
            f"{p.steps:>6,} {p.recipe.train.warmup_steps:>6,} {'-' if p.branch_step is None else p.branch_step:>6} {lr:>8.3g}  {c}"
        )
    trained, independent = plan.trained_tokens()
    total = f"total:            {trained:,} tokens trained"
    if plan.trunks:
        total += f" ({independent:,} as independent runs: {trained / independent:.0%})"
    lines.append(total + f", {sum(6.0 * p.N * p.tokens for p in plan.points):.3g} FLOPs of points (6 N D)")
    lines += [f"note:             {n}" for n in plan.notes + ([note] if note else [])]
    lines.append(f"output_dir:       {recipe.output_dir}")
    return lines + hp_lines


def _hp_lines(recipe: ScaleRecipe, vocab: int | None) -> list[str]:
    """What `llmkit scale hp` runs: one line per size and batch, each tried at every learning rate of hp.lrs."""
    grid = recipe.hp
    points = planning.hp_points(recipe.model_copy(update={"output_dir": planning.hp_dir(recipe)}), vocab)
    tokens = sum(p.steps * planning.tokens_per_step(p.recipe) for p in points)
    lines = [
        f"hp grid:          {len(points)} runs of `llmkit scale hp` in {planning.hp_dir(recipe)}: {len(grid.sizes)} sizes x "
        f"{len(grid.batch_tokens)} batches x {len(grid.lrs)} learning rates ({', '.join(f'{lr:g}' for lr in grid.lrs)}); "
        f"{tokens:,} tokens",
        f"{'hp run':<22} {'layers':>6} {'hidden':>6} {'N':>10} {'D':>10} {'batch':>6} {'steps':>6} {'warmup':>6}",
    ]
    for p in points[::len(grid.lrs)]:  # hp_points orders size, batch, lr
        s = p.sized.shape
        lines.append(
            f"{p.name.rsplit('_lr', 1)[0] + '_lr*':<22} {s.layers:>6} {s.hidden:>6} {p.N:>10,} {p.tokens:>10,} "
            f"{planning.tokens_per_step(p.recipe):>6,} {p.steps:>6,} {p.recipe.train.warmup_steps:>6,}"
        )
    return lines


def _available_tokens(recipe, tokenizer) -> int | None:
    """Training tokens the data holds (whole blocks), None for streamed data, where it is unknown until read."""
    data = lm_train_data(recipe, tokenizer)
    return None if data.train is None else len(data.train) * recipe.data.seq_len


def _write_if_changed(path: Path, text: str) -> None:
    """Write a file atomically unless it already says the same (a rerun of a finished sweep changes nothing)."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    rundir.write_text_atomic(path, text)


def _data_record(recipe, tokenizer, available: int | None) -> dict[str, Any]:
    """What the sweep trained on (data.json): the tokenization cache's fingerprint of its sources, and their size in tokens."""
    return {
        "fingerprint": cache_key(recipe, tokenizer), "train": recipe.data.model_dump(mode="json")["train"],
        "train_tokens": available, "seq_len": recipe.data.seq_len,
    }


def _check_tokens(plan: planning.Plan, available: int | None, allow_repeat: bool) -> None:
    """DataError when a point would train on more tokens than data.train holds, unless allow_repeat."""
    if available is None or allow_repeat:
        return
    worst = max(plan.points, key=lambda p: p.tokens)
    if worst.tokens > available:
        raise DataError(
            f"grid: point {worst.name} trains on {worst.tokens:,} tokens but data.train holds {available:,} "
            f"({worst.tokens / available:.2f} epochs); lower grid.tokens (or grid.flops), add data, "
            "or set allow_repeat: true to repeat it"
        )


def _clear(output_dir: Path) -> None:
    """Remove a replaced sweep's points and files (--overwrite)."""
    for sub in (planning.POINTS, planning.TRUNKS, planning.HP):
        shutil.rmtree(output_dir / sub, ignore_errors=True)
    for name in SWEEP_FILES:
        (output_dir / name).unlink(missing_ok=True)


def _write_recipe_if_changed(recipe: ScaleRecipe, output_dir: Path) -> None:
    """recipe.yaml of the sweep, rewritten only when it changed (a grown grid), so a rerun leaves it as it was."""
    saved = output_dir / "recipe.yaml"
    if not saved.is_file() or saved.read_text(encoding="utf-8") != recipe_to_yaml(recipe):
        rundir.write_resolved(recipe, output_dir)


def _write_tables(output_dir: Path, records: list[dict[str, Any]]) -> None:
    rundir.write_text_atomic(output_dir / "sweep.jsonl", planning.jsonl_text(records))
    rundir.write_text_atomic(output_dir / "sweep.csv", planning.csv_text(records))


def _run_point(point: planning.Point, index: int, total: int, available: int | None) -> dict[str, Any]:
    """The record of one point: read back when it has finished, else trained (or resumed) now."""
    record = planning.read_record(point)
    # A finished point is skipped only while its directory still holds its recipe (claim raises otherwise).
    if record is not None and rundir.claim(point.recipe, what="sweep point").state == "same":
        dist.log(f"scale: point {index}/{total} {point.name}: finished, skipped (loss {record['loss']:.4f})")
        return record
    dist.log(f"scale: point {index}/{total} {point.name}: {point.sized.describe()}; {point.tokens:,} tokens")
    started = time.perf_counter()
    try:
        summary = pretrain.run(point.recipe)
    except LlmkitError as exc:
        raise type(exc)(f"point {point.name} ({point.recipe.output_dir}): {exc}") from None
    record = planning.make_record(point, summary, time.perf_counter() - started, available)
    if dist.rank() == 0:
        rundir.write_json_atomic(Path(point.recipe.output_dir) / planning.RECORD, record)
    return record


@contextlib.contextmanager
def _one_process_group():
    """Keep a multi-process launch's process group for every point of the sweep, and end it once after the last.

    Each point's training loop ends with Accelerator.end_training(), which (accelerate 1.x) destroys the
    process group while accelerate's singleton state still reads as set up, so the next point's first
    barrier fails ("Default process group has not been initialized"). Clearing that state to make the
    next Accelerator initialise a new group is not safe either: the new group has the old one's name, and
    gloo then connects to addresses the old group left in the launcher's store ("connectFullMesh failed").
    So while the sweep runs, destroying the group is a no-op; a single process has no group and is left alone.
    """
    if dist.world_size() == 1:
        yield
        return
    import torch
    from accelerate.state import PartialState

    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    try:
        yield
    finally:
        PartialState.destroy_process_group = destroy
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def sweep(recipe: ScaleRecipe, overwrite: bool = False) -> str:
    """`llmkit scale sweep RECIPE`: run (or continue) every point; returns the table of results."""
    output_dir = Path(recipe.output_dir)
    with rundir.locked(output_dir):
        # 1. Cheap checks: the sweep directory, the base recipe, the plan (shapes on the meta device).
        claimed = rundir.claim(recipe, overwrite, what="sweep")
        base, _ = planning.base_recipe(recipe)
        tokenizer = models.load_tokenizer(base.tokenizer)
        plan = planning.plan(recipe, models.padded_vocab_size(len(tokenizer)))
        # 2. The data (tokenized once into the cache, shared by every point): enough tokens for the grid?
        available = _available_tokens(plan.points[0].recipe, tokenizer)
        _check_tokens(plan, available, recipe.allow_repeat)
        # 3. Run each point in grid order; the tables are rewritten after each one.
        if dist.rank() == 0:
            _write_if_changed(output_dir / DATA_FILE, json.dumps(_data_record(plan.points[0].recipe, tokenizer, available), indent=1) + "\n")
            if claimed.state == "replace":
                _clear(output_dir)
            _write_recipe_if_changed(recipe, output_dir)
            for line in plan_lines(recipe, plan):
                dist.log(line)
        records = []
        order = sorted(plan.points, key=lambda p: (list(plan.trunks).index(p.trunk), p.branch_step)) if plan.trunks else plan.points
        started = time.perf_counter()
        with _one_process_group():
            for index, point in enumerate(order, start=1):
                if point.trunk is None:
                    records.append(_run_point(point, index, len(order), available))
                else:
                    records.append(_run_branch(point, plan.trunks[point.trunk], index, len(order), available))
                if dist.rank() == 0:
                    _write_tables(output_dir, records)
    if dist.rank() != 0:
        return ""
    trained, independent = plan.trained_flops()
    cost = [f"compute: {trained:.3g} training FLOPs (6N_attention)"]
    if plan.trunks:
        cost[0] += f" with {len(plan.trunks)} shared stable phase(s); {independent:.3g} as independent runs ({trained / independent:.0%})"
    return "\n".join(result_lines(records) + cost + [
        f"wall:    {time.perf_counter() - started:.1f} s for this invocation",
        f"wrote:   {output_dir / 'sweep.jsonl'}, {output_dir / 'sweep.csv'}",
        f"next:    llmkit scale fit {output_dir}",
    ])


def _copy_checkpoint(source: Path, run_dir: Path) -> None:
    """Copy a complete checkpoint into run_dir/checkpoints under its own name; a kill mid-copy leaves no complete one."""
    target = run_dir / rundir.CHECKPOINTS / source.name
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = rundir.temp_path(target.parent, source.name)
    shutil.copytree(source, partial)
    partial.replace(target)


def _branch_from_trunk(point: planning.Point, trunk: Any) -> str:
    """Make the point's run directory hold the stable phase's checkpoint at its branch step; how (for the log)."""
    trunk_dir = Path(trunk.output_dir)
    segment = trunk.model_copy(update={"train": trunk.train.model_copy(update={"max_steps": point.branch_step})})
    found = dict(rundir.complete_checkpoints(trunk_dir)) if trunk_dir.is_dir() else {}
    if point.branch_step not in found:
        if found and max(found) > point.branch_step:
            return "independent"  # the stable phase is past this budget's branch step (a budget added later)
        dist.log(f"scale: stable phase {trunk_dir.name}: training to step {point.branch_step:,} (constant lr after warmup)")
        try:
            pretrain.run(segment)
        except LlmkitError as exc:
            raise type(exc)(f"stable phase {trunk_dir.name} ({trunk_dir}): {exc}") from None
        found = dict(rundir.complete_checkpoints(trunk_dir))
    if dist.rank() == 0:
        run_dir = Path(point.recipe.output_dir)
        rundir.write_resolved(point.recipe, run_dir)
        if (trunk_dir / "metrics.jsonl").is_file() and not (run_dir / "metrics.jsonl").exists():
            shutil.copyfile(trunk_dir / "metrics.jsonl", run_dir / "metrics.jsonl")  # the stable phase's history, up to the branch
        _copy_checkpoint(found[point.branch_step], run_dir)
    if dist.world_size() > 1:
        dist.process_state().wait_for_everyone()  # every process resumes from the copy rank 0 made
    return "branched"


def _run_branch(point: planning.Point, trunk: Any, index: int, total: int, available: int | None) -> dict[str, Any]:
    """The record of one point of a branched sweep: its cooldown resumed from the stable phase's checkpoint."""
    record = planning.read_record(point)
    run_dir = Path(point.recipe.output_dir)
    state = rundir.claim(point.recipe, what="sweep point").state
    if record is not None and state == "same":
        dist.log(f"scale: point {index}/{total} {point.name}: finished, skipped (loss {record['loss']:.4f})")
        return record
    how = "resumed"
    if state == "new" or not rundir.complete_checkpoints(run_dir):
        how = _branch_from_trunk(point, trunk)
    if how == "independent":
        dist.log(f"scale: point {index}/{total} {point.name}: the stable phase is past step {point.branch_step:,}; trained on its own")
        independent = dataclasses.replace(point, trunk=None, branch_step=None)
        return _run_point(independent, index, total, available)
    dist.log(
        f"scale: point {index}/{total} {point.name}: {point.sized.describe()}; cooldown from step {point.branch_step:,} "
        f"of stable phase {point.trunk} to step {point.steps:,} ({how})"
    )
    started = time.perf_counter()
    try:
        summary = pretrain.run(point.recipe)
    except LlmkitError as exc:
        raise type(exc)(f"point {point.name} ({run_dir}): {exc}") from None
    record = planning.make_record(point, summary, time.perf_counter() - started, available)
    if dist.rank() == 0:
        rundir.write_json_atomic(run_dir / planning.RECORD, record)
    return record


def hp(recipe: ScaleRecipe, overwrite: bool = False) -> str:
    """`llmkit scale hp RECIPE`: run (or continue) the hp grid, fit lr* = a N^b and B* = c N^d, write hp.json."""
    # The grid runs in its own directory beside the sweep's (SWEEP-hp), and is claimed without the keys that only
    # steer the sweep, so that setting lr_rule: fitted afterwards keeps the finished hp runs.
    identity = recipe.model_copy(update={
        "output_dir": planning.hp_dir(recipe), "lr_rule": "constant", "batch_rule": "constant", "warmup_rule": "fraction",
        "hp_fit": None, "branch": False,
    })
    output_dir = Path(identity.output_dir)
    with rundir.locked(output_dir):
        claimed = rundir.claim(identity, overwrite, what="hp grid")
        base, _ = planning.base_recipe(identity)
        tokenizer = models.load_tokenizer(base.tokenizer)
        points = planning.hp_points(identity, models.padded_vocab_size(len(tokenizer)))
        available = _available_tokens(points[0].recipe, tokenizer)
        _check_tokens(planning.Plan(base, "", None, points, []), available, recipe.allow_repeat)
        if dist.rank() == 0:
            if claimed.state == "replace":
                _clear(output_dir)
            _write_recipe_if_changed(identity, output_dir)
            dist.log(f"scale hp: {len(points)} runs: {len(recipe.hp.sizes)} sizes x {len(recipe.hp.batch_tokens)} batches x "
                     f"{len(recipe.hp.lrs)} learning rates, {recipe.hp.tokens_per_param:g} tokens per parameter, in {output_dir}")
        records = []
        with _one_process_group():
            for index, point in enumerate(points, start=1):
                records.append(_run_point(point, index, len(points), available))
                if dist.rank() == 0:
                    rundir.write_text_atomic(output_dir / "hp.jsonl", planning.jsonl_text(records))
    if dist.rank() != 0:
        return ""
    muon = base.train.optimizer == "muon"
    rows = [{**r, "lr": p.recipe.train.muon_lr if muon else r["lr"]} for r, p in zip(records, points, strict=True)]
    result = rules.fit_hp(rows, recipe.param_convention, base.train.optimizer)
    result["runs"] = [{k: r[k] for k in ("name", "N", "D", "lr", "tokens_per_step", "loss")} for r in rows]
    write_fit_json(output_dir / "hp.json", result)
    rule = result["rule"]
    lines = [f"{'N':>10} {'best lr':>9} {'best batch':>10} {'loss':>8}"]
    for p in result["per_size"]:
        ends = [name for name, key in (("lr", "lr_at_grid_edge"), ("batch", "batch_at_grid_edge")) if p.get(key)]
        grids = " and ".join({"lr": "hp.lrs", "batch": "hp.batch_tokens"}[e] for e in ends)
        edge = f"  (the best {' and '.join(ends)} at the edge of {grids}: widen it)" if ends else ""
        lines.append(f"{p['N']:>10,} {p['lr']:>9.3g} {p['batch_tokens']:>10,.0f} {p['loss']:>8.4f}{edge}")
    lines += [
        f"rule:    {'muon_lr' if muon else 'lr'} = {rule['lr_coef']:.4g} N^{rule['lr_exp']:.3f}, batch = {rule['batch_coef']:.4g} "
        f"N^{rule['batch_exp']:.3f} tokens (N = {recipe.param_convention} parameters, {base.train.optimizer})",
        f"wrote:   {output_dir / 'hp.json'}, {output_dir / 'hp.jsonl'}",
        f"next:    llmkit scale sweep RECIPE --set lr_rule=fitted --set batch_rule=fitted --set hp_fit={output_dir / 'hp.json'}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Downstream scores of the points
# ----------------------------------------------------------------------------------------------


def score(sweep_dir: Path, recipe: EvalRecipe, overwrite: bool = False) -> str:
    """`llmkit scale eval SWEEP RECIPE`: score every finished point with one eval recipe, each into POINT/NAME, NAME
    the last part of the recipe's output_dir (what `scale fit --accuracy NAME` reads); points already scored by the
    same recipe are skipped, so a sweep that grew is scored point by point as it grows."""
    sweep_dir = Path(sweep_dir)
    points_file = sweep_dir / "sweep.jsonl"
    if not points_file.is_file():
        raise LlmkitError(f"{sweep_dir}: no sweep.jsonl (not a sweep directory, or no point has finished); run `llmkit scale sweep` first")
    rows = _rows(points_file)
    name = recipe.output_dir.name
    # 1. Every point's eval recipe, and its directory claimed, before any model loads: a refusal writes nothing.
    todo = []
    for i, row in enumerate(rows):
        run_dir = _point_dir(row, sweep_dir)
        if run_dir is None or not run_dir.is_dir():
            raise LlmkitError(f"{points_file}: point {row.get('name') or i + 1}: its run directory {run_dir} does not exist")
        point_recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"path": str(run_dir)}),
                                                 "output_dir": run_dir / name})
        claimed = rundir.claim(point_recipe, overwrite, what="eval")
        done = claimed.state == "same" and (run_dir / name / "metrics.json").is_file()
        todo.append((row, point_recipe, done))
    # 2. Score the points not yet scored, one model at a time, in this process.
    results = []
    for index, (row, point_recipe, done) in enumerate(todo, start=1):
        metrics_file = Path(point_recipe.output_dir) / "metrics.json"
        if done:
            dist.log(f"scale eval: point {index}/{len(todo)} {row['name']}: scored already, skipped ({metrics_file})")
            metrics = json.loads(metrics_file.read_text(encoding="utf-8")).get("metrics", {})
        else:
            dist.log(f"scale eval: point {index}/{len(todo)} {row['name']}: {point_recipe.model.path}")
            with contextlib.redirect_stdout(sys.stderr):  # `llmkit eval` prints each point's metrics: progress here
                metrics = evaluate.run(point_recipe, overwrite=overwrite).get("metrics", {})
        results.append((row, metrics))
    if dist.rank() != 0:
        return ""
    keys = [k for k, v in results[0][1].items() if isinstance(v, float) and not k.endswith("_stderr")][:4]
    lines = [f"{'point':<22} {'N':>12} {'D':>12} {'loss':>8} " + " ".join(f"{k:>10}" for k in keys)]
    for row, metrics in results:
        values = " ".join(f"{_fmt(metrics.get(k), 4):>10}" for k in keys)
        lines.append(f"{row['name']:<22} {int(float(row['N'])):>12,} {int(float(row['D'])):>12,} {float(row['loss']):>8.4f} {values}")
    lines += [
        f"wrote:   {sweep_dir / planning.POINTS}/NAME/{name}/metrics.json for {len(results)} points",
        f"next:    llmkit scale fit {sweep_dir} --accuracy {name} --accuracy-metric {keys[0] if keys else 'acc'}",
    ]
    return "\n".join(lines)


def result_lines(records: list[dict[str, Any]]) -> list[str]:
    """The sweep's results as a table."""
    lines = [f"{'point':<22} {'N':>12} {'D':>12} {'C':>9} {'loss':>8} {'wall s':>8} {'tokens/s':>9}"]
    for r in records:
        lines.append(
            f"{r['name']:<22} {r['N']:>12,} {r['D']:>12,} {r['C']:>9.2e} {r['loss']:>8.4f} {r['wall_s']:>8.1f} "
            f"{_fmt(r['tokens_per_s'], 4):>9}"
        )
    return lines


# ----------------------------------------------------------------------------------------------
# Fit
# ----------------------------------------------------------------------------------------------


def _rows(file: Path) -> list[dict[str, Any]]:
    """The rows of a points file in order (as fit.load_points reads them), empty cells as None."""
    if file.suffix.lower() == ".csv":
        with open(file, newline="", encoding="utf-8") as handle:
            rows = [dict(row) for row in csv.DictReader(handle)]
    else:
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{k: (None if v == "" else v) for k, v in row.items() if k is not None} for row in rows]


def _convention(points, rows: list[dict[str, Any]], chosen: str | None) -> str | None:
    """What N counts: the --param-convention asked for, else the one every row of a sweep names."""
    if chosen:
        return chosen
    names = {row.get("param_convention") for row in rows}
    return names.pop() if len(names) == 1 and points.columns.get("N") == "N" else None


def fit(
    data: Path, output: Path | None = None, n_boot: int = 200, param_convention: str | None = None, seed: int = 0,
    accuracy: str | None = None, accuracy_metric: str = "acc",
) -> str:
    """`llmkit scale fit DATA`: fit the points, write fit.json and its plot, return the report."""
    data = Path(data)
    if n_boot < 0:
        raise LlmkitError(f"--bootstrap {n_boot}: give 0 (no intervals) or more resamples, e.g. 200")
    plots.require_matplotlib()
    columns = {"N": f"params_{param_convention}"} if param_convention else None
    points = load_points(data, columns=columns)
    rows = _rows(Path(points.source))
    report = laws.fit_points(points, rows, n_boot=n_boot, seed=seed)
    report["param_convention"] = _convention(points, rows, param_convention)
    report["sweep"] = str(data) if data.is_dir() else None
    report["provenance"] = _provenance(data, Path(points.source), report["param_convention"])
    if accuracy is not None:
        acc, stderr = _accuracies(rows, accuracy, accuracy_metric, Path(points.source), data if data.is_dir() else None)
        report["downstream"] = {
            "task": accuracy, "metric": accuracy_metric if accuracy not in rows[0] else accuracy,
            **laws.fit_downstream(points.loss, acc, n_boot=n_boot, seed=seed, source=points.source),
            # Every point is scored on the same examples: their sampling error moves all the scores together, so the
            # bootstrap over points does not see it. Recorded (median over the points) so that recommend can say so.
            "score_stderr": stderr,
        }
    target = Path(output) if output else (data / "fit.json" if data.is_dir() else data.with_name(f"{data.stem}.fit.json"))
    picture = target.with_suffix(".png")
    write_fit_json(target, report)
    # The numbers first: a plot of many points takes a while, and the fit is what was asked for.
    for line in fit_lines(report) + [f"wrote:       {target}"]:
        print(line, flush=True)
    plots.plot_fit(report, points, rows, picture)
    return "\n".join([f"wrote:       {picture}", f"next:        llmkit scale recommend --flops 1e15 --fit {target}"])


def _point_dir(row: dict[str, Any], sweep_dir: Path | None) -> Path | None:
    """Where a point's run directory is now: SWEEP/points/NAME for a sweep directory (its run_dir column names where
    the point was trained, stale once the sweep was moved or copied), else the run_dir column."""
    if sweep_dir is not None and row.get("name"):
        here = sweep_dir / planning.POINTS / str(row["name"])
        if here.is_dir():
            return here
    return Path(row["run_dir"]) if row.get("run_dir") else None


def _accuracies(rows: list[dict[str, Any]], source: str, metric: str, points_file: Path, sweep_dir: Path | None) -> tuple[Any, float | None]:
    """Each point's downstream accuracy: a column of the points file, a key of the point's last eval event (a task its
    train.evals scored), or metric in RUN_DIR/SOURCE/metrics.json, written by `llmkit scale eval` over the points; and
    the median standard error of those scores (SOURCE_stderr / METRIC_stderr beside them), None where not every point
    has one."""
    values, stderrs = [], []
    for i, row in enumerate(rows):
        name = row.get("name") or f"row {i + 1}"
        run_dir = _point_dir(row, sweep_dir)
        logged = planning.last_eval(run_dir / "metrics.jsonl") if run_dir is not None else {}
        if source in row:
            value, stderr = row[source], row.get(f"{source}_stderr")
            where = f"{points_file}: {name}: column {source}"
        elif source in logged:
            value, stderr = logged[source], logged.get(f"{source}_stderr")  # a task the point's own train.evals scored
            where = f"{run_dir}/metrics.jsonl: last eval event: {source}"
        else:
            if run_dir is None:
                raise LlmkitError(
                    f"--accuracy {source}: {points_file} has no column {source} and no run_dir to find "
                    f"{source}/metrics.json in; give a column name, e.g. --accuracy choice_acc"
                )
            path = run_dir / source / "metrics.json"
            where = f"{path}: metrics.{metric}"
            try:
                scores = json.loads(path.read_text(encoding="utf-8")).get("metrics", {})
                value, stderr = scores.get(metric), scores.get(f"{metric}_stderr")
            except FileNotFoundError:
                sweep = sweep_dir if sweep_dir is not None else "SWEEP"
                raise LlmkitError(
                    f"--accuracy {source}: point {name} has no {path}; score every point first: llmkit scale eval {sweep} "
                    f"eval/choice-tiny --set output_dir={source}"
                ) from None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
                raise LlmkitError(f"--accuracy {source}: {path} is not a metrics.json of `llmkit eval` ({exc.__class__.__name__})") from None
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise LlmkitError(f"--accuracy {source}: {where} is {value!r}, not an accuracy; was the point scored on the task?") from None
        if not (0.0 <= number <= 1.0):
            raise LlmkitError(f"--accuracy {source}: {where} is {number}, not an accuracy between 0 and 1")
        values.append(number)
        try:
            stderrs.append(float(stderr))
        except (TypeError, ValueError):
            stderrs.append(math.nan)
    known = [e for e in stderrs if math.isfinite(e) and e >= 0]
    return np.asarray(values), (float(np.median(known)) if len(known) == len(values) else None)


def _provenance(data: Path, points_file: Path, param_convention: str | None) -> dict[str, Any]:
    """What makes the fit reproducible: llmkit's version, the points file's hash, and for a sweep its conventions,
    per-point rules and data (fingerprint and size)."""
    out: dict[str, Any] = {
        "llmkit_version": __version__, "points_file": str(points_file),
        "points_sha256": hashlib.sha256(points_file.read_bytes()).hexdigest(), "param_convention": param_convention,
        "flop_convention": None, "rules": None, "schedule": None, "data": None,
    }
    if not data.is_dir() or not (data / "recipe.yaml").is_file():
        return out
    try:
        sweep = load_recipe(data / "recipe.yaml", stage="scale")
        base, _ = planning.base_recipe(sweep)
        hp = rules.load_hp(sweep.hp_fit) if sweep.hp_fit is not None else None
    except LlmkitError as exc:
        dist.log(f"note: {data / 'recipe.yaml'} no longer loads ({exc}); fit.json records no rules")
        return out
    out.update(
        flop_convention=sweep.flop_convention, rules=rules.provenance(sweep.lr_rule, sweep.batch_rule, sweep.warmup_rule, hp),
        schedule=("branched wsd: one stable phase per size, cooldown of train.decay_fraction "
                  f"{base.train.decay_fraction}") if sweep.branch else f"independent runs, train.schedule {base.train.schedule}",
    )
    try:
        out["data"] = json.loads((data / DATA_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        out["data"] = None
    return out


def fit_lines(report: dict[str, Any]) -> list[str]:
    """The fit report: constants with intervals, R^2, held-out residuals, Approach 2 and the optimum at the swept budgets."""
    boot = report["bootstrap"]
    convention = report.get("param_convention")
    columns = ", ".join(f"{q} = {c}" for q, c in report["columns"].items())
    counted = f"; N counts {convention} parameters" if convention else ""
    lines = [
        f"points:      {report['n_points']} from {report['source']} ({columns}{counted})",
        f"law:         {report['law']}",
        f"method:      {report['method']}",
        f"             {'estimate':>12}   {int(boot['level'] * 100)}% bootstrap interval ({boot['n_ok']} of {boot['n_boot']} resamples fitted)",
    ]
    for name, value in report["constants"].items():
        interval = boot["intervals"].get(name)
        span = f"[{interval[0]:.4g}, {interval[1]:.4g}]" if interval else "-"
        lines.append(f"  {name:<10} {value:>12.5g}   {span}")
    if report["kind"] == "chinchilla" and not report.get("degenerate"):
        a = report["derived"]["a"]
        interval = boot["intervals"].get("a")
        span = f" [{interval[0]:.3g}, {interval[1]:.3g}]" if interval else ""
        lines.append(f"  {'a':<10} {a:>12.4g}   {span.strip()}  (compute-optimal N* grows as C^a, D* as C^(1-a))")
    residuals = [r["relative"] for r in report["residuals"]]
    lines.append(f"fit:         R^2 {report['r2']:.4f} on its {report['n_points']} points; residuals {min(residuals):+.2%} .. {max(residuals):+.2%}")
    held = report["holdout"]
    if held.get("available"):
        rows = report["residuals"]
        each = ", ".join(
            f"{rows[i]['name']} {rows[i]['loss'] / p - 1:+.2%}" for i, p in zip(held["test_indices"], held["predicted"], strict=True)
        )
        lines.append(
            f"held out:    {held['n_test']} of {report['n_points']} points (every {held['every']}th of a seeded order), fitted without them: "
            f"RMSE of log loss {held['rmse_log_loss']:.4f}, R^2 {_fmt(held['r2_loss'], 3)}; {each}"
        )
    else:
        lines.append(f"held out:    not computed: {held['reason']}")
    if report["kind"] == "chinchilla":
        a2 = report["approach2"]
        if a2.get("available"):
            extrapolated = sum(b["extrapolated"] for b in a2["budgets"])
            lines.append(
                f"approach 2:  N* ~ C^{a2['a']:.3f} from {len(a2['budgets'])} IsoFLOP parabolas (BIASED, for comparison only; "
                f"{extrapolated} vertex(es) outside the sampled sizes)"
            )
        else:
            lines.append(f"approach 2:  not available (biased anyway): {a2['reason'].split(' (')[0]}")
        for row in report["optimum_at"]:
            if "N" in row and not report.get("degenerate"):
                lines.append(
                    f"optimum:     C {row['C']:.3g}: N* {row['N']:.3g}, D* {row['D']:.3g} ({row['tokens_per_param']:.1f} tokens per parameter), loss {row['loss']:.4f}"
                )
    prov = report.get("provenance") or {}
    if prov.get("rules"):
        lines.append(f"sweep:       {prov['schedule']}; IsoFLOP budgets in {prov['flop_convention']}; " + "; ".join(prov["rules"]["lines"]))
    if prov.get("data"):
        size = prov["data"].get("train_tokens")
        lines.append(f"data:        {prov['data']['fingerprint']}" + (f" ({size:,} training tokens)" if size else ""))
    down = report.get("downstream")
    if down:
        c = down["constants"]
        lines.append(
            f"downstream:  {down['task']}: Acc(L) = {c['a']:.3g} / (1 + exp({-c['k']:.3g} (L - {c['L0']:.4g}))) + {c['b']:.3g}, "
            f"R^2 {_fmt(down['r2'], 3)}, RMSE {down['rmse']:.4f} on {len(down['points'])} points (Bhagia et al. 2024)"
            + (f"; each score +/- {down['score_stderr']:.3f} (its standard error)" if down.get("score_stderr") is not None else "")
        )
    if report.get("degenerate"):
        lines.append(f"warning:     degenerate fit: {report['degenerate']}; `scale recommend` refuses it")
    return lines


# ----------------------------------------------------------------------------------------------
# Recommend
# ----------------------------------------------------------------------------------------------


def _positive(value: float | None, option: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise LlmkitError(f"{option} {value}: must be a positive, finite number")


def _law_base(law: laws.Law, base: str | None):
    """The base pretrain recipe to size, from --base or else from the fitted sweep (Nones without either).

    Returns (base as given, base without its sizes, that as a raw mapping, label, the sweep recipe or
    None): the shape search starts from the one without sizes, as the sweep's points did, so sizes the
    sweep fixed in its overrides (model.head_dim, ...) stay fixed.
    """
    if base is not None:
        recipe = load_recipe(base, stage="pretrain")
        if recipe.model.type is None:
            raise RecipeError(f"--base {base}: continues a checkpoint (model.path); recommend sizes a model built from model.type")
        shapes.family_of(recipe.model.type, f"--base {base}: model.type")
        raw = yaml.safe_load(resolve_recipe_path(base, "pretrain").read_text(encoding="utf-8"))
        drop = shapes.size_keys(recipe.model.type) | {"target_params", "depth"}
        raw["model"] = {k: v for k, v in raw["model"].items() if k not in drop}
        unsized = recipe_from_dict(json.loads(json.dumps(raw)), where=f"--base {base}", stage="pretrain")
        return recipe, unsized, raw, str(base), None
    if law.sweep is not None and (law.sweep / "recipe.yaml").is_file():
        scale_recipe = load_recipe(law.sweep / "recipe.yaml", stage="scale")
        recipe, where = planning.base_recipe(scale_recipe)
        unsized, _ = planning.base_recipe(scale_recipe, keep_sizes=False)
        raw, _ = planning.base_mapping(scale_recipe, keep_sizes=False)
        return recipe, unsized, raw, where, scale_recipe
    return None, None, None, None, None


def _budget(flops, gpu_hours, tokens_per_s, at_params, base, convention) -> tuple[float, str]:
    """The compute budget C (FLOPs, 6 N D) and how it was derived."""
    for value, option in ((flops, "--flops"), (gpu_hours, "--gpu-hours"), (tokens_per_s, "--tokens-per-s"), (at_params, "--at-params")):
        _positive(value, option)
    if (flops is None) == (gpu_hours is None):
        raise LlmkitError("give the budget as --flops C, or as --gpu-hours H with --tokens-per-s T (not both)")
    if flops is not None:
        return float(flops), "--flops"
    if tokens_per_s is None:
        raise LlmkitError("--gpu-hours needs --tokens-per-s: the training speed you measured (tokens per second per GPU)")
    if at_params is None:
        if base is None:
            raise LlmkitError("--tokens-per-s needs the model size it was measured at: give --at-params N or --base RECIPE")
        vocab, _, _ = _vocab(base)
        at_params = planning.model_size(base, vocab, convention)
        where = f"the base model's {at_params:,} {convention} parameters"
    else:
        where = f"{at_params:,.0f} parameters"
    C = gpu_hours * 3600.0 * tokens_per_s * 6.0 * at_params
    return C, f"{gpu_hours:g} GPU-hours x {tokens_per_s:,.0f} tokens/s x 6 x {where}"


def _shape_for(unsized, N: float, convention: str) -> tuple[shapes.SizedModel, Any, str, int | None]:
    """The concrete shape nearest N* for the base's model.type (a llama with a 32,000-token vocabulary without a base),
    and the recipe that builds it."""
    if unsized is None:
        unsized = recipe_from_dict({
            "stage": "pretrain", "output_dir": "runs/recommended", "tokenizer": "none", "model": {"type": "llama"},
            "data": {"train": "builtin:pydoc/train", "seq_len": 512}, "train": {"max_steps": 1},
        })
        vocab, note = 32000, "for a llama with a 32,000-token vocabulary (give --base RECIPE for your own)"
    else:
        vocab, _, note = _vocab(unsized)
    dial = unsized.model.model_copy(update={"target_params": max(1, int(round(N))), "param_convention": convention})
    target = unsized.model_copy(update={"model": dial})
    sized = shapes.choose(target, vocab)
    return sized, models.model_config(shapes.sized_recipe(target, vocab), vocab), note, vocab


def recommend(
    flops: float | None = None,
    gpu_hours: float | None = None,
    tokens_per_s: float | None = None,
    at_params: float | None = None,
    fit_path: Path | None = None,
    base: str | None = None,
    write_recipe: Path | None = None,
    force: bool = False,
    param_convention: str | None = None,
) -> str:
    """`llmkit scale recommend`: the compute-optimal N*, D*, predicted loss, model shape, steps and wall time of a budget."""
    # 1. The law, the base recipe and the budget; every input is checked before anything is written.
    law = laws.load_law(fit_path)
    convention = param_convention or law.convention or "non_embedding"
    base_recipe, unsized, raw, base_where, scale_recipe = _law_base(law, base)
    if write_recipe is not None:
        if raw is None:
            raise LlmkitError("--write-recipe needs a base pretrain recipe: give --base RECIPE (or a --fit made from a sweep)")
        if Path(write_recipe).exists() and not force:
            raise LlmkitError(f"--write-recipe {write_recipe}: already exists; pass --force to overwrite it")
    C, how = _budget(flops, gpu_hours, tokens_per_s, at_params, base_recipe, convention)
    # 2. The optimum (closed form of the fitted law) and the shape that hits N*.
    best = laws.optimum(law, C)
    sized, config, shape_note, vocab = _shape_for(unsized, best.N, convention)
    _check_possible(best, vocab, law)
    seq_len = unsized.data.seq_len if unsized is not None else 512  # the default llama of _shape_for
    flops_per_token = models.flops_per_token(config, sized.counts["matmul"], seq_len)
    per_token = conventions.flops_per_token(sized.counts, sized.shape.layers, sized.shape.hidden, seq_len, convention)
    lines = [_law_line(law, fit_path), f"budget:      C = {C:.4g} FLOPs (6 N D, N = {convention} parameters; {how})"]
    if law.convention is None and param_convention is None:
        lines.append("note:        the points file does not say what N counts; taken as non_embedding (set --param-convention)")
    elif law.convention != convention:
        lines.append(f"note:        the law counts N as {law.convention} parameters; the shape below is sized as {convention}")
    lines += _optimum_lines(best)
    accuracy = laws.predicted_accuracy(law, C)
    if accuracy is not None:
        value, interval = accuracy
        span = f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
        lines.append(f"accuracy:    {value:.3f}{span} predicted on {law.downstream['task']} ({law.downstream['metric']}) from that loss")
        if law.downstream.get("score_stderr") is not None:
            lines.append(
                f"             the interval is the fit's over the sweep's points; the task's own sampling error (each point's "
                f"score +/- {law.downstream['score_stderr']:.3f}, one standard error, on the same examples) is not in it"
            )
    lines.append(f"model:       {sized.describe()}" + (f" ({shape_note})" if shape_note else ""))
    lines.append(f"compute:     of this model on D* tokens, by convention: {conventions.side_by_side(per_token, best.D)} FLOPs")
    # 3. Steps at the base's batch, wall time at the sweep's measured speed, extrapolation warning.
    if base_recipe is not None:
        per_step = planning.tokens_per_step(base_recipe, 1)
        lines.append(f"steps:       {math.ceil(best.D / per_step):,} at the base's batch of {per_step:,} tokens (one process)")
    lines += _time_lines(law, best.D * flops_per_token, gpu_hours)
    lines += _range_warning(law, C)
    lines += _data_lines(law, best, base_recipe if base is not None else None)
    ratio = per_token["6N_attention"] / per_token["6N"]
    if ratio > 1.5:
        lines.append(
            f"note:        this model's training FLOPs with the output layer and attention (6N_attention) are {ratio:.1f}x the "
            f"6 N D the law splits, N counting {convention} parameters: at this size they dominate (Porian et al. 2024); "
            "a fit with --param-convention matmul counts the output layer"
        )
    if write_recipe is not None:
        train, rule_note = _recipe_rules(scale_recipe, base_recipe, sized, best)
        path = _write_recipe(Path(write_recipe), raw, sized, best, law, base_where, how, train, rule_note)
        lines.append(f"wrote:       {path} (run it: llmkit pretrain {path})")
    return "\n".join(lines)


def _recipe_rules(scale_recipe, base_recipe, sized: shapes.SizedModel, best: laws.Optimum) -> tuple[dict[str, Any], str]:
    """The train.* keys the sweep's lr, batch and warmup rules give the recommended model, and a note naming the rules."""
    if scale_recipe is None or base_recipe is None:
        return {}, ""
    cfg = base_recipe.train
    seq_len = base_recipe.data.seq_len
    hp = rules.load_hp(scale_recipe.hp_fit) if scale_recipe.hp_fit is not None else None
    base_params = None
    if scale_recipe.lr_rule == "inverse_sqrt":
        vocab, _, _ = _vocab(base_recipe)
        base_params = planning.model_size(base_recipe, vocab, scale_recipe.param_convention)
    per_token = conventions.flops_per_token(sized.counts, sized.shape.layers, sized.shape.hidden, seq_len, sized.convention)
    inputs = rules.PointInputs(
        counts=sized.counts, tokens=int(round(best.D)), M_per_token=per_token["M"], convention=scale_recipe.param_convention,
        base_lr=cfg.lr, base_batch_tokens=planning.tokens_per_step(base_recipe, 1), base_params=base_params,
    )
    lr = rules.lr_for(scale_recipe.lr_rule, inputs, hp)
    train: dict[str, Any] = {"lr": float(f"{lr:.4g}"), "min_lr": float(f"{cfg.min_lr * lr / cfg.lr:.4g}")}
    if scale_recipe.lr_rule == "fitted" and hp is not None and hp.optimizer == "muon":
        train = {"muon_lr": float(f"{lr:.4g}")}
    if scale_recipe.batch_rule != "constant":
        micro, accum = rules.batch_layout(rules.batch_tokens_for(scale_recipe.batch_rule, inputs, hp), seq_len, cfg.micro_batch_size)
        train.update(micro_batch_size=micro, grad_accum_steps=accum)
    if scale_recipe.warmup_rule == "porian":
        per_step = train.get("micro_batch_size", cfg.micro_batch_size) * train.get("grad_accum_steps", cfg.grad_accum_steps) * seq_len
        train["warmup_steps"] = rules.warmup_steps_for("porian", 0.0, 0, sized.counts[scale_recipe.param_convention], per_step)
    note = "; ".join(rules.describe(scale_recipe.lr_rule, scale_recipe.batch_rule, scale_recipe.warmup_rule, hp))
    return train, f"the sweep's rules ({note})"


def _unique_tokens(law: laws.Law, base_recipe) -> tuple[int | None, str]:
    """The tokens one pass over the training data holds: counted from --base's data (tokenized once, cached), else the
    fitted sweep's data.json; (None, why) when neither is known."""
    if base_recipe is not None:
        vocab, tokenizer, note = _vocab(base_recipe)
        if tokenizer is None:
            return None, note
        try:
            available = _available_tokens(base_recipe, tokenizer)
        except DataError as exc:
            return None, f"--base's data cannot be read as training data: {exc}"
        if available is None:
            return None, "data.train is streamed: its size is unknown until read"
        return available, f"data.train of --base ({cache_key(base_recipe, tokenizer)})"
    if law.data and law.data.get("train_tokens"):
        return int(law.data["train_tokens"]), f"data.train of the sweep ({law.data.get('fingerprint')})"
    return None, "no --base and no sweep data in the fit"


def _data_lines(law: laws.Law, best: laws.Optimum, base_recipe) -> list[str]:
    """Epochs of D* over the unique training tokens; beyond one, the data-constrained adjustment (Muennighoff et al. 2023)."""
    unique, where = _unique_tokens(law, base_recipe)
    if unique is None:
        return [f"data:        not checked ({where})"]
    epochs = best.D / unique
    lines = [f"data:        D* = {best.D:.3g} tokens is {epochs:.2f} epoch(s) of the {unique:,} tokens of {where}"]
    if epochs <= 1.0:
        return lines
    constrained = laws.data_constrained(law, best.C, unique)
    lines[0] = "warning:     " + lines[0][len("data:        "):] + ": the data repeats"
    lines += [
        f"repeats:     {epochs:.2f} passes are worth {laws.effective_tokens(best.D, unique):.3g} unique tokens (Muennighoff et al. "
        f"2023, R* = {laws.REPEAT_DECAY}): predicted loss {constrained.loss_at_unconstrained:.4f} instead of {best.loss:.4f}",
        f"constrained: with {unique:,} unique tokens the best split is N = {constrained.N:.4g}, D = {constrained.D:.4g} "
        f"({constrained.epochs:.2f} epochs), predicted loss {constrained.loss:.4f}; or add data",
    ]
    return lines


def _check_possible(best: laws.Optimum, vocab: int | None, law: laws.Law) -> None:
    """LlmkitError when the law predicts a loss no model can have: above a uniform guess over the vocabulary."""
    if not vocab or vocab < 2:
        return
    uniform = math.log(vocab)
    if best.loss > uniform:
        where = f" (the sweep spans C = {law.C_range[0]:.3g} .. {law.C_range[1]:.3g})" if law.C_range else ""
        raise LlmkitError(
            f"the law predicts a loss of {best.loss:.2f} nats at C = {best.C:.3g}{where}, worse than guessing uniformly "
            f"over the {vocab:,}-token vocabulary (ln {vocab:,} = {uniform:.2f}): the budget lies where the fit does not hold; "
            "give a budget inside the swept range, or sweep smaller models"
        )


def _law_line(law: laws.Law, fit_path: Path | None) -> str:
    c = law.fit
    constants = f"E={c.E:.4g}, A={c.A:.4g}, B={c.B:.4g}, alpha={c.alpha:.4g}, beta={c.beta:.4g}"
    if fit_path is None:
        return f"law:         no --fit given, so the published constants of {laws.EPOCH_SOURCE}: {constants}"
    return f"law:         {law.source}: {constants}"


def _optimum_lines(best: laws.Optimum) -> list[str]:
    def span(name: str, fmt: str) -> str:
        interval = best.intervals.get(name)
        return f" [{interval[0]:{fmt}}, {interval[1]:{fmt}}]" if interval else ""

    level = "" if not best.intervals else " (bracketed: 95% bootstrap interval)"
    return [
        f"optimum:     N* = {best.N:.4g}{span('N', '.3g')} parameters, D* = {best.D:.4g}{span('D', '.3g')} tokens{level}",
        f"             {best.tokens_per_param:.1f}{span('tokens_per_param', '.1f')} tokens per parameter",
        f"loss:        {best.loss:.4f}{span('loss', '.4f')} predicted at (N*, D*)",
    ]


def _time_lines(law: laws.Law, hardware_flops: float, gpu_hours: float | None) -> list[str]:
    """Wall time of the recommended run (D* x its FLOPs per token) at the FLOP/s the sweep's largest point reached."""
    if gpu_hours is not None:
        return [f"wall time:   {gpu_hours:g} GPU-hours (the budget you gave)"]
    speed = law.throughput
    if not speed:
        return ["wall time:   unknown: fit a sweep (its points record their tokens/s) to estimate it"]
    hours = hardware_flops / speed["flops_per_s"] / 3600.0
    return [
        f"wall time:   about {_duration(hours)}: {hardware_flops:.3g} training FLOPs (6 x matmul parameters + attention, "
        f"per token) at the {speed['flops_per_s']:.3g} FLOP/s that point {speed['point']} reached in the sweep "
        f"({speed['tokens_per_s']:,.0f} tokens/s; smaller models reach less)"
    ]


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def _range_warning(law: laws.Law, C: float) -> list[str]:
    if law.C_range is None:
        return []
    low, high = law.C_range
    beyond = max(math.log10(C / high), math.log10(low / C))
    if beyond <= ORDERS_BEYOND:
        return []
    return [
        f"warning:     C is {beyond:.1f} orders of magnitude outside the swept range ({low:.3g} .. {high:.3g} FLOPs): "
        "the law is extrapolated far; treat N*, D* and the loss as rough"
    ]


def _write_recipe(
    path: Path, raw: dict[str, Any], sized: shapes.SizedModel, best: laws.Optimum, law: laws.Law, base_where: str, how: str,
    train_rules: dict[str, Any], rule_note: str,
) -> Path:
    """A pretrain recipe of the base with the recommended shape, the tokens that spend the budget on it and the sweep's
    rules; LlmkitError, writing nothing, when whole optimizer steps cannot spend the budget within BUDGET_TOLERANCE."""
    data = json.loads(json.dumps(raw))
    data["model"] = {k: v for k, v in data["model"].items() if k not in ("aspect_ratio", "param_convention")}
    data["model"].update(shapes.shape_keys(sized.model_type, sized.shape))
    train = data.setdefault("train", {})
    train.pop("max_steps", None)
    train.update(train_rules)
    # D for the shape actually built, so that 6 N D of the recipe is the budget (N* is only hit within the dial's tolerance).
    N = sized.counts[sized.convention]
    tokens = best.C / (6.0 * N)
    train["max_tokens"] = max(1, int(round(tokens)))
    data["output_dir"] = f"runs/{path.stem}"
    recipe = recipe_from_dict(json.loads(json.dumps(data)), where=str(path), stage="pretrain")
    per_step = planning.tokens_per_step(recipe, 1)
    steps = math.ceil(train["max_tokens"] / per_step)
    spent = 6.0 * N * steps * per_step
    if abs(spent / best.C - 1.0) > BUDGET_TOLERANCE:
        raise LlmkitError(
            f"--write-recipe {path}: {steps:,} whole step(s) of {per_step:,} tokens on this {N:,}-parameter model cost "
            f"{spent:.3g} FLOPs (6 N D), {spent / best.C:.2f}x the budget of {best.C:.3g}: the budget is a few optimizer steps; "
            "give a larger budget, or a base with a smaller batch (train.micro_batch_size)"
        )
    if recipe.train.warmup_steps > steps or (recipe.train.schedule == "wsd" and recipe.train.warmup_steps + max(1, round(recipe.train.decay_fraction * steps)) > steps):
        train["warmup_steps"] = max(0, steps // 10)
        recipe_from_dict(json.loads(json.dumps(data)), where=str(path), stage="pretrain")
    header = [
        f"# Compute-optimal {sized.model_type} for C = {best.C:.3g} FLOPs (6 N D): N* {best.N:.3g} ({sized.convention}), this shape "
        f"{N:,}; D {train['max_tokens']:.3g} tokens, predicted loss {best.loss:.3f}.",
        f"# Run:      llmkit pretrain {path}",
        f"# Override: llmkit pretrain {path} --set train.micro_batch_size=4",
        f"# Written by `llmkit scale recommend` from {law.source}; base {base_where}; budget {how}"
        + (f"; {rule_note}." if rule_note else "."),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    return rundir.write_text_atomic(path, "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
