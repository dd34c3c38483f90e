"""The scaling-law lab: the size dial, `llmkit scale sweep` bookkeeping and resume, `scale fit`, `scale recommend`.

    pytest tests/test_scale.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from pretrain_helpers import recipe_dict, tree_snapshot, write_corpus, write_recipe
from typer.testing import CliRunner

from llmkit import rundir
from llmkit.cli import app
from llmkit.errors import Interrupted, RecipeError
from llmkit.models import meta_model, model_config, parameter_counts
from llmkit.recipes import recipe_from_dict
from llmkit.scaling import laws, shapes
from llmkit.scaling import sweep as planning
from llmkit.scaling.fit import compute_optimal, predict
from llmkit.stages import pretrain as pretrain_stage
from llmkit.stages import scale

runner = CliRunner()


def assert_clean_error(result, *fragments: str) -> str:
    """Exit 2, one error line (the last on stderr, after any progress lines) naming every fragment, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    err = lines[-1]
    assert err.startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale-corpus")
    return write_corpus(d, docs=24), write_corpus(d, docs=6, name="val.jsonl", offset=40)


def _pretrain(tmp_path, tokenizer_dir, corpus, **model) -> dict:
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus[0], corpus[1])
    recipe["model"] = {"type": model.pop("type", "llama"), **model}
    return recipe


# ------------------------------------------------------------------------------------------------
# The size dial
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type, positions", [("llama", {"max_position_embeddings": 64}), ("gpt2", {"n_positions": 64})])
def test_size_dial_hits_the_target_within_tolerance(tmp_path, tokenizer_dir, corpus, model_type, positions):
    data = _pretrain(tmp_path, tokenizer_dir, corpus, type=model_type, target_params=20_000_000, **positions)
    sized = shapes.sized_recipe(recipe_from_dict(data, stage="pretrain"), vocab_size=512)
    # An independent count of the model the resolved recipe builds, on the meta device.
    counts = parameter_counts(meta_model(model_config(sized, 512)))
    assert abs(counts["non_embedding"] / 20e6 - 1) <= shapes.TOLERANCE
    keys = sized.model.config_overrides
    layers, hidden = (keys["num_hidden_layers"], keys["hidden_size"]) if model_type == "llama" else (keys["n_layer"], keys["n_embd"])
    # Kaplan's N: neither the token/position tables nor the output matrix (llama's own, gpt2's tied to the input).
    untied_head = 512 * hidden if model_type == "llama" else 0
    assert counts["non_embedding"] == counts["total"] - counts["embedding"] - untied_head
    assert hidden % 64 == 0 and 32 <= hidden / layers <= 128  # head_dim 64, aspect ratio within 2x of 64
    assert sized.model.target_params == 20_000_000  # the dial stays in the recipe, next to the sizes it chose


def test_depth_dial_follows_nanochat_aspect_ratio(tmp_path, tokenizer_dir, corpus):
    llama = shapes.sized_recipe(recipe_from_dict(_pretrain(tmp_path, tokenizer_dir, corpus, depth=6), stage="pretrain"), 512)
    assert {k: llama.model.config_overrides[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")} == {
        "num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 6, "intermediate_size": 1024  # 8/3 x 384
    }
    gpt2 = _pretrain(tmp_path, tokenizer_dir, corpus, type="gpt2", depth=6, n_positions=64)
    sized = shapes.sized_recipe(recipe_from_dict(gpt2, stage="pretrain"), 512).model.config_overrides
    assert (sized["n_layer"], sized["n_embd"], sized["n_head"], sized["n_inner"]) == (6, 384, 6, 1536)


@pytest.mark.parametrize(
    "model, fragments",
    [
        ({"depth": 4, "num_hidden_layers": 6}, ["model.depth (4) contradicts model.num_hidden_layers (6)"]),
        ({"target_params": 20_000_000, "hidden_size": 2048}, ["model.target_params (20,000,000) contradicts", "model.hidden_size 2048"]),
    ],
)
def test_size_dial_conflicting_with_explicit_sizes_exits_2(tmp_path, tokenizer_dir, corpus, model, fragments):
    recipe = write_recipe(tmp_path / "r.yaml", _pretrain(tmp_path, tokenizer_dir, corpus, max_position_embeddings=64, **model))
    assert_clean_error(runner.invoke(app, ["validate", str(recipe)]), *fragments)
    assert_clean_error(runner.invoke(app, ["pretrain", str(recipe)]), *fragments)
    assert not (tmp_path / "run").exists()


def test_explicit_sizes_narrow_the_dial(tmp_path, tokenizer_dir, corpus):
    data = _pretrain(tmp_path, tokenizer_dir, corpus, target_params=1_500_000, num_hidden_layers=8, max_position_embeddings=64)
    sized = shapes.choose(recipe_from_dict(data, stage="pretrain"), 512)
    assert sized.shape.layers == 8 and abs(sized.counts["non_embedding"] / 1.5e6 - 1) < shapes.TOLERANCE
    assert sized.shape.hidden == 128  # 8 x (4 x 128^2 attention + 3 x 128 x 320 MLP + norms) = 1.51M


def test_validate_prints_the_three_conventions_and_the_dial(tmp_path, tokenizer_dir, corpus):
    recipe = write_recipe(tmp_path / "r.yaml", _pretrain(tmp_path, tokenizer_dir, corpus, target_params=300_000, max_position_embeddings=64))
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("N conventions:"))
    assert "total" in line and "non-embedding" in line and "matmul" in line
    assert "size dial:        target_params 300,000 non_embedding ->" in result.stdout
    assert "num_hidden_layers:" in result.stdout  # the resolved recipe names the sizes training builds


def test_the_dial_given_with_set_replaces_the_recipe_files_shape(tmp_path, tokenizer_dir, corpus):
    from llmkit.recipes import SIZE_KEYS, load_recipe

    data = _pretrain(tmp_path, tokenizer_dir, corpus, num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    path = write_recipe(tmp_path / "r.yaml", data)
    alone = load_recipe(path, ["model.target_params=1.5e6"], stage="pretrain")
    assert not SIZE_KEYS & set(alone.model.config_overrides)  # no `null` overrides needed for the file's sizes
    assert alone.model.config_overrides["max_position_embeddings"] == 64  # not a size key: kept
    sized = shapes.choose(alone, 512)
    assert abs(sized.counts["non_embedding"] / 1.5e6 - 1) < shapes.TOLERANCE
    kept = load_recipe(path, ["model.target_params=1.5e6", "model.num_hidden_layers=8"], stage="pretrain")
    assert kept.model.config_overrides["num_hidden_layers"] == 8 and "hidden_size" not in kept.model.config_overrides
    assert shapes.choose(kept, 512).shape.layers == 8
    plain = load_recipe(path, ["train.lr=1e-3"], stage="pretrain")  # without the dial the file's shape stands
    assert plain.model.config_overrides["hidden_size"] == 64
    for family in shapes.FAMILIES:  # every key the dial sizes is one --set of the dial drops
        for model_type in family.types:
            assert shapes.size_keys(model_type) <= SIZE_KEYS, model_type


def test_size_dial_needs_model_type(tmp_path, tokenizer_dir, corpus):
    data = _pretrain(tmp_path, tokenizer_dir, corpus)
    data["model"] = {"path": "runs/x", "target_params": 1000}
    with pytest.raises(RecipeError, match="a checkpoint \\(model.path\\) keeps its size"):
        recipe_from_dict(data, stage="pretrain")


# ------------------------------------------------------------------------------------------------
# Sweep bookkeeping (a stand-in for the pretrain run) and resume
# ------------------------------------------------------------------------------------------------


def _sweep_dict(tmp_path, tokenizer_dir, corpus, grid, **extra) -> dict:
    base = write_recipe(tmp_path / "base.yaml", _pretrain(tmp_path, tokenizer_dir, corpus, max_position_embeddings=64))
    return {
        "stage": "scale", "output_dir": str(tmp_path / "sweep"), "base": str(base),
        # head_dim 16 and hidden 16 x depth keep the shapes tiny
        "overrides": {"model.head_dim": 16, "model.aspect_ratio": 16, "train.save_every": 4},
        "grid": grid, **extra,
    }


class FakeRun:
    """Stands in for stages.pretrain.run: writes what a finished run writes, with a loss from a known law."""

    def __init__(self, interrupt: str | None = None) -> None:
        self.calls: list[str] = []
        self.interrupt = interrupt

    def __call__(self, recipe, overwrite: bool = False) -> dict:
        name = Path(recipe.output_dir).name
        self.calls.append(name)
        if name == self.interrupt:
            self.interrupt = None
            raise Interrupted(f"stopped by SIGINT at step 3; checkpoint saved to {recipe.output_dir}")
        out = Path(recipe.output_dir)
        rundir.write_resolved(recipe, out)
        per_step = planning.tokens_per_step(recipe)
        steps = math.ceil(recipe.train.max_tokens / per_step)
        hidden = recipe.model.config_overrides["hidden_size"]
        loss = 2.0 + 20.0 / hidden + 30.0 / math.sqrt(steps * per_step)
        events = [{"event": "train", "step": steps, "tokens": steps * per_step, "loss": loss, "tokens_per_s": 500.0},
                  {"event": "eval", "step": steps, "tokens": steps * per_step, "val_loss": loss, "val_tokens": 321}]
        (out / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        return {"val_loss": loss, "tokens": steps * per_step, "step": steps, "flops_per_token": 1000, "resumed_from": None}


def _available_tokens(tokenizer_dir, corpus_file, seq_len: int = 32) -> int:
    """Whole seq_len blocks in a jsonl corpus: each document's ids plus EOS, counted with the tokenizer itself."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [json.loads(line)["text"] for line in Path(corpus_file).read_text().splitlines()]
    tokens = sum(len(tokenizer(text)["input_ids"]) + 1 for text in texts)
    return tokens // seq_len * seq_len


GRID = {"sizes": [4_000, 16_000], "tokens": [1_280, 1_920, 2_560]}


def test_sweep_records_every_field_and_a_rerun_skips_finished_points(tmp_path, tokenizer_dir, corpus, monkeypatch):
    fake = FakeRun()
    monkeypatch.setattr(pretrain_stage, "run", fake)
    recipe = recipe_from_dict(_sweep_dict(tmp_path, tokenizer_dir, corpus, GRID), stage="scale")
    out = scale.sweep(recipe)
    names = [f"n{s}_d{t}" for s in ("4k", "16k") for t in ("1.28k", "1.92k", "2.56k")]
    assert fake.calls == names
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == names
    for row in rows:
        assert list(row) == list(planning.RECORD_FIELDS)
        assert row["N"] == row["params_non_embedding"] and row["C"] == pytest.approx(6 * row["N"] * row["D"])
        assert row["tokens_per_s"] == 500.0 and row["val_tokens"] == 321 and row["wall_s"] >= 0
        assert row["epochs"] == pytest.approx(row["D"] / _available_tokens(tokenizer_dir, corpus[0]), rel=1e-5)
        assert row["run_dir"] == str(tmp_path / "sweep" / "points" / row["name"])
    csv_rows = (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()
    assert csv_rows[0].split(",") == list(planning.RECORD_FIELDS) and len(csv_rows) == 1 + len(names)
    assert "n16k_d2.56k" in out and "llmkit scale fit" in out
    before = tree_snapshot(tmp_path / "sweep")
    fake.calls.clear()
    scale.sweep(recipe)
    assert fake.calls == []  # every point finished: nothing runs again
    after = tree_snapshot(tmp_path / "sweep")
    assert {k: v for k, v in after.items() if not k.startswith("sweep.")} == {k: v for k, v in before.items() if not k.startswith("sweep.")}
    assert (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines() == [json.dumps(r) for r in rows]


def test_sweep_interrupted_then_rerun_continues_at_the_interrupted_point(tmp_path, tokenizer_dir, corpus, monkeypatch):
    fake = FakeRun(interrupt="n16k_d1.28k")
    monkeypatch.setattr(pretrain_stage, "run", fake)
    recipe = recipe_from_dict(_sweep_dict(tmp_path, tokenizer_dir, corpus, GRID), stage="scale")
    with pytest.raises(Interrupted):
        scale.sweep(recipe)
    done = [json.loads(line)["name"] for line in (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()]
    assert done == ["n4k_d1.28k", "n4k_d1.92k", "n4k_d2.56k"]
    fake.calls.clear()
    scale.sweep(recipe)
    assert fake.calls == ["n16k_d1.28k", "n16k_d1.92k", "n16k_d2.56k"]


def test_sweep_that_grows_keeps_its_finished_points(tmp_path, tokenizer_dir, corpus, monkeypatch):
    fake = FakeRun()
    monkeypatch.setattr(pretrain_stage, "run", fake)
    scale.sweep(recipe_from_dict(_sweep_dict(tmp_path, tokenizer_dir, corpus, GRID), stage="scale"))
    fake.calls.clear()
    grown = dict(GRID, tokens=[*GRID["tokens"], 3_200])
    scale.sweep(recipe_from_dict(_sweep_dict(tmp_path, tokenizer_dir, corpus, grown), stage="scale"))
    assert fake.calls == ["n4k_d3.2k", "n16k_d3.2k"]
    assert len((tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()) == 8


def test_sweep_of_real_runs_resumes_an_interrupted_point_and_skips_finished_ones(tmp_path, tokenizer_dir, corpus, monkeypatch):
    """Real tiny pretraining runs: a point stopped half-way resumes from its checkpoint; a rerun trains nothing."""
    import torch
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("LLMKIT_PEAK_FLOPS", "1e11")  # skip the matmul probe: this checks bookkeeping
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _real_sweep(tmp_path, tokenizer_dir, corpus, monkeypatch)
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)


def _real_sweep(tmp_path, tokenizer_dir, corpus, monkeypatch):
    grid = {"sizes": [4_000], "tokens": [1_280, 1_920, 2_560, 3_200]}  # one size: a law in D (4 points)
    recipe = recipe_from_dict(_sweep_dict(tmp_path, tokenizer_dir, corpus, grid), stage="scale")
    plan = planning.plan(recipe, 512)
    half = plan.points[1]
    real, calls = pretrain_stage.run, []

    def stopped_half_way(r, overwrite=False):
        if Path(r.output_dir).name != half.name:
            return real(r, overwrite)
        # 10 of its 15 steps (max_tokens may change on resume), then the signal
        real(r.model_copy(update={"train": r.train.model_copy(update={"max_tokens": 1_280})}))
        raise Interrupted(f"stopped by SIGINT at step 10; checkpoint saved to {r.output_dir}")

    monkeypatch.setattr(pretrain_stage, "run", stopped_half_way)
    with pytest.raises(Interrupted):
        scale.sweep(recipe)
    monkeypatch.setattr(pretrain_stage, "run", lambda r, overwrite=False: calls.append(Path(r.output_dir).name) or real(r, overwrite))
    scale.sweep(recipe)
    assert calls == [p.name for p in plan.points[1:]]  # the first point had finished
    rows = {r["name"]: r for r in map(json.loads, (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines())}
    assert rows[half.name]["resumed_from"] == 10 and rows[half.name]["steps"] == 15
    for point in plan.points:
        summary = json.loads((Path(point.recipe.output_dir) / "summary.json").read_text())
        row = rows[point.name]
        assert row["loss"] == summary["val_loss"] and row["D"] == summary["tokens"] == point.steps * 128
        assert math.isfinite(row["loss"]) and row["tokens_per_s"] > 0
    calls.clear()
    scale.sweep(recipe)
    assert calls == []


# ------------------------------------------------------------------------------------------------
# Sweep: bad input
# ------------------------------------------------------------------------------------------------


def test_sweep_needing_more_tokens_than_the_data_exits_2(tmp_path, tokenizer_dir, corpus, monkeypatch):
    fake = FakeRun()
    monkeypatch.setattr(pretrain_stage, "run", fake)
    grid = {"sizes": [4_000, 16_000], "tokens": [1_280, 1_920, 2_000_000]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_sweep_dict(tmp_path, tokenizer_dir, corpus, grid)))
    result = runner.invoke(app, ["scale", "sweep", str(path)])
    assert_clean_error(result, "point n4k_d2m trains on 2,000,000 tokens but data.train holds", "epochs", "allow_repeat: true")
    assert not (tmp_path / "sweep").exists() and fake.calls == []
    result = runner.invoke(app, ["scale", "sweep", str(path), "--set", "allow_repeat=true"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()]
    assert max(r["epochs"] for r in rows) > 1


@pytest.mark.parametrize(
    "grid, fragments",
    [
        ({"sizes": [4_000, 16_000], "tokens": [1_280, 2_560]}, ["4 point(s)", "needs at least 6"]),
        ({"sizes": [4_000], "tokens": [1_280, 2_560, 3_840]}, ["3 point(s)", "one-variable law in D", "needs at least 4"]),
        ({"sizes": [4_000, 16_000]}, ["grid.tokens is missing"]),
        ({"sizes": [4_000, 16_000], "tokens": [1_280, 1_280]}, ["grid.tokens lists a value twice"]),
        ({"sizes": [4_000], "tokens": [100, 200, 300, 400]}, ["point n4k_d100 trains 100 tokens = 1 optimizer step(s)"]),
        ({"sizes": [-5], "tokens": [1_280]}, ["grid.sizes.0"]),
    ],
)
def test_sweep_bad_grids_exit_2_and_write_nothing(tmp_path, tokenizer_dir, corpus, grid, fragments):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_sweep_dict(tmp_path, tokenizer_dir, corpus, grid)))
    assert_clean_error(runner.invoke(app, ["scale", "sweep", str(path)]), *fragments)
    assert not (tmp_path / "sweep").exists()


def test_sweep_base_without_validation_exits_2(tmp_path, tokenizer_dir, corpus):
    data = _sweep_dict(tmp_path, tokenizer_dir, corpus, GRID)
    data["overrides"]["data.validation"] = None
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    assert_clean_error(runner.invoke(app, ["scale", "sweep", str(path)]), "no held-out text", "data.validation")


def test_isoflop_grid_spends_each_budget(tmp_path, tokenizer_dir, corpus):
    grid = {"flops": [1e11, 1e12], "sizes_per_budget": 3, "size_spread": 3.0}
    plan = planning.plan(recipe_from_dict(_sweep_dict(tmp_path, tokenizer_dir, corpus, grid), stage="scale"), 512)
    assert len(plan.points) == 6
    for point in plan.points:
        assert 6 * point.N * point.tokens == pytest.approx(point.budget_flops, rel=1e-4)
    centre = laws.optimum(laws.epoch_law(), 1e11).N
    sizes = [p.target_params for p in plan.points if p.budget_flops == 1e11]
    assert sizes[0] == pytest.approx(centre / 3, rel=1e-3) and sizes[-1] == pytest.approx(centre * 3, rel=1e-3)


# ------------------------------------------------------------------------------------------------
# Fit
# ------------------------------------------------------------------------------------------------

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def _points_csv(path: Path, N_values, D_values, noise: float = 0.002, **columns) -> Path:
    rng = np.random.default_rng(0)
    lines = ["N,D,loss" + "".join(f",{k}" for k in columns)]
    law = laws.chinchilla(TRUE)
    for i, (n, d) in enumerate((n, d) for n in N_values for d in D_values):
        loss = predict(law, n, d) * math.exp(rng.normal(0, noise))
        lines.append(f"{n},{d},{loss}" + "".join(f",{v[i]}" for v in columns.values()))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fit_recovers_a_known_law_and_writes_fit_json_and_plot(tmp_path):
    data = _points_csv(tmp_path / "points.csv", np.geomspace(1e7, 1e9, 4), np.geomspace(1e9, 1e11, 4))
    result = runner.invoke(app, ["scale", "fit", str(data), "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "points.fit.json").read_text())
    assert report["kind"] == "chinchilla" and report["r2"] > 0.99
    assert report["constants"]["alpha"] == pytest.approx(TRUE["alpha"], abs=0.06)
    assert report["bootstrap"]["n_ok"] >= 15 and len(report["bootstrap"]["draws"]) == report["bootstrap"]["n_ok"]
    low, high = report["bootstrap"]["intervals"]["E"]
    assert low <= report["constants"]["E"] <= high
    assert report["holdout"]["available"] and report["holdout"]["n_test"] == 4
    assert (tmp_path / "points.fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "R^2" in result.stdout and "held out:" in result.stdout and "approach 2:" in result.stdout


def test_fit_of_one_variable_and_approach2_on_isoflop_points(tmp_path):
    data = _points_csv(tmp_path / "d.csv", [1e8], np.geomspace(1e9, 1e11, 5))
    assert runner.invoke(app, ["scale", "fit", str(data), "--bootstrap", "5", "-o", str(tmp_path / "out" / "f.json")]).exit_code == 0
    report = json.loads((tmp_path / "out" / "f.json").read_text())
    assert report["kind"] == "power_law" and report["variable"] == "D" and report["r2"] > 0.99
    assert report["constants"]["alpha"] == pytest.approx(TRUE["beta"], abs=0.05)  # the D exponent
    assert (tmp_path / "out" / "f.png").is_file()
    # IsoFLOP points: 3 budgets x 5 sizes, labelled by budget: Approach 2 is reported, flagged biased.
    rows = ["N,D,loss,budget_flops"]
    law = laws.chinchilla(TRUE)
    for C in (1e18, 1e19, 1e20):
        centre = compute_optimal(law, C).N_params
        for n in centre * np.geomspace(0.25, 4, 5):
            rows.append(f"{n},{C / (6 * n)},{predict(law, n, C / (6 * n))},{C}")
    (tmp_path / "iso.csv").write_text("\n".join(rows) + "\n")
    result = runner.invoke(app, ["scale", "fit", str(tmp_path / "iso.csv"), "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    a2 = json.loads((tmp_path / "iso.fit.json").read_text())["approach2"]
    assert a2["available"] and a2["biased"] and len(a2["budgets"]) == 3
    assert "BIASED" in result.stdout


@pytest.mark.parametrize(
    "csv, fragments",
    [
        ("N,D,loss\n1e7,1e9,3.1\n1e8,1e9,2.9\n1e9,1e9,2.8\n", ["3 points", "at least 4"]),
        ("N,D,loss\n" + "".join(f"{n},{d},3.0\n" for n in (1e7, 1e8) for d in (1e9, 1e10)) + "1e9,1e9,2.5\n", ["5 points", "at least 6"]),
        ("N,D,loss\n1e7,1e9,nan\n1e8,1e9,2.9\n1e9,1e9,2.8\n1e10,1e9,2.7\n", ["line 2", "'loss'", "positive and finite"]),
        ("N,D,loss\n-1e7,1e9,3\n1e8,1e9,2.9\n1e9,1e9,2.8\n1e10,1e9,2.7\n", ["line 2", "'N'", "positive and finite"]),
        ("N,D,loss\n0,1e9,3\n1e8,1e9,2.9\n1e9,1e9,2.8\n1e10,1e9,2.7\n", ["line 2", "'N'"]),
        ("size,toks,score\n1,2,3\n1,2,3\n1,2,3\n1,2,3\n", ["no loss column", "size", "accepted names"]),
    ],
)
def test_fit_bad_points_exit_2_and_write_nothing(tmp_path, csv, fragments):
    path = tmp_path / "p.csv"
    path.write_text(csv)
    assert_clean_error(runner.invoke(app, ["scale", "fit", str(path), "--bootstrap", "0"]), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]


def test_fit_of_a_sweep_directory(tmp_path, tokenizer_dir, corpus, monkeypatch):
    monkeypatch.setattr(pretrain_stage, "run", FakeRun())
    recipe = recipe_from_dict(_sweep_dict(tmp_path, tokenizer_dir, corpus, GRID), stage="scale")
    scale.sweep(recipe)
    result = runner.invoke(app, ["scale", "fit", str(tmp_path / "sweep"), "--bootstrap", "10"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "sweep" / "fit.json").read_text())
    assert report["param_convention"] == "non_embedding" and report["sweep"] == str(tmp_path / "sweep")
    assert report["throughput"]["tokens_per_s"] == 500.0 and (tmp_path / "sweep" / "fit.png").is_file()
    assert [r["name"] for r in report["residuals"]][:2] == ["n4k_d1.28k", "n4k_d1.92k"]
    # Everything that makes the numbers reproducible: version, conventions, rules, data.
    import hashlib

    import llmkit
    from llmkit.data.lm import cache_key
    from llmkit.models import load_tokenizer

    prov = report["provenance"]
    assert prov["llmkit_version"] == llmkit.__version__ and prov["param_convention"] == "non_embedding"
    assert prov["points_sha256"] == hashlib.sha256((tmp_path / "sweep" / "sweep.jsonl").read_bytes()).hexdigest()
    assert prov["flop_convention"] == "6N" and prov["rules"]["lr_rule"] == "constant" and prov["rules"]["batch_rule"] == "constant"
    point = planning.plan(recipe, 512).points[0].recipe
    assert prov["data"]["fingerprint"] == cache_key(point, load_tokenizer(str(tokenizer_dir)))
    assert prov["data"]["train_tokens"] == _available_tokens(tokenizer_dir, corpus[0])
    assert "data:        lm-" in result.stdout or "data:        " in result.stdout
    refit = runner.invoke(app, ["scale", "fit", str(tmp_path / "sweep"), "--bootstrap", "0", "--param-convention", "total",
                                "-o", str(tmp_path / "total.json")])
    assert refit.exit_code == 0, refit.output
    rows = [json.loads(x) for x in (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "total.json").read_text())["ranges"]["N"] == [min(r["params_total"] for r in rows), max(r["params_total"] for r in rows)]


# ------------------------------------------------------------------------------------------------
# Recommend
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fit_json(tmp_path_factory) -> Path:
    """fit.json of 9 noisy points of a known law (N 1e7..1e9, D 1e9..1e11), with 20 bootstrap draws."""
    tmp = tmp_path_factory.mktemp("fit")
    data = _points_csv(tmp / "points.csv", np.geomspace(1e7, 1e9, 3), np.geomspace(1e9, 1e11, 3))
    assert runner.invoke(app, ["scale", "fit", str(data), "--bootstrap", "20", "-o", str(tmp / "fit.json")]).exit_code == 0
    return tmp / "fit.json"


@pytest.mark.parametrize("C", [1e15, 1e19, 1e23])
def test_closed_form_optimum_equals_brute_force_on_the_budget_line(fit_json, C):
    law = laws.load_law(fit_json) if C == 1e19 else laws.epoch_law()
    best = laws.optimum(law, C)
    N = np.geomspace(best.N / 100, best.N * 100, 400_001)
    losses = predict(law.fit, N, C / (6 * N))
    assert best.N == pytest.approx(N[np.argmin(losses)], rel=1e-3)
    assert best.loss == pytest.approx(losses.min(), rel=1e-9)
    assert best.D == pytest.approx(C / (6 * best.N))


def test_recommend_without_a_fit_uses_the_epoch_constants_and_says_so(tmp_path):
    result = runner.invoke(app, ["scale", "recommend", "--flops", "1e21"])
    assert result.exit_code == 0, result.output
    assert "no --fit given" in result.stdout and "Epoch AI" in result.stdout and "E=1.817" in result.stdout
    E, A, B, alpha, beta = 1.8172, 482.01, 2085.43, 0.3478, 0.3658
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    N = G * (1e21 / 6) ** (beta / (alpha + beta))
    assert f"N* = {N:.4g}" in result.stdout
    assert f"D* = {1e21 / (6 * N):.4g}" in result.stdout
    assert f"loss:        {E + A * N**-alpha + B * (1e21 / (6 * N)) ** -beta:.4f} predicted" in result.stdout
    assert "model:       llama," in result.stdout


def test_recommend_from_a_fit_with_intervals_shape_and_recipe(tmp_path, tokenizer_dir, corpus, fit_json):
    fit_path = fit_json
    base = write_recipe(tmp_path / "base.yaml", _pretrain(tmp_path, tokenizer_dir, corpus, max_position_embeddings=64))
    target = tmp_path / "optimal.yaml"
    args = ["scale", "recommend", "--flops", "1e17", "--fit", str(fit_path), "--base", str(base), "--write-recipe", str(target)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    best = laws.optimum(laws.load_law(fit_path), 1e17)
    assert f"N* = {best.N:.4g} [" in result.stdout and "loss:" in result.stdout and "steps:" in result.stdout
    assert "compute:     of this model on D* tokens, by convention: 6N " in result.stdout and "| M " in result.stdout
    written = yaml.safe_load(target.read_text())
    recipe = recipe_from_dict(written, stage="pretrain")
    counts = parameter_counts(meta_model(model_config(recipe, 512)))
    assert abs(math.log(counts["non_embedding"] / best.N)) < math.log(1.1)
    # D for the shape built, so that the recipe's 6 N D is the budget (within whole steps)
    assert written["train"]["max_tokens"] == round(1e17 / (6 * counts["non_embedding"])) and "max_steps" not in written["train"]
    steps = math.ceil(written["train"]["max_tokens"] / planning.tokens_per_step(recipe, 1))
    assert 6 * counts["non_embedding"] * steps * planning.tokens_per_step(recipe, 1) == pytest.approx(1e17, rel=0.05)
    assert target.read_text().startswith("# Compute-optimal llama")
    assert_clean_error(runner.invoke(app, args), "already exists", "--force")
    far = runner.invoke(app, ["scale", "recommend", "--flops", "1e23", "--fit", str(fit_path)])
    assert far.exit_code == 0 and "orders of magnitude outside the swept range" in far.stdout


def test_recommend_refuses_a_recipe_that_whole_steps_cannot_fit_in_the_budget(tmp_path, tokenizer_dir, corpus, fit_json):
    data = _pretrain(tmp_path, tokenizer_dir, corpus, max_position_embeddings=64)
    data["train"]["grad_accum_steps"] = 1_000_000  # 128M tokens a step: D* of 1e17 FLOPs is under 5 steps
    base = write_recipe(tmp_path / "base.yaml", data)
    target = tmp_path / "optimal.yaml"
    result = runner.invoke(app, ["scale", "recommend", "--flops", "1e17", "--fit", str(fit_json), "--base", str(base),
                                 "--write-recipe", str(target)])
    line = assert_clean_error(result, "--write-recipe", "whole step(s) of 128,000,000 tokens", "x the budget of 1e+17")
    ratio = float(line.split("FLOPs (6 N D), ")[1].split("x")[0])
    assert abs(ratio - 1) > 0.05 and not target.exists()


def test_recommend_counts_the_data_and_offers_the_data_constrained_split(tmp_path, tokenizer_dir, corpus, fit_json):
    base = write_recipe(tmp_path / "base.yaml", _pretrain(tmp_path, tokenizer_dir, corpus, max_position_embeddings=64))
    result = runner.invoke(app, ["scale", "recommend", "--flops", "1e17", "--fit", str(fit_json), "--base", str(base)])
    assert result.exit_code == 0, result.output
    law = laws.load_law(fit_json)
    best = laws.optimum(law, 1e17)
    unique = _available_tokens(tokenizer_dir, corpus[0])
    assert f"D* = {best.D:.3g} tokens is {best.D / unique:.2f} epoch(s) of the {unique:,} tokens" in result.stdout
    assert "warning:" in result.stdout and "the data repeats" in result.stdout
    # Muennighoff et al. 2023: U + U R* (1 - exp(-(D/U - 1) / R*)), R* = 15.39, computed here independently.
    effective = unique + unique * 15.39 * (1 - math.exp(-(best.D / unique - 1) / 15.39))
    assert laws.effective_tokens(best.D, unique) == pytest.approx(effective, rel=1e-12)
    assert f"are worth {effective:.3g} unique tokens" in result.stdout
    constrained = laws.data_constrained(law, 1e17, unique)
    # The constrained split beats every other split of the budget on a fine grid of sizes, and the unconstrained one.
    grid = np.geomspace(best.N / 100, best.N * 1e4, 4000)
    losses = [predict(law.fit, n, laws.effective_tokens(1e17 / (6 * n), unique)) for n in grid]
    assert constrained.loss <= min(losses) + 1e-9 and constrained.loss <= constrained.loss_at_unconstrained
    assert f"best split is N = {constrained.N:.4g}" in result.stdout


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--flops=-1"], ["--flops -1.0", "positive"]),
        (["--flops", "1e18", "--gpu-hours", "3"], ["not both"]),
        (["--gpu-hours", "3"], ["--tokens-per-s"]),
        (["--gpu-hours", "3", "--tokens-per-s", "1000"], ["--at-params"]),
        (["--flops", "1e18", "--fit", "nowhere.json"], ["--fit nowhere.json", "no such file"]),
        (["--flops", "1e18", "--write-recipe", "x.yaml"], ["--write-recipe needs a base"]),
        (["--flops", "1e18", "--param-convention", "all"], ["--param-convention all"]),
    ],
)
def test_recommend_bad_input_exits_2(tmp_path, args, fragments, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_clean_error(runner.invoke(app, ["scale", "recommend", *args]), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_recommend_from_gpu_hours(tmp_path):
    result = runner.invoke(app, ["scale", "recommend", "--gpu-hours", "10", "--tokens-per-s", "1e5", "--at-params", "1e8"])
    assert result.exit_code == 0, result.output
    assert f"C = {10 * 3600 * 1e5 * 6 * 1e8:.4g} FLOPs" in result.stdout


@pytest.mark.slow
def test_sweep_under_accelerate_launch_writes_its_files_once(tmp_path, tokenizer_dir, corpus):
    """Two processes (gloo on CPU): every point trains on both, the main process writes the rows, a rerun skips them."""
    import subprocess
    import sys

    from pretrain_helpers import subprocess_env

    grid = {"sizes": [4_000], "tokens": [2_560, 3_840, 5_120, 6_400]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_sweep_dict(tmp_path, tokenizer_dir, corpus, grid)))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "llmkit", "scale", "sweep", str(path),
    ]
    first = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["n4k_d2.56k", "n4k_d3.84k", "n4k_d5.12k", "n4k_d6.4k"]
    # 4 sequences x 32 tokens x 2 processes per step
    assert [(r["tokens_per_step"], r["steps"], r["D"]) for r in rows] == [(256, s, 256 * s) for s in (10, 15, 20, 25)]
    assert first.stdout.count("next:    llmkit scale fit") == 1
    again = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stderr.count("finished, skipped") == 4
