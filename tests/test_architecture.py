"""The package's layers (docs/architecture.md): imports go downward only, at module top, with no cycle.

    pytest tests/test_architecture.py
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import llmkit

PACKAGE = Path(llmkit.__file__).parent

# Lowest first. A module may import modules of a lower layer, and of its own layer when no cycle
# results (e.g. data.lm imports data.cache). The CLI reaches the stages only through
# importlib at call time, so that `llmkit --help` stays free of torch.
LAYERS = [
    ["llmkit", "llmkit.errors", "llmkit.dist"],
    ["llmkit.recipes"],
    ["llmkit.rundir"],
    ["llmkit.prompts"],
    ["llmkit.data"],
    ["llmkit.models"],
    ["llmkit.generation", "llmkit.metrics"],
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


# Stage modules behind a command group have one entry function per subcommand instead of run().
COMMAND_GROUPS = {"data": {"prepare", "inspect"}, "scale": {"sweep", "fit", "recommend"}}


def test_every_stage_module_has_its_entry_functions():
    for path in sorted((PACKAGE / "stages").glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        expected = COMMAND_GROUPS.get(path.stem, {"run"})
        assert expected <= names, f"{path.name} lacks {sorted(expected - names)}"


def test_help_imports_no_heavy_library():
    code = "import sys, llmkit.cli; print(sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
