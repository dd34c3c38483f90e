"""Time to a target validation loss: llmkit (AdamW, Muon) against the HF Trainer run_clm path and a nanoGPT-style loop.

    python benchmarks/time_to_target.py                      # CPU defaults: 4 sides x 3 seeds, ~10 minutes on 1 thread each
    python benchmarks/time_to_target.py --seeds 5 --steps 200 --target 5.2

Every side trains the same llama shape (built with transformers from the same config, float32,
sdpa) on the same corpus (built-in pydoc text, `builtin:pydoc/train`), with the same micro-batch,
sequence length, number of steps (so the same token budget), peak learning rate and warmup:

- hf-trainer:   transformers' run_clm example path: load_dataset("json") -> map(tokenize) ->
                map(group_texts) -> Trainer + TrainingArguments with the Trainer's defaults
                (AdamW fused, betas 0.9/0.999, no weight decay, linear decay to 0, grad clip 1.0);
                only learning_rate, warmup_steps, max_steps, batch and seed are set.
- nanogpt:      a plain PyTorch loop written for this benchmark in nanoGPT's style: the corpus as
                one flat token array (EOS between documents), random windows per step, AdamW
                (fused, betas 0.9/0.95, weight decay 0.1 on 2-D weights), warmup then cosine to lr/10,
                grad clip 1.0.
- llmkit-adamw: `llmkit.training.loop.fit` on llmkit's packed, cached data, train.optimizer adamw,
                train.schedule wsd (decay_fraction 0.2, 1-sqrt to 0), llmkit's defaults otherwise.
- llmkit-muon:  the same with train.optimizer muon (train.muon_lr 0.02, momentum 0.95) on the
                hidden matrices and AdamW on the rest.

The clock. Every side is evaluated every --eval-every steps on the SAME validation blocks (the
first --val-blocks full blocks of builtin:pydoc/validation, each document followed by EOS) by the
same function (token-weighted next-token cross-entropy, model in eval mode). Evaluation time is
subtracted: a side's time at step s is the wall time from its first training batch to the end of
step s, minus the time spent evaluating before it. Time to target = that time at the first
evaluation whose loss is <= the target. The target defaults to the highest of the runs' best
losses (so every run reaches it: the slowest side reaches it last); --target fixes one.

Both wall seconds and the process's CPU seconds are recorded (one torch thread per run: CPU time is
the load-robust measure on a machine shared with other jobs, wall time what a user waits).
Seeds (--seeds, default 3) change model init and data order; sides alternate order per seed;
each run is a fresh subprocess on --threads torch threads. Reported: per side the median time to
target (wall and CPU), its range over seeds, steps to target, tokens/s; llmkit / hf-trainer
ratios, and Welch's t-test (scipy) and range overlap against hf-trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from pretrain_bench import build_fixtures, run_clm_group_texts  # noqa: E402  (the same corpus and tokenizer as the throughput bench)

SIDES = ("hf-trainer", "nanogpt", "llmkit-adamw", "llmkit-muon")


# ----------------------------------------------------------------------------------------------
# Shared pieces (workers)
# ----------------------------------------------------------------------------------------------


def model_config(cfg: dict, tokenizer):
    """The llama config every side trains."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "llama", vocab_size=64 * -(-len(tokenizer) // 64), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfg["model"],
    )


def val_loss(model, blocks, batch: int = 8) -> float:
    """Token-weighted next-token cross-entropy of `model` on `blocks` [K, seq_len], in eval mode."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            x = blocks[i : i + batch]
            logits = model(input_ids=x).logits
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1), reduction="sum").item()
            count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


def now() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds)."""
    return time.perf_counter(), time.process_time()


class Clock:
    """Training time (evaluation excluded), wall and CPU, and the evaluations, as every side records them.

    CPU seconds (time.process_time) are the load-robust companion of wall seconds: on a machine
    shared with other jobs a one-thread run's wall time stretches with the neighbours' load, its CPU
    time much less.
    """

    def __init__(self) -> None:
        self.t0: tuple[float, float] | None = None
        self.eval_wall = self.eval_cpu = 0.0
        self.evals: list[list[float]] = []  # [step, training wall s, val loss, training CPU s] at the end of the step

    def start(self) -> None:
        """Called at the first training batch."""
        if self.t0 is None:
            self.t0 = now()

    def evaluate(self, step: int, model, blocks, started: tuple[float, float] | None = None) -> None:
        """Evaluate at the end of `step`; `started` = now() when the side's own evaluation began (default: now)."""
        started = started or now()
        wall, cpu = started[0] - self.t0[0] - self.eval_wall, started[1] - self.t0[1] - self.eval_cpu
        loss = val_loss(model, blocks)
        end = now()
        self.eval_wall += end[0] - started[0]
        self.eval_cpu += end[1] - started[1]
        self.evals.append([step, wall, loss, cpu])

    def result(self, tokens_per_step: int) -> dict:
        """The worker's JSON result."""
        step, wall, _, cpu = self.evals[-1]
        return {"evals": self.evals, "tokens_per_s": tokens_per_step * step / wall, "tokens_per_cpu_s": tokens_per_step * step / cpu}


def load_blocks(path: str):
    import torch

    return torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------------------------
# Workers (run in subprocesses)
# ----------------------------------------------------------------------------------------------


def worker_hf(cfg: dict) -> dict:
    """The run_clm path: datasets map tokenize + group_texts, Trainer with its defaults."""
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    blocks, clock = load_blocks(cfg["val_blocks"]), Clock()
    tokenizer = AutoTokenizer.from_pretrained(cfg["tokenizer"])
    raw = load_dataset("json", data_files=cfg["corpus"], split="train", cache_dir=str(Path(cfg["workdir"]) / f"hf-cache-{os.getpid()}"))
    tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    size = cfg["seq_len"]

    train = tokenized.map(run_clm_group_texts(size), batched=True)
    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_config(model_config(cfg, tokenizer), dtype=torch.float32, attn_implementation="sdpa")

    def collate(features):
        clock.start()
        return default_data_collator(features)

    class Evaluate(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % cfg["eval_every"] == 0:
                clock.evaluate(state.global_step, model, blocks)

    args = TrainingArguments(
        output_dir=str(Path(cfg["workdir"]) / f"hf-out-{os.getpid()}"), per_device_train_batch_size=cfg["batch"],
        max_steps=cfg["steps"], learning_rate=cfg["lr"], warmup_steps=cfg["warmup"], logging_steps=10**6,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=cfg["seed"], dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[Evaluate()]).train()
    return clock.result(cfg["batch"] * size)


def worker_nanogpt(cfg: dict) -> dict:
    """A nanoGPT-style loop: flat token array, random windows, AdamW, warmup + cosine, grad clip."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    blocks, clock = load_blocks(cfg["val_blocks"]), Clock()
    tokenizer = AutoTokenizer.from_pretrained(cfg["tokenizer"])
    texts = [json.loads(line)["text"] for line in Path(cfg["corpus"]).read_text(encoding="utf-8").splitlines()]
    ids = [i for doc in tokenizer(texts)["input_ids"] for i in doc + [tokenizer.eos_token_id]]
    data = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_config(model_config(cfg, tokenizer), dtype=torch.float32, attn_implementation="sdpa")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg["lr"], betas=(0.9, 0.95), fused=True)
    generator = torch.Generator().manual_seed(cfg["seed"])
    size, steps, warmup, min_lr = cfg["seq_len"], cfg["steps"], cfg["warmup"], cfg["lr"] / 10

    def get_lr(it: int) -> float:
        if it < warmup:
            return cfg["lr"] * (it + 1) / warmup
        ratio = (it - warmup) / max(1, steps - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["lr"] - min_lr)

    model.train()
    for it in range(steps):
        clock.start()
        starts = torch.randint(len(data) - size - 1, (cfg["batch"],), generator=generator)
        x = torch.stack([data[s : s + size] for s in starts.tolist()])
        y = torch.stack([data[s + 1 : s + 1 + size] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (it + 1) % cfg["eval_every"] == 0:
            clock.evaluate(it + 1, model, blocks)
    return clock.result(cfg["batch"] * size)


def worker_llmkit(cfg: dict) -> dict:
    """llmkit's library path (what `llmkit pretrain` runs), evaluated on the shared blocks through extra_eval."""
    from llmkit import models
    from llmkit.data.lm import lm_train_data
    from llmkit.recipes import recipe_from_dict
    from llmkit.training.loop import fit

    blocks, clock = load_blocks(cfg["val_blocks"]), Clock()
    recipe = recipe_from_dict({
        "stage": "pretrain", "output_dir": str(Path(cfg["workdir"]) / f"llmkit-{cfg['optimizer']}-{os.getpid()}"),
        "tokenizer": cfg["tokenizer"], "model": {"type": "llama", **cfg["model"]},
        "data": {"train": [cfg["corpus"]], "validation": ["builtin:pydoc/validation"], "seq_len": cfg["seq_len"], "cache_dir": cfg["cache"]},
        "train": {
            "max_steps": cfg["steps"], "micro_batch_size": cfg["batch"], "lr": cfg["lr"], "warmup_steps": cfg["warmup"],
            "optimizer": cfg["optimizer"], "schedule": "wsd", "decay_fraction": 0.2, "eval_every": cfg["eval_every"],
            "eval_batches": 1, "log_every": cfg["eval_every"], "save_every": 10**6, "seed": cfg["seed"], "mixed_precision": "no",
        },
    }, stage="pretrain")
    tokenizer = models.load_tokenizer(recipe.tokenizer)
    model = models.build_model(recipe, tokenizer)
    data = lm_train_data(recipe, tokenizer)
    collate = data.collate_fn
    eval_started: list[tuple[float, float]] = []

    def train_collate(examples):
        clock.start()
        return collate(examples)

    def eval_collate(examples):
        eval_started.append(now())  # llmkit's own (one-batch) validation starts the evaluation
        return collate(examples)

    data.collate_fn, data.eval_collate_fn = train_collate, eval_collate
    fit(recipe, model, tokenizer, data, extra_eval=lambda m, step: clock.evaluate(step, m, blocks, eval_started[-1]) or {})
    return clock.result(cfg["batch"] * cfg["seq_len"])


def run_worker(side: str, cfg: dict, threads: int) -> dict:
    """Run one side in a fresh subprocess and parse its JSON result line."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", LLMKIT_PEAK_FLOPS="1e12", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE), "--worker", side, "--worker-config", json.dumps(cfg)],
                          env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def shared_val_blocks(tokenizer_dir: Path, seq_len: int, count: int, out: Path) -> Path:
    """The first `count` full blocks of builtin:pydoc/validation (documents + EOS), saved for every worker."""
    import torch
    from transformers import AutoTokenizer

    from llmkit.data.sources import iter_texts

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    flat: list[int] = []
    for text in iter_texts("builtin:pydoc/validation"):
        flat += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        if len(flat) >= count * seq_len:
            break
    if len(flat) < count * seq_len:
        raise SystemExit(f"builtin:pydoc/validation holds {len(flat)} tokens, fewer than {count} blocks of {seq_len}")
    torch.save(torch.tensor(flat[: count * seq_len]).view(count, seq_len), out)
    return out


def time_to_target(result: dict, target: float) -> tuple[float, int, float] | None:
    """(training wall seconds, step, training CPU seconds) at the first evaluation at or below the target; None if never."""
    return next(((wall, step, cpu) for step, wall, loss, cpu in result["evals"] if loss <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=2e-3, help="Peak learning rate of every AdamW side (and of llmkit-muon's AdamW part).")
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--val-blocks", type=int, default=16)
    parser.add_argument("--target", type=float, default=None, help="Validation loss to reach (default: the highest best loss of all runs).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--output", type=Path, default=None, help="Write every run's evaluations as JSON here.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        cfg = json.loads(args.worker_config)
        worker = {"hf-trainer": worker_hf, "nanogpt": worker_nanogpt, "llmkit": worker_llmkit}[args.worker]
        print(json.dumps(worker(cfg)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="time-to-target-"))
    corpus, tokenizer = build_fixtures(workdir, args.vocab)
    model = {
        "hidden_size": args.hidden, "intermediate_size": args.hidden * 3, "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden // 32), "num_key_value_heads": max(1, args.hidden // 32),
        "max_position_embeddings": max(args.seq_len, 256), "tie_word_embeddings": True,
    }
    base = {
        "workdir": str(workdir), "corpus": str(corpus), "tokenizer": str(tokenizer), "cache": str(workdir / "llmkit-cache"),
        "val_blocks": str(shared_val_blocks(tokenizer, args.seq_len, args.val_blocks, workdir / "val_blocks.pt")),
        "model": model, "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps, "lr": args.lr,
        "warmup": args.warmup, "eval_every": args.eval_every,
    }
    kinds = {"hf-trainer": ("hf-trainer", {}), "nanogpt": ("nanogpt", {}),
             "llmkit-adamw": ("llmkit", {"optimizer": "adamw"}), "llmkit-muon": ("llmkit", {"optimizer": "muon"})}
    chosen = [s for s in args.sides.split(",") if s]
    runs: dict[str, list[dict]] = {s: [] for s in chosen}
    load_before = os.getloadavg()
    for index in range(args.seeds):
        seed = 1234 + index
        order = chosen[index % len(chosen):] + chosen[: index % len(chosen)]  # a different side goes first each seed
        for side in order:
            kind, extra = kinds[side]
            result = run_worker(kind, {**base, **extra, "seed": seed}, args.threads)
            runs[side].append(result)
            best = min(row[2] for row in result["evals"])
            print(f"seed {seed} {side}: best val loss {best:.4f}, {result['tokens_per_s']:,.0f} tokens/s, "
                  f"process {result['process_s']:.1f}s", file=sys.stderr)
    load_after = os.getloadavg()

    target = args.target
    if target is None:
        target = max(min(row[2] for row in r["evals"]) for side in chosen for r in runs[side])
    lines = [
        f"machine: {os.cpu_count()} CPUs, {args.threads} torch thread(s) per run; load average before {load_before[0]:.2f}, "
        f"after {load_after[0]:.2f} (1 min)",
        f"model: llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; {args.batch} x {args.seq_len} tokens a step, "
        f"{args.steps} steps ({args.steps * args.batch * args.seq_len:,} tokens); peak lr {args.lr}, warmup {args.warmup}; "
        f"eval every {args.eval_every} steps on {args.val_blocks} shared blocks; {args.seeds} seeds",
        f"target validation loss: {target:.4f}" + (" (the highest best loss of all runs)" if args.target is None else ""),
        "",
        "| side | wall s to target (median) | wall range | CPU s to target (median) | CPU range | steps to target (median) "
        "| final val loss (median) | tokens/s wall (median) | tokens/CPU s (median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    times: dict[str, dict[str, list[float]]] = {}
    for side in chosen:
        reached = [time_to_target(r, target) for r in runs[side]]
        times[side] = {"wall": [t[0] if t else float("inf") for t in reached], "CPU": [t[2] if t else float("inf") for t in reached]}
        steps = [t[1] for t in reached if t]
        finals = [r["evals"][-1][2] for r in runs[side]]
        wall, cpu = times[side]["wall"], times[side]["CPU"]
        lines.append(
            f"| {side} | {statistics.median(wall):.1f} | {min(wall):.1f}-{max(wall):.1f} | {statistics.median(cpu):.1f} | "
            f"{min(cpu):.1f}-{max(cpu):.1f} | {statistics.median(steps) if steps else 'never'} | {statistics.median(finals):.4f} | "
            f"{statistics.median(r['tokens_per_s'] for r in runs[side]):,.0f} | {statistics.median(r['tokens_per_cpu_s'] for r in runs[side]):,.0f} |"
        )
    if "hf-trainer" in chosen:
        from scipy.stats import ttest_ind

        lines.append("")
        for side in chosen:
            if side == "hf-trainer":
                continue
            for clock in ("wall", "CPU"):
                hf, mine = times["hf-trainer"][clock], times[side][clock]
                ratio = statistics.median(mine) / statistics.median(hf)
                overlap = "overlap" if min(hf) <= max(mine) and min(mine) <= max(hf) else "do not overlap"
                finite = all(t != float("inf") for t in hf + mine)
                p = ttest_ind(mine, hf, equal_var=False).pvalue if finite and len(hf) > 1 else float("nan")
                lines.append(f"{side} / hf-trainer = {ratio:.2f}x {clock} time to target (ranges {overlap}; Welch's t-test p = {p:.3g})")
    print("\n".join(lines))
    if args.output:
        args.output.write_text(json.dumps({"target": target, "args": vars(args) | {"output": str(args.output)}, "runs": runs}, indent=1, default=str))


if __name__ == "__main__":
    main()
