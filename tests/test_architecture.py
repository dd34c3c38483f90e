"""docs/architecture.md, checked: the layers (imports go downward only, at module top, with no cycle), the
one command table that the CLI, the recipe kinds, the quickstart and the README agree on, and the stage shape.

    pytest tests/test_architecture.py
"""

from __future__ import annotations

import ast
import importlib
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest

import llmkit
from llmkit import recipes
from llmkit.commands import COMMANDS, RECIPE_KINDS, command, command_running
from llmkit.errors import RecipeError
from llmkit.recipes import RECIPE_CLASSES, load_recipe

PACKAGE = Path(llmkit.__file__).parent

# Lowest first. A module may import modules of a lower layer, and of its own layer when no cycle
# results (e.g. data.lm imports data.cache). The CLI reaches the stages only through
# importlib at call time, so that `llmkit --help` stays free of torch.
LAYERS = [
    ["llmkit", "llmkit.errors", "llmkit.dist", "llmkit.commands"],
    ["llmkit.recipes"],
    ["llmkit.rundir"],
    ["llmkit.prompts"],
    ["llmkit.data"],
    ["llmkit.models"],
    ["llmkit.generation", "llmkit.metrics"],
    ["llmkit.evals"],
    ["llmkit.training"],
    ["llmkit.scaling"],
    ["llmkit.stages"],
    ["llmkit.cli", "llmkit.__main__"],
]


def module_name(path: Path) -> str:
    """Dotted module name of a file of the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int:
    """Index in LAYERS of the longest prefix naming `name`'s layer."""
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{name} is in no layer: add it to LAYERS and docs/architecture.md"
    return best[0]


def internal_imports(tree: ast.Module) -> tuple[set[str], list[int]]:
    """(llmkit modules imported at top level, line numbers of llmkit imports nested in functions or classes)."""
    top: set[str] = set()
    nested: list[int] = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "llmkit":
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "llmkit"]
        if not targets:
            continue
        if node in tree.body:
            top.update(targets)
        else:
            nested.append(node.lineno)
    return top, nested


def graph() -> dict[str, set[str]]:
    """module -> the package modules it imports at top level."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        top, _ = internal_imports(ast.parse(path.read_text(encoding="utf-8")))
        edges[name] = {t for t in top if t in modules and t != name}
    return edges


def test_imports_go_downward_only():
    upward = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        for target in targets
        if target != "llmkit" and layer_of(target) > layer_of(name)
    ]
    assert not upward, "upward imports: " + "; ".join(sorted(upward))


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_checks_catch_an_upward_import_and_a_cycle(monkeypatch):
    fake = {"llmkit.data.lm": {"llmkit.training.loop"}, "llmkit.training.loop": {"llmkit.data.lm"}}
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: fake)
    for check in (test_imports_go_downward_only, test_no_import_cycle):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a graph with an upward import and a cycle")


def test_internal_imports_are_at_module_top():
    nested = []
    for path in PACKAGE.rglob("*.py"):
        _, lines = internal_imports(ast.parse(path.read_text(encoding="utf-8")))
        nested += [f"{path.relative_to(PACKAGE.parent)}:{n}" for n in lines]
    assert not nested, "llmkit imports inside functions: " + ", ".join(nested)


def test_every_stage_module_has_the_functions_the_command_table_names():
    """Read from the source (no import): each row's module exists and defines its function at top level."""
    for row in (c for c in COMMANDS if c.module):
        path = PACKAGE / "stages" / f"{row.module}.py"
        assert path.is_file(), f"{row.name}: llmkit/stages/{row.module}.py does not exist"
        names = {n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.FunctionDef)}
        assert row.function in names, f"{row.name}: llmkit/stages/{row.module}.py has no function {row.function}()"
    modules = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__"}
    assert modules == {c.module for c in COMMANDS if c.module}, "a stage module that no command runs, or a row without one"


# ------------------------------------------------------------------------------------------------
# One command table (llmkit/commands.py): the CLI, the recipe kinds, the quickstart and the README agree with it
# ------------------------------------------------------------------------------------------------


def typer_commands() -> dict[str, object]:
    """Every command of the `llmkit` Typer app, by the name it is typed with, to its callback."""
    from llmkit.cli import app

    def name_of(info) -> str:
        return info.name or info.callback.__name__.replace("_", "-")

    found = {name_of(c): c.callback for c in app.registered_commands}
    for group in app.registered_groups:
        found |= {f"{group.name} {name_of(c)}": c.callback for c in group.typer_instance.registered_commands}
    return found


def test_the_cli_has_exactly_the_commands_of_the_table():
    assert set(typer_commands()) == {c.name for c in COMMANDS}, (
        "cli.py and llmkit/commands.py disagree: add the new command's row to COMMANDS (or its Typer command)"
    )


def test_each_cli_command_calls_the_function_the_table_names():
    """In cli.py, the command NAME calls `stage("NAME").FUNCTION(...)` and nothing else from llmkit.stages."""
    tree = ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8"))
    by_callback = {callback.__name__: name for name, callback in typer_commands().items()}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name not in by_callback:
            continue
        name = by_callback[node.name]
        calls = {
            (call.func.value.args[0].value, call.func.attr)
            for call in ast.walk(node)
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            and isinstance(call.func.value, ast.Call) and getattr(call.func.value.func, "id", None) == "stage"
        }
        row = command(name)
        expected = {(row.name, row.function)} if row.module else set()
        assert calls == expected, f"cli.py `{name}` calls {sorted(calls)}; the table says {sorted(expected)}"


def test_recipe_kinds_are_the_tables():
    assert list(RECIPE_CLASSES) == list(RECIPE_KINDS) == list(recipes.STAGES)
    for kind in RECIPE_KINDS:
        assert RECIPE_CLASSES[kind].model_fields["stage"].annotation.__args__ == (kind,)


def test_the_run_it_with_hint_names_a_real_command(tmp_path):
    """A recipe given to the wrong command names the command of the table that runs it."""
    for kind in RECIPE_KINDS:
        other = next(k for k in RECIPE_KINDS if k != kind)
        path = tmp_path / f"{kind}.yaml"
        path.write_text(f"stage: {kind}\n")
        with pytest.raises(RecipeError, match=re.escape(f"run it with `llmkit {command_running(kind).name}`")):
            load_recipe(path, stage=other)


def test_the_quickstart_runs_the_tables_stages_in_pipeline_order():
    from llmkit.stages import quickstart

    kinds = [s.name for s in quickstart.STAGES]
    assert kinds == [k for k in RECIPE_KINDS if k in kinds], kinds
    for stage in quickstart.STAGES:
        assert load_recipe(stage.recipe).stage == stage.name, stage.recipe
        row = command_running(stage.name)
        module = importlib.import_module(f"llmkit.stages.{row.module}")
        assert quickstart.runner(stage.name) is getattr(module, row.function)


def readme_command_table() -> set[str]:
    """The commands named in the README's table under "## Commands" (`llmkit recipes list / show NAME` is two)."""
    text = (PACKAGE.parent / "README.md").read_text(encoding="utf-8").split("## Commands", 1)[1].split("\n## ", 1)[0]
    found = set()
    for cell in re.findall(r"^\| `llmkit ([^`]+)`", text, re.M):
        group = None
        for part in cell.split(" / "):
            words = list(itertools.takewhile(lambda w: re.fullmatch(r"[a-z]+", w), part.split()))
            if group and len(words) == 1:
                words = [group, *words]
            group = words[0] if len(words) == 2 else None
            found.add(" ".join(words))
    return found


def test_the_readme_command_table_lists_every_command():
    assert readme_command_table() == {c.name for c in COMMANDS}


def test_the_training_stages_check_before_they_load_anything(monkeypatch, tmp_path):
    """docs/architecture.md: pretrain and finetune run check(recipe) (no weights, no data) before building anything."""
    from llmkit import models
    from llmkit.stages import finetune, pretrain

    class Checked(Exception):
        pass

    loaded = []
    for name in ("load_tokenizer", "build_model", "load_model"):
        monkeypatch.setattr(models, name, lambda *a, _n=name, **k: loaded.append(_n))
    recipes_for = {
        pretrain: load_recipe("pretrain/tiny", [f"output_dir={tmp_path / 'pre'}"], stage="pretrain"),
        finetune: load_recipe("finetune/tiny-summarization", [f"output_dir={tmp_path / 'ft'}"], stage="finetune"),
    }
    for module, recipe in recipes_for.items():
        monkeypatch.setattr(module, "check", lambda *a, **k: (_ for _ in ()).throw(Checked()))
        with pytest.raises(Checked):
            module.run(recipe)
    assert loaded == [], f"loaded before the checks: {loaded}"


def test_help_imports_no_heavy_library():
    code = "import sys, llmkit.cli; print(sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_layout_block_names_every_module_and_only_existing_files():
    """docs/architecture.md's layer block: every module of the package appears in it, every file it names exists."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("```\n", 1)[1].split("```", 1)[0]
    words = set(re.findall(r"[A-Za-z_][\w]*", block))
    missing = sorted(
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
        if p.stem != "__init__" and p.stem not in words and p.stem.strip("_") not in words
    )
    assert not missing, f"docs/architecture.md does not name: {missing}"
    named = re.findall(r"([\w]+\.py|[\w]+/)", block)
    packages = {p.name for p in PACKAGE.rglob("*") if p.is_dir()}
    files = {p.name for p in PACKAGE.rglob("*.py")}
    stale = sorted(n for n in named if (n.endswith("/") and n[:-1] not in packages) or (n.endswith(".py") and n not in files))
    assert not stale, f"docs/architecture.md names what does not exist: {stale}"
