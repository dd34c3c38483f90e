"""What a run reports while it trains: metrics.jsonl, experiment trackers and the progress bar.

    llmkit plot runs/pretrain-tiny          # reads metrics.jsonl
    llmkit pretrain pretrain/tiny --set 'train.trackers=[tensorboard]'

metrics.jsonl holds one JSON object per event: {"event": "train" | "eval" | "skip" | "stop" |
"nonfinite", "step", "tokens", "time", ...}. On resume the events logged after the checkpoint are
dropped first, since they will be logged again.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

from llmkit import rundir
from llmkit.errors import writing


def flat_config(recipe) -> dict[str, Any]:
    """The recipe as {dotted.key: scalar} for trackers that only take scalars."""
    out: dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = node if isinstance(node, (int, float, str, bool)) else json.dumps(node)

    walk(recipe.model_dump(mode="json"), "")
    return out


def available_trackers(names: list[str]) -> list[str]:
    """The requested trackers that are installed; a warning for each one that is not."""
    found = []
    for name in names:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
        if importlib.util.find_spec(module) is None and not (name == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            print(f"warning: train.trackers: {name} is not installed (pip install {name}); not logging to it", file=sys.stderr)
        else:
            found.append(name)
    return found


class MetricsLog:
    """metrics.jsonl (main process), accelerate trackers, and the progress bar's numbers."""

    def __init__(self, accelerator, path: Path, resume_step: int | None) -> None:
        self.accelerator = accelerator
        self.path = path
        if accelerator.is_main_process:
            if resume_step is not None and path.is_file():
                # Drop events logged after the checkpoint we resume from: they will be logged again.
                kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_step]
                rundir.write_text_atomic(path, "".join(line + "\n" for line in kept))
            elif resume_step is None and path.exists():
                path.unlink()

    def write(self, event: dict[str, Any]) -> None:
        """Append one event (main process) and forward its numbers to the trackers."""
        if not self.accelerator.is_main_process:
            return
        event = {"time": round(time.time(), 3), **event}
        with writing(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
        numbers = {f"{event['event']}/{k}": v for k, v in event.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self.accelerator.trackers:
            self.accelerator.log(numbers, step=event["step"])


def progress_bar(accelerator, total: int, initial: int):
    """The step progress bar on stderr (main process only)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not accelerator.is_main_process,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=1.0,
    )
