"""The README's walkthrough and every page of docs/ do what they say: their shell commands, as written.

    pytest tests/test_readme_commands.py -q             # every command parses and validates (seconds)
    pytest tests/test_readme_commands.py -q -m slow     # every command runs, in order (minutes on 2 CPU cores)

The commands are read from the fenced ```bash blocks of README.md and docs/*.md, so the docs cannot
drift from what llmkit accepts. The working directory holds what the pages assume a user has:
`corpus/*.txt`, `chat.jsonl`, `document.txt`, `data/corpus/`, a HellaSwag-layout file, and a copy of
docs/recipes.md. Commands that need what a test machine lacks (GPUs, Docker, the network, a Slurm
cluster) are listed in NOT_RUN with the reason; their llmkit part is still validated.
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
    """The commands of a section's ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
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
    data_corpus = workdir / "data" / "corpus" / "python"
    data_corpus.mkdir(parents=True)
    for name, text in topics[:60]:  # pydoc has 79 topics: data/corpus/ holds the same text as corpus/
        (data_corpus / f"{name}.txt").write_text(text, encoding="utf-8")
    hellaswag = workdir / "data" / "hellaswag"
    hellaswag.mkdir(parents=True)
    (hellaswag / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hellaswag_records()), encoding="utf-8")
    (workdir / "docs").mkdir()
    (workdir / "docs" / "recipes.md").write_text((ROOT / "docs" / "recipes.md").read_text(encoding="utf-8"), encoding="utf-8")
    (workdir / "document.txt").write_text(
        "This module provides a portable way of using operating system dependent functionality.\n"
        "If you just want to read or write a file see open(), and if you want to manipulate paths,\n"
        "see the os.path module.\n",
        encoding="utf-8",
    )


def hellaswag_records() -> list[dict]:
    """Questions in HellaSwag's layout (ctx_a, ctx_b, activity_label, endings, label), made from pydoc topics."""
    import pydoc_data.topics

    texts = [t.split() for _, t in sorted(pydoc_data.topics.topics.items()) if len(t.split()) > 60][:24]
    records = []
    for i, words in enumerate(texts):
        endings = [" ".join(texts[(i + k) % len(texts)][20:32]) for k in range(4)]
        records.append({"ind": i, "activity_label": "Python", "ctx_a": " ".join(words[:12]), "ctx_b": " ".join(words[12:20]),
                        "endings": endings, "label": "0", "split": "val", "source_id": f"pydoc~{i}"})
    return records


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


# ------------------------------------------------------------------------------------------------
# Every page of docs/ (and the README's other blocks)
# ------------------------------------------------------------------------------------------------

DOCS = ROOT / "docs"
PAGE_ORDER = ["tokenizers", "pretraining", "finetuning", "evaluation", "scaling", "distributed",
              "troubleshooting", "environment", "recipes", "architecture"]
"""The order a reader follows the pages in (README's documentation table); the slow test runs them so, in one directory."""

NOT_RUN = {
    "pip install": "installs packages from the network",
    "python -m pytest": "the test suite itself",
    "lm_eval ": "a peer tool (tests/test_eval_choice.py compares with it when it is installed)",
    "docker ": "needs Docker and a GPU",
    "hub:": "reads a dataset from the Hugging Face Hub",
    "recipes/accelerate/": "a GPU launch config",
    "multi_gpu.yaml": "a GPU launch config",
    "--num_processes 2": "a two-process launch (tests/test_distributed.py runs those)",
    "llmkit quickstart": "tests/test_quickstart.py runs it (slow)",
    "eval/gsm8k": "reads GSM8K from data/gsm8k/, which its recipe header says how to download",
    "llmkit scale hp scale/cpu-tiny": "27 training runs (about 5 minutes on 2 CPU cores); tests/test_scale_branch.py runs `scale hp` and the fitted rule",
    "--set lr_rule=fitted --set batch_rule=fitted": "a second 18-point sweep on the rule `scale hp` fitted (4 minutes); tests/test_scale_branch.py plans it",
    "llmkit pretrain runs/optimal.yaml": "trains the recommended model for the steps `scale recommend` printed; tests/test_scale.py checks the written recipe (shape, budget)",
    "pretrain/llama-1b": "a 1.1B model: a multi-GPU run",
}
"""Substrings of commands that the slow test does not run, with the reason; their llmkit part is validated all the same."""

EXTERNAL = {"pip", "python", "accelerate", "docker", "lm_eval", "cat", "srun"}
"""Programs other than llmkit that a page may tell the reader to run."""

GROUPS = {"tokenizer", "data", "recipes", "scale"}
STAGE_OF = {("tokenizer", "train"): "tokenizer", ("pretrain",): "pretrain", ("finetune",): "finetune",
            ("eval",): "eval", ("data", "inspect"): "finetune", ("data", "prepare"): None,
            ("scale", "sweep"): "scale", ("validate",): None}


def pages() -> list[Path]:
    """README.md and every docs page, the topic pages in reading order."""
    found = {p.stem: p for p in DOCS.glob("*.md")}
    return [README] + [found.pop(n) for n in PAGE_ORDER if n in found] + sorted(found.values())


def page_commands(page: Path) -> list[str]:
    """The commands of a page's ```bash blocks; a block that is a script (#!) gives its llmkit lines only."""
    text = page.read_text(encoding="utf-8")
    if page == README:  # the walkthrough has its own tests above
        text = text.replace(readme_section(SECTION), "")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        if block.startswith("#!"):
            commands += [m.strip() for m in re.findall(r"(?:python -m )?llmkit [^'\n]+", block)]
        else:
            commands += shell_commands(f"```bash\n{block}```")
    return commands


def llmkit_parts(command: str) -> list[list[str]]:
    """The llmkit argument lists inside a command line (after `&&`, `|`, env assignments, a launcher)."""
    found = []
    for part in re.split(r"&&|\|", command):
        argv = shlex.split(part)
        while argv and re.match(r"^[A-Z_]+=", argv[0]):
            argv = argv[1:]
        if not argv:
            continue
        if "llmkit" in argv and (argv[0] == "llmkit" or argv[argv.index("llmkit") - 1] == "-m"):
            found.append(argv[argv.index("llmkit") + 1:])
        else:
            assert argv[0] in EXTERNAL, f"{command!r}: {argv[0]} is neither llmkit nor a program the docs may name ({sorted(EXTERNAL)})"
    return found


def check_llmkit_argv(argv: list[str], command: str, written: set[str]) -> None:
    """Validate one llmkit invocation without training: recipe and --set keys load, options exist, listing commands run."""
    runner = CliRunner()
    words = tuple(argv[:2]) if argv[0] in GROUPS else tuple(argv[:1])
    if words in (("recipes", "list"), ("recipes", "show"), ("recipes", "copy")):
        result = runner.invoke(app, argv + (["--force"] if words[1] == "copy" else []))
        assert result.exit_code == 0, (command, result.output)
        return
    if words in STAGE_OF:
        recipe, sets = recipe_and_sets(argv, words)
        if recipe not in written:
            load_recipe(recipe, sets, stage=STAGE_OF[words])
    help_text = runner.invoke(app, list(words) + ["--help"]).stdout
    for option in (a.split("=")[0] for a in argv if a.startswith("--")):
        assert re.search(rf"{re.escape(option)}(?![\w-])", help_text), (command, option)


def written_paths(commands: list[str]) -> set[str]:
    """Recipe files a page's own commands write (`--write-recipe PATH`), which later commands run."""
    return {m for c in commands for m in re.findall(r"--write-recipe\s+(\S+)", c)}


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_every_command_of_the_page_is_accepted(page, tmp_path, monkeypatch):
    """Recipes, keys and values of each llmkit command validate, options exist, other programs are known ones."""
    monkeypatch.chdir(tmp_path)
    user_files(tmp_path)
    commands = page_commands(page)
    written = written_paths(commands)
    for command in commands:
        for argv in llmkit_parts(command):
            check_llmkit_argv(argv, command, written)


def test_the_pages_hold_commands():
    """The topic pages show their commands in ```bash blocks (the ones the tests read)."""
    for name in ("tokenizers", "pretraining", "finetuning", "evaluation", "scaling", "distributed", "recipes"):
        assert page_commands(DOCS / f"{name}.md"), name


@pytest.mark.slow
def test_the_pages_run_as_written(tmp_path):
    """Every page's commands, in reading order, in one directory, as a reader following the docs would run them.

    A command that an earlier page already ran (README's scaling block repeats docs/scaling.md's) runs once:
    `scale recommend --write-recipe` rightly refuses to overwrite the recipe it wrote the first time."""
    from pretrain_helpers import subprocess_env

    user_files(tmp_path)
    # One thread per process (subprocess_env): on a 2-core machine other jobs keep busy, two threads ran
    # the sweep's points several times slower (benchmarks/RESULTS.md, the CPU sweep).
    env = subprocess_env(LLMKIT_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("LLMKIT_PEAK_FLOPS", None)
    timings, skipped, seen = [], [], set()
    for page in pages()[1:] + [README]:  # the README's short blocks repeat commands of the pages: run each once
        for command in page_commands(page):
            if command in seen:
                continue
            seen.add(command)
            reason = next((why for needle, why in NOT_RUN.items() if needle in command), None)
            if reason:
                skipped.append(f"{page.name}: {command}  ({reason})")
                continue
            started = time.perf_counter()
            result = subprocess.run(["bash", "-c", _runnable(command)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
            timings.append((time.perf_counter() - started, f"{page.name}: {command}"))
            assert result.returncode == 0, (page.name, command, result.stdout[-2000:], result.stderr[-3000:])
            assert "Traceback" not in result.stderr, (page.name, command, result.stderr[-3000:])
    print("\n".join(f"{seconds:7.1f} s  {command}" for seconds, command in timings))
    print(f"{sum(s for s, _ in timings):7.1f} s  in all; not run:\n  " + "\n  ".join(skipped))
    assert (tmp_path / "runs" / "scale-cpu-tiny" / "fit.json").is_file()
    assert (tmp_path / "plots" / "muon.png").is_file()
