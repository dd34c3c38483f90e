"""The README's walkthrough does what it says: its shell commands, as written, on a small corpus of one's own text.

    pytest tests/test_readme_commands.py -q             # every command parses and validates (seconds)
    pytest tests/test_readme_commands.py -q -m slow     # every command runs, in order (minutes on 2 CPU cores)

The commands are read from the fenced bash blocks of the README section "From your own text to a
scored model", so the README cannot drift from what llmkit accepts. The working directory holds
what the walkthrough assumes a user has: `corpus/*.txt`, `chat.jsonl` and `document.txt`.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.data.splits import builtin_validation_warning
from llmkit.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## From your own text to a scored model"
STAGE_COMMANDS = {("tokenizer", "train"): "tokenizer", ("pretrain",): "pretrain", ("finetune",): "finetune",
                  ("eval",): "eval", ("data", "inspect"): "finetune"}


def readme_section(title: str) -> str:
    """The README text from the heading `title` to the next second-level heading."""
    text = README.read_text(encoding="utf-8")
    assert title in text, f"README lost its section {title!r}"
    return text.split(title, 1)[1].split("\n## ", 1)[0]


def shell_commands(section: str) -> list[str]:
    """The commands of a section's ```bash blocks: continuation lines joined, trailing comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


def llmkit_argv(command: str) -> list[str]:
    """The llmkit arguments of a command (the part after `|` of a pipe), without `llmkit` itself."""
    argv = shlex.split(command.split("|")[-1])
    assert argv[0] == "llmkit", command
    return argv[1:]


def recipe_and_sets(argv: list[str], words: tuple[str, ...]) -> tuple[str, list[str]]:
    """(recipe, --set values) of a stage command `words RECIPE [--set KEY=VALUE ...]`."""
    return argv[len(words)], [argv[i + 1] for i, a in enumerate(argv) if a in ("--set", "-s")]


def user_files(workdir: Path) -> None:
    """What the walkthrough assumes: a corpus of text files, chat records and a document to summarize."""
    import pydoc_data.topics

    topics = sorted(pydoc_data.topics.topics.items())
    corpus = workdir / "corpus"
    corpus.mkdir()
    for name, text in topics[:60]:
        (corpus / f"{name}.txt").write_text(text, encoding="utf-8")
    chats = []
    for name, text in topics[60:140]:
        first = text.strip().split("\n\n")[0].replace("\n", " ")[:300]
        chats.append({"messages": [{"role": "user", "content": f"What is '{name}' in Python?"},
                                   {"role": "assistant", "content": first}]})
    (workdir / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    (workdir / "document.txt").write_text(
        "This module provides a portable way of using operating system dependent functionality.\n"
        "If you just want to read or write a file see open(), and if you want to manipulate paths,\n"
        "see the os.path module.\n",
        encoding="utf-8",
    )


def test_the_walkthrough_is_a_list_of_llmkit_commands():
    commands = shell_commands(readme_section(SECTION))
    assert len(commands) >= 12, commands
    for command in commands:
        llmkit_argv(command)


def test_every_walkthrough_command_is_accepted_and_keeps_no_builtin_validation(tmp_path, monkeypatch):
    """Recipes, keys and values of each stage command validate; generate/plot options exist (no training)."""
    monkeypatch.chdir(tmp_path)
    user_files(tmp_path)
    runner = CliRunner()
    for command in shell_commands(readme_section(SECTION)):
        argv = llmkit_argv(command)
        words = next((w for w in STAGE_COMMANDS if tuple(argv[: len(w)]) == w), None)
        if argv[0] in ("recipes", "validate"):
            result = runner.invoke(app, argv)
            assert result.exit_code == 0, (command, result.output)
        elif words is not None:
            recipe, sets = recipe_and_sets(argv, words)
            stage = STAGE_COMMANDS[words]
            loaded = load_recipe(recipe, sets, stage=stage)
            data = loaded.data
            if hasattr(data, "train"):
                assert builtin_validation_warning(data) is None, (command, builtin_validation_warning(data))
        else:
            help_text = runner.invoke(app, [argv[0], "--help"]).stdout
            for option in (a for a in argv if a.startswith("--")):
                assert option in help_text, (command, option)


def _runnable(command: str) -> str:
    """The command with `llmkit` run by this interpreter (the package under test)."""
    return re.sub(r"(^|\|\s*)llmkit\b", lambda m: f"{m.group(1)}{shlex.quote(sys.executable)} -m llmkit", command)


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path):
    from pretrain_helpers import subprocess_env

    user_files(tmp_path)
    env = subprocess_env(LLMKIT_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    env.pop("LLMKIT_PEAK_FLOPS", None)
    timings = []
    outputs = {}
    for command in shell_commands(readme_section(SECTION)):
        started = time.perf_counter()
        result = subprocess.run(["bash", "-c", _runnable(command)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        timings.append((time.perf_counter() - started, command))
        assert result.returncode == 0, (command, result.stderr[-3000:])
        assert "Traceback" not in result.stderr, (command, result.stderr[-3000:])
        assert "warning: data.validation" not in result.stderr, (command, result.stderr)
        outputs[command] = result
    print("\n".join(f"{seconds:7.1f} s  {command}" for seconds, command in timings))
    print(f"{sum(s for s, _ in timings):7.1f} s  in all")
    run_dir = tmp_path / "runs"
    for name in ("tok", "pre", "ft", "chat", "eval"):
        assert (run_dir / name).is_dir(), name
    assert (run_dir / "pre" / "model.safetensors").is_file() and (run_dir / "ft" / "model.safetensors").is_file()
    report = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert [Path(m["model"]).name for m in report["models"]] == ["pre", "ft"]
    summarize = next(r for c, r in outputs.items() if "--file document.txt" in c)
    assert "prompt template" in summarize.stderr and summarize.stdout.strip(), summarize.stderr
    plot = next(r for c, r in outputs.items() if c.startswith("llmkit plot"))
    assert "created the directory plots" in plot.stdout and (tmp_path / "plots" / "curves.png").is_file()
