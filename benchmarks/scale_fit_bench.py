"""Scaling-law fit speed: llmkit's Chinchilla fit versus plain scipy multi-start L-BFGS-B, same data, same run.

    python benchmarks/scale_fit_bench.py                            # 450 baseline starts, 3 repeats, ~1.5 min on 2 cores
    python benchmarks/scale_fit_bench.py --baseline-starts 4500 --repeats 3   # full Hoffmann grid, ~6 min

Data: tests/data/chinchilla_fig4_epoch_extracted.csv (Epoch AI's 245 points from Chinchilla's Figure 4),
D = C / (6 N), the 5 highest losses dropped as Besiroglu et al. 2024 do: 240 points.

Sides, alternating within every repeat (the first side swaps each repeat), medians reported:

- llmkit:   `llmkit.scaling.fit.fit_chinchilla` (the whole 4,500-start grid evaluated at once, L-BFGS-B with
            an analytic gradient from the best 16 starts, one polishing restart).
- scipy:    the straightforward way: the objective as numpy on one parameter vector (log of a sum of
            exps, Huber via np.where, summed), `scipy.optimize.minimize(method="L-BFGS-B")` with its
            default tolerances and finite-difference gradients, from each of `--baseline-starts` points
            of Hoffmann's grid (every k-th of the 4,500 when fewer), keeping the lowest objective.

Both sides run with BLAS held to one thread (threadpoolctl), since scipy's L-BFGS-B calls OpenBLAS on
tiny matrices and extra threads only spin on a shared machine; the comparison is of the methods.
Also timed: llmkit's 200-round bootstrap (warm-started refits), for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from itertools import product
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))

DATA = HERE.parent.parent / "tests" / "data" / "chinchilla_fig4_epoch_extracted.csv"
PUBLISHED = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}  # Besiroglu et al. 2024
NAMES = ("E", "A", "B", "alpha", "beta")


def chinchilla_points() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N, D, loss of the 240 points the replication fits."""
    from llmkit.scaling.fit import load_points

    points = load_points(DATA)
    keep = np.sort(np.argsort(points.loss, kind="stable")[:-5])
    return points.N_params[keep], points.D_tokens[keep], points.loss[keep]


def plain_objective(params, N, D, loss, delta=1e-3):
    """Sum of Huber losses of log-sum-exp predictions, written the plain way for one parameter vector."""
    a, b, e, alpha, beta = params
    predicted = np.log(np.exp(a - alpha * np.log(N)) + np.exp(b - beta * np.log(D)) + np.exp(e))
    residual = np.abs(np.log(loss) - predicted)
    return np.sum(np.where(residual <= delta, 0.5 * residual**2, delta * (residual - 0.5 * delta)))


def hoffmann_grid() -> np.ndarray:
    """The 4,500 initialisations: a, b in {0..25 step 5}, e in {-1..1 step .5}, alpha, beta in {0..2 step .5}."""
    axes = [
        np.arange(0, 30, 5),
        np.arange(0, 30, 5),
        np.arange(-1, 1.5, 0.5),
        np.arange(0, 2.5, 0.5),
        np.arange(0, 2.5, 0.5),
    ]
    return np.array(list(product(*axes)), dtype=float)


def run_scipy(N, D, loss, starts: np.ndarray) -> dict:
    """Plain multi-start L-BFGS-B (numerical gradients, default tolerances); the best result and its time."""
    from scipy.optimize import minimize

    begin = time.perf_counter()
    best = None
    with np.errstate(over="ignore", invalid="ignore"):  # exp overflows from the grid's far corners; scipy copes
        for start in starts:
            result = minimize(plain_objective, start, args=(N, D, loss), method="L-BFGS-B")
            if best is None or result.fun < best.fun:
                best = result
    seconds = time.perf_counter() - begin
    a, b, e, alpha, beta = best.x
    constants = {"E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta}
    return {"seconds": seconds, "objective": float(best.fun), **{k: float(v) for k, v in constants.items()}}


def run_llmkit(N, D, loss) -> dict:
    """llmkit's fit; its constants and time."""
    from llmkit.scaling.fit import fit_chinchilla

    begin = time.perf_counter()
    fit = fit_chinchilla(N, D, loss)
    seconds = time.perf_counter() - begin
    return {"seconds": seconds, "objective": fit.objective_huber_sum, **{k: getattr(fit, k) for k in NAMES}}


def objective_at(constants: dict, N, D, loss) -> float:
    """The replication's objective evaluated at given constants."""
    params = [
        np.log(constants["A"]),
        np.log(constants["B"]),
        np.log(constants["E"]),
        constants["alpha"],
        constants["beta"],
    ]
    return float(plain_objective(params, N, D, loss))


def table(rows: list[tuple[str, str, dict, list[float] | None]]) -> str:
    """Markdown table of sides, their times and constants."""
    lines = [
        "| side | starts | median s | runs (s) | E | A | B | alpha | beta | a = beta/(alpha+beta) | objective |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side, starts, c, runs in rows:
        median = f"{statistics.median(runs):.2f}" if runs else "-"
        runs_text = " / ".join(f"{r:.2f}" for r in runs) if runs else "-"
        a = c["beta"] / (c["alpha"] + c["beta"])
        lines.append(
            f"| {side} | {starts} | {median} | {runs_text} | {c['E']:.4f} | {c['A']:.2f} | {c['B']:.2f} | "
            f"{c['alpha']:.4f} | {c['beta']:.4f} | {a:.4f} | {c['objective']:.6e} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Alternate the two sides, print a markdown table and the raw numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--baseline-starts", type=int, default=450, help="Grid starts for plain scipy (4500 = all)."
    )
    parser.add_argument("--bootstrap-rounds", type=int, default=200)
    parser.add_argument("--output", type=Path, help="Also write the raw results to this JSON file.")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    N, D, loss = chinchilla_points()
    grid = hoffmann_grid()
    stride = max(1, len(grid) // args.baseline_starts)
    starts = grid[::stride][: args.baseline_starts]
    times: dict[str, list[float]] = {"llmkit": [], "scipy": []}
    last: dict[str, dict] = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for repeat in range(args.repeats):
            order = ["llmkit", "scipy"] if repeat % 2 == 0 else ["scipy", "llmkit"]
            for side in order:
                last[side] = run_llmkit(N, D, loss) if side == "llmkit" else run_scipy(N, D, loss, starts)
                times[side].append(last[side]["seconds"])
                print(f"repeat {repeat + 1} {side}: {last[side]['seconds']:.2f} s", flush=True)
        from llmkit.scaling.fit import bootstrap, fit_chinchilla

        fit = fit_chinchilla(N, D, loss)
        begin = time.perf_counter()
        boot = bootstrap(N, D, loss, n_boot=args.bootstrap_rounds, seed=0, fit=fit)
        boot_seconds = time.perf_counter() - begin
    published = {**PUBLISHED, "objective": objective_at(PUBLISHED, N, D, loss)}
    speedup = statistics.median(times["scipy"]) / statistics.median(times["llmkit"])
    per_start = statistics.median(times["scipy"]) / len(starts)
    print()
    print(
        f"{len(loss)} points; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print(
        table(
            [
                ("llmkit `fit_chinchilla`", "4500 evaluated, 16 L-BFGS", last["llmkit"], times["llmkit"]),
                (
                    "plain scipy L-BFGS-B, numerical gradients",
                    str(len(starts)),
                    last["scipy"],
                    times["scipy"],
                ),
                ("published (Besiroglu et al. 2024)", "4500", published, None),
            ]
        )
    )
    print()
    print(
        f"speedup (median scipy / median llmkit): {speedup:.1f}x at {len(starts)} baseline starts; "
        f"scipy per start {per_start:.3f} s, so the full 4,500-start grid ~ {per_start * len(grid):.0f} s"
    )
    interval = boot.intervals["a"]
    print(
        f"llmkit bootstrap, {args.bootstrap_rounds} rounds: {boot_seconds:.2f} s; 95% interval of a: "
        f"[{interval[0]:.3f}, {interval[1]:.3f}]"
    )
    if args.output:
        results = {
            "times": times,
            "llmkit": last["llmkit"],
            "scipy": last["scipy"],
            "published": published,
            "baseline_starts": len(starts),
            "bootstrap_seconds": boot_seconds,
            "bootstrap": boot.intervals,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
