"""Branched sweeps (one stable phase per size, a WSD cooldown per token budget) and the per-point rules.

    pytest tests/test_scale_branch.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pretrain_helpers import assert_clean_error
from safetensors.torch import load_file
from test_scale import _sweep_dict, corpus  # noqa: F401  (the module's corpus fixture)
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.errors import Interrupted
from llmkit.recipes import recipe_from_dict
from llmkit.scaling import rules
from llmkit.scaling import sweep as planning
from llmkit.stages import pretrain as pretrain_stage
from llmkit.stages import scale

runner = CliRunner()
BRANCH_GRID = {"sizes": [4_000], "tokens": [1_280, 1_920, 2_560, 3_200]}  # 10, 15, 20, 25 steps of 128 tokens


@pytest.fixture
def one_thread(monkeypatch):
    import torch
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("LLMKIT_PEAK_FLOPS", "1e11")  # skip the matmul probe
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_branched_points_equal_independent_wsd_runs_bit_for_bit(tmp_path, tokenizer_dir, corpus, monkeypatch, one_thread):  # noqa: F811
    """A cooldown branched from the shared stable phase is the independent WSD run of that budget, exactly."""
    recipe = recipe_from_dict(_sweep_dict(tmp_path, tokenizer_dir, corpus, BRANCH_GRID, branch=True), stage="scale")
    plan = planning.plan(recipe, 512)
    assert [p.branch_step for p in plan.points] == [8, 12, 16, 20]  # steps - round(0.2 x steps)
    assert {p.recipe.train.warmup_steps for p in plan.points} == {plan.points[0].recipe.train.warmup_steps}
    trained, independent = plan.trained_tokens()
    assert trained == (20 + 2 + 3 + 4 + 5) * 128 and independent == (10 + 15 + 20 + 25) * 128
    real, calls = pretrain_stage.run, []
    monkeypatch.setattr(pretrain_stage, "run", lambda r, overwrite=False: calls.append((Path(r.output_dir).name, r.train.max_steps)) or real(r, overwrite))
    out = scale.sweep(recipe)
    trunk = plan.points[0].trunk
    # The stable phase is trained once, in segments to each branch step; each point only runs its cooldown.
    assert [c for c in calls if c[0] == trunk] == [(trunk, 8), (trunk, 12), (trunk, 16), (trunk, 20)]
    assert "shared stable phase" in out
    rows = {r["name"]: r for r in map(json.loads, (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines())}
    csv_head = (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()[0].split(",")
    assert "trunk" in csv_head and "branch_step" in csv_head
    for p in plan.points:
        assert rows[p.name]["trunk"] == trunk and rows[p.name]["branch_step"] == p.branch_step
        assert rows[p.name]["resumed_from"] == p.branch_step and rows[p.name]["steps"] == p.steps
        assert rows[p.name]["trained_tokens"] == (p.steps - p.branch_step) * 128
    # The independent run of the 15-step budget: the same point recipe from scratch in its own directory.
    point = plan.points[1]
    alone = point.recipe.model_copy(update={"output_dir": tmp_path / "alone"})
    summary = real(alone)
    assert summary["resumed_from"] is None and summary["val_loss"] == rows[point.name]["loss"]
    branched = load_file(Path(point.recipe.output_dir) / "model.safetensors")
    independent = load_file(tmp_path / "alone" / "model.safetensors")
    assert branched.keys() == independent.keys()
    for name in branched:
        assert (branched[name] == independent[name]).all(), name
    # A rerun trains nothing.
    calls.clear()
    scale.sweep(recipe)
    assert calls == []


def test_an_interrupted_cooldown_resumes_from_its_own_checkpoint(tmp_path, tokenizer_dir, corpus, monkeypatch, one_thread):  # noqa: F811
    recipe = recipe_from_dict(_sweep_dict(tmp_path, tokenizer_dir, corpus, BRANCH_GRID, branch=True), stage="scale")
    plan = planning.plan(recipe, 512)
    victim = plan.points[2]  # 20 steps, branched at 16
    real, calls = pretrain_stage.run, []

    def stop_in_cooldown(r, overwrite=False):
        if Path(r.output_dir).name == victim.name:
            real(r.model_copy(update={"train": r.train.model_copy(update={"max_tokens": 18 * 128})}))
            raise Interrupted(f"stopped by SIGINT at step 18; checkpoint saved to {r.output_dir}")
        return real(r, overwrite)

    monkeypatch.setattr(pretrain_stage, "run", stop_in_cooldown)
    with pytest.raises(Interrupted):
        scale.sweep(recipe)
    monkeypatch.setattr(pretrain_stage, "run", lambda r, overwrite=False: calls.append(Path(r.output_dir).name) or real(r, overwrite))
    scale.sweep(recipe)
    assert calls == [victim.name, plan.points[3].trunk, plan.points[3].name]
    rows = {r["name"]: r for r in map(json.loads, (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines())}
    assert rows[victim.name]["resumed_from"] == 18 and rows[victim.name]["steps"] == 20


@pytest.mark.parametrize(
    "extra, fragments",
    [
        ({"branch": True, "lr_rule": "step_law"}, ["lr_rule: step_law", "depends on the token budget", "branch: false"]),
        ({"branch": True, "batch_rule": "deepseek"}, ["batch_rule: deepseek", "depends on the token budget"]),
        ({"lr_rule": "fitted"}, ["lr_rule: fitted needs hp_fit", "llmkit scale hp"]),
        ({"batch_rule": "fitted", "hp_fit": "missing-hp.json"}, ["hp_fit: missing-hp.json does not exist", "llmkit scale hp"]),
        # the warmup (20% of the base's 12 steps = 2 of the shortest point's 10) is kept; a 10-step budget with
        # decay_fraction 0.9 leaves 1 step before its cooldown: a budget below the warmup
        ({"branch": True, "overrides": {"model.head_dim": 16, "model.aspect_ratio": 16, "train.decay_fraction": 0.9}},
         ["point n4k_d1.28k", "before the wsd cooldown", "fewer than the 2 warmup steps"]),
    ],
)
def test_bad_rules_and_branches_exit_2_and_write_nothing(tmp_path, tokenizer_dir, corpus, extra, fragments):  # noqa: F811
    import yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_sweep_dict(tmp_path, tokenizer_dir, corpus, BRANCH_GRID, **extra)))
    result = runner.invoke(app, ["scale", "sweep", str(path)])
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "sweep").exists()


# ------------------------------------------------------------------------------------------------
# The published rules at their papers' stated points
# ------------------------------------------------------------------------------------------------


def test_porian_rule_at_108m_parameters():
    # Porian et al. 2024 quote lr ~0.0047 and batch ~3.3e5 tokens... at N = 108M (with the output layer).
    assert rules.porian_lr(108e6) == pytest.approx(3.7 * 108e6**-0.36) == pytest.approx(0.00474, rel=0.01)
    assert rules.porian_batch(108e6) == pytest.approx(3.3e5, rel=0.05)


def test_deepseek_rule_at_1e20_flops():
    # eta = 0.3118 C^-0.125, B = 0.2920 C^0.3271: at C = 1e20, 0.3118 / 10^2.5 and 0.292 x 10^6.542.
    assert rules.deepseek_lr(1e20) == pytest.approx(0.3118 / 10**2.5, rel=1e-9) == pytest.approx(9.86e-4, rel=1e-3)
    assert rules.deepseek_batch(1e20) == pytest.approx(0.2920 * 10**6.542, rel=1e-9) == pytest.approx(1.0e6, rel=0.02)


def test_step_law_at_1b_parameters_and_100b_tokens():
    # N = 1e9 non-embedding parameters, D = 1e11 tokens: 1.79 x 10^(-0.713 x 9 + 0.307 x 11), 0.58 x 10^(0.571 x 11).
    assert rules.step_law_lr(1e9, 1e11) == pytest.approx(1.79 * 10 ** (-6.417 + 3.377), rel=1e-9) == pytest.approx(1.63e-3, rel=0.01)
    assert rules.step_law_batch(1e11) == pytest.approx(0.58 * 10**6.281, rel=1e-9) == pytest.approx(1.11e6, rel=0.01)


def test_rules_pick_the_convention_each_paper_assumes():
    p = rules.PointInputs(counts={"total": 900, "non_embedding": 400, "matmul": 700}, tokens=10_000, M_per_token=3_000.0,
                          convention="total", base_lr=1e-3, base_batch_tokens=512, base_params=None)
    assert rules.lr_for("porian", p) == rules.porian_lr(700)  # with the output layer
    assert rules.lr_for("step_law", p) == rules.step_law_lr(400, 10_000)  # non-embedding
    assert rules.lr_for("deepseek", p) == rules.deepseek_lr(3_000.0 * 10_000)  # C = M D
    assert rules.batch_tokens_for("step_law", p) == rules.step_law_batch(10_000)
    assert rules.batch_layout(3_300, 128, 4) == (2, 13)  # 26 sequences: 13 micro-batches of 2, not 7 of 4 (28)
    assert rules.batch_layout(18 * 32, 32, 4) == (3, 6) and rules.batch_layout(100, 32, 8) == (3, 1)
    assert rules.warmup_steps_for("porian", 0.1, 100, 5_000, 512) == 10  # N tokens


# ------------------------------------------------------------------------------------------------
# `llmkit scale hp`: your own rule from an lr x batch grid
# ------------------------------------------------------------------------------------------------


class FakeHpRun:
    """Stands in for pretrain: a loss whose best lr is 0.5 N^-0.5 and best batch 4 N^0.5 tokens (parabolic in logs)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, recipe, overwrite: bool = False) -> dict:
        from llmkit import rundir
        from llmkit.models import meta_model, model_config, parameter_counts

        self.calls.append(Path(recipe.output_dir).name)
        N = parameter_counts(meta_model(model_config(recipe, 512)))["non_embedding"]
        per_step = planning.tokens_per_step(recipe)
        steps = math.ceil(recipe.train.max_tokens / per_step)
        loss = 3.0 + (math.log(recipe.train.lr) - math.log(0.5 * N**-0.5)) ** 2 + 0.1 * (math.log(per_step) - math.log(4 * N**0.5)) ** 2
        out = Path(recipe.output_dir)
        rundir.write_resolved(recipe, out)
        (out / "metrics.jsonl").write_text(json.dumps({"event": "eval", "step": steps, "tokens": steps * per_step, "val_loss": loss}) + "\n")
        return {"val_loss": loss, "tokens": steps * per_step, "step": steps, "flops_per_token": 1000, "resumed_from": None}


HP_GRID = {"sizes": [4_000, 16_000], "tokens_per_param": 20, "lrs": [1e-3, 3e-3, 1e-2, 3e-2], "batch_tokens": [128, 256, 512, 1024]}


def test_scale_hp_fits_the_rule_the_runs_follow_and_the_sweep_uses_it(tmp_path, tokenizer_dir, corpus, monkeypatch):  # noqa: F811
    fake = FakeHpRun()
    monkeypatch.setattr(pretrain_stage, "run", fake)
    data = _sweep_dict(tmp_path, tokenizer_dir, corpus, BRANCH_GRID, hp=HP_GRID, allow_repeat=True)
    out = scale.hp(recipe_from_dict(data, stage="scale"))
    assert len(fake.calls) == 2 * 4 * 4
    hp_file = tmp_path / "sweep-hp" / "hp.json"
    rule = json.loads(hp_file.read_text())["rule"]
    assert rule["lr_coef"] == pytest.approx(0.5, rel=1e-6) and rule["lr_exp"] == pytest.approx(-0.5, abs=1e-6)
    assert rule["batch_coef"] == pytest.approx(4.0, rel=1e-6) and rule["batch_exp"] == pytest.approx(0.5, abs=1e-6)
    assert "lr = 0.5 N^-0.500" in out and "lr_rule=fitted" in out
    # A rerun trains nothing; the sweep that uses the rule leaves the finished grid alone.
    fake.calls.clear()
    scale.hp(recipe_from_dict({**data, "lr_rule": "fitted", "hp_fit": str(hp_file)}, stage="scale"))
    assert fake.calls == []
    big = {"sizes": [4_000, 16_000], "tokens": [12_800, 19_200, 25_600]}  # 10+ steps at the rule's batches
    fitted = {**data, "grid": big, "lr_rule": "fitted", "batch_rule": "fitted", "hp_fit": str(hp_file)}
    plan = planning.plan(recipe_from_dict(fitted, stage="scale"), 512)
    for p in plan.points:
        assert p.recipe.train.lr == pytest.approx(0.5 * p.N**-0.5)
        assert planning.tokens_per_step(p.recipe) == 32 * round(4 * p.N**0.5 / 32)  # whole sequences of 32 tokens
    assert not [n for n in plan.notes if n.startswith("hp_fit")]  # the sweep's sizes are the ones the rule was fitted at
    # A size beyond the hp grid's extrapolates the rule: the plan says how far.
    wider = planning.plan(recipe_from_dict({**fitted, "grid": {**big, "sizes": [4_000, 16_000, 64_000]}}, stage="scale"), 512)
    fitted_at = [p["N"] for p in json.loads(hp_file.read_text())["per_size"]]
    largest = max(p.N for p in wider.points)
    note = next(n for n in wider.notes if n.startswith("hp_fit"))
    assert f"N = {min(fitted_at):,} .. {max(fitted_at):,}" in note and f"N = {largest:,} extrapolate" in note
    assert f"up to {largest / max(fitted_at):.1f}x beyond" in note


def test_scale_hp_flags_a_best_batch_at_the_edge_of_its_grid(tmp_path, tokenizer_dir, corpus, monkeypatch):  # noqa: F811
    """The fake loss's best batch is 4 N^0.5 tokens (~250 at N = 4,000, ~500 at 16,000): a grid up to 512 bounds the second."""
    monkeypatch.setattr(pretrain_stage, "run", FakeHpRun())
    grid = {**HP_GRID, "batch_tokens": [128, 256, 512]}
    out = scale.hp(recipe_from_dict(_sweep_dict(tmp_path, tokenizer_dir, corpus, BRANCH_GRID, hp=grid, allow_repeat=True), stage="scale"))
    per_size = json.loads((tmp_path / "sweep-hp" / "hp.json").read_text())["per_size"]
    assert [p["batch_at_grid_edge"] for p in per_size] == [False, True]
    assert [p["lr_at_grid_edge"] for p in per_size] == [False, False]
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert lines[f"{per_size[1]['N']:,}"].endswith("(the best batch at the edge of hp.batch_tokens: widen it)")
    assert "edge" not in lines[f"{per_size[0]['N']:,}"]


def test_scale_hp_without_a_grid_exits_2(tmp_path, tokenizer_dir, corpus):  # noqa: F811
    import yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_sweep_dict(tmp_path, tokenizer_dir, corpus, BRANCH_GRID)))
    assert_clean_error(runner.invoke(app, ["scale", "hp", str(path)]), "hp: missing from the recipe", "hp.lrs")
    bad = _sweep_dict(tmp_path, tokenizer_dir, corpus, BRANCH_GRID, hp={**HP_GRID, "lrs": [1e-3, 1e-2]})
    path.write_text(yaml.safe_dump(bad))
    assert_clean_error(runner.invoke(app, ["scale", "hp", str(path)]), "hp.lrs has 2 value(s); give at least 3")
    assert not (tmp_path / "sweep-hp").exists()


def test_validate_prints_the_hp_grid_and_refuses_a_bad_one(tmp_path, tokenizer_dir, corpus):  # noqa: F811
    import yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_sweep_dict(tmp_path, tokenizer_dir, corpus, BRANCH_GRID, hp=HP_GRID, allow_repeat=True)))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert f"hp grid:          32 runs of `llmkit scale hp` in {tmp_path / 'sweep-hp'}: 2 sizes x 4 batches x 4 learning rates" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.endswith(tuple("0123456789")) and "_lr*" in line]
    recipe = recipe_from_dict(yaml.safe_load(path.read_text()), stage="scale")
    points = planning.hp_points(recipe, 512)
    assert [r[0] for r in rows] == [p.name.rsplit("_lr", 1)[0] + "_lr*" for p in points[::4]]
    assert [int(r[6].replace(",", "")) for r in rows] == [p.steps for p in points[::4]]
    # A grid `scale hp` would refuse is refused by validate, before anything runs.
    short = {**HP_GRID, "tokens_per_param": 0.5}
    path.write_text(yaml.safe_dump(_sweep_dict(tmp_path, tokenizer_dir, corpus, BRANCH_GRID, hp=short, allow_repeat=True)))
    assert_clean_error(runner.invoke(app, ["validate", str(path)]), "hp: run", "step(s)", "hp.tokens_per_param")


def test_a_rule_fitted_on_muon_sets_muon_lr_and_the_sweep_records_it(tmp_path, tokenizer_dir, corpus, monkeypatch):  # noqa: F811
    from test_scale import FakeRun

    hp_file = tmp_path / "hp.json"
    hp_file.write_text(json.dumps({"rule": {"lr_coef": 0.5, "lr_exp": -0.5, "batch_coef": 4.0, "batch_exp": 0.5,
                                            "convention": "non_embedding", "optimizer": "muon"}}))
    data = _sweep_dict(tmp_path, tokenizer_dir, corpus, {"sizes": [4_000, 16_000], "tokens": [12_800, 19_200, 25_600]},
                       lr_rule="fitted", hp_fit=str(hp_file))
    data["overrides"]["train.optimizer"] = "muon"
    recipe = recipe_from_dict(data, stage="scale")
    base_lr = planning.base_recipe(recipe)[0].train.lr
    monkeypatch.setattr(pretrain_stage, "run", FakeRun())
    scale.sweep(recipe)
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:  # the hidden matrices train at the rule's lr; AdamW's (embeddings, norms) stays the base's
        assert row["muon_lr"] == pytest.approx(0.5 * row["N"] ** -0.5) and row["lr"] == base_lr
    assert "muon_lr" in (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()[0].split(",")
