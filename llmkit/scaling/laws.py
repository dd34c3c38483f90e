"""What a sweep's points say: the law they fit with intervals and held-out checks (fit.json), and the optimum it implies.

    llmkit scale fit runs/scale-cpu-tiny                         # fit_points -> fit.json
    llmkit scale recommend --flops 1e15 --fit runs/scale-cpu-tiny

The fits themselves are llmkit/scaling/fit.py. Added here:

- `bootstrap_draws`: resample the points with replacement and refit, keeping every draw's constants
  (fit.bootstrap keeps only their percentiles), so that whatever the law implies -- N*, D* and the loss
  at a budget nobody ran -- gets an interval too;
- the choice of law from what the points vary: both N and D give L(N, D) = E + A/N^alpha + B/D^beta;
  only one of them gives L(x) = E + A/x^alpha in that one;
- held-out residuals for the one-variable laws (fit.holdout covers L(N, D)), with the same rule;
- fit.json and reading it back as a `Law`; without a fit, Epoch AI's refit of Chinchilla (`EPOCH_CHINCHILLA`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from llmkit.errors import LlmkitError
from llmkit.scaling.fit import (
    MIN_POINTS_CHINCHILLA,
    MIN_POINTS_ONE_VARIABLE,
    ChinchillaFit,
    Points,
    compute_optimal,
    fit_chinchilla,
    fit_isoflop_parabolas,
    fit_power_law,
    holdout,
    predict,
    predict_power_law,
    r_squared,
)

FIT_VERSION = 1
# Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt", arXiv 2404.10102), Approach 3 refit
# of Hoffmann et al.'s data; N counts all parameters, D MassiveText tokens.
EPOCH_CHINCHILLA = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
EPOCH_SOURCE = "Epoch AI's refit of Chinchilla (Besiroglu et al. 2024): total parameters, MassiveText tokens"
LAW_NAMES = ("E", "A", "B", "alpha", "beta")
POWER_NAMES = ("E", "A", "alpha")
LEVEL = 0.95
BOOTSTRAP_TOP_K = 2  # L-BFGS starts per bootstrap refit: the best grid starts of a resample are as good as 16 (0.05 s vs 0.3 s)
HOLDOUT_EVERY = 5
DEGENERATE_EXPONENT = 1e-3  # an exponent at or below this makes its term a constant: the law cannot extrapolate
# An exponent above this makes its term fall more than 30x per doubling: a step inside the swept range (the loss stops
# improving with N or D past the smallest values), not a power law to extrapolate. Published fits lie at 0.07-0.8.
STEEP_EXPONENT = 5.0


def chinchilla(constants: dict[str, float], n_points: int = 0) -> ChinchillaFit:
    """A ChinchillaFit from its five constants, with the derived a, b and G filled in."""
    E, A, B, alpha, beta = (float(constants[name]) for name in LAW_NAMES)
    a = b = G = math.nan
    if alpha > 0 and beta > 0:
        a, b = beta / (alpha + beta), alpha / (alpha + beta)
        G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    return ChinchillaFit(E=E, A=A, B=B, alpha=alpha, beta=beta, objective_huber_sum=math.nan, n_points=n_points,
                         delta=1e-3, a=a, b=b, G=G)


# ----------------------------------------------------------------------------------------------
# Fitting points
# ----------------------------------------------------------------------------------------------


def _r2(actual: np.ndarray, predicted: np.ndarray) -> float:
    total = float(((actual - actual.mean()) ** 2).sum())
    return 1.0 - float(((actual - predicted) ** 2).sum()) / total if total > 0 else math.nan


def _interval(values: np.ndarray, level: float) -> list[float] | None:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    return [float(np.percentile(values, 50 * (1 - level))), float(np.percentile(values, 50 * (1 + level)))]


def bootstrap_draws(x: list[np.ndarray], loss: np.ndarray, *, n_boot: int, seed: int) -> tuple[np.ndarray, int]:
    """Constants refitted on n_boot seeded resamples (rows: E, A, B, alpha, beta for two variables, else E, A, alpha).

    A resample that repeats too few distinct points to identify the law is skipped; the count comes back.
    """
    rng = np.random.default_rng(seed)
    draws, skipped = [], 0
    for _ in range(n_boot):
        rows = rng.integers(0, len(loss), size=len(loss))
        try:
            if len(x) == 2:
                refit = fit_chinchilla(x[0][rows], x[1][rows], loss[rows], top_k=BOOTSTRAP_TOP_K)
                draws.append([getattr(refit, name) for name in LAW_NAMES])
            else:
                refit = fit_power_law(x[0][rows], loss[rows], top_k=BOOTSTRAP_TOP_K)
                draws.append([getattr(refit, name) for name in POWER_NAMES])
        except LlmkitError:
            skipped += 1
    width = 5 if len(x) == 2 else 3
    return np.asarray(draws, dtype=float).reshape(-1, width), skipped


def degenerate(constants: dict[str, float]) -> str | None:
    """Why a fitted law cannot be used to extrapolate (an exponent at or below DEGENERATE_EXPONENT, or above
    STEEP_EXPONENT), or None."""
    names = [name for name in ("alpha", "beta") if name in constants]
    flat = [name for name in names if not float(constants[name]) > DEGENERATE_EXPONENT]
    steep = [name for name in names if float(constants[name]) > STEEP_EXPONENT]

    def quantities(which: list[str]) -> str:
        return " or ".join("N" if n == "alpha" else "D" for n in which)

    def values(which: list[str]) -> str:
        return f"{' and '.join(which)} = {', '.join(f'{float(constants[n]):.3g}' for n in which)}"

    if flat:
        return (
            f"{values(flat)}: the loss does not fall with {quantities(flat)} in this fit, so it says nothing about larger "
            "runs; vary that quantity more widely (or train the points longer)"
        )
    if steep:
        return (
            f"{values(steep)}: the loss stops falling with {quantities(steep)} past the smallest swept values (a step, "
            f"not a power law), so the fit says nothing about larger runs; check the larger points' training (lr, batch) "
            "or vary that quantity more widely"
        )
    return None


def holdout_every(n: int, min_train: int) -> int | None:
    """Hold out every 5th point when that leaves enough to fit, else one point, else none (None)."""
    if n - math.ceil(n / HOLDOUT_EVERY) >= min_train:
        return HOLDOUT_EVERY
    if n - 1 >= min_train and n >= 2:
        return n
    return None


def _power_holdout(x: np.ndarray, loss: np.ndarray, every: int, seed: int) -> dict[str, Any]:
    """fit.holdout's rule (every `every`-th point of a seeded permutation held out) for a one-variable law."""
    test = np.sort(np.random.default_rng(seed).permutation(len(loss))[::every])
    train = np.setdiff1d(np.arange(len(loss)), test)
    law = fit_power_law(x[train], loss[train])
    predicted = np.asarray(predict_power_law(law, x[test]), dtype=float)
    return {
        "test_indices": test.tolist(), "n_train": int(len(train)), "n_test": int(len(test)),
        "rmse_log_loss": float(np.sqrt(np.mean((np.log(predicted) - np.log(loss[test])) ** 2))),
        "r2_loss": _r2(loss[test], predicted), "predicted": predicted.tolist(),
    }


def _finite_holdout(held: dict[str, Any]) -> dict[str, Any]:
    """A held-out check whose refit ran off to infinite constants says so instead of reporting NaN residuals."""
    if all(math.isfinite(p) for p in held["predicted"]):
        return held
    return {
        "available": False, "every": held["every"], "test_indices": held["test_indices"],
        "reason": f"the law refitted without {held['n_test']} of the points diverged (constants not finite): "
                  "the remaining points do not pin it down; add points",
    }


def _which_law(points: Points) -> str:
    """'ND' when both N and D vary, else the one variable that does ('N' or 'D')."""
    N, D = points.N_params, points.D_tokens
    varies = {name: values is not None and len(np.unique(values)) > 1 for name, values in (("N", N), ("D", D))}
    if varies["N"] and varies["D"]:
        return "ND"
    if varies["N"] or varies["D"]:
        return "N" if varies["N"] else "D"
    raise LlmkitError(f"{points.source}: every point has the same N and D; vary the model size or the tokens to fit a law")


def _residuals(names: list[str], points: Points, predicted: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for i, name in enumerate(names):
        row = {"name": name, "loss": float(points.loss[i]), "predicted": float(predicted[i]),
               "relative": float(points.loss[i] / predicted[i] - 1.0)}
        for key, values in (("N", points.N_params), ("D", points.D_tokens)):
            if values is not None:
                row[key] = float(values[i])
        rows.append(row)
    return rows


def fit_points(points: Points, extras: list[dict[str, Any]], *, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Everything `llmkit scale fit` reports and writes to fit.json, for one set of points.

    extras: the rows of the points file (names, IsoFLOP budget labels, measured throughput), in order.
    """
    kind = _which_law(points)
    if float(np.ptp(points.loss)) <= 1e-9 * float(points.loss.max()):
        raise LlmkitError(
            f"{points.source}: every point has the same loss ({points.loss[0]:.6g}): there is no trend to fit; "
            "check the loss column (did every run log the same value?)"
        )
    names = [str(row.get("name") or f"point {i + 1}") for i, row in enumerate(extras)]
    if kind == "ND":
        report = _fit_two_variables(points, extras, n_boot=n_boot, seed=seed)
    else:
        report = _fit_one_variable(points, kind, n_boot=n_boot, seed=seed)
    report["residuals"] = _residuals(names, points, np.asarray(report.pop("_predicted")))
    if not math.isfinite(report["r2"]):
        raise LlmkitError(
            f"{points.source}: the fitted law does not reproduce the points (R^2 not finite): the losses do not "
            "follow a power law in N or D; check the columns, or add points"
        )
    report["degenerate"] = degenerate(report["constants"])
    C = 6.0 * points.N_params * points.D_tokens if points.N_params is not None and points.D_tokens is not None else None
    report.update({
        "version": FIT_VERSION,
        "source": points.source,
        "columns": points.columns,
        "n_points": len(points),
        "ranges": {
            key: [float(values.min()), float(values.max())]
            for key, values in (("N", points.N_params), ("D", points.D_tokens), ("C", C)) if values is not None
        },
        "throughput": _throughput(points, extras),
    })
    return report


def _guard(points: Points, minimum: int, law: str) -> None:
    if len(points) < minimum:
        raise LlmkitError(
            f"{points.source} has {len(points)} points; {law} needs at least {minimum}: add runs (grid points)"
        )


def _fit_two_variables(points: Points, extras: list[dict[str, Any]], *, n_boot: int, seed: int) -> dict[str, Any]:
    """L(N, D) with bootstrap intervals, R^2, held-out residuals, the optimum at the swept budgets, and Approach 2."""
    N, D, loss = points.N_params, points.D_tokens, points.loss
    _guard(points, MIN_POINTS_CHINCHILLA, "L(N, D) = E + A/N^alpha + B/D^beta (5 constants)")
    try:
        law = fit_chinchilla(N, D, loss)
    except LlmkitError as exc:
        raise LlmkitError(f"{points.source}: {exc}") from None
    predicted = np.asarray(predict(law, N, D), dtype=float)
    draws, skipped = bootstrap_draws([N, D], loss, n_boot=n_boot, seed=seed) if n_boot else (np.zeros((0, 5)), 0)
    derived = _derived(draws)
    intervals = {name: _interval(draws[:, i], LEVEL) for i, name in enumerate(LAW_NAMES)}
    intervals.update({name: _interval(values, LEVEL) for name, values in derived.items()})
    every = holdout_every(len(loss), MIN_POINTS_CHINCHILLA)
    if every is None:
        held = {"available": False, "reason": f"needs {MIN_POINTS_CHINCHILLA + 1}+ points to fit without one"}
    else:
        result = holdout(N, D, loss, every=every, seed=seed)
        test = np.asarray(result.test_indices)
        held = {
            "available": True, "every": every, "test_indices": result.test_indices, "n_train": result.n_train,
            "n_test": result.n_test, "rmse_log_loss": result.rmse_log_loss, "r2_loss": result.r2_loss,
            "predicted": np.asarray(predict(result.fit, N[test], D[test]), dtype=float).tolist(),
        }
        held = _finite_holdout(held)
    C = 6.0 * N * D
    return {
        "kind": "chinchilla",
        "law": "L(N, D) = E + A / N^alpha + B / D^beta",
        "method": "Huber (delta 1e-3) on log loss, L-BFGS from Hoffmann et al.'s 4,500-start grid (Besiroglu et al. 2024)",
        "constants": {name: float(getattr(law, name)) for name in LAW_NAMES},
        "derived": {"a": law.a, "b": law.b, "G": law.G},
        "objective_huber_sum": law.objective_huber_sum,
        "r2": float(r_squared(law, N, D, loss)),
        "holdout": held,
        "bootstrap": {"n_boot": n_boot, "n_ok": int(len(draws)), "skipped": skipped, "seed": seed, "level": LEVEL,
                      "intervals": intervals, "draws": draws.tolist()},
        "optimum_at": [_optimum_row(law, c) for c in _budgets(C, extras)],
        "approach2": _approach2(N, C, loss, extras),
        "_predicted": predicted,
    }


def _derived(draws: np.ndarray) -> dict[str, np.ndarray]:
    """a = beta/(alpha+beta) per draw (N* grows as C^a) and b = 1 - a."""
    if not len(draws):
        return {"a": np.zeros(0), "b": np.zeros(0)}
    alpha, beta = draws[:, 3], draws[:, 4]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where((alpha > 0) & (beta > 0), beta / (alpha + beta), np.nan)
    return {"a": a, "b": 1.0 - a}


def _fit_one_variable(points: Points, kind: str, *, n_boot: int, seed: int) -> dict[str, Any]:
    """L(x) = E + A/x^alpha in the one variable that varies, with intervals, R^2 and held-out residuals."""
    x = points.N_params if kind == "N" else points.D_tokens
    loss = points.loss
    _guard(points, MIN_POINTS_ONE_VARIABLE, f"a one-variable law L({kind}) = E + A/{kind}^alpha (3 constants)")
    try:
        law = fit_power_law(x, loss)
    except LlmkitError as exc:
        raise LlmkitError(f"{points.source}: {exc}") from None
    predicted = np.asarray(predict_power_law(law, x), dtype=float)
    draws, skipped = bootstrap_draws([x], loss, n_boot=n_boot, seed=seed) if n_boot else (np.zeros((0, 3)), 0)
    every = holdout_every(len(loss), MIN_POINTS_ONE_VARIABLE)
    held = {"available": False, "reason": f"needs {MIN_POINTS_ONE_VARIABLE + 1}+ points to fit without one"}
    if every is not None:
        held = _finite_holdout({"available": True, "every": every, **_power_holdout(x, loss, every, seed)})
    fixed = "D" if kind == "N" else "N"
    fixed_values = points.D_tokens if kind == "N" else points.N_params
    return {
        "kind": "power_law",
        "variable": kind,
        "law": f"L({kind}) = E + A / {kind}^alpha" + (f" at {fixed} = {fixed_values[0]:.4g}" if fixed_values is not None else ""),
        "method": "Huber (delta 1e-3) on log loss, L-BFGS from a grid of starts (as the L(N, D) fit)",
        "constants": {name: float(getattr(law, name)) for name in POWER_NAMES},
        "objective_huber_sum": law.objective_huber_sum,
        "r2": _r2(loss, predicted),
        "holdout": held,
        "bootstrap": {"n_boot": n_boot, "n_ok": int(len(draws)), "skipped": skipped, "seed": seed, "level": LEVEL,
                      "intervals": {name: _interval(draws[:, i], LEVEL) for i, name in enumerate(POWER_NAMES)},
                      "draws": draws.tolist()},
        "_predicted": predicted,
    }


def _budgets(C: np.ndarray, extras: list[dict[str, Any]]) -> list[float]:
    """The compute budgets to report the optimum at: the IsoFLOP budgets of a sweep, else the smallest, middle and largest C."""
    labels = sorted({float(row["budget_flops"]) for row in extras if row.get("budget_flops")})
    if labels:
        return labels
    low, high = float(C.min()), float(C.max())
    return sorted({low, math.sqrt(low * high), high})


def _optimum_row(law: ChinchillaFit, C: float) -> dict[str, float]:
    if not (law.alpha > 0 and law.beta > 0):
        return {"C": C}
    best = compute_optimal(law, C)
    return {"C": C, "N": best.N_params, "D": best.D_tokens, "loss": best.loss, "tokens_per_param": best.tokens_per_param}


def _approach2(N: np.ndarray, C: np.ndarray, loss: np.ndarray, extras: list[dict[str, Any]]) -> dict[str, Any]:
    """Approach 2 (IsoFLOP parabolas), grouped by the sweep's budget labels when every point has one. Biased."""
    labels = [row.get("budget_flops") for row in extras]
    groups = np.asarray(labels, dtype=float) if labels and all(v is not None for v in labels) else None
    try:
        result = fit_isoflop_parabolas(N, C, loss, groups=groups)
    except LlmkitError as exc:
        return {"available": False, "biased": True, "reason": str(exc)}
    return {"available": True, **asdict(result)}


def _throughput(points: Points, extras: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The training speed the largest swept model reached, in FLOP/s (its FLOPs per token x tokens/s), for wall-time estimates."""
    if points.N_params is None:
        return None
    rows = [(float(points.N_params[i]), row) for i, row in enumerate(extras) if row.get("tokens_per_s") and row.get("flops_per_token")]
    if not rows:
        return None
    N, row = max(rows, key=lambda item: (item[0], float(item[1].get("D") or 0)))
    speed, per_token = float(row["tokens_per_s"]), float(row["flops_per_token"])
    return {"point": row.get("name"), "N": N, "tokens_per_s": speed, "flops_per_token": per_token, "flops_per_s": speed * per_token}


# ----------------------------------------------------------------------------------------------
# A law to recommend from
# ----------------------------------------------------------------------------------------------


@dataclass
class Law:
    """A fitted (or published) L(N, D), with what is known about where it came from."""

    fit: ChinchillaFit
    source: str
    convention: str | None  # what N counts; None when the points file did not say
    draws: np.ndarray | None  # bootstrap constants, rows E, A, B, alpha, beta
    level: float
    C_range: tuple[float, float] | None
    throughput: dict[str, Any] | None
    sweep: Path | None
    path: Path | None
    data: dict[str, Any] | None = None  # what the sweep trained on (fingerprint, train_tokens), from fit.json
    downstream: dict[str, Any] | None = None  # loss -> accuracy: source, metric, constants, draws


def epoch_law() -> Law:
    """Epoch AI's Chinchilla refit, for when no sweep has been fitted."""
    return Law(chinchilla(EPOCH_CHINCHILLA), EPOCH_SOURCE, "total", None, LEVEL, None, None, None, None)


def fit_file(path: Path) -> Path:
    """fit.json itself, or the fit.json inside a sweep directory."""
    path = Path(path)
    file = path / "fit.json" if path.is_dir() else path
    if not file.is_file():
        hint = f"run `llmkit scale fit {path}` first" if path.is_dir() else "give a fit.json written by `llmkit scale fit`"
        raise LlmkitError(f"--fit {path}: no {'fit.json in this directory' if path.is_dir() else 'such file'}; {hint}")
    return file


def load_law(path: Path | None) -> Law:
    """The law in a fit.json (or sweep directory); Epoch AI's constants when path is None."""
    if path is None:
        return epoch_law()
    file = fit_file(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LlmkitError(f"--fit {file}: not readable as JSON ({exc.__class__.__name__}); rerun `llmkit scale fit`") from None
    if not isinstance(data, dict) or "constants" not in data:
        raise LlmkitError(f"--fit {file}: not a fit.json of `llmkit scale fit` (no constants)")
    if data.get("kind") != "chinchilla":
        raise LlmkitError(
            f"--fit {file}: holds {data.get('law', 'a one-variable law')}, which cannot split compute between N and D; "
            "sweep several sizes and token budgets to fit L(N, D)"
        )
    if isinstance(data.get("degenerate"), str):  # its constants may hold an overflowed A or B (null in the JSON)
        raise LlmkitError(f"--fit {file}: a degenerate law ({data['degenerate']}); it cannot recommend a size")
    constants = {name: _number(data, ("constants", name), file) for name in LAW_NAMES}
    flat = degenerate(constants)
    if flat:
        raise LlmkitError(f"--fit {file}: a degenerate law ({flat}); it cannot recommend a size")
    boot = data.get("bootstrap") if isinstance(data.get("bootstrap"), dict) else {}
    try:
        draws = np.asarray(boot.get("draws") or [], dtype=float).reshape(-1, 5)
    except (TypeError, ValueError, AttributeError):
        raise LlmkitError(f"--fit {file}: not a fit.json of `llmkit scale fit` (bootstrap.draws is not a table of numbers); rerun the fit") from None
    C = data["ranges"].get("C") if isinstance(data.get("ranges"), dict) else None
    if C is not None:
        C = [_number(data, ("ranges", "C", i), file) for i in range(2)]
    level = _number(data, ("bootstrap", "level"), file) if boot.get("level") is not None else LEVEL
    sweep = data.get("sweep") if isinstance(data.get("sweep"), str) else None
    throughput = data.get("throughput") if isinstance(data.get("throughput"), dict) else None
    if throughput is not None:
        for key in ("flops_per_s", "tokens_per_s"):
            _number(data, ("throughput", key), file)
    convention = data.get("param_convention")
    if convention is not None and convention not in ("total", "non_embedding", "matmul"):
        raise LlmkitError(
            f"--fit {file}: not a fit.json of `llmkit scale fit` (param_convention is {convention!r}, not total, "
            "non_embedding or matmul); rerun `llmkit scale fit`"
        )
    return Law(
        fit=chinchilla(constants, int(data["n_points"]) if isinstance(data.get("n_points"), int) else 0),
        source=f"{file} ({data.get('n_points')} points)",
        convention=convention,
        draws=draws if len(draws) else None,
        level=level,
        C_range=(float(C[0]), float(C[1])) if C else None,
        throughput=throughput,
        sweep=Path(sweep) if sweep else None,
        path=file,
        data=_data_of(data, file),
        downstream=_downstream_of(data, file),
    )


def _downstream_of(data: dict[str, Any], file: Path) -> dict[str, Any] | None:
    """The loss -> accuracy fit of a fit.json, its constants checked; None when `scale fit` was not given --accuracy."""
    down = data.get("downstream")
    if not isinstance(down, dict):
        return None
    constants = {name: _number(data, ("downstream", "constants", name), file) for name in DOWNSTREAM_NAMES}
    try:
        draws = np.asarray((down.get("bootstrap") or {}).get("draws") or [], dtype=float).reshape(-1, 4)
    except (TypeError, ValueError, AttributeError):
        raise LlmkitError(f"--fit {file}: not a fit.json of `llmkit scale fit` (downstream draws are not numbers); rerun the fit") from None
    stderr = down.get("score_stderr")
    if stderr is not None:
        stderr = _number(data, ("downstream", "score_stderr"), file)
    return {"constants": constants, "draws": draws.tolist(), "task": down.get("task"), "metric": down.get("metric"),
            "score_stderr": stderr}


def _data_of(data: dict[str, Any], file: Path) -> dict[str, Any] | None:
    """provenance.data of a fit.json, its train_tokens checked (None when the fit did not come from a sweep)."""
    prov = data.get("provenance")
    found = prov.get("data") if isinstance(prov, dict) else None
    if not isinstance(found, dict):
        return None
    if found.get("train_tokens") is not None:
        _number(data, ("provenance", "data", "train_tokens"), file)
    return found


def _number(data: dict[str, Any], path: tuple, file: Path) -> float:
    """The finite number at data[path[0]][path[1]]...; LlmkitError naming the key when it is missing or not a number."""
    value: Any = data
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            value = None
            break
    name = ".".join(str(k) for k in path)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LlmkitError(
            f"--fit {file}: not a fit.json of `llmkit scale fit` ({name} is {value!r}, not a number); rerun `llmkit scale fit`"
        )
    return float(value)


# Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models", arXiv 2305.16264): repeated tokens are worth
# less and less; after R repetitions of U unique tokens the effective data is U + U R* (1 - exp(-R / R*)), R* = 15.4.
REPEAT_DECAY = 15.39


def effective_tokens(D: float, unique: float, r_star: float = REPEAT_DECAY) -> float:
    """The tokens D of training on `unique` tokens repeated are worth (Muennighoff et al. 2023); D itself when D <= unique."""
    if D <= unique:
        return float(D)
    repeats = D / unique - 1.0
    return float(unique + unique * r_star * (1.0 - math.exp(-repeats / r_star)))


@dataclass
class Constrained:
    """The best split of a budget when only `unique` tokens exist and repeats count for less (Muennighoff et al. 2023)."""

    C: float
    N: float
    D: float
    effective_D: float
    epochs: float
    loss: float
    loss_at_unconstrained: float  # the unconstrained optimum's (N*, D*) with its repeats discounted


def data_constrained(law: Law, C: float, unique: float) -> Constrained:
    """Minimise L(N, D'(C / 6N)) over N, D' the effective tokens of repeating `unique` (a 1-D search in log N)."""
    fit = law.fit
    best = compute_optimal(fit, C)

    def loss(log_N: float) -> float:
        N = math.exp(log_N)
        return float(predict(fit, N, effective_tokens(C / (6.0 * N), unique)))

    centre = math.log(best.N_params)
    # The optimum can only move towards larger N (fewer tokens, fewer repeats): search up to 4 orders above N*.
    found = minimize_scalar(loss, bounds=(centre - 2.0, centre + 9.5), method="bounded", options={"xatol": 1e-6})
    N = math.exp(found.x)
    D = C / (6.0 * N)
    return Constrained(
        C=float(C), N=N, D=D, effective_D=effective_tokens(D, unique), epochs=D / unique, loss=float(found.fun),
        loss_at_unconstrained=float(predict(fit, best.N_params, effective_tokens(best.D_tokens, unique))),
    )


# ----------------------------------------------------------------------------------------------
# Downstream: loss -> accuracy (Bhagia et al. 2024, "Establishing Task Scaling Laws via Compute-Efficient Model Ladders")
# ----------------------------------------------------------------------------------------------

DOWNSTREAM_NAMES = ("a", "k", "L0", "b")


def accuracy_of(constants: dict[str, float] | np.ndarray, loss: Any) -> Any:
    """Acc(L) = a / (1 + exp(-k (L - L0))) + b; fitted with k <= 0, so accuracy rises from b at high loss to a + b at low loss."""
    a, k, L0, b = (constants[n] for n in DOWNSTREAM_NAMES) if isinstance(constants, dict) else constants
    with np.errstate(over="ignore"):
        return a / (1.0 + np.exp(-k * (np.asarray(loss, dtype=float) - L0))) + b


def _fit_sigmoid(loss: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """Least squares of the sigmoid in loss (4 constants) from a few starts; bounded so that 0 <= b <= b + a <= 1."""
    from scipy.optimize import least_squares

    best = None
    spread = max(float(np.ptp(loss)), 1e-3)
    for k0 in (-1.0 / spread, -4.0 / spread, -16.0 / spread):
        start = [max(1e-3, float(acc.max() - acc.min())), k0, float(np.median(loss)), float(max(0.0, acc.min() - 1e-3))]
        found = least_squares(
            lambda t: accuracy_of(t, loss) - acc, start,
            bounds=([0.0, -np.inf, -np.inf, 0.0], [1.0, 0.0, np.inf, 1.0]), max_nfev=4000,
        )
        if best is None or found.cost < best.cost:
            best = found
    return best.x


def fit_downstream(loss: np.ndarray, acc: np.ndarray, *, n_boot: int, seed: int, source: str) -> dict[str, Any]:
    """The two-step fit's second step: accuracy as a sigmoid of the loss, with bootstrap draws (fit.json "downstream")."""
    loss, acc = np.asarray(loss, dtype=float), np.asarray(acc, dtype=float)
    if len(loss) < 5:
        raise LlmkitError(f"{source}: {len(loss)} points with an accuracy; the loss -> accuracy sigmoid (4 constants) needs 5+")
    if float(np.ptp(acc)) <= 1e-9:
        raise LlmkitError(f"{source}: every point has the same accuracy ({acc[0]:.4g}): no trend to fit; train the points longer")
    theta = _fit_sigmoid(loss, acc)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        rows = rng.integers(0, len(loss), size=len(loss))
        if np.ptp(acc[rows]) > 1e-9 and len(np.unique(loss[rows])) >= 4:
            draws.append(_fit_sigmoid(loss[rows], acc[rows]))
    predicted = accuracy_of(theta, loss)
    return {
        "law": "Acc(L) = a / (1 + exp(-k (L - L0))) + b (Bhagia et al. 2024)",
        "constants": dict(zip(DOWNSTREAM_NAMES, map(float, theta), strict=True)),
        "r2": _r2(acc, predicted), "rmse": float(np.sqrt(np.mean((predicted - acc) ** 2))),
        "points": [[float(x), float(y)] for x, y in zip(loss, acc, strict=True)],
        "bootstrap": {"n_boot": n_boot, "n_ok": len(draws), "seed": seed, "level": LEVEL, "draws": np.asarray(draws).tolist()},
    }


def predicted_accuracy(law: Law, C: float) -> tuple[float, list[float] | None] | None:
    """The downstream accuracy at the optimum of budget C, and its interval from the loss draws paired with the sigmoid's."""
    down = law.downstream
    if not down:
        return None
    best = compute_optimal(law.fit, C)
    value = float(accuracy_of(down["constants"], best.loss))
    sig = np.asarray(down.get("draws") or [], dtype=float).reshape(-1, 4)
    if law.draws is None or not len(sig):
        return value, None
    values = []
    for i, draw in enumerate(law.draws):
        sample = chinchilla(dict(zip(LAW_NAMES, draw, strict=True)))
        if sample.alpha > 0 and sample.beta > 0 and math.isfinite(sample.G):
            values.append(float(accuracy_of(sig[i % len(sig)], compute_optimal(sample, C).loss)))
    return value, _interval(np.asarray(values), law.level)


@dataclass
class Optimum:
    """The compute-optimal N and D of a budget, the loss there, and bootstrap intervals of each (None without draws)."""

    C: float
    N: float
    D: float
    loss: float
    tokens_per_param: float
    intervals: dict[str, list[float] | None]


def optimum(law: Law, C: float) -> Optimum:
    """The closed-form optimum of fit.compute_optimal at budget C (C = 6 N D), with intervals from the law's draws."""
    best = compute_optimal(law.fit, C)
    intervals: dict[str, list[float] | None] = {}
    if law.draws is not None:
        rows = []
        for draw in law.draws:
            sample = chinchilla(dict(zip(LAW_NAMES, draw, strict=True)))
            if sample.alpha > 0 and sample.beta > 0 and math.isfinite(sample.G):
                s = compute_optimal(sample, C)
                rows.append((s.N_params, s.D_tokens, s.loss, s.tokens_per_param))
        values = np.asarray(rows, dtype=float).reshape(-1, 4)
        intervals = {name: _interval(values[:, i], law.level) for i, name in enumerate(("N", "D", "loss", "tokens_per_param"))}
    return Optimum(C=float(C), N=float(best.N_params), D=float(best.D_tokens), loss=float(best.loss),
                   tokens_per_param=float(best.tokens_per_param), intervals=intervals)
