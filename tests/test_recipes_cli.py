"""Recipe schema, bundled recipes and the CLI surface: exit codes and messages for bad input.

    pytest tests/test_recipes_cli.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from pretrain_helpers import assert_clean_error
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.recipes import (
    RECIPE_CLASSES,
    bundled_dir,
    bundled_names,
    check_model_overrides,
    load_recipe,
    recipe_from_dict,
    recipe_to_yaml,
    schema_reference,
)

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
BUNDLED = sorted(bundled_dir().rglob("*.yaml"))
RECIPE_FILES = [p for p in BUNDLED if p.parent.name != "accelerate"]
ACCELERATE_FILES = [p for p in BUNDLED if p.parent.name == "accelerate"]

PRETRAIN = {
    "stage": "pretrain",
    "output_dir": "runs/x",
    "tokenizer": "runs/tok",
    "model": {"type": "llama", "hidden_size": 64, "num_hidden_layers": 2},
    "data": {"train": "builtin:pydoc/train", "seq_len": 64},
    "train": {"max_steps": 10, "lr": 1e-3},
}


def write(tmp_path: Path, data, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def run(*args: str):
    return runner.invoke(app, list(args))


# ------------------------------------------------------------------------------------------------
# Bundled recipes
# ------------------------------------------------------------------------------------------------


def test_every_stage_has_a_bundled_recipe():
    stages = {yaml.safe_load(p.read_text())["stage"] for p in RECIPE_FILES}
    assert stages == set(RECIPE_CLASSES)


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.relative_to(bundled_dir()).as_posix())
def test_bundled_recipe_validates_and_explains_itself(path: Path):
    text = path.read_text(encoding="utf-8")
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert len(header) >= 3, "a bundled recipe starts with a header: purpose, run command, example override"
    assert any("llmkit " in line for line in header), "the header shows the run command"
    recipe = load_recipe(path)
    if recipe.stage == "pretrain":
        check_model_overrides(recipe.model)
    # The resolved form round-trips through YAML to the same recipe.
    again = recipe_from_dict(yaml.safe_load(recipe_to_yaml(recipe)))
    assert again == recipe


@pytest.mark.parametrize("path", ACCELERATE_FILES, ids=lambda p: p.name)
def test_bundled_accelerate_configs_are_accelerate_configs(path: Path):
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert {"compute_environment", "distributed_type", "num_processes"} <= set(config)


def test_recipes_list_show_copy(tmp_path):
    result = run("recipes", "list")
    assert result.exit_code == 0
    for name in bundled_names():
        assert name in result.stdout
    name = next(n for n in bundled_names() if n.startswith("pretrain/"))
    shown = run("recipes", "show", name)
    assert shown.exit_code == 0 and "stage: pretrain" in shown.stdout
    copied = run("recipes", "copy", name, str(tmp_path))
    assert copied.exit_code == 0
    target = tmp_path / Path(name).with_suffix(".yaml").name
    assert target.read_text() == (bundled_dir() / f"{name}.yaml").read_text()
    assert_clean_error(run("recipes", "copy", name, str(tmp_path)), "already exists", "--force")
    assert_clean_error(run("recipes", "show", "pretrain/tinny"), "did you mean 'pretrain/tiny'")


def test_bundled_name_resolves_with_or_without_stage(tmp_path):
    by_stage = load_recipe("tiny", stage="pretrain")
    assert by_stage == load_recipe("pretrain/tiny")
    assert_clean_error(run("validate", "pretrain/zzqqxx"), "pretrain/zzqqxx", "recipes list")


def test_wheel_ships_recipes_and_metric(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("llmkit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in RECIPE_FILES + ACCELERATE_FILES:
        assert f"llmkit/recipes/{path.relative_to(bundled_dir()).as_posix()}" in names
    assert any(n.startswith("llmkit/metrics/rouge/") and n.endswith(".py") for n in names)
    package = ROOT / "llmkit"
    modules = {f"llmkit/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, the key / file / line named
# ------------------------------------------------------------------------------------------------


def test_unknown_key_suggests_the_right_one(tmp_path):
    bad = {**PRETRAIN, "train": {"max_steps": 10, "lrr": 1e-3}}
    path = write(tmp_path, bad)
    result = run("validate", str(path))
    assert_clean_error(result, str(path), "train.lrr", "did you mean 'lr'")


def test_unknown_key_reports_its_line(tmp_path):
    text = "stage: pretrain\noutput_dir: x\ntokenizer: t\nmodel:\n  type: llama\ndata:\n  train: a.txt\n  seqlen: 12\ntrain:\n  max_steps: 3\n"
    result = run("validate", str(write(tmp_path, text)))
    assert_clean_error(result, "recipe.yaml:8:", "data.seqlen", "did you mean 'seq_len'")


def test_unknown_top_level_section(tmp_path):
    result = run("validate", str(write(tmp_path, {**PRETRAIN, "trian": {}})))
    assert_clean_error(result, "trian", "did you mean 'train'")


def test_wrong_type_names_key_and_value(tmp_path):
    bad = {**PRETRAIN, "train": {"max_steps": "many"}}
    assert_clean_error(run("validate", str(write(tmp_path, bad))), "train.max_steps", "'many'")


def test_missing_required_key(tmp_path):
    bad = {k: v for k, v in PRETRAIN.items() if k != "tokenizer"}
    assert_clean_error(run("validate", str(write(tmp_path, bad))), "tokenizer", "required")


def test_missing_stage_says_what_to_add(tmp_path):
    bad = {k: v for k, v in PRETRAIN.items() if k != "stage"}
    assert_clean_error(run("validate", str(write(tmp_path, bad))), "stage", "add 'stage:")


def test_wrong_literal_suggests(tmp_path):
    result = run("validate", str(write(tmp_path, PRETRAIN)), "--set", "train.schedule=cosin")
    assert_clean_error(result, "train.schedule", "did you mean 'cosine'")


def test_invalid_yaml_gives_line(tmp_path):
    path = write(tmp_path, "stage: pretrain\ntrain:\n  max_steps: [1, 2\n")
    assert_clean_error(run("validate", str(path)), str(path), "invalid YAML", "line ")


def test_not_a_mapping(tmp_path):
    assert_clean_error(run("validate", str(write(tmp_path, "- a\n- b\n"))), "mapping")


def test_unreadable_file(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert_clean_error(run("validate", str(path)), str(path), "cannot read")
    assert_clean_error(run("validate", str(tmp_path)), str(tmp_path), "not a file")


def test_cross_field_rules_name_both_keys(tmp_path):
    result = run("validate", str(write(tmp_path, PRETRAIN)), "--set", "train.warmup_steps=500")
    assert_clean_error(result, "train.warmup_steps (500) is larger than train.max_steps (10)")
    no_budget = {**PRETRAIN, "train": {"lr": 1e-3}}
    assert_clean_error(run("validate", str(write(tmp_path, no_budget))), "max_steps", "max_tokens")


def test_wrong_stage_for_command(tmp_path):
    path = write(tmp_path, PRETRAIN)
    assert_clean_error(run("finetune", str(path)), "pretrain recipe", "llmkit pretrain")


def test_bad_set_syntax(tmp_path):
    path = write(tmp_path, PRETRAIN)
    assert_clean_error(run("validate", str(path), "--set", "train.lr"), "dotted.key=value")
    assert_clean_error(run("validate", str(path), "--set", "train.lr.x=1"), "train.lr is not a section")


def test_unknown_model_config_key_suggests(tmp_path):
    bad = {**PRETRAIN, "model": {"type": "llama", "hiden_size": 64}}
    recipe = recipe_from_dict(bad)
    from llmkit.errors import RecipeError

    with pytest.raises(RecipeError, match="model.hiden_size.*did you mean 'hidden_size'"):
        check_model_overrides(recipe.model)
    with pytest.raises(RecipeError, match="model.type.*did you mean 'llama'"):
        check_model_overrides(recipe_from_dict({**PRETRAIN, "model": {"type": "lama", "hidden_size": 8}}).model)


# ------------------------------------------------------------------------------------------------
# Overrides and the resolved recipe
# ------------------------------------------------------------------------------------------------


def test_set_overrides_are_typed_by_the_schema(tmp_path):
    path = write(tmp_path, PRETRAIN)
    recipe = load_recipe(path, ["train.lr=3e-4", "train.betas=[0.8, 0.9]", "data.train=[a.txt, b.txt]", "model.num_hidden_layers=4"])
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.train.betas == (0.8, 0.9)
    assert recipe.data.train == ["a.txt", "b.txt"]
    assert recipe.model.config_overrides["num_hidden_layers"] == 4


def test_validate_prints_resolved_recipe_with_defaults():
    recipe = load_recipe("tokenizer/tiny")
    shown = run("validate", "tokenizer/tiny")
    assert shown.exit_code == 0, shown.output
    resolved = yaml.safe_load(shown.stdout.split("# plan")[0])
    assert resolved["tokenizer"]["vocab_size"] == recipe.tokenizer.vocab_size
    assert "min_frequency" in resolved["tokenizer"]  # defaults are filled in
    assert "# plan" in shown.stdout


def test_schema_reference_covers_every_field():
    reference = schema_reference()
    for key in ("train.lr", "data.seq_len", "tokenizer.vocab_size", "lora.r", "metrics", "data.stride"):
        assert f"`{key}`" in reference


# ------------------------------------------------------------------------------------------------
# The command line itself
# ------------------------------------------------------------------------------------------------


def test_version_and_help_are_fast_and_import_no_torch():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    code = "import sys, llmkit.cli; print(any(m in sys.modules for m in ('torch', 'transformers', 'datasets')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
    version = subprocess.run([sys.executable, "-m", "llmkit", "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.startswith("llmkit ")
    assert run("--help").exit_code == 0
    for command in ("pretrain", "finetune", "eval", "generate", "validate", "quickstart", "plot"):
        assert command in run("--help").stdout
