"""Fit scaling laws to measured runs: Chinchilla's L(N, D) = E + A/N^alpha + B/D^beta and what follows from it.

    llmkit scale fit runs/sweep               # planned CLI (not wired yet): fit runs/sweep/sweep.jsonl
    python benchmarks/scale_fit_bench.py      # runs today: fits the Chinchilla points, prints the constants

Notation: N = parameters, D = training tokens, C = training FLOPs (C = 6 N D), loss in nats per token.

The N-D law is fitted the way Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt",
arXiv 2404.10102) refit Hoffmann et al. 2022 (Approach 3): with a = log A, b = log B, e = log E, minimise
sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i), delta = 1e-3, by L-BFGS from
Hoffmann's grid of 4,500 starts. To take seconds rather than minutes, the objective is evaluated on the
whole grid at once (vectorised), L-BFGS-B with an analytic gradient runs only from the best `top_k` starts,
and the best result is polished by one restart.

Also here: one-variable laws L(x) = E + A/x^alpha, bootstrap intervals, the closed-form compute-optimal
allocation, Approach 2 (IsoFLOP parabolas, biased, for comparison), R^2 and held-out error, and an atomic
JSON writer. Errors in the input raise LlmkitError with one line that names the problem and the fix.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize

from llmkit.data.sources import first_invalid_utf8
from llmkit.errors import LlmkitError
from llmkit.rundir import write_text_atomic

# Column names accepted for each quantity, matched case-insensitively with "_", "-" and spaces alike.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "N": ("N", "params", "parameters", "Model Size", "model_size"),
    "D": ("D", "tokens", "Training Tokens"),
    "C": ("C", "flops", "compute", "Training FLOP"),
    "loss": ("loss", "val_loss", "Loss"),
}
MIN_POINTS_ONE_VARIABLE = 4  # L(x) = E + A / x^alpha has 3 parameters
MIN_POINTS_CHINCHILLA = 6  # L(N, D) has 5 parameters

# Hoffmann et al.'s grid of initialisations, kept by Besiroglu et al.: a, b in {0, 5, ..., 25},
# e in {-1, -0.5, ..., 1}, alpha, beta in {0, 0.5, ..., 2}: 6 * 6 * 5 * 5 * 5 = 4,500 starts.
GRID_LOG_COEF = np.arange(0.0, 30.0, 5.0)
GRID_LOG_E = np.arange(-1.0, 1.5, 0.5)
GRID_EXPONENT = np.arange(0.0, 2.5, 0.5)

# scipy's ftol is relative to max(|f|, 1), and this objective is ~1e-3 (sum of Huber terms of 1e-3-sized
# log residuals), so the default ftol (2.2e-9) stops early in the flat A-B valley: on the Chinchilla data
# 11% of grid starts reach the minimum with the defaults, 39% with these (the rest land 10x higher).
_LBFGS_OPTIONS = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000}
_GRID_CHUNK_ELEMENTS = 4_000_000  # bound memory of the vectorised grid evaluation (floats per chunk)
BOOTSTRAP_NAMES = ("E", "A", "B", "alpha", "beta", "a", "b", "G")


# ---------------------------------------------------------------------------------------------------------
# Loading points
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Points:
    """Measured runs: N (parameters), D (training tokens), C (training FLOPs), each None when unknown, and loss."""

    loss: np.ndarray
    N_params: np.ndarray | None
    D_tokens: np.ndarray | None
    C_flops: np.ndarray | None
    source: str
    columns: dict[str, str] = field(default_factory=dict)  # quantity -> column it came from, or how derived

    def __len__(self) -> int:
        """Number of points."""
        return len(self.loss)


def load_points(path: str | os.PathLike, *, columns: dict[str, str] | None = None) -> Points:
    """Read points from a CSV, a JSONL, or a sweep directory holding sweep.jsonl; D = C / (6 N) when D is absent."""
    file = _points_file(Path(path))
    try:
        rows = _read_csv(file) if file.suffix.lower() == ".csv" else _read_jsonl(file)
    except UnicodeDecodeError:
        raise not_utf8(file) from None
    if not rows:
        raise LlmkitError(f"{file} holds no points: add one row per run with columns N, D (or C) and loss")
    headers = list(dict.fromkeys(key for _, row in rows for key in row))
    chosen = _choose_columns(headers, file, columns or {})
    if len(rows) < MIN_POINTS_ONE_VARIABLE:
        raise LlmkitError(
            f"{file} has {len(rows)} points; a one-variable law (3 parameters) needs at least "
            f"{MIN_POINTS_ONE_VARIABLE} and the N-D law (5 parameters) at least {MIN_POINTS_CHINCHILLA}: add runs"
        )
    values = {quantity: _column_values(rows, name, file) for quantity, name in chosen.items()}
    N, D, C = values.get("N"), values.get("D"), values.get("C")
    if D is None and C is not None:
        D, chosen["D"] = C / (6.0 * N), f"{chosen['C']} / (6 * {chosen['N']})"
    if C is None and N is not None and D is not None:
        C, chosen["C"] = 6.0 * N * D, f"6 * {chosen['N']} * {chosen['D']}"
    return Points(loss=values["loss"], N_params=N, D_tokens=D, C_flops=C, source=str(file), columns=chosen)


def _points_file(path: Path) -> Path:
    """The file to read: the path itself, or sweep.jsonl inside a sweep directory."""
    if path.is_dir():
        file = path / "sweep.jsonl"
        if not file.is_file():
            raise LlmkitError(
                f"{path} is a directory without sweep.jsonl: pass a CSV or JSONL file of points instead"
            )
        return file
    if not path.is_file():
        raise LlmkitError(
            f"{path} does not exist: pass a CSV, a JSONL, or a sweep directory holding sweep.jsonl"
        )
    if path.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
        raise LlmkitError(f"{path} is neither .csv nor .jsonl: save the points as CSV (header row) or JSONL")
    return path


def not_utf8(file: Path) -> LlmkitError:
    """The one-line error for a points file that is not UTF-8, naming the first bad byte."""
    found = first_invalid_utf8(file)
    where = f" (byte {found[0]:,}, line {found[1]:,}: {found[2].hex(' ')})" if found else ""
    return LlmkitError(f"{file}: not UTF-8 text{where}; save the points as UTF-8 CSV or JSONL (iconv -f latin1 -t utf-8)")


def _read_csv(file: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for every data row of a CSV with a header."""
    with open(file, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        # DictReader files cells beyond the header under the key None; they have no column name to match.
        return [(reader.line_num, {k: v for k, v in row.items() if k is not None}) for row in reader]


def _read_jsonl(file: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file."""
    rows = []
    with open(file, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise LlmkitError(
                    f"{file} line {line_no} is not JSON ({err.msg}): write one JSON object a line"
                ) from None
            if not isinstance(row, dict):
                raise LlmkitError(
                    f'{file} line {line_no} is a {type(row).__name__}, not an object like {{"N": ..., "loss": ...}}'
                )
            rows.append((line_no, row))
    return rows


def _normal_name(name: str) -> str:
    """Lower case, with runs of spaces, '_' and '-' as one space."""
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower())


def _choose_columns(headers: list[str], file: Path, override: dict[str, str]) -> dict[str, str]:
    """Map each quantity (N, D, C, loss) to the one column that names it; fail on missing or ambiguous ones."""
    unknown = sorted(set(override) - set(COLUMN_ALIASES))
    if unknown:
        raise LlmkitError(f"columns= names unknown quantities {unknown}: use the keys {list(COLUMN_ALIASES)}")
    chosen: dict[str, str] = {}
    for quantity, aliases in COLUMN_ALIASES.items():
        if quantity in override:
            if override[quantity] not in headers:
                raise LlmkitError(
                    f"{file} has no column '{override[quantity]}' (found: {', '.join(headers)})"
                )
            chosen[quantity] = override[quantity]
            continue
        accepted = {_normal_name(alias) for alias in aliases}
        matches = [h for h in headers if _normal_name(h) in accepted]
        if len(matches) > 1:
            raise LlmkitError(
                f"{file}: columns {', '.join(map(repr, matches))} all name {quantity}: keep one, "
                f"or choose with columns={{'{quantity}': '{matches[0]}'}}"
            )
        if matches:
            chosen[quantity] = matches[0]
    _require_columns(chosen, headers, file)
    return chosen


def _require_columns(chosen: dict[str, str], headers: list[str], file: Path) -> None:
    """Fail unless the columns give a loss and at least one of N or D (D may come from C and N)."""
    found = ", ".join(map(repr, headers)) or "none"

    def accepted(*quantities: str) -> str:
        return "; ".join(f"{q}: {', '.join(COLUMN_ALIASES[q])}" for q in quantities)

    if "loss" not in chosen:
        raise LlmkitError(f"{file} has no loss column (found {found}); accepted names: {accepted('loss')}")
    if "N" not in chosen and "D" not in chosen:
        if "C" in chosen:
            raise LlmkitError(
                f"{file} has C but no N column, so D = C / (6 N) is unknown (found {found}); accepted names: {accepted('N')}"
            )
        raise LlmkitError(
            f"{file} has neither an N nor a D column (found {found}); accepted names: {accepted('N', 'D', 'C')}"
        )


def _column_values(rows: list[tuple[int, dict[str, Any]]], name: str, file: Path) -> np.ndarray:
    """One column as floats; every value must be present, numeric, finite and positive (fits are in log space)."""
    out = np.empty(len(rows))
    for i, (line_no, row) in enumerate(rows):
        raw = row.get(name)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise LlmkitError(f"{file} line {line_no}: no value for '{name}': fill it in or drop the row")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise LlmkitError(
                f"{file} line {line_no}: '{name}' is {raw!r}, not a number: fix or drop the row"
            ) from None
        if not (math.isfinite(value) and value > 0):
            raise LlmkitError(
                f"{file} line {line_no}: '{name}' = {raw!r}; values must be positive and finite (fits use logs): fix or drop the row"
            )
        out[i] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# The objective: Huber loss of log-sum-exp predictions of log loss
# ---------------------------------------------------------------------------------------------------------
# A law with k power terms, E + sum_j exp(c_j) / x_j^p_j, has theta = [c_1..c_k, e, p_1..p_k]; for the N-D
# law that is [a, b, e, alpha, beta] as in the paper, for one variable [a, e, alpha].


def _log_predictions(theta: np.ndarray, log_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted log loss for a batch theta [S, 2k+1] at points log_x [k, n], and the softmax weights [S, k+1, n]."""
    k = log_x.shape[0]
    terms = np.empty((theta.shape[0], k + 1, log_x.shape[1]))
    terms[:, :k] = theta[:, :k, None] - theta[:, k + 1 :, None] * log_x
    terms[:, k] = theta[:, k, None]
    top = terms.max(axis=1)  # log-sum-exp with the max taken out, so exp never overflows
    weights = np.exp(terms - top[:, None])
    total = weights.sum(axis=1)
    return top + np.log(total), weights / total[:, None]


def _huber_sums(theta: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, delta: float) -> np.ndarray:
    """The objective for every row of theta [S, 2k+1], evaluated in chunks to bound memory."""
    rows_per_chunk = max(1, _GRID_CHUNK_ELEMENTS // (log_x.size + log_x.shape[1]))
    out = []
    for start in range(0, theta.shape[0], rows_per_chunk):
        predicted, _ = _log_predictions(theta[start : start + rows_per_chunk], log_x)
        residual = predicted - log_loss
        clipped = np.clip(residual, -delta, delta)
        out.append((clipped * (residual - 0.5 * clipped)).sum(axis=1))  # = Huber_delta(residual)
    return np.concatenate(out)


def _objective_and_gradient(theta: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, delta: float):
    """Sum of Huber_delta(predicted - actual log loss) and its analytic gradient, for one theta."""
    k = log_x.shape[0]
    predicted, weights = _log_predictions(theta[None], log_x)
    residual = predicted[0] - log_loss
    clipped = np.clip(residual, -delta, delta)  # Huber'(r): r inside [-delta, delta], +-delta outside
    value = float((clipped * (residual - 0.5 * clipped)).sum())
    # d LSE / d term_j is the softmax weight of term j; term_j = c_j - p_j log x_j and term_k = e.
    weighted = weights[0] * clipped
    grad_coef_e = weighted.sum(axis=1)
    grad_exponent = -(weighted[:k] * log_x).sum(axis=1)
    return value, np.concatenate([grad_coef_e, grad_exponent])


def _start_grid(k: int) -> np.ndarray:
    """Hoffmann et al.'s grid of initialisations for a law with k power terms, as rows of theta."""
    axes = [GRID_LOG_COEF] * k + [GRID_LOG_E] + [GRID_EXPONENT] * k
    return np.array(list(product(*axes)), dtype=float)


def _best_starts(log_x: np.ndarray, log_loss: np.ndarray, delta: float, top_k: int) -> tuple[np.ndarray, int]:
    """The top_k grid starts with the lowest objective, and how many grid points were evaluated."""
    grid = _start_grid(log_x.shape[0])
    order = np.argsort(_huber_sums(grid, log_x, log_loss, delta), kind="stable")
    return grid[order[:top_k]], len(grid)


@functools.cache
def _blas_controller():
    """threadpoolctl's handle on the loaded BLAS libraries, built once; None where threadpoolctl is missing."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def _one_blas_thread():
    """Hold BLAS to one thread: scipy's L-BFGS-B calls its OpenBLAS on 5-20 element problems, where extra threads only spin."""
    # Measured on the shared 2-core box with one core busy: the Chinchilla fit took 8-17 s with OpenBLAS's
    # 2 threads and 1.0 s with one. Without threadpoolctl the fit is the same, only slower on a busy machine.
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


def _minimize_from(
    starts: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, delta: float
) -> tuple[np.ndarray, float]:
    """L-BFGS-B from every start, then one restart from the best (fresh curvature memory); best theta and value."""
    best_theta, best_value = None, math.inf
    with _one_blas_thread():
        for start in starts:
            result = _lbfgs(start, log_x, log_loss, delta)
            if math.isfinite(result.fun) and result.fun < best_value:
                best_theta, best_value = result.x, float(result.fun)
        if best_theta is None:
            raise LlmkitError(
                "the fit diverged from every start: check that loss, N and D are in natural units, not logs"
            )
        polished = _lbfgs(best_theta, log_x, log_loss, delta)
    if math.isfinite(polished.fun) and polished.fun <= best_value:
        best_theta, best_value = polished.x, float(polished.fun)
    return np.asarray(best_theta, dtype=float), best_value


def _lbfgs(start: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, delta: float):
    """One unbounded L-BFGS-B run with the analytic gradient."""
    return minimize(
        _objective_and_gradient,
        start,
        args=(log_x, log_loss, delta),
        jac=True,
        method="L-BFGS-B",
        options=_LBFGS_OPTIONS,
    )


def _validated(law: str, n_params: int, **arrays: Any) -> list[np.ndarray]:
    """The arrays as 1-d floats, checked: present, positive, finite, equally long, enough points for the law."""
    out = []
    for name, values in arrays.items():
        if values is None:
            raise LlmkitError(
                f"{law} needs {name}, but none was given: add a {name} column to the points file"
            )
        try:
            array = np.asarray(values, dtype=float).ravel()
        except (TypeError, ValueError):
            raise LlmkitError(
                f"{law}: {name} holds values that are not numbers: pass numeric arrays"
            ) from None
        bad = np.flatnonzero(~(np.isfinite(array) & (array > 0)))
        if bad.size:
            i = int(bad[0])
            raise LlmkitError(
                f"{law}: {name} of point {i} is {array[i]:g}; values must be positive and finite (fits use logs): fix or drop that point"
            )
        out.append(array)
    lengths = {name: len(array) for name, array in zip(arrays, out, strict=True)}
    if len(set(lengths.values())) > 1:
        raise LlmkitError(
            f"{law}: the inputs have different lengths {lengths}: pass one value per point for each"
        )
    n = len(out[0])
    if n < n_params + 1:
        raise LlmkitError(
            f"{law} has {n_params} parameters, so it needs at least {n_params + 1} points; got {n}: add runs"
        )
    return out


def _require_distinct(law: str, name: str, values: np.ndarray, minimum: int, hint: str) -> None:
    """Fail when a variable takes fewer distinct values than the law needs to identify its term."""
    distinct = len(np.unique(values))
    if distinct < minimum:
        raise LlmkitError(
            f"{law}: {name} takes {distinct} distinct value(s), at least {minimum} are needed: {hint}"
        )


# ---------------------------------------------------------------------------------------------------------
# The N-D law (Approach 3)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ChinchillaFit:
    """L(N, D) = E + A/N^alpha + B/D^beta, and the compute-optimal allocation it implies (N_opt = G (C/6)^a)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective_huber_sum: float  # sum over points of Huber_delta(log residual) at the optimum
    n_points: int
    delta: float
    a: float  # N_opt ∝ C^a, a = beta / (alpha + beta) (NaN unless alpha, beta > 0)
    b: float  # D_opt ∝ C^b, b = alpha / (alpha + beta)
    G: float  # (alpha A / (beta B))^(1 / (alpha + beta))
    grid_starts_evaluated: int = 0
    lbfgs_starts: int = 0
    log_A: float | None = None  # the fitted log A and log B (A, B alone overflow to inf for a runaway exponent)
    log_B: float | None = None


def _exp(log_value: float) -> float:
    """exp, with inf instead of OverflowError for the runaway constants of a degenerate (bootstrap) sample."""
    return math.exp(log_value) if log_value < 700.0 else math.inf


def _chinchilla_result(
    theta: np.ndarray, value: float, n_points: int, delta: float, **counts: int
) -> ChinchillaFit:
    """Turn theta = [log A, log B, log E, alpha, beta] into a ChinchillaFit with the derived quantities."""
    log_A, log_B, log_E, alpha, beta = (float(v) for v in theta)
    a = b = G = math.nan
    if alpha > 0 and beta > 0:
        a, b = beta / (alpha + beta), alpha / (alpha + beta)
        # G in logs: alpha A / (beta B) over- or underflows for the extreme A, B of a bad bootstrap sample.
        G = _exp((math.log(alpha / beta) + log_A - log_B) / (alpha + beta))
    return ChinchillaFit(
        E=_exp(log_E),
        A=_exp(log_A),
        B=_exp(log_B),
        alpha=alpha,
        beta=beta,
        objective_huber_sum=value,
        n_points=n_points,
        delta=delta,
        a=a,
        b=b,
        G=G,
        log_A=log_A,
        log_B=log_B,
        **counts,
    )


def fit_chinchilla(N: Any, D: Any, loss: Any, *, delta: float = 1e-3, top_k: int = 16) -> ChinchillaFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta as Besiroglu et al. 2024 do (Huber on log loss, L-BFGS, Hoffmann grid)."""
    N, D, loss = _validated("fit_chinchilla", 5, N=N, D=D, loss=loss)
    hint = "fit_power_law(x, loss) fits a law in the one variable that varies"
    _require_distinct("fit_chinchilla", "N", N, 2, hint)
    _require_distinct("fit_chinchilla", "D", D, 2, hint)
    log_x, log_loss = np.log(np.stack([N, D])), np.log(loss)
    starts, evaluated = _best_starts(log_x, log_loss, delta, max(1, top_k))
    theta, value = _minimize_from(starts, log_x, log_loss, delta)
    return _chinchilla_result(
        theta, value, len(loss), delta, grid_starts_evaluated=evaluated, lbfgs_starts=len(starts)
    )


def predict(fit: ChinchillaFit, N: Any, D: Any) -> Any:
    """Predicted loss E + A/N^alpha + B/D^beta (a float for scalar N and D, else an array)."""
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    # Each term in logs, from the fitted log A and log B: when the loss stops falling with N within the swept sizes
    # the fit runs alpha into the hundreds and A = e^(log A) overflows, while A / N^alpha at the points is finite.
    # Far from the points a degenerate law still overflows: inf is the honest answer there, which callers check
    # (held-out refits, plots), not a RuntimeWarning printed to the user.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        log_A = fit.log_A if fit.log_A is not None else np.log(fit.A)
        log_B = fit.log_B if fit.log_B is not None else np.log(fit.B)
        loss = fit.E + np.exp(log_A - fit.alpha * np.log(N)) + np.exp(log_B - fit.beta * np.log(D))
    return float(loss) if np.ndim(loss) == 0 else loss


@dataclass
class ComputeOptimal:
    """The loss-minimising split of a compute budget C = 6 N D under a fitted L(N, D)."""

    C_flops: Any
    N_params: Any
    D_tokens: Any
    loss: Any
    tokens_per_param: Any


def compute_optimal(fit: ChinchillaFit, C_flops: Any) -> ComputeOptimal:
    """Closed form: N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = C / (6 N_opt), and the loss there."""
    if not (fit.alpha > 0 and fit.beta > 0):
        raise LlmkitError(
            f"no compute-optimal allocation: the fit has alpha = {fit.alpha:.3g}, beta = {fit.beta:.3g}, both must be > 0; "
            "fit points that vary both N and D"
        )
    C = np.asarray(C_flops, dtype=float)
    if not np.all(np.isfinite(C) & (C > 0)):
        raise LlmkitError(
            f"compute_optimal: every budget C must be positive and finite FLOPs; got {C_flops!r}"
        )
    N_opt = fit.G * (C / 6.0) ** fit.a
    D_opt = C / (6.0 * N_opt)
    scalar = C.ndim == 0
    values = [C, N_opt, D_opt, np.asarray(predict(fit, N_opt, D_opt)), D_opt / N_opt]
    if scalar:
        values = [float(v) for v in values]
    return ComputeOptimal(*values)


# ---------------------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------------------


@dataclass
class BootstrapResult:
    """Percentile intervals of the N-D law's constants over refits on points resampled with replacement."""

    n_boot: int
    seed: int
    level: float  # 0.95: the 2.5th and 97.5th percentiles
    estimates: dict[str, float]  # the fit on all points
    intervals: dict[str, tuple[float, float]]  # name -> (low, high), for E, A, B, alpha, beta, a, b, G


def bootstrap(
    N: Any,
    D: Any,
    loss: Any,
    *,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
    delta: float = 1e-3,
    fit: ChinchillaFit | None = None,
) -> BootstrapResult:
    """Percentile intervals (default 95%) from n_boot seeded resample-and-refit rounds, warm-started at the full fit."""
    N, D, loss = _validated("bootstrap", 5, N=N, D=D, loss=loss)
    if n_boot < 1:
        raise LlmkitError(f"bootstrap: n_boot = {n_boot}; it must be at least 1 (200 takes seconds)")
    if not 0 < level < 1:
        raise LlmkitError(f"bootstrap: level = {level}; it must lie between 0 and 1, e.g. 0.95")
    if fit is None:
        fit = fit_chinchilla(N, D, loss, delta=delta)
    theta0 = np.log([fit.A, fit.B, fit.E]).tolist() + [fit.alpha, fit.beta]
    log_x, log_loss = np.log(np.stack([N, D])), np.log(loss)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {name: [] for name in BOOTSTRAP_NAMES}
    for _ in range(n_boot):
        rows = rng.integers(0, len(loss), size=len(loss))
        theta, value = _minimize_from(np.array([theta0]), log_x[:, rows], log_loss[rows], delta)
        refit = _chinchilla_result(theta, value, len(rows), delta)
        for name in BOOTSTRAP_NAMES:
            samples[name].append(getattr(refit, name))
    low_pct, high_pct = 50.0 * (1.0 - level), 50.0 * (1.0 + level)
    intervals = {
        name: (float(np.nanpercentile(v, low_pct)), float(np.nanpercentile(v, high_pct)))
        for name, v in samples.items()
    }
    estimates = {name: float(getattr(fit, name)) for name in BOOTSTRAP_NAMES}
    return BootstrapResult(n_boot=n_boot, seed=seed, level=level, estimates=estimates, intervals=intervals)


# ---------------------------------------------------------------------------------------------------------
# One-variable laws
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PowerLawFit:
    """L(x) = E + A / x^alpha, for sweeps where only N (or only D) varies."""

    E: float
    A: float
    alpha: float
    objective_huber_sum: float
    n_points: int
    delta: float


def fit_power_law(x: Any, loss: Any, *, delta: float = 1e-3, top_k: int = 8) -> PowerLawFit:
    """Fit L(x) = E + A / x^alpha by the same Huber-on-log-loss objective and grid as fit_chinchilla."""
    x, loss = _validated("fit_power_law", 3, x=x, loss=loss)
    _require_distinct("fit_power_law", "x", x, 3, "three parameters need three or more distinct x")
    log_x, log_loss = np.log(x)[None], np.log(loss)
    starts, _ = _best_starts(log_x, log_loss, delta, max(1, top_k))
    theta, value = _minimize_from(starts, log_x, log_loss, delta)
    log_A, log_E, alpha = (float(v) for v in theta)
    return PowerLawFit(
        E=_exp(log_E),
        A=_exp(log_A),
        alpha=alpha,
        objective_huber_sum=value,
        n_points=len(loss),
        delta=delta,
    )


def predict_power_law(fit: PowerLawFit, x: Any) -> Any:
    """Predicted loss E + A / x^alpha (a float for scalar x, else an array)."""
    loss = fit.E + fit.A * np.asarray(x, dtype=float) ** (-fit.alpha)
    return float(loss) if np.ndim(loss) == 0 else loss


# ---------------------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP parabolas (biased; for comparison)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class IsoFlopBudget:
    """The minimum of one IsoFLOP parabola: loss vs log N at (about) one compute budget."""

    C_flops: float  # geometric mean of the budget's points
    N_opt_params: float
    D_opt_tokens: float  # C / (6 N_opt)
    loss_min: float
    n_points: int
    extrapolated: bool  # the vertex lies outside the sampled model sizes: trust it less


@dataclass
class IsoFlopFit:
    """Approach 2 of Hoffmann et al.: N_opt ∝ C^a from IsoFLOP parabola minima. BIASED: see fit_isoflop_parabolas."""

    a: float  # log N_opt = a log C + log_N_intercept
    log_N_intercept: float
    b: float  # D_opt ∝ C^b, b = 1 - a since D_opt = C / (6 N_opt)
    budgets: list[IsoFlopBudget]
    skipped: list[str]  # budgets left out, with why
    method: str = (
        "approach 2 (IsoFLOP parabolas in log N): biased, for comparison only; prefer fit_chinchilla"
    )
    biased: bool = True


def fit_isoflop_parabolas(
    N: Any, C: Any, loss: Any, *, rel_tol: float = 0.05, groups: Any = None, min_sizes: int = 3
) -> IsoFlopFit:
    """Approach 2 (biased): a parabola of loss vs log N per compute budget, then log N_opt = a log C + const.

    Biased because the true IsoFLOP curve E + A N^-alpha + B (C/6N)^-beta is not a parabola in log N (it is
    asymmetric), so the vertex moves with which sizes were sampled and how widely; prefer fit_chinchilla.
    Points join a budget when their C is within rel_tol (relative) of the budget's smallest C, unless
    `groups` gives a budget label per point.
    """
    N, C, loss = _validated("fit_isoflop_parabolas", 3, N=N, C=C, loss=loss)
    if min_sizes < 3:
        raise LlmkitError(
            f"fit_isoflop_parabolas: min_sizes = {min_sizes}; a parabola needs at least 3 model sizes"
        )
    labels = _budget_labels(C, rel_tol) if groups is None else np.asarray(groups)
    if labels.shape != C.shape:
        raise LlmkitError(
            f"fit_isoflop_parabolas: groups has {labels.size} labels for {C.size} points: give one per point"
        )
    budgets, skipped = [], []
    for label in sorted(set(labels.tolist()), key=lambda g: float(np.min(C[labels == g]))):
        rows = labels == label
        budget, reason = _parabola_minimum(N[rows], C[rows], loss[rows], min_sizes)
        if budget is None:
            skipped.append(f"budget {label!r} (C ~ {np.exp(np.log(C[rows]).mean()):.3g}): {reason}")
        else:
            budgets.append(budget)
    if len(budgets) < 2:
        raise LlmkitError(
            f"approach 2 needs at least 2 compute budgets with {min_sizes}+ model sizes each; found {len(budgets)} "
            f"({'; '.join(skipped) or 'no budgets'}): sample more sizes per budget, or widen rel_tol"
        )
    log_C = np.log([b.C_flops for b in budgets])
    slope, intercept = np.polyfit(log_C, np.log([b.N_opt_params for b in budgets]), 1)
    return IsoFlopFit(
        a=float(slope),
        log_N_intercept=float(intercept),
        b=float(1.0 - slope),
        budgets=budgets,
        skipped=skipped,
    )


def _budget_labels(C: np.ndarray, rel_tol: float) -> np.ndarray:
    """Group points by compute: sorted by C, a new budget starts when C exceeds the current one's first C by rel_tol."""
    if not rel_tol > 0:
        raise LlmkitError(f"fit_isoflop_parabolas: rel_tol = {rel_tol}; it must be > 0, e.g. 0.05 for 5%")
    labels = np.empty(len(C), dtype=int)
    label, first = -1, -math.inf
    for i in np.argsort(C, kind="stable"):
        if C[i] > first * (1.0 + rel_tol):
            label, first = label + 1, C[i]
        labels[i] = label
    return labels


def _parabola_minimum(
    N: np.ndarray, C: np.ndarray, loss: np.ndarray, min_sizes: int
) -> tuple[IsoFlopBudget | None, str]:
    """Fit loss = p2 x^2 + p1 x + p0 with x = log N; the vertex, or None and why it cannot be used."""
    sizes = len(np.unique(N))
    if sizes < min_sizes:
        return None, f"{sizes} model size(s), need {min_sizes}+"
    log_N = np.log(N)
    p2, p1, p0 = np.polyfit(log_N, loss, 2)
    if not p2 > 0:
        return None, "the parabola opens downwards (no minimum): sample sizes on both sides of the optimum"
    log_N_opt = -p1 / (2.0 * p2)
    C_flops = float(np.exp(np.log(C).mean()))
    N_opt = float(np.exp(log_N_opt))
    extrapolated = not (log_N.min() <= log_N_opt <= log_N.max())
    return IsoFlopBudget(
        C_flops=C_flops,
        N_opt_params=N_opt,
        D_opt_tokens=C_flops / (6.0 * N_opt),
        loss_min=float(p0 - p1 * p1 / (4.0 * p2)),
        n_points=len(N),
        extrapolated=extrapolated,
    ), ""


# ---------------------------------------------------------------------------------------------------------
# Goodness of fit
# ---------------------------------------------------------------------------------------------------------


def _r2(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot."""
    total = float(((actual - actual.mean()) ** 2).sum())
    return 1.0 - float(((actual - predicted) ** 2).sum()) / total if total > 0 else math.nan


def r_squared(fit: ChinchillaFit, N: Any, D: Any, loss: Any) -> float:
    """R^2 of the fit's predicted loss against the actual loss (loss itself, not its log)."""
    N, D, loss = _validated("r_squared", 0, N=N, D=D, loss=loss)
    return _r2(loss, np.asarray(predict(fit, N, D)))


@dataclass
class HoldoutResult:
    """The N-D law fitted without every `every`-th point (seeded order) and scored on those held-out points."""

    fit: ChinchillaFit
    test_indices: list[int]
    n_train: int
    n_test: int
    rmse_log_loss: float  # held-out RMSE of log(predicted) - log(actual), i.e. of relative error
    r2_loss: float  # held-out R^2 of loss itself
    r2_loss_train: float


def holdout(
    N: Any, D: Any, loss: Any, *, every: int = 5, seed: int = 0, delta: float = 1e-3
) -> HoldoutResult:
    """Fit on all but every `every`-th point of a seeded permutation; report held-out RMSE of log loss and R^2 of loss."""
    N, D, loss = _validated("holdout", 5, N=N, D=D, loss=loss)
    if every < 2:
        raise LlmkitError(
            f"holdout: every = {every}; it must be at least 2 (every=5 holds out 20% of the points)"
        )
    test = np.sort(np.random.default_rng(seed).permutation(len(loss))[::every])
    train = np.setdiff1d(np.arange(len(loss)), test)
    if len(train) < MIN_POINTS_CHINCHILLA:
        raise LlmkitError(
            f"holdout leaves {len(train)} training points; the N-D law needs {MIN_POINTS_CHINCHILLA}: raise every or add runs"
        )
    fit = fit_chinchilla(N[train], D[train], loss[train], delta=delta)
    predicted = np.asarray(predict(fit, N[test], D[test]))
    rmse = float(np.sqrt(np.mean((np.log(predicted) - np.log(loss[test])) ** 2)))
    return HoldoutResult(
        fit=fit,
        test_indices=test.tolist(),
        n_train=len(train),
        n_test=len(test),
        rmse_log_loss=rmse,
        r2_loss=_r2(loss[test], predicted),
        r2_loss_train=_r2(loss[train], np.asarray(predict(fit, N[train], D[train]))),
    )


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Dataclasses, numpy values and tuples as plain JSON types; NaN and infinities as null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_fit_json(path: str | os.PathLike, result: Any) -> Path:
    """Write a result (dict or dataclass) as JSON atomically (non-finite numbers as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n")
