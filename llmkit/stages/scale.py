"""`llmkit scale sweep | fit | recommend`: measure a scaling law on your data, fit it, and size a model with it.

    llmkit tokenizer train tokenizer/tiny
    llmkit scale sweep scale/cpu-tiny                     # 9 tiny llamas on Python's docs (CPU, minutes)
    llmkit scale fit runs/scale-cpu-tiny                  # L(N, D) with intervals -> fit.json, fit.png
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
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from llmkit import dist, models, rundir
from llmkit.data.lm import lm_train_data
from llmkit.errors import DataError, LlmkitError, RecipeError
from llmkit.recipes import ScaleRecipe, load_recipe, recipe_from_dict, recipe_to_yaml, resolve_recipe_path
from llmkit.scaling import laws, plots, shapes
from llmkit.scaling import sweep as planning
from llmkit.scaling.fit import load_points, write_fit_json
from llmkit.stages import pretrain

SWEEP_FILES = ("sweep.jsonl", "sweep.csv", "fit.json", "fit.png")
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
    """What a sweep will run: its base, rules and one line per point (shape, N, D, C, steps, lr)."""
    if plan is None:
        base, _ = planning.base_recipe(recipe)
        vocab, _, note = _vocab(base)
        plan = planning.plan(recipe, vocab)
    base = plan.base
    per_step = planning.tokens_per_step(base)
    grid = recipe.grid
    mode = f"{len(grid.flops)} IsoFLOP budget(s)" if grid.flops else f"{len(grid.sizes)} sizes x {len(grid.tokens)} token budgets"
    rule = "constant" if recipe.lr_rule == "constant" else f"inverse_sqrt (lr x (N_base / N)^0.5, N_base {plan.base_params:,})"
    lines = [
        f"stage:            scale ({len(plan.points)} pretrain runs: {mode})",
        f"base:             {plan.base_where}",
        f"N counts:         {recipe.param_convention} parameters; C = 6 N D",
        f"batch:            {base.train.micro_batch_size} micro-batch x {base.train.grad_accum_steps} accum x "
        f"{base.data.seq_len} seq_len x {dist.world_size()} process(es) = {per_step:,} tokens per step, every point",
        f"learning rate:    {rule}; base lr {base.train.lr:g}",
        f"{'point':<22} {'layers':>6} {'hidden':>6} {'heads':>5} {'N':>12} {'D':>12} {'C':>9} {'steps':>7} {'lr':>9}",
    ]
    for p in plan.points:
        s = p.sized.shape
        lines.append(
            f"{p.name:<22} {s.layers:>6} {s.hidden:>6} {s.heads:>5} {p.N:>12,} {p.tokens:>12,} "
            f"{6.0 * p.N * p.tokens:>9.2e} {p.steps:>7,} {p.recipe.train.lr:>9.3g}"
        )
    total_tokens = sum(p.tokens for p in plan.points)
    lines.append(f"total:            {total_tokens:,} tokens, {sum(6.0 * p.N * p.tokens for p in plan.points):.3g} FLOPs (6 N D)")
    lines += [f"note:             {n}" for n in plan.notes + ([note] if note else [])]
    lines.append(f"output_dir:       {recipe.output_dir}")
    return lines


def _available_tokens(recipe, tokenizer) -> int | None:
    """Training tokens the data holds (whole blocks), None for streamed data, where it is unknown until read."""
    data = lm_train_data(recipe, tokenizer)
    return None if data.train is None else len(data.train) * recipe.data.seq_len


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
    shutil.rmtree(output_dir / planning.POINTS, ignore_errors=True)
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
            if claimed.state == "replace":
                _clear(output_dir)
            _write_recipe_if_changed(recipe, output_dir)
            for line in plan_lines(recipe, plan):
                dist.log(line)
        records = []
        with _one_process_group():
            for index, point in enumerate(plan.points, start=1):
                records.append(_run_point(point, index, len(plan.points), available))
                if dist.rank() == 0:
                    _write_tables(output_dir, records)
    if dist.rank() != 0:
        return ""
    return "\n".join(result_lines(records) + [
        f"wrote:  {output_dir / 'sweep.jsonl'}, {output_dir / 'sweep.csv'}",
        f"next:   llmkit scale fit {output_dir}",
    ])


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


def fit(data: Path, output: Path | None = None, n_boot: int = 200, param_convention: str | None = None, seed: int = 0) -> str:
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
    target = Path(output) if output else (data / "fit.json" if data.is_dir() else data.with_name(f"{data.stem}.fit.json"))
    picture = target.with_suffix(".png")
    write_fit_json(target, report)
    plots.plot_fit(report, points, rows, picture)
    return "\n".join(fit_lines(report) + [f"wrote:       {target}, {picture}", f"next:        llmkit scale recommend --flops 1e15 --fit {target}"])


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
    if report["kind"] == "chinchilla":
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
            if "N" in row:
                lines.append(
                    f"optimum:     C {row['C']:.3g}: N* {row['N']:.3g}, D* {row['D']:.3g} ({row['tokens_per_param']:.1f} tokens per parameter), loss {row['loss']:.4f}"
                )
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


def _shape_for(unsized, N: float, convention: str) -> tuple[shapes.SizedModel, Any, str]:
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
    return sized, models.model_config(shapes.sized_recipe(target, vocab), vocab), note


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
    sized, config, shape_note = _shape_for(unsized, best.N, convention)
    seq_len = unsized.data.seq_len if unsized is not None else 512  # the default llama of _shape_for
    flops_per_token = models.flops_per_token(config, sized.counts["matmul"], seq_len)
    lines = [_law_line(law, fit_path), f"budget:      C = {C:.4g} FLOPs (6 N D, N = {convention} parameters; {how})"]
    if law.convention is None and param_convention is None:
        lines.append("note:        the points file does not say what N counts; taken as non_embedding (set --param-convention)")
    elif law.convention != convention:
        lines.append(f"note:        the law counts N as {law.convention} parameters; the shape below is sized as {convention}")
    lines += _optimum_lines(best)
    lines.append(f"model:       {sized.describe()}" + (f" ({shape_note})" if shape_note else ""))
    # 3. Steps at the base's batch, wall time at the sweep's measured speed, extrapolation warning.
    if base_recipe is not None:
        per_step = planning.tokens_per_step(base_recipe, 1)
        lines.append(f"steps:       {math.ceil(best.D / per_step):,} at the base's batch of {per_step:,} tokens (one process)")
    lines += _time_lines(law, best.D * flops_per_token, gpu_hours)
    lines += _range_warning(law, C)
    if write_recipe is not None:
        lr_scale = 1.0
        if scale_recipe is not None and scale_recipe.lr_rule == "inverse_sqrt":
            # The sweep's learning-rate rule, so the recommended model trains the way its points did.
            vocab, _, _ = _vocab(base_recipe)
            lr_scale = math.sqrt(planning.model_size(base_recipe, vocab, scale_recipe.param_convention) / sized.counts[scale_recipe.param_convention])
        path = _write_recipe(Path(write_recipe), raw, sized, best, law, base_where, how, lr_scale)
        lines.append(f"wrote:       {path} (run it: llmkit pretrain {path})")
    return "\n".join(lines)


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
    lr_scale: float = 1.0,
) -> Path:
    """A pretrain recipe of the base with the recommended shape, train.max_tokens = D* and the sweep's lr rule; checked first."""
    data = json.loads(json.dumps(raw))
    data["model"] = {k: v for k, v in data["model"].items() if k not in ("aspect_ratio", "param_convention")}
    data["model"].update(shapes.shape_keys(sized.model_type, sized.shape))
    train = data.setdefault("train", {})
    train.pop("max_steps", None)
    train["max_tokens"] = int(round(best.D))
    if lr_scale != 1.0:
        base_lr = recipe_from_dict(json.loads(json.dumps(raw)), where=base_where, stage="pretrain").train
        train["lr"], train["min_lr"] = float(f"{base_lr.lr * lr_scale:.4g}"), float(f"{base_lr.min_lr * lr_scale:.4g}")
    data["output_dir"] = f"runs/{path.stem}"
    recipe = recipe_from_dict(json.loads(json.dumps(data)), where=str(path), stage="pretrain")
    steps = math.ceil(best.D / planning.tokens_per_step(recipe, 1))
    if recipe.train.warmup_steps > steps:
        train["warmup_steps"] = max(0, steps // 10)
        recipe_from_dict(json.loads(json.dumps(data)), where=str(path), stage="pretrain")
    header = [
        f"# Compute-optimal {sized.model_type} for C = {best.C:.3g} FLOPs: N* {best.N:.3g} ({sized.convention}), D* {best.D:.3g} tokens, "
        f"predicted loss {best.loss:.3f}.",
        f"# Run:      llmkit pretrain {path}",
        f"# Override: llmkit pretrain {path} --set train.micro_batch_size=4",
        f"# Written by `llmkit scale recommend` from {law.source}; base {base_where}; budget {how}"
        + (f"; lr x {lr_scale:.3g} by the sweep's lr_rule inverse_sqrt." if lr_scale != 1.0 else "."),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    return rundir.write_text_atomic(path, "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
