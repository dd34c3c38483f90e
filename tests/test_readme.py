"""The README stays true: its recipe reference is the schema's, and its commands exist.

    pytest tests/test_readme.py -q
"""

import re
from pathlib import Path

from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.recipes import schema_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_recipe_reference_matches_schema():
    text = README.read_text(encoding="utf-8")
    section = re.search(r"<!-- recipe-reference:start -->\n(.*)<!-- recipe-reference:end -->", text, re.S)
    assert section, "README lost its recipe-reference markers"
    assert section.group(1).strip() == schema_reference().strip(), (
        "README's recipe reference is stale: replace the text between the markers with "
        "the output of `llmkit recipes reference`"
    )


def test_readme_commands_exist():
    text = README.read_text(encoding="utf-8")
    help_text = CliRunner().invoke(app, ["--help"]).stdout
    for command in set(re.findall(r"^\s*llmkit ([a-z]+)", text, re.M)):
        assert command in help_text, command
    first = re.search(r"```bash\n(.+?)\n```", text, re.S).group(1)
    assert "pip install" in first and "llmkit quickstart" in first
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest" in text and "python -m pytest" in ci
