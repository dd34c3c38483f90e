"""Scaling-law fits: recovery of known constants, the Chinchilla replication, closed-form optimum, errors.

    pytest -q tests/test_scaling_fit.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from llmkit.errors import LlmkitError
from llmkit.scaling.fit import (
    ChinchillaFit,
    bootstrap,
    compute_optimal,
    fit_chinchilla,
    fit_isoflop_parabolas,
    fit_power_law,
    holdout,
    load_points,
    predict,
    predict_power_law,
    r_squared,
    write_fit_json,
)

CHINCHILLA_CSV = Path(__file__).parent / "data" / "chinchilla_fig4_epoch_extracted.csv"
# Hoffmann et al.'s published Approach 3 constants, used here as the ground truth of synthetic data.
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
# Besiroglu et al. 2024, refit on the 240 points left after dropping the 5 highest losses.
PUBLISHED_REFIT = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}


def _law(N, D, E=TRUE["E"], A=TRUE["A"], B=TRUE["B"], alpha=TRUE["alpha"], beta=TRUE["beta"]):
    return E + A * N ** (-alpha) + B * D ** (-beta)


def _true_fit() -> ChinchillaFit:
    alpha, beta, A, B = TRUE["alpha"], TRUE["beta"], TRUE["A"], TRUE["B"]
    return ChinchillaFit(
        **TRUE,
        objective_huber_sum=0.0,
        n_points=0,
        delta=1e-3,
        a=beta / (alpha + beta),
        b=alpha / (alpha + beta),
        G=(alpha * A / (beta * B)) ** (1 / (alpha + beta)),
    )


def _grid_points(noise: float, seed: int = 0):
    """A 10 x 10 grid of N in [1e7, 1e10] and D in [1e9, 1e12], loss from TRUE times lognormal noise."""
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e10, 10), np.geomspace(1e9, 1e12, 10)))
    loss = _law(N, D) * np.exp(np.random.default_rng(seed).normal(0.0, noise, N.size))
    return N, D, loss


@pytest.fixture(scope="module")
def chinchilla():
    """The Epoch AI points less the 5 highest losses (as the replication does), and the fit on them."""
    points = load_points(CHINCHILLA_CSV)
    keep = np.sort(np.argsort(points.loss, kind="stable")[:-5])
    N, D, loss = points.N_params[keep], points.D_tokens[keep], points.loss[keep]
    start = time.process_time()  # CPU seconds, all threads: wall time on a shared box measures the neighbours
    fit = fit_chinchilla(N, D, loss)
    return N, D, loss, fit, time.process_time() - start


# --- recovery and the replication --------------------------------------------------------------------------


def test_noise_free_data_recovers_every_constant():
    fit = fit_chinchilla(*_grid_points(noise=0.0))
    for name, value in TRUE.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-3), name


def test_noisy_data_recovers_E_alpha_beta_to_a_few_percent():
    N, D, loss = _grid_points(noise=0.002, seed=3)
    fit = fit_chinchilla(N, D, loss)
    assert fit.E == pytest.approx(TRUE["E"], rel=0.02)
    assert fit.alpha == pytest.approx(TRUE["alpha"], rel=0.03)
    assert fit.beta == pytest.approx(TRUE["beta"], rel=0.03)
    assert r_squared(fit, N, D, loss) > 0.999


def test_chinchilla_replication_matches_the_published_refit(chinchilla):
    N, D, loss, fit, seconds = chinchilla
    assert len(loss) == 240 and fit.n_points == 240
    assert fit.E == pytest.approx(PUBLISHED_REFIT["E"], rel=0.01)
    assert fit.alpha == pytest.approx(PUBLISHED_REFIT["alpha"], rel=0.01)
    assert fit.beta == pytest.approx(PUBLISHED_REFIT["beta"], rel=0.01)
    assert fit.a == pytest.approx(0.513, rel=0.01)
    assert fit.a + fit.b == pytest.approx(1.0)
    # A and B are poorly determined (they trade off along a flat valley); same order is all one can ask.
    assert fit.A == pytest.approx(PUBLISHED_REFIT["A"], rel=0.10)
    assert fit.B == pytest.approx(PUBLISHED_REFIT["B"], rel=0.15)
    assert seconds < 3.0, f"fit took {seconds:.2f} CPU s"
    assert fit.grid_starts_evaluated == 4500


def test_fit_is_at_least_as_good_as_the_published_constants(chinchilla):
    N, D, loss, fit, _ = chinchilla
    # The same objective evaluated at the published constants (L-BFGS-B with numerical gradients stops early).
    residual = np.log(_law(N, D, **PUBLISHED_REFIT)) - np.log(loss)
    clipped = np.clip(residual, -1e-3, 1e-3)
    published_objective = float((clipped * (residual - 0.5 * clipped)).sum())
    assert fit.objective_huber_sum <= published_objective


# --- the compute-optimal allocation ------------------------------------------------------------------------


@pytest.mark.parametrize("C_flops", [1e20, 5.76e23])
def test_closed_form_optimum_matches_brute_force_on_the_compute_line(C_flops):
    fit = _true_fit()
    N = np.geomspace(1e6, 1e15, 400_001)  # log spacing 5e-5: far finer than the 0.5% asked
    losses = predict(fit, N, C_flops / (6.0 * N))
    N_brute = N[np.argmin(losses)]
    best = compute_optimal(fit, C_flops)
    assert best.N_params == pytest.approx(N_brute, rel=0.005)
    assert best.D_tokens == pytest.approx(C_flops / (6.0 * N_brute), rel=0.005)
    assert best.loss == pytest.approx(losses.min(), rel=1e-9)
    assert best.loss <= losses.min() + 1e-12
    assert best.tokens_per_param == pytest.approx(best.D_tokens / best.N_params)


def test_compute_optimal_accepts_arrays_and_grows_N_as_C_to_the_a(chinchilla):
    fit = chinchilla[3]
    budgets = compute_optimal(fit, np.array([1e21, 1e23]))
    assert budgets.N_params[1] / budgets.N_params[0] == pytest.approx(100.0**fit.a)


# --- bootstrap ---------------------------------------------------------------------------------------------


def test_bootstrap_intervals_contain_the_estimate_and_repeat_for_a_seed(chinchilla):
    N, D, loss, fit, _ = chinchilla
    first = bootstrap(N, D, loss, n_boot=30, seed=7, fit=fit)
    again = bootstrap(N, D, loss, n_boot=30, seed=7, fit=fit)
    other = bootstrap(N, D, loss, n_boot=30, seed=8, fit=fit)
    assert first.intervals == again.intervals
    assert first.intervals != other.intervals
    assert first.level == 0.95
    for name in ("E", "A", "B", "alpha", "beta", "a", "b", "G"):
        low, high = first.intervals[name]
        assert low < first.estimates[name] < high, name


# --- one-variable laws and Approach 2 ----------------------------------------------------------------------


def test_power_law_recovers_its_constants():
    x = np.geomspace(1e7, 1e10, 12)
    noise = np.exp(np.random.default_rng(0).normal(0.0, 0.002, x.size))
    fit = fit_power_law(x, (1.69 + 406.4 * x ** (-0.34)) * noise)
    assert fit.E == pytest.approx(1.69, rel=0.02)
    assert fit.alpha == pytest.approx(0.34, rel=0.03)
    assert predict_power_law(fit, 1e8) == pytest.approx(1.69 + 406.4 * 1e8 ** (-0.34), rel=0.005)


def _isoflop_points():
    """Nine sizes around the true optimum at each of six budgets, C jittered by up to 1%."""
    truth, N, C = _true_fit(), [], []
    for budget in np.geomspace(1e18, 1e21, 6):
        N_opt = compute_optimal(truth, budget).N_params
        N.extend(np.geomspace(N_opt / 4, N_opt * 4, 9))
        C.extend([budget] * 9)
    N = np.array(N)
    C = np.array(C) * np.exp(np.random.default_rng(0).uniform(-0.01, 0.01, len(C)))
    return N, C, predict(truth, N, C / (6 * N)), truth


def test_isoflop_parabolas_give_the_exponent_and_say_they_are_biased():
    N, C, loss, truth = _isoflop_points()
    result = fit_isoflop_parabolas(N, C, loss)
    assert len(result.budgets) == 6 and result.skipped == []
    assert result.a == pytest.approx(truth.a, abs=0.01)
    assert result.b == pytest.approx(1 - result.a)
    assert result.biased and "biased" in result.method
    by_label = fit_isoflop_parabolas(N, C, loss, groups=np.repeat(np.arange(6), 9))
    assert by_label.a == pytest.approx(result.a)


def test_isoflop_needs_two_usable_budgets():
    N, C, loss, _ = _isoflop_points()
    with pytest.raises(LlmkitError, match="at least 2 compute budgets"):
        fit_isoflop_parabolas(N[:9], C[:9], loss[:9])


# --- goodness of fit and output ----------------------------------------------------------------------------


def test_holdout_is_deterministic_and_predicts_held_out_points(chinchilla):
    N, D, loss, _, _ = chinchilla
    result = holdout(N, D, loss, every=5, seed=0)
    assert result.n_test == 48 and result.n_train == 192
    assert result.test_indices == holdout(N, D, loss, every=5, seed=0).test_indices
    assert result.rmse_log_loss < 0.02  # ~1% relative error on runs the fit never saw
    assert result.r2_loss > 0.95


def test_write_fit_json_is_atomic_and_plain_json(tmp_path, chinchilla):
    fit = chinchilla[3]
    path = write_fit_json(
        tmp_path / "out" / "fit.json", {"fit": fit, "missing": float("nan"), "C": np.float64(1e21)}
    )
    data = json.loads(path.read_text())
    assert data["fit"]["alpha"] == pytest.approx(fit.alpha) and data["missing"] is None and data["C"] == 1e21
    assert [p.name for p in path.parent.iterdir()] == ["fit.json"]  # no temp file left behind


# --- loading and bad input ---------------------------------------------------------------------------------


def test_load_points_csv_derives_D_from_flops():
    points = load_points(CHINCHILLA_CSV)
    assert len(points) == 245
    assert points.columns["N"] == "Model Size" and points.columns["C"] == "Training FLOP"
    np.testing.assert_allclose(points.D_tokens, points.C_flops / (6 * points.N_params))


def test_load_points_sweep_directory_with_aliases(tmp_path):
    N, D, loss = _grid_points(noise=0.0)
    rows = [
        {"PARAMS": float(n), "training_tokens": float(d), "Val_Loss": float(v), "note": "x"}
        for n, d, v in zip(N, D, loss, strict=True)
    ]
    (tmp_path / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    points = load_points(tmp_path)
    np.testing.assert_allclose(points.D_tokens, D)
    np.testing.assert_allclose(points.C_flops, 6 * N * D)
    assert points.columns["loss"] == "Val_Loss"


def _csv(tmp_path, text: str) -> Path:
    path = tmp_path / "points.csv"
    path.write_text(text)
    return path


def test_unknown_columns_name_what_was_found_and_what_is_accepted(tmp_path):
    path = _csv(tmp_path, "size,toks,ppl\n" + "1e8,1e9,3.0\n" * 6)
    with pytest.raises(LlmkitError) as err:
        load_points(path)
    message = str(err.value)
    assert "'size'" in message and "'ppl'" in message and "val_loss" in message and "\n" not in message


def test_nan_and_non_positive_values_name_the_line(tmp_path):
    good = "N,D,loss\n1e7,1e10,3.0\n1e8,1e10,3.0\n1e9,1e10,3.0\n1e10,1e10,3.0\n1e11,1e10,3.0\n"
    with pytest.raises(LlmkitError, match=r"line 3: 'loss' = 'nan'"):
        load_points(_csv(tmp_path, good.replace("1e8,1e10,3.0", "1e8,1e10,nan")))
    with pytest.raises(LlmkitError, match=r"line 4: 'N' = '-5'"):
        load_points(_csv(tmp_path, good.replace("1e9,1e10", "-5,1e10")))
    with pytest.raises(LlmkitError, match=r"loss of point 2 is nan"):
        fit_power_law([1e7, 1e8, 1e9, 1e10], [3.0, 2.9, float("nan"), 2.7])
    with pytest.raises(LlmkitError, match=r"N of point 0 is 0"):
        fit_chinchilla([0, 1, 2, 3, 4, 5], [1] * 6, [3] * 6)


def test_too_few_points_say_how_many_are_needed(tmp_path):
    N, D, loss = _grid_points(noise=0.0)
    with pytest.raises(LlmkitError, match="5 parameters, so it needs at least 6 points; got 5"):
        fit_chinchilla(N[:5], D[:5], loss[:5])
    with pytest.raises(LlmkitError, match="3 parameters, so it needs at least 4 points; got 3"):
        fit_power_law(N[:3], loss[:3])
    with pytest.raises(LlmkitError, match="has 2 points; a one-variable law"):
        load_points(_csv(tmp_path, "N,D,loss\n1e8,1e9,3\n1e9,1e10,2.5\n"))


def test_single_model_size_points_to_the_one_variable_law():
    with pytest.raises(LlmkitError, match="N takes 1 distinct value.*fit_power_law"):
        fit_chinchilla([1e8] * 8, np.geomspace(1e9, 1e11, 8), np.linspace(3.0, 2.5, 8))
