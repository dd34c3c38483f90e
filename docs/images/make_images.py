"""Regenerate the pictures of README.md and docs/ from real runs of the bundled recipes.

    python docs/images/make_images.py                      # all three, runs in ./images-work (about 10 minutes on 2 idle CPU cores)
    python docs/images/make_images.py --only comparison    # one of curves, comparison, scaling
    python docs/images/make_images.py --work /tmp/w        # reuse the finished runs of an earlier call

Each picture is drawn from runs this script makes (or finds finished in --work: llmkit skips a finished
run of the same recipe, and a sweep skips its finished points), all on built-in data, offline:

- pretrain-curves.png: `pretrain/tiny` (AdamW, cosine) against `pretrain/tiny-muon` (Muon, warmup-stable-decay),
  drawn by `llmkit plot`: loss against steps and tokens, and the learning rate.
- eval-comparison.png: the comparison table of `llmkit eval eval/tiny` on the base model and the fine-tuned
  summarizer (comparison.json), rendered as a table, the better value of each column in bold.
- scale-cpu-tiny.png: the plot `llmkit scale fit` draws for the bundled CPU sweep (`scale/cpu-tiny`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

IMAGES = Path(__file__).resolve().parent

EVAL = ["eval", "eval/tiny", "--set", "model.path=[runs/pretrain-tiny, runs/finetune-tiny-summarization]",
        "--set", "output_dir=runs/eval-images"]
PICTURES = {
    "curves": [["tokenizer", "train", "tokenizer/tiny"], ["pretrain", "pretrain/tiny"], ["pretrain", "pretrain/tiny-muon"],
               ["plot", "runs/pretrain-tiny", "runs/pretrain-tiny-muon", "-o", str(IMAGES / "pretrain-curves.png")]],
    "comparison": [["tokenizer", "train", "tokenizer/tiny"], ["pretrain", "pretrain/tiny"],
                   ["finetune", "finetune/tiny-summarization"], EVAL],
    "scaling": [["tokenizer", "train", "tokenizer/tiny"], ["scale", "sweep", "scale/cpu-tiny"], ["scale", "fit", "runs/scale-cpu-tiny"]],
}
"""Per picture, the llmkit commands that make it, in order (a command an earlier picture ran is not run twice)."""


def llmkit(args: list[str], work: Path) -> None:
    """Run one llmkit command in `work` with this interpreter, and stop the script if it fails."""
    started = time.perf_counter()
    print(f"$ llmkit {' '.join(args)}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "llmkit", *args], cwd=work, env=env)
    if result.returncode != 0:
        sys.exit(f"error: `llmkit {' '.join(args)}` failed with exit code {result.returncode} (in {work})")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def draw_comparison(comparison_json: Path, output: Path) -> None:
    """Render an eval comparison.json as a table picture: one row per model, the best value per column in bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = json.loads(comparison_json.read_text(encoding="utf-8"))
    keys = [k for k in table["metrics"] if not k.endswith("_per_second")]
    rows = [[Path(str(r["model"])).name] + [f"{r[k]:.4g}" if isinstance(r[k], (int, float)) else str(r[k]) for k in keys]
            for r in table["models"]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.25 * len(keys), 0.5 + 0.42 * (len(rows) + 1)))
    ax.axis("off")
    grid = ax.table(cellText=rows, colLabels=["model", *keys], loc="center", cellLoc="center")
    grid.auto_set_font_size(False)
    grid.set_fontsize(9)
    grid.auto_set_column_width(list(range(len(keys) + 1)))
    grid.scale(1, 1.5)
    for column, key in enumerate(keys, start=1):
        best = table["best"].get(key)
        for row, model in enumerate(table["models"], start=1):
            if model["model"] == best:
                grid[row, column].set_text_props(fontweight="bold")
    for column in range(len(keys) + 1):
        grid[0, column].set_facecolor("#e8e8e8")
    lower = [k for k in keys if k in ("perplexity", "nll", "bits_per_byte", "target_perplexity")]
    ax.set_title("llmkit eval eval/tiny: base model against the fine-tuned summarizer (40 test records)\n"
                 f"best value per column in bold; lower is better for {', '.join(lower)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=130)
    plt.close(fig)


def main() -> None:
    """Run the bundled recipes (or reuse them) and write the pictures next to this script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("images-work"), help="Where the runs go (reused when finished).")
    parser.add_argument("--only", choices=sorted(PICTURES), action="append", help="Make only this picture (repeatable).")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    done: list[list[str]] = []
    for picture in args.only or list(PICTURES):
        for command in PICTURES[picture]:
            if command not in done:
                llmkit(command, work)
                done.append(command)
        if picture == "comparison":
            draw_comparison(work / "runs" / "eval-images" / "comparison.json", IMAGES / "eval-comparison.png")
        if picture == "scaling":  # `scale fit` drew it
            shutil.copyfile(work / "runs" / "scale-cpu-tiny" / "fit.png", IMAGES / "scale-cpu-tiny.png")
        name = {"curves": "pretrain-curves.png", "comparison": "eval-comparison.png", "scaling": "scale-cpu-tiny.png"}[picture]
        print(f"wrote {IMAGES / name}", flush=True)


if __name__ == "__main__":
    main()
