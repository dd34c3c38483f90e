"""The whole pipeline on built-in data, with the bundled tiny recipes, in a few minutes on a CPU.

    llmkit quickstart runs/quickstart

tokenizer -> pretrain -> fine-tune for summarization -> evaluate base and fine-tuned models
(perplexity and ROUGE) -> generate a few samples -> plot the curves. Every stage writes its own run
directory under OUTPUT_DIR; a stage that finished is reused on the next run, and one that was
interrupted resumes from its last checkpoint.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import typer

from llmkit.commands import command_running
from llmkit.data.sources import iter_records
from llmkit.generation import generate_texts
from llmkit.models import load_model
from llmkit.prompts import format_record
from llmkit.recipes import GenerationSpec, load_recipe
from llmkit.stages import evaluate, finetune, plot, pretrain, tokenizer

MODULES = {m.__name__.rpartition(".")[2]: m for m in (tokenizer, pretrain, finetune, evaluate)}


def runner(kind: str):
    """The function the command table (llmkit/commands.py) names for running recipes of `kind`."""
    row = command_running(kind)
    return getattr(MODULES[row.module], row.function)

# A much shorter schedule for smoke tests and CI (`llmkit quickstart --fast`).
FAST = {
    "tokenizer": ["tokenizer.vocab_size=1024"],
    "pretrain": ["train.max_steps=30", "train.warmup_steps=3", "train.eval_every=15", "train.save_every=15"],
    "finetune": ["train.max_steps=16", "train.warmup_steps=2", "train.eval_every=8", "train.save_every=8", "train.evals=[{metrics: [rouge], data: {max_samples: 4}, generation: {max_new_tokens: 32}}]"],
    "eval": ["data.max_samples=12", "generation.max_new_tokens=24"],
}


@dataclass
class Stage:
    """One step of the pipeline: a bundled recipe, its run directory and the file that marks it done."""

    name: str
    recipe: str
    done_marker: str


STAGES = [
    Stage("tokenizer", "tokenizer/tiny", "tokenizer.json"),
    Stage("pretrain", "pretrain/tiny", "model.safetensors"),
    Stage("finetune", "finetune/tiny-summarization", "model.safetensors"),
    Stage("eval", "eval/tiny", "metrics.json"),
]


def _overrides(stage: Stage, root: Path, fast: bool) -> list[str]:
    """Point each stage's recipe at the run directories of the stages before it."""
    dirs = {s.name: (root / s.name).as_posix() for s in STAGES}
    paths = {
        "tokenizer": [f"output_dir={dirs['tokenizer']}"],
        "pretrain": [f"output_dir={dirs['pretrain']}", f"tokenizer={dirs['tokenizer']}"],
        "finetune": [f"output_dir={dirs['finetune']}", f"model.path={dirs['pretrain']}"],
        "eval": [f"output_dir={dirs['eval']}", f"model.path=[{dirs['pretrain']}, {dirs['finetune']}]"],
    }[stage.name]
    return paths + (FAST[stage.name] if fast else [])


def _run_stage(stage: Stage, root: Path, fast: bool) -> None:
    """Run one stage, or reuse it when its run directory already holds the finished result."""
    recipe = load_recipe(stage.recipe, _overrides(stage, root, fast), stage=stage.name)
    if (recipe.output_dir / stage.done_marker).exists():
        typer.echo(f"[{stage.name}] already done in {recipe.output_dir}; reusing it")
        return
    typer.echo(f"[{stage.name}] running {stage.recipe} -> {recipe.output_dir}")
    start = time.perf_counter()
    runner(stage.name)(recipe)
    typer.echo(f"[{stage.name}] done in {time.perf_counter() - start:.0f} s")


def _samples(root: Path, count: int = 3) -> list[dict[str, str]]:
    """A few test documents summarized by the pretrained and the fine-tuned model, from the same prompt.

    Each is {"document", "reference", "base", "finetuned"}: the base model's output shows what
    fine-tuning changed (the README promises both).
    """
    recipe = load_recipe(root / "finetune" / "recipe.yaml", stage="finetune")
    records = list(itertools.islice(iter_records(["builtin:docsum/test"]), count))
    samples = [{"document": r["document"], "reference": r["summary"]} for r in records]
    for key, name in (("base", "pretrain"), ("finetuned", "finetune")):
        model, tok = load_model(str(root / name), device="cpu")
        prompts = [format_record(recipe.task, r, tok).prompt for r in records]
        outputs = generate_texts(model, tok, prompts, GenerationSpec(max_new_tokens=32), batch_size=count)
        for sample, out in zip(samples, outputs, strict=True):
            sample[key] = out.strip()
    return samples


def _write_samples(path: Path, samples: list[dict[str, str]]) -> None:
    """samples.md: each document with its reference, the pretrained model's output and the fine-tuned one's."""
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(
                f"## document\n{s['document'][:500]}\n\n**reference:** {s['reference']}\n\n"
                f"**pretrained only:** {s['base'] or '(empty)'}\n\n**fine-tuned:** {s['finetuned'] or '(empty)'}\n\n"
            )


def _results_table(eval_dir: Path) -> str:
    """Base versus fine-tuned metrics, read from the eval stage's metrics.json."""
    report = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    rows = report["models"] if "models" in report else [report]
    keys = ["perplexity", "bits_per_byte", "rouge1", "rouge2", "rougeL", "rougeLsum"]
    lines = [f"{'model':<12}" + "".join(f"{k:>14}" for k in keys)]
    for row in rows:
        name = Path(str(row["model"])).name
        lines.append(f"{name:<12}" + "".join(f"{row['metrics'].get(k, float('nan')):>14.4f}" for k in keys))
    return "\n".join(lines)


def _rouge_line(eval_dir: Path) -> str:
    """What fine-tuning did to ROUGE-L, on how many test records, and what the two outputs were like.

    A tiny pretrained model asked to summarize mostly ends at once: ROUGE-L 0 then measures no
    output at all, not a poor summary, and a fine-tuned model that writes one near-constant summary
    for every document still scores above it. The line says so when the predictions show it, so the
    jump is not read as more learning than it is.
    """
    report = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    rows = {Path(str(row["model"])).name: row for row in report.get("models", [])}
    if not {"pretrain", "finetune"} <= set(rows):
        return ""
    base, tuned = (rows[name]["metrics"].get("rougeL", float("nan")) for name in ("pretrain", "finetune"))
    records = rows["finetune"]["protocol"].get("test_records")
    scope = f" (first {records['scored']} of {records['available'] or 'more'} test records)" if records else ""
    line = f"fine-tuning took ROUGE-L from {base:.3f} (pretrained only) to {tuned:.3f}{scope}"
    predictions: dict[str, list[str]] = {"pretrain": [], "finetune": []}
    path = eval_dir / "predictions.jsonl"
    if path.is_file():
        for text in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(text)
            name = Path(str(row.get("model", ""))).name
            if name in predictions:
                predictions[name].append(str(row.get("prediction", "")).strip())
    base_out, tuned_out = predictions["pretrain"], predictions["finetune"]
    if base_out and not any(base_out):
        line += (f"\n  note: all {len(base_out)} outputs of the pretrained model were empty, so its score measures no "
                 "output at all rather than a worse summary")
    if tuned_out and len(set(tuned_out)) <= len(tuned_out) // 2:
        line += (f"\n  note: the fine-tuned model gave {len(set(tuned_out))} distinct summaries for {len(tuned_out)} documents: "
                 "it learned the format and common words more than each document (see samples.md)")
    return line


def run(output_dir: Path, fast: bool = False) -> None:
    """Run every stage on built-in data, then print where everything is and a results table."""
    root = Path(output_dir)
    start = time.perf_counter()
    for stage in STAGES:
        _run_stage(stage, root, fast)
    plot.run([root / "pretrain", root / "finetune"], root / "curves.png")
    samples = _samples(root)
    _write_samples(root / "samples.md", samples)

    typer.echo(f"\nquickstart finished in {time.perf_counter() - start:.0f} s. Everything is under {root}/:")
    for label, path in [
        ("tokenizer", root / "tokenizer"),
        ("pretrained model", root / "pretrain"),
        ("fine-tuned model", root / "finetune"),
        ("evaluation", root / "eval"),
        ("loss curves", root / "curves.png"),
        ("samples", root / "samples.md"),
    ]:
        typer.echo(f"  {label:<18} {path}")
    typer.echo("\n" + _results_table(root / "eval"))
    typer.echo(_rouge_line(root / "eval"))
    typer.echo("\nA summary, before and after fine-tuning:")
    first = samples[0]
    typer.echo(f"  document:        {' '.join(first['document'].split())[:160]}...")
    typer.echo(f"  reference:       {first['reference']}")
    typer.echo(f"  pretrained only: {first['base'] or '(empty)'}")
    typer.echo(f"  fine-tuned:      {first['finetuned'] or '(empty)'}")
    typer.echo(
        f"\nNext: llmkit generate {root / 'finetune'} --file any-document.txt   (summarizes it, through the fine-tune's "
        f"prompt template)  |  llmkit plot {root / 'pretrain'} {root / 'finetune'}"
    )
