"""The one command table: every `llmkit` command, the stage function that runs it, and the recipe kind it runs.

    python -c "from llmkit.commands import COMMANDS; print(*(c.name for c in COMMANDS), sep='\\n')"

cli.py dispatches through it (`cli.STAGES`), recipes.py names the command of a recipe kind from it
("this is a finetune recipe; run it with `llmkit finetune`"), and the quickstart finds its stages'
functions in it. tests/test_architecture.py checks that the Typer app, the recipe kinds, the
quickstart and the README's command table all agree with this table, so adding a command starts
with a row here. Plain data: this module imports nothing, so every layer may read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One `llmkit` command."""

    name: str
    """As typed after `llmkit`: "tokenizer train", "pretrain"."""
    module: str | None
    """Its module in llmkit/stages/; None for the commands cli.py answers itself (the bundled recipes)."""
    function: str | None
    """The one function of that module the command calls."""
    runs: str | None = None
    """The recipe kind (`stage:` in a recipe) this command runs; each kind has exactly one such command."""
    computes: bool = False
    """Whether it runs torch models (cli.py then chooses its threads: training/hardware.py `choose_threads`)."""


COMMANDS: tuple[Command, ...] = (
    Command("tokenizer train", "tokenizer", "run", runs="tokenizer"),
    Command("pretrain", "pretrain", "run", computes=True, runs="pretrain"),
    Command("finetune", "finetune", "run", computes=True, runs="finetune"),
    Command("eval", "evaluate", "run", computes=True, runs="eval"),
    Command("generate", "generate", "run", computes=True),
    Command("validate", "validate", "run"),
    Command("quickstart", "quickstart", "run", computes=True),
    Command("plot", "plot", "run"),
    Command("data prepare", "data", "prepare"),
    Command("data inspect", "data", "inspect"),
    Command("scale sweep", "scale", "sweep", computes=True, runs="scale"),
    Command("scale hp", "scale", "hp", computes=True),
    Command("scale eval", "scale", "score", computes=True),
    Command("scale fit", "scale", "fit"),
    Command("scale recommend", "scale", "recommend"),
    Command("recipes list", None, None),
    Command("recipes show", None, None),
    Command("recipes copy", None, None),
    Command("recipes reference", None, None),
)

RECIPE_KINDS: tuple[str, ...] = tuple(c.runs for c in COMMANDS if c.runs)
"""Every recipe kind, in pipeline order: tokenizer, pretrain, finetune, eval, scale."""


def command(name: str) -> Command:
    """The row of the command `name` ("data prepare")."""
    return next(c for c in COMMANDS if c.name == name)


def command_running(kind: str) -> Command:
    """The row of the command that runs recipes of `kind` ("tokenizer" -> `tokenizer train`)."""
    return next(c for c in COMMANDS if c.runs == kind)
