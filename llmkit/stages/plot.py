"""Loss and learning-rate curves of one or several runs, read from their metrics.jsonl, to a PNG.

    llmkit plot runs/pretrain-tiny runs/finetune-tiny -o curves.png
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from llmkit import rundir
from llmkit.errors import DataError, LlmkitError, writing

ACC_SUFFIXES = ("acc", "acc_norm", "accuracy")  # accuracies logged by train.evals (llmkit/evals/training.py)


def accuracy_keys(runs) -> list[str]:
    """The accuracy keys of the runs' eval events (NAME_acc, NAME_acc_norm, accuracy, exact_match/FILTER), in first-seen order."""
    keys: dict[str, None] = {}
    for _, events in runs:
        for event in events:
            if event.get("event") != "eval":
                continue
            for key in event:
                matched = "match/" in key and "stderr" not in key  # a generative task's exact_match/FILTER
                if key in ACC_SUFFIXES or key.endswith(("_acc", "_acc_norm", "_accuracy")) or matched:
                    keys.setdefault(key)
    return list(keys)


def read_metrics(run_dir: Path) -> list[dict]:
    """The events of a run's metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl here; give a run directory written by llmkit pretrain/finetune")
    events = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise DataError(f"{path}:{number}: not a JSON line; the metrics log is damaged") from None
    return events


def _series(events: list[dict], event: str, key: str, x: str) -> tuple[list[float], list[float]]:
    points = [(e[x], e[key]) for e in events if e.get("event") == event and key in e and x in e]
    return [p[0] for p in points], [p[1] for p in points]


def run(run_dirs: list[Path], output: Path) -> str:
    """Draw train/validation loss against steps and tokens, the learning rate, and multiple-choice accuracy when logged."""
    try:
        import matplotlib
    except ImportError:
        raise LlmkitError("llmkit plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # no display needed; also safe inside tests and on servers
    import matplotlib.pyplot as plt

    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    if not any(events for _, events in runs):
        raise DataError(f"{', '.join(str(d) for d in run_dirs)}: the metrics logs hold no events yet")
    # train.evals logs accuracies (e.g. choice_acc, choice_acc_norm) in eval events: a fourth panel shows them.
    acc_keys = accuracy_keys(runs)
    has_acc = bool(acc_keys)
    fig, axes = plt.subplots(1, 4 if has_acc else 3, figsize=(21 if has_acc else 16, 4.5))
    ax_steps, ax_tokens, ax_lr = axes[:3]
    for index, (run_dir, events) in enumerate(runs):
        color = f"C{index % 10}"
        label = run_dir.name or str(run_dir)
        for ax, x in ((ax_steps, "step"), (ax_tokens, "tokens")):
            xs, ys = _series(events, "train", "loss", x)
            ax.plot(xs, ys, color=color, linewidth=1.2, label=f"{label} train")
            xs, ys = _series(events, "eval", "val_loss", x)
            if xs:
                ax.plot(xs, ys, color=color, linestyle="--", marker="o", markersize=3, label=f"{label} validation")
        xs, ys = _series(events, "train", "lr", "step")
        ax_lr.plot(xs, ys, color=color, label=label)
        for n, key in enumerate(acc_keys):
            style = ("-", ":", "--", "-.")[n % 4]
            xs, ys = _series(events, "eval", key, "step")
            if xs:
                axes[3].plot(xs, ys, color=color, linestyle=style, marker="o", markersize=3, label=f"{label} {key}")
    ax_steps.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="loss vs steps")
    ax_tokens.set(xlabel="tokens seen", ylabel="loss (nats/token)", title="loss vs tokens")
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    if has_acc:
        axes[3].set(xlabel="optimizer step", ylabel="accuracy", title="accuracy (train.evals)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    output = Path(output)
    created = None if output.parent.is_dir() else output.parent  # made below, and said so in the result line
    tmp = rundir.temp_path(output.parent, output.name)
    try:
        with writing(output, "--output"):
            output.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(tmp, dpi=110, format="png")
            tmp.replace(output)
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):
            tmp.unlink()  # left only when saving failed
    return f"wrote {output}" + (f" (created the directory {created})" if created else "")
