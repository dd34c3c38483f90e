"""Branched sweep versus independent runs: compute, wall time, and the fit each gives, on the bundled CPU sweep.

    python benchmarks/scale_branch_bench.py                               # recipes/scale/cpu-tiny.yaml, ~25 min on 2 busy cores
    python benchmarks/scale_branch_bench.py --set grid.sizes=[20e3,80e3]  # a smaller grid

Sides (each in its own fresh process, one after the other, the independent side first):

- independent: every point of the sweep's plan trained from scratch as its own `llmkit pretrain` run
               (the same recipe the branched sweep gives it: WSD schedule, same warmup, lr and batch);
- branched:    `llmkit scale sweep` with branch: true: one constant-lr stable phase per size, each point a
               WSD cooldown resumed from the stable phase's checkpoint at its branch step.

Both run with OMP_NUM_THREADS=1 and a fresh tokenization cache each (tokenizing once is in both times).
Reported: tokens and training FLOPs (6N_attention) each side trains, wall time, whether every point's final
validation loss is the same on both sides, and `llmkit scale fit` of each (constants, 95% bootstrap
intervals, held-out RMSE). Raw numbers: benchmarks/_work/scale_branch_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", LLMKIT_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _load(recipe: str, sets: list[str], output_dir: Path):
    from llmkit import models
    from llmkit.recipes import load_recipe
    from llmkit.scaling import sweep as planning

    scale_recipe = load_recipe(recipe, [*sets, f"output_dir={output_dir}", "branch=true"], stage="scale")
    base, _ = planning.base_recipe(scale_recipe)
    tokenizer = models.load_tokenizer(base.tokenizer)
    return scale_recipe, planning.plan(scale_recipe, models.padded_vocab_size(len(tokenizer)))


def independent_worker(recipe: str, sets: list[str], output_dir: Path) -> None:
    """Train every point of the plan from scratch in this process; write sweep.jsonl like a sweep does."""
    import torch

    from llmkit.stages import pretrain
    from llmkit.stages.scale import _one_process_group

    torch.set_num_threads(1)
    _, plan = _load(recipe, sets, output_dir / "unused")
    rows = []
    with _one_process_group():
        for point in plan.points:
            alone = point.recipe.model_copy(update={"output_dir": output_dir / "points" / point.name})
            started = time.perf_counter()
            summary = pretrain.run(alone)
            rows.append({"name": point.name, "N": point.N, "D": summary["tokens"], "loss": summary["val_loss"],
                         "wall_s": round(time.perf_counter() - started, 2)})
    (output_dir / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fit(points: Path, out: Path, env: dict[str, str]) -> dict:
    subprocess.run([sys.executable, "-m", "llmkit", "scale", "fit", str(points), "-o", str(out), "--bootstrap", "200"],
                   env=env, check=True, capture_output=True)
    fit = json.loads(out.read_text())
    held = fit["holdout"]
    return {
        "constants": fit["constants"], "intervals": {k: fit["bootstrap"]["intervals"].get(k) for k in (*fit["constants"], "a")},
        "a": fit.get("derived", {}).get("a"), "r2": fit["r2"],
        "holdout_rmse_log_loss": held.get("rmse_log_loss"), "holdout_n": held.get("n_test"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="scale/cpu-tiny")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="a sweep recipe override, as in llmkit --set")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "scale_branch")
    parser.add_argument("--reuse", action="store_true", help="fit and report the runs already in --work (no training)")
    parser.add_argument("--independent-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.independent_worker:
        independent_worker(args.recipe, args.sets, args.independent_worker)
        return
    import shutil

    if not args.reuse:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    _, plan = _load(args.recipe, args.sets, args.work / "branched")
    trained_tokens, independent_tokens = plan.trained_tokens()
    trained_flops, independent_flops = plan.trained_flops()
    load_before = os.getloadavg()
    walls = json.loads((args.work / "walls.json").read_text()) if args.reuse else {}
    for side in () if args.reuse else ("independent", "branched"):
        with tempfile.TemporaryDirectory() as cache:
            env = _env(Path(cache))
            started = time.perf_counter()
            if side == "independent":
                cmd = [sys.executable, str(HERE), "--recipe", args.recipe, "--independent-worker", str(args.work / side)]
            else:
                cmd = [sys.executable, "-m", "llmkit", "scale", "sweep", args.recipe, "--set", f"output_dir={args.work / side}",
                       "--set", "branch=true"]
            for s in args.sets:
                cmd += ["--set", s]
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            walls[side] = time.perf_counter() - started
            print(f"{side}: {walls[side]:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
            (args.work / "walls.json").write_text(json.dumps(walls))
    rows = {side: {r["name"]: r for r in map(json.loads, (args.work / side / "sweep.jsonl").read_text().splitlines())}
            for side in walls}
    same = {name: rows["branched"][name]["loss"] == rows["independent"][name]["loss"] for name in rows["independent"]}
    env = _env(args.work / "fit-cache")
    fits = {side: _fit(args.work / side / "sweep.jsonl", args.work / f"{side}-fit.json", env) for side in walls}
    result = {
        "machine": f"{platform.node()}, {os.cpu_count()} cores (shared), load before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}",
        "recipe": args.recipe, "sets": args.sets, "points": len(plan.points), "stable_phases": len(plan.trunks),
        "tokens": {"branched": trained_tokens, "independent": independent_tokens, "ratio": trained_tokens / independent_tokens},
        "flops_6N_attention": {"branched": trained_flops, "independent": independent_flops, "ratio": trained_flops / independent_flops},
        "wall_s": {**{k: round(v, 1) for k, v in walls.items()}, "ratio": walls["branched"] / walls["independent"]},
        "identical_losses": f"{sum(same.values())} of {len(same)}",
        "losses": {name: [rows["independent"][name]["loss"], rows["branched"][name]["loss"]] for name in rows["independent"]},
        "fits": fits,
    }
    out = args.work.parent / "scale_branch_bench.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=1))


if __name__ == "__main__":
    main()
