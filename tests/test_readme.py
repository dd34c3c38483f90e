"""The docs stay true: docs/recipes.md holds the schema's reference, and the README's commands exist.

    pytest tests/test_readme.py -q
"""

import re
from pathlib import Path

from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.recipes import schema_reference

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RECIPES_PAGE = ROOT / "docs" / "recipes.md"


def test_recipe_reference_matches_schema():
    text = RECIPES_PAGE.read_text(encoding="utf-8")
    section = re.search(r"<!-- recipe-reference:start -->\n(.*)<!-- recipe-reference:end -->", text, re.S)
    assert section, "docs/recipes.md lost its recipe-reference markers"
    assert section.group(1).strip() == schema_reference().strip(), (
        "docs/recipes.md's recipe reference is stale: run `llmkit recipes reference --write docs/recipes.md`"
    )


def test_reference_write_updates_only_between_the_markers(tmp_path):
    page = tmp_path / "recipes.md"
    page.write_text("# Mine\n\nhand text\n<!-- recipe-reference:start -->\nstale\n<!-- recipe-reference:end -->\ntail\n")
    result = CliRunner().invoke(app, ["recipes", "reference", "--write", str(page)])
    assert result.exit_code == 0, result.output
    assert "updated" in result.stdout
    text = page.read_text()
    assert text.startswith("# Mine\n\nhand text\n<!-- recipe-reference:start -->\n") and text.endswith("<!-- recipe-reference:end -->\ntail\n")
    assert "stale" not in text and schema_reference().strip() in text
    again = CliRunner().invoke(app, ["recipes", "reference", "--write", str(page)])
    assert again.exit_code == 0 and "current" in again.stdout and page.read_text() == text


def test_reference_write_refuses_a_page_without_markers(tmp_path):
    page = tmp_path / "notes.md"
    page.write_text("no markers here\n")
    result = CliRunner().invoke(app, ["recipes", "reference", "--write", str(page)])
    assert result.exit_code == 2
    assert "recipe-reference:start" in result.stderr and "Traceback" not in result.output
    assert page.read_text() == "no markers here\n"
    missing = CliRunner().invoke(app, ["recipes", "reference", "--write", str(tmp_path / "absent.md")])
    assert missing.exit_code == 2 and "no such file" in missing.stderr and not (tmp_path / "absent.md").exists()


def test_readme_commands_exist():
    text = README.read_text(encoding="utf-8")
    help_text = CliRunner().invoke(app, ["--help"]).stdout
    for command in set(re.findall(r"^\s*llmkit ([a-z]+)", text, re.M)):
        assert command in help_text, command
    first = re.search(r"```bash\n(.+?)\n```", text, re.S).group(1)
    assert "pip install" in first and "llmkit quickstart" in first
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest" in text and "python -m pytest" in ci


def test_ci_runs_the_readmes_two_commands_as_written():
    """.ci/run holds every line of the README's "Two commands" blocks verbatim (comments dropped)."""
    section = README.read_text(encoding="utf-8").split("## Two commands", 1)[1].split("\n## ", 1)[0]
    ci_lines = {line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()}
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 2, blocks
    commands = [re.sub(r"\s+#\s.*$", "", line).strip() for block in blocks for line in block.splitlines()]
    assert any("download.pytorch.org/whl/cpu" in c for c in commands), "the CPU install must sit in the first command"
    for command in filter(None, commands):
        assert command in ci_lines, f".ci/run does not run the README's command {command!r}"
