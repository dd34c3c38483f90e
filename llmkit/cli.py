"""The `llmkit` command line: parse, load the recipe, call one stage function, map errors to exit codes.

    llmkit quickstart runs/quickstart
    llmkit pretrain pretrain/tiny --set train.max_steps=50

Each command is a few lines: load the recipe (llmkit/recipes.py), then call `run` of its stage
module in llmkit/stages/ (the command table, llmkit/commands.py). Stage modules are imported when their command runs, so
`llmkit --help` and `llmkit --version` never import torch or transformers and answer instantly.
"""

from __future__ import annotations

import functools
import importlib
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmkit import __version__, dist, rundir
from llmkit.commands import COMMANDS
from llmkit.commands import command as find_command
from llmkit.errors import Interrupted, LlmkitError, disk_error
from llmkit.recipes import bundled_dir, bundled_names, load_recipe, resolve_recipe_path, schema_reference, with_schema_reference
from llmkit.training.hardware import choose_threads

# Command -> the module in llmkit/stages/ whose function it calls; the table itself is llmkit/commands.py.
STAGES = {c.name: c.module for c in COMMANDS if c.module}


def stage(command: str):
    """The stage module behind `command` (imported now: it pulls in torch and transformers).

    A command that runs models first chooses its threads, the same way for every one of them; its
    header says what it chose.
    """
    module = importlib.import_module(f"llmkit.stages.{STAGES[command]}")
    if find_command(command).computes:
        choose_threads()
    return module

app = typer.Typer(
    name="llmkit",
    help="From raw text to a trained, fine-tuned and scored language model. Recipes are YAML files or bundled names.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
tokenizer_app = typer.Typer(help="Train tokenizers.", no_args_is_help=True)
recipes_app = typer.Typer(help="List, show and copy the bundled recipes.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare and inspect training data.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(recipes_app, name="recipes")
app.add_typer(data_app, name="data")
scale_app = typer.Typer(help="Scaling laws: sweep sizes and token budgets, fit L(N, D), recommend a compute-optimal model.", no_args_is_help=True)
app.add_typer(scale_app, name="scale")

RecipeArg = Annotated[str, typer.Argument(help="Recipe YAML file or bundled recipe name (see `llmkit recipes list`).")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe key: --set train.lr=3e-4 (repeatable; value parsed as YAML)."),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace a different, finished run in output_dir instead of refusing.")
]


def _one_process_says(line: str) -> None:
    """Print `line` on stderr once per machine: under a launcher every process meets the same bad input or signal."""
    if dist.is_local_main():
        typer.echo(line, err=True)


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit with `code`."""
    _one_process_says(f"error: {message}")
    raise typer.Exit(code)


def handles_errors(func):
    """Map llmkit's known errors to one stderr line and their exit code, never a traceback.

    A disk problem that no stage caught itself (a read-only or full file system, a permission, a
    file where a directory must be) is translated here, once for every command (llmkit/errors.py:
    `disk_error`); any other unexpected error keeps its traceback, since it is a bug to report.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LlmkitError as exc:
            fail(str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__, exc.exit_code)
        except (typer.Exit, typer.Abort):
            raise
        except Interrupted as exc:  # before `Exception`, which it is: a signal is not a crash
            _one_process_says(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:
            error = disk_error(exc)
            if error is None:
                raise
            fail(str(error), error.exit_code)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """llmkit: tokenizer training, pretraining, fine-tuning, evaluation and generation."""


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


@tokenizer_app.command("train")
@handles_errors
def tokenizer_train(recipe: RecipeArg, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    """Train a BPE, Unigram or WordPiece tokenizer on a corpus."""
    stage("tokenizer train").run(load_recipe(recipe, set_, stage="tokenizer"), overwrite=overwrite)


@app.command()
@handles_errors
def pretrain(recipe: RecipeArg, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    """Pretrain a causal LM (resumes when output_dir holds a checkpoint). Multi-GPU: accelerate launch -m llmkit pretrain."""
    stage("pretrain").run(load_recipe(recipe, set_, stage="pretrain"), overwrite=overwrite)


@app.command()
@handles_errors
def finetune(recipe: RecipeArg, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    """Fine-tune a checkpoint on summarization, instruction, classification or text, full or LoRA."""
    stage("finetune").run(load_recipe(recipe, set_, stage="finetune"), overwrite=overwrite)


@app.command("eval")
@handles_errors
def eval_(recipe: RecipeArg, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    """Score one or several checkpoints: perplexity, ROUGE, accuracy, exact match, BLEU."""
    stage("eval").run(load_recipe(recipe, set_, stage="eval"), overwrite=overwrite)


@app.command()
@handles_errors
def generate(
    model: Annotated[str, typer.Argument(help="Checkpoint directory (or hub id when online).")],
    prompt: Annotated[Optional[str], typer.Argument(help="Prompt text; '-' or omitted reads the prompt from stdin.")] = None,
    file: Annotated[
        Optional[Path], typer.Option("--file", "-f", help="Read the prompt from this file (all of it; .jsonl: one record per line).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = all).")] = 50,
    repetition_penalty: Annotated[float, typer.Option(help="Penalty on repeated tokens.")] = 1.0,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="Samples per prompt.")] = 1,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 1234,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap prompts in the tokenizer's chat template.")] = False,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they are generated.")] = True,
    raw: Annotated[
        bool, typer.Option("--raw", help="Send prompts as they are, without the fine-tune's prompt template.")
    ] = False,
    one_per_line: Annotated[
        bool, typer.Option("--one-per-line", help="Each non-empty line of --file or stdin is a prompt of its own.")
    ] = False,
) -> None:
    """Sample text from any checkpoint; a fine-tuned model's prompts go through its training prompt template."""
    stage("generate").run(
        model=model,
        prompt=prompt,
        file=file,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        num_samples=num_samples,
        seed=seed,
        chat=chat,
        stop=stop or [],
        stream=stream,
        raw=raw,
        one_per_line=one_per_line,
    )


@app.command()
@handles_errors
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe and print it resolved, with the plan (parameters, tokens per step, steps, FLOPs)."""
    typer.echo(stage("validate").run(load_recipe(recipe, set_)))


@app.command()
@handles_errors
def quickstart(
    output_dir: Annotated[Path, typer.Argument(help="Where the whole pipeline writes its runs.")] = Path("runs/quickstart"),
    fast: Annotated[bool, typer.Option("--fast", help="A much shorter run, for smoke tests.")] = False,
) -> None:
    """Run the whole pipeline on built-in data: tokenizer -> pretrain -> finetune -> eval -> generate."""
    stage("quickstart").run(output_dir, fast=fast)


@app.command()
@handles_errors
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories holding metrics.jsonl.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.")] = Path("curves.png"),
) -> None:
    """Plot loss and learning-rate curves of one or several runs to a PNG."""
    typer.echo(stage("plot").run(run_dirs, output))


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


@data_app.command("prepare")
@handles_errors
def data_prepare(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Tokenize and pack a recipe's data into the cache ahead of training."""
    stage("data prepare").prepare(load_recipe(recipe, set_))


@data_app.command("inspect")
@handles_errors
def data_inspect(
    recipe: RecipeArg,
    set_: SetOpt = None,
    num_examples: Annotated[int, typer.Option("--num", "-n", help="Examples (or packed blocks) to show.")] = 3,
) -> None:
    """Show a fine-tune's examples with trained and masked tokens told apart, or a pretrain recipe's packed blocks."""
    stage("data inspect").inspect(load_recipe(recipe, set_), num_examples=num_examples)


# ----------------------------------------------------------------------------------------------
# Scaling laws
# ----------------------------------------------------------------------------------------------

ConventionOpt = Annotated[
    Optional[str],
    typer.Option("--param-convention", help="What N counts: total, non_embedding or matmul (default: what the sweep used)."),
]


@scale_app.command("sweep")
@handles_errors
def scale_sweep(recipe: RecipeArg, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    """Pretrain a grid of model sizes x token budgets (or IsoFLOP budgets) from one base recipe; reruns skip finished points."""
    table = stage("scale sweep").sweep(load_recipe(recipe, set_, stage="scale"), overwrite=overwrite)
    if table:  # only the main process of a multi-process launch has one
        typer.echo(table)


@scale_app.command("hp")
@handles_errors
def scale_hp(recipe: RecipeArg, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    """Run the recipe's hp grid (lr x batch at a few small sizes), fit your own lr and batch rule, write hp.json for the sweep."""
    table = stage("scale hp").hp(load_recipe(recipe, set_, stage="scale"), overwrite=overwrite)
    if table:
        typer.echo(table)


@scale_app.command("eval")
@handles_errors
def scale_eval(
    sweep: Annotated[Path, typer.Argument(help="A sweep directory (holding sweep.jsonl).")],
    recipe: RecipeArg, set_: SetOpt = None, overwrite: OverwriteOpt = False,
) -> None:
    """Score every finished point of a sweep with one eval recipe (into POINT/NAME, NAME its output_dir's), for fit --accuracy NAME."""
    table = stage("scale eval").score(sweep, load_recipe(recipe, set_, stage="eval"), overwrite=overwrite)
    if table:
        typer.echo(table)


@scale_app.command("fit")
@handles_errors
def scale_fit(
    data: Annotated[Path, typer.Argument(help="A sweep directory, or a CSV / JSONL of points (columns N, D or C, loss).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="fit.json to write (its plot goes beside it, .png).")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Resamples for the intervals (0: none).")] = 200,
    param_convention: ConventionOpt = None,
    accuracy: Annotated[Optional[str], typer.Option(
        "--accuracy", help="Also fit accuracy from loss: a points column (choice_acc) or the eval dir in each point (POINT/NAME/metrics.json of `scale eval`).")] = None,
    accuracy_metric: Annotated[str, typer.Option("--accuracy-metric", help="The metrics.json key to read (acc, acc_norm).")] = "acc",
) -> None:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (or a one-variable law) with intervals; write fit.json and a plot."""
    _convention_choice(param_convention)
    typer.echo(stage("scale fit").fit(data, output, n_boot=bootstrap, param_convention=param_convention,
                                      accuracy=accuracy, accuracy_metric=accuracy_metric))


@scale_app.command("recommend")
@handles_errors
def scale_recommend(
    flops: Annotated[Optional[float], typer.Option("--flops", help="Compute budget C in FLOPs (C = 6 N D), e.g. 1e18.")] = None,
    gpu_hours: Annotated[Optional[float], typer.Option("--gpu-hours", help="Budget in GPU-hours (with --tokens-per-s).")] = None,
    tokens_per_s: Annotated[Optional[float], typer.Option("--tokens-per-s", help="Measured training tokens/s per GPU.")] = None,
    at_params: Annotated[Optional[float], typer.Option("--at-params", help="Model size --tokens-per-s was measured at (default: the base's).")] = None,
    fit: Annotated[Optional[Path], typer.Option("--fit", help="fit.json or sweep directory (default: Epoch AI's Chinchilla constants).")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Pretrain recipe to size (default: the fitted sweep's base).")] = None,
    write_recipe: Annotated[Optional[Path], typer.Option("--write-recipe", help="Write a ready pretrain recipe here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --write-recipe file.")] = False,
    param_convention: ConventionOpt = None,
) -> None:
    """The compute-optimal model of a budget: N*, D*, predicted loss, shape, steps and wall time."""
    _convention_choice(param_convention)
    typer.echo(stage("scale recommend").recommend(
        flops=flops, gpu_hours=gpu_hours, tokens_per_s=tokens_per_s, at_params=at_params, fit_path=fit, base=base,
        write_recipe=write_recipe, force=force, param_convention=param_convention,
    ))


def _convention_choice(value: Optional[str]) -> None:
    if value is not None and value not in ("total", "non_embedding", "matmul"):
        raise LlmkitError(f"--param-convention {value}: choose total, non_embedding or matmul")


# ----------------------------------------------------------------------------------------------
# Bundled recipes
# ----------------------------------------------------------------------------------------------


@recipes_app.command("list")
@handles_errors
def recipes_list() -> None:
    """List the bundled recipes with their one-line purpose."""
    root = bundled_dir()
    for name in bundled_names():
        first = (root / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[:1]
        purpose = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        typer.echo(f"{name:<32} {purpose}")


@recipes_app.command("show")
@handles_errors
def recipes_show(name: Annotated[str, typer.Argument(help="Bundled recipe name, e.g. pretrain/tiny.")]) -> None:
    """Print a bundled recipe."""
    typer.echo(resolve_recipe_path(name).read_text(encoding="utf-8").rstrip())


@recipes_app.command("copy")
@handles_errors
def recipes_copy(
    name: Annotated[str, typer.Argument(help="Bundled recipe name, e.g. pretrain/tiny.")],
    dest: Annotated[Path, typer.Argument(help="File or directory to copy it to.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Copy a bundled recipe to edit it."""
    source = resolve_recipe_path(name)
    target = dest / source.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise LlmkitError(f"{target}: already exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    typer.echo(f"copied {name} -> {target}")


@recipes_app.command("reference")
@handles_errors
def recipes_reference(
    write: Annotated[
        Optional[Path],
        typer.Option("--write", help="Update the reference between the markers of this Markdown file (docs/recipes.md) instead of printing it."),
    ] = None,
) -> None:
    """Print the reference of every recipe key (default, meaning) as Markdown, or update docs/recipes.md with --write."""
    if write is None:
        typer.echo(schema_reference().rstrip())
        return
    if not write.is_file():
        raise LlmkitError(f"{write}: no such file; --write updates an existing page between its reference markers")
    old = write.read_text(encoding="utf-8")
    new = with_schema_reference(old, str(write))
    if new == old:
        typer.echo(f"{write}: the recipe reference is current")
        return
    rundir.write_text_atomic(write, new)
    typer.echo(f"{write}: recipe reference updated")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="llmkit")


if __name__ == "__main__":
    main()
    sys.exit(0)
