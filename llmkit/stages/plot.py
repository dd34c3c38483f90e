"""Loss and learning-rate curves of one or several runs, read from their metrics.jsonl, to a PNG.

    llmkit plot runs/pretrain-tiny runs/finetune-tiny -o curves.png
"""

from __future__ import annotations

import json
from pathlib import Path

from llmkit.errors import DataError, LlmkitError


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
    """Draw train/validation loss against steps and tokens, and the learning rate, for each run."""
    try:
        import matplotlib
    except ImportError:
        raise LlmkitError("llmkit plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # no display needed; also safe inside tests and on servers
    import matplotlib.pyplot as plt

    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    if not any(events for _, events in runs):
        raise DataError(f"{', '.join(str(d) for d in run_dirs)}: the metrics logs hold no events yet")
    fig, (ax_steps, ax_tokens, ax_lr) = plt.subplots(1, 3, figsize=(16, 4.5))
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
    ax_steps.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="loss vs steps")
    ax_tokens.set(xlabel="tokens seen", ylabel="loss (nats/token)", title="loss vs tokens")
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    for ax in (ax_steps, ax_tokens, ax_lr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(output)
    return f"wrote {output}"
