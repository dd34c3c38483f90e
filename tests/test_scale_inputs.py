"""`llmkit scale fit` and `scale recommend` on input they must refuse or survive: many distinct sizes, bytes that
are not UTF-8, a fit.json with strings for numbers, degenerate fits, and predictions no model can reach.

    pytest tests/test_scale_inputs.py -q
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from pretrain_helpers import assert_clean_error, tree_snapshot
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.scaling import plots

runner = CliRunner()
LAW = {"E": 1.8, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}


def _grid_csv(path, loss=None):
    rows = ["N,D,loss"]
    for N in (1e6, 3e6, 1e7, 3e7, 1e8):
        for D in (2e7, 6e7, 2e8, 6e8):
            value = LAW["E"] + LAW["A"] / N ** LAW["alpha"] + LAW["B"] / D ** LAW["beta"] if loss is None else loss(N, D)
            rows.append(f"{N},{D},{value}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_fit_of_thousands_of_distinct_sizes_prints_the_fit_and_bounds_the_plot(tmp_path):
    rng = np.random.default_rng(0)
    N, D = 10 ** rng.uniform(6, 8, 2000), 10 ** rng.uniform(7, 9, 2000)
    loss = LAW["E"] + LAW["A"] / N ** LAW["alpha"] + LAW["B"] / D ** LAW["beta"]
    path = tmp_path / "big.csv"
    path.write_text("N,D,loss\n" + "".join(f"{n},{d},{x}\n" for n, d, x in zip(N, D, loss, strict=True)))
    groups = plots._bounded_groups(N)
    assert len(groups) <= plots.MAX_SERIES and sorted(np.concatenate(groups).tolist()) == list(range(2000))
    result = runner.invoke(app, ["scale", "fit", str(path), "--bootstrap", "0", "-o", str(tmp_path / "big.json")])
    assert result.exit_code == 0, result.output
    out = result.stdout
    # The constants come first, then the plot is drawn.
    assert out.index("alpha") < out.index("big.json") < out.index("big.png")
    assert (tmp_path / "big.png").stat().st_size > 0
    fit = json.loads((tmp_path / "big.json").read_text())
    assert fit["constants"]["alpha"] == pytest.approx(LAW["alpha"], rel=0.02)


def test_fit_of_a_file_that_is_not_utf8_exits_2(tmp_path):
    path = tmp_path / "bin.csv"
    path.write_bytes(b"N,D,loss\n\xff\xfe\x00\x01\n")
    assert_clean_error(runner.invoke(app, ["scale", "fit", str(path)]), "bin.csv: not UTF-8 text", "byte 9", "line 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin.csv"]


def test_fit_of_points_with_one_loss_exits_2_and_writes_nothing(tmp_path):
    path = _grid_csv(tmp_path / "const.csv", loss=lambda N, D: 3.0)
    assert_clean_error(runner.invoke(app, ["scale", "fit", str(path)]), "const.csv", "every point has the same loss (3)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["const.csv"]


def test_a_degenerate_fit_warns_and_recommend_refuses_it(tmp_path):
    # The loss does not depend on N at all: alpha fits to ~0.
    path = _grid_csv(tmp_path / "flat.csv", loss=lambda N, D: 1.8 + 410.0 / D**0.28)
    result = runner.invoke(app, ["scale", "fit", str(path), "--bootstrap", "0", "-o", str(tmp_path / "flat.json")])
    assert result.exit_code == 0, result.output
    assert "warning:     degenerate fit: alpha" in result.stdout and "optimum:" not in result.stdout
    assert json.loads((tmp_path / "flat.json").read_text())["degenerate"].startswith("alpha")
    refused = runner.invoke(app, ["scale", "recommend", "--flops", "1e18", "--fit", str(tmp_path / "flat.json")])
    assert_clean_error(refused, "flat.json: a degenerate law (alpha", "does not fall with N")


# The bundled CPU grid trained with Porian et al.'s lr and batch rules (benchmarks/RESULTS.md): the 320K-parameter
# model, at lr 0.032 and 8,192 tokens per step, ends above the 80K one, so alpha fits far below 0.
PORIAN_GRID_LOSSES = [6.4385, 6.3731, 6.2464, 6.1613, 6.0439, 5.8877, 6.3837, 6.2742, 6.1108, 6.0235, 5.7886, 5.5062, 6.7636, 6.5529, 6.3313, 6.3011, 6.2252, 6.0933]


def test_a_fit_whose_loss_rises_with_N_warns_without_numpy_noise(tmp_path):
    sizes, budgets = (20_640, 83_280, 315_952), (100e3, 160e3, 250e3, 320e3, 450e3, 640e3)
    points = [(N, D) for N in sizes for D in budgets]
    path = tmp_path / "porian.csv"
    path.write_text("N,D,loss\n" + "".join(f"{N},{D},{x}\n" for (N, D), x in zip(points, PORIAN_GRID_LOSSES, strict=True)))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner.invoke(app, ["scale", "fit", str(path), "--bootstrap", "20", "-o", str(tmp_path / "fit.json")])
    assert result.exit_code == 0, result.output
    assert "warning:     degenerate fit: alpha" in result.stdout
    # Predictions of such a law overflow away from the points (plots, refits): no RuntimeWarning reaches the user.
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


# The bundled CPU grid trained with the rule `scale hp` fitted on it (benchmarks/RESULTS.md): the 80K and 316K models
# end at the same losses, so the N term is a step between 20K and 80K: alpha runs to hundreds and A = e^(log A)
# overflows, while the law reproduces the points (R^2 0.99).
STEP_GRID_LOSSES = [5.6932, 5.3822, 5.103, 4.9879, 4.8043, 4.6836, 5.6305, 5.2949, 4.9547, 4.808, 4.5826, 4.4244, 5.5148, 5.2438, 4.9833, 4.8522, 4.6316, 4.4345]


def test_a_fit_whose_loss_stops_falling_with_N_is_reported_degenerate_not_refused(tmp_path):
    sizes, budgets = (20_640, 83_280, 315_952), (100e3, 160e3, 250e3, 320e3, 450e3, 640e3)
    path = tmp_path / "step.csv"
    path.write_text("N,D,loss\n" + "".join(f"{N},{D},{x}\n" for (N, D), x in
                                           zip([(N, D) for N in sizes for D in budgets], STEP_GRID_LOSSES, strict=True)))
    result = runner.invoke(app, ["scale", "fit", str(path), "--bootstrap", "10", "-o", str(tmp_path / "fit.json")])
    assert result.exit_code == 0, result.output
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["constants"]["alpha"] > 5 and fit["r2"] > 0.98
    # The law's predictions at the points, from its logs, are the losses within 2%.
    assert max(abs(r["relative"]) for r in fit["residuals"]) < 0.02
    assert "the loss stops falling with N past the smallest swept values" in fit["degenerate"]
    assert "warning:     degenerate fit: alpha" in result.stdout and (tmp_path / "fit.png").stat().st_size > 0
    refused = runner.invoke(app, ["scale", "recommend", "--flops", "1e13", "--fit", str(tmp_path / "fit.json")])
    assert_clean_error(refused, "fit.json: a degenerate law (alpha", "stops falling with N")


def test_predictions_of_a_law_whose_A_overflows_come_from_its_logs():
    from llmkit.scaling.fit import _chinchilla_result, predict

    law = _chinchilla_result(np.array([800.0, math.log(20.0), 0.0, 80.0, 0.1]), 0.0, 6, 1e-3)
    assert law.A == math.inf
    N, D = 2e4, 1e5
    expected = 1.0 + math.exp(800.0 - 80.0 * math.log(N)) + 20.0 / D**0.1
    assert predict(law, N, D) == pytest.approx(expected, rel=1e-12)


@pytest.fixture(scope="module")
def good_fit(tmp_path_factory):
    d = tmp_path_factory.mktemp("good-fit")
    result = runner.invoke(app, ["scale", "fit", str(_grid_csv(d / "good.csv")), "--bootstrap", "20", "-o", str(d / "fit.json")])
    assert result.exit_code == 0, result.output
    return d / "fit.json"


def _strings_for_floats(value):
    if isinstance(value, dict):
        return {k: _strings_for_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strings_for_floats(v) for v in value]
    return "abc" if isinstance(value, float) else value


@pytest.mark.parametrize(
    "change, fragments",
    [
        (_strings_for_floats, ["constants.E is 'abc', not a number"]),
        (lambda d: {**d, "constants": {**d["constants"], "beta": None}}, ["constants.beta is None"]),
        (lambda d: {**d, "bootstrap": {**d["bootstrap"], "draws": [["x"]]}}, ["bootstrap.draws is not a table of numbers"]),
        (lambda d: {**d, "ranges": {"C": ["1", 2]}}, ["ranges.C.0 is '1'"]),
        (lambda d: {**d, "throughput": {"flops_per_s": "fast", "tokens_per_s": 1.0}}, ["throughput.flops_per_s is 'fast'"]),
        (lambda d: {**d, "param_convention": 7}, ["param_convention is 7"]),
    ],
)
def test_recommend_from_a_fit_json_with_bad_numbers_exits_2(tmp_path, good_fit, change, fragments):
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(change(json.loads(good_fit.read_text()))))
    before = tree_snapshot(tmp_path)
    assert_clean_error(runner.invoke(app, ["scale", "recommend", "--flops", "1e18", "--fit", str(broken)]), "broken.json", *fragments)
    assert tree_snapshot(tmp_path) == before


def test_recommend_refuses_a_loss_worse_than_a_uniform_guess(tmp_path, good_fit):
    # A law whose loss at a budget far below the sweep exceeds ln(32,000) = 10.37 nats (the default llama's vocabulary).
    data = json.loads(good_fit.read_text())
    data["constants"].update(E=1.8, A=4000.0, alpha=0.34)
    steep = tmp_path / "steep.json"
    steep.write_text(json.dumps(data))
    result = runner.invoke(app, ["scale", "recommend", "--flops", "1e12", "--fit", str(steep)])
    line = assert_clean_error(result, "worse than guessing uniformly", "32,000-token vocabulary", f"ln 32,000 = {math.log(32000):.2f}")
    assert "nats at C = 1e+12" in line
    assert runner.invoke(app, ["scale", "recommend", "--flops", "1e20", "--fit", str(steep)]).exit_code == 0


# ------------------------------------------------------------------------------------------------
# Downstream: loss -> accuracy, and the accuracy recommend predicts
# ------------------------------------------------------------------------------------------------

SIGMOID = {"a": 0.6, "k": -3.0, "L0": 3.0, "b": 0.25}  # chance 0.25, rising to 0.85 as the loss falls


def _true_accuracy(loss):
    return SIGMOID["a"] / (1 + math.exp(-SIGMOID["k"] * (loss - SIGMOID["L0"]))) + SIGMOID["b"]


def _points_with_accuracy(tmp_path, with_dirs: bool = False):
    rng = np.random.default_rng(1)
    rows = ["name,N,D,loss,choice_acc,choice_acc_stderr,run_dir"]
    for i, N in enumerate((1e6, 3e6, 1e7, 3e7, 1e8)):
        for j, D in enumerate((2e7, 6e7, 2e8, 6e8)):
            loss = LAW["E"] + LAW["A"] / N ** LAW["alpha"] + LAW["B"] / D ** LAW["beta"]
            acc = _true_accuracy(loss) + rng.normal(0, 0.003)
            run_dir = tmp_path / "points" / f"p{i}{j}"
            if with_dirs:
                (run_dir / "eval-task").mkdir(parents=True)
                scores = {"acc": acc, "acc_stderr": 0.05 + 0.002 * j, "acc_norm": acc}
                (run_dir / "eval-task" / "metrics.json").write_text(json.dumps({"metrics": scores}))
            rows.append(f"p{i}{j},{N},{D},{loss},{acc},0.04,{run_dir}")
    path = tmp_path / "points.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("source", ["choice_acc", "eval-task"])
def test_fit_of_accuracy_from_loss_and_the_accuracy_recommend_predicts(tmp_path, source):
    points = _points_with_accuracy(tmp_path, with_dirs=source == "eval-task")
    out = tmp_path / "fit.json"
    result = runner.invoke(app, ["scale", "fit", str(points), "--bootstrap", "40", "-o", str(out), "--accuracy", source])
    assert result.exit_code == 0, result.output
    assert f"downstream:  {source}: Acc(L) =" in result.stdout
    down = json.loads(out.read_text())["downstream"]
    assert down["rmse"] < 0.005 and down["r2"] > 0.9  # the noise is 0.003
    from llmkit.scaling import laws

    # The fitted sigmoid agrees with the true one across the losses the points span (not only at them).
    for loss in np.linspace(min(p[0] for p in down["points"]), max(p[0] for p in down["points"]), 7):
        assert laws.accuracy_of(down["constants"], loss) == pytest.approx(_true_accuracy(loss), abs=0.02)
    rec = runner.invoke(app, ["scale", "recommend", "--flops", "1e16", "--fit", str(out)])  # inside the points' losses
    assert rec.exit_code == 0, rec.output
    line = next(x for x in rec.stdout.splitlines() if x.startswith("accuracy:"))
    law = laws.load_law(out)
    expected = _true_accuracy(laws.optimum(law, 1e16).loss)
    import re

    value, low, high = (float(v) for v in re.match(r"accuracy:\s+([\d.]+) \[([\d.]+), ([\d.]+)\]", line).groups())
    assert value == pytest.approx(expected, abs=0.02) and low <= value <= high and f"on {source}" in line
    # The scores' own sampling error (median over the points) is recorded and named beside the interval.
    stderr = 0.04 if source == "choice_acc" else 0.053  # median of 0.050, 0.052, 0.054, 0.056 over the budgets
    assert down["score_stderr"] == pytest.approx(stderr)
    assert f"score +/- {stderr:.3f}, one standard error" in rec.stdout and "is not in it" in rec.stdout


def test_fit_of_accuracy_without_the_scores_names_the_command_to_run(tmp_path):
    points = _points_with_accuracy(tmp_path, with_dirs=False)
    result = runner.invoke(app, ["scale", "fit", str(points), "--bootstrap", "0", "--accuracy", "eval-task"])
    assert_clean_error(result, "--accuracy eval-task: point p00 has no", "metrics.json", "llmkit scale eval", "--set output_dir=eval-task")
    assert not (tmp_path / "points.fit.json").exists()


def _as_moved_sweep(tmp_path, points_csv) -> Path:
    """The points as a sweep directory that was moved after it ran: sweep.jsonl's run_dir still names the old place."""
    import csv

    sweep = tmp_path / "moved-sweep"
    sweep.mkdir()
    shutil.move(tmp_path / "points", sweep / "points")
    rows = list(csv.DictReader(points_csv.open()))
    (sweep / "sweep.jsonl").write_text("".join(json.dumps({**r, "N": float(r["N"]), "D": float(r["D"]), "loss": float(r["loss"])}) + "\n"
                                               for r in rows))
    return sweep


def test_fit_of_accuracy_finds_the_scores_of_a_sweep_that_was_moved(tmp_path):
    """A sweep directory's points are read where they are now (SWEEP/points/NAME), not at the run_dir they trained in."""
    sweep = _as_moved_sweep(tmp_path, _points_with_accuracy(tmp_path, with_dirs=True))
    assert not (tmp_path / "points").exists()
    result = runner.invoke(app, ["scale", "fit", str(sweep), "--bootstrap", "0", "--accuracy", "eval-task"])
    assert result.exit_code == 0, result.output
    down = json.loads((sweep / "fit.json").read_text())["downstream"]
    scores = [json.loads((sweep / "points" / f"p{i}{j}" / "eval-task" / "metrics.json").read_text())["metrics"]["acc"]
              for i in range(5) for j in range(4)]
    assert [p[1] for p in down["points"]] == pytest.approx(scores)


# ------------------------------------------------------------------------------------------------
# `llmkit scale eval`: every point of a sweep scored by one eval recipe, in one command
# ------------------------------------------------------------------------------------------------


def _model_sweep(tmp_path, model_dir, names=("p0", "p1")) -> Path:
    """A sweep directory whose points are copies of one tiny model, moved since it ran (stale run_dir)."""

    sweep = tmp_path / "sweep"
    rows = []
    for i, name in enumerate(names):
        shutil.copytree(model_dir, sweep / "points" / name)
        rows.append({"name": name, "N": 1000 * (i + 1), "D": 5000, "loss": 6.0 - i, "run_dir": str(tmp_path / "gone" / name)})
    (sweep / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sweep


SCORE = ["eval/choice-tiny", "--set", "data.max_samples=8"]


def test_scale_eval_scores_every_point_as_llmkit_eval_does_and_skips_them_on_a_rerun(tmp_path, tiny_model_dir, monkeypatch):
    sweep = _model_sweep(tmp_path, tiny_model_dir)
    result = runner.invoke(app, ["scale", "eval", str(sweep), *SCORE])
    assert result.exit_code == 0, result.output
    assert "next:    llmkit scale fit" in result.stdout and "--accuracy eval-choice-tiny" in result.stdout
    # stdout is the table (one row per point); each point's `llmkit eval` report is progress, on stderr.
    assert result.stdout.splitlines()[0].split()[:4] == ["point", "N", "D", "loss"] and "acc_stderr" in result.stderr
    direct = tmp_path / "direct"
    alone = runner.invoke(app, ["eval", *SCORE, "--set", f"model.path={sweep / 'points' / 'p1'}", "--set", f"output_dir={direct}"])
    assert alone.exit_code == 0, alone.output
    expected = json.loads((direct / "metrics.json").read_text())["metrics"]
    for name in ("p0", "p1"):  # copies of one model: the same scores as `llmkit eval` of one of them
        scored = json.loads((sweep / "points" / name / "eval-choice-tiny" / "metrics.json").read_text())
        assert scored["model"] == str(sweep / "points" / name)
        assert scored["metrics"] == expected
    from llmkit.stages import evaluate

    monkeypatch.setattr(evaluate, "run", lambda *a, **k: pytest.fail("a scored point was scored again"))
    rerun = runner.invoke(app, ["scale", "eval", str(sweep), *SCORE])
    assert rerun.exit_code == 0, rerun.output
    assert rerun.stderr.count("scored already, skipped") == 2


@pytest.mark.parametrize("setup, fragments", [
    ("no-sweep", ["no sweep.jsonl", "llmkit scale sweep"]),
    ("lost-point", ["point p1", "does not exist"]),
    ("other-eval", ["output_dir", "holds a different eval", "--overwrite"]),
])
def test_scale_eval_bad_input_exits_2_before_scoring_any_point(tmp_path, tiny_model_dir, setup, fragments, monkeypatch):

    from llmkit.stages import evaluate

    sweep = _model_sweep(tmp_path, tiny_model_dir)
    if setup == "no-sweep":
        (sweep / "sweep.jsonl").unlink()
    elif setup == "lost-point":
        shutil.rmtree(sweep / "points" / "p1")
    else:  # p1 was scored by another recipe into the same directory name
        assert runner.invoke(app, ["eval", *SCORE, "--set", f"model.path={sweep / 'points' / 'p1'}",
                                   "--set", f"output_dir={sweep / 'points' / 'p1' / 'eval-choice-tiny'}"]).exit_code == 0
        SCORE_OTHER = ["eval/choice-tiny", "--set", "data.max_samples=4"]
        monkeypatch.setattr(evaluate, "run", lambda *a, **k: pytest.fail("scored before every point was checked"))
        assert_clean_error(runner.invoke(app, ["scale", "eval", str(sweep), *SCORE_OTHER]), *fragments)
        return
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: pytest.fail("scored before every point was checked"))
    assert_clean_error(runner.invoke(app, ["scale", "eval", str(sweep), *SCORE]), *fragments)
    assert not (sweep / "points" / "p0" / "eval-choice-tiny").exists()
