"""Pretraining throughput of llmkit versus the plain HF Trainer path, bf16 versus fp32, and MFU.

    python benchmarks/pretrain_bench.py                       # CPU defaults: 2-layer llama, 8 x 256 tokens a step
    python benchmarks/pretrain_bench.py --repeats 5 --steps 40 --mfu-hidden 1024 --mfu-layers 4

Sides, each run in its own subprocess, alternating within every repeat (the machine is shared, so
medians over repeats are reported):

- hf-trainer:   what a user would otherwise write, following transformers' run_clm example:
                datasets.load_dataset("json") -> map(tokenize) -> map(concatenate-and-chunk into seq_len
                blocks) -> transformers.Trainer with default_data_collator (fp32, AdamW fused, as the
                Trainer defaults).
- llmkit-fp32:  `llmkit pretrain` on the same jsonl file, same model config, seed, batch, seq_len and
                steps (data prepared by llmkit's cache; AdamW fused).
- llmkit-bf16:  the same with train.mixed_precision=bf16 (autocast on the CPU).
- llmkit-fp32-unchunked: llmkit-fp32 with train.chunked_loss=false (full logits, as before the chunked loss).
- llmkit-fp32-muon: llmkit-fp32 with train.optimizer=muon (what Muon's Newton-Schulz steps cost per step).

Both sides build the model with AutoModelForCausalLM.from_config from the same config, float32
weights, sdpa attention. Tokens/s is measured in steady state over steps [warmup, steps): from the
time stamps llmkit writes in metrics.jsonl (log_every 1), and from a TrainerCallback on_step_end for
the Trainer, so data preparation, model building and saving are outside the window: tokens per
step / the median step time of the run. Every step of both sides processes micro_batch x seq_len
tokens.

MFU = FLOPs per token (6N + 12 * layers * hidden * seq_len, as llmkit prints) x tokens/s divided by
the machine's matmul peak, measured here as the best fp32 square-matmul rate over several sizes and
repeats (before and after the runs). litgpt (the ~1.2x reference) is not installed here and is not
compared.
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


# ----------------------------------------------------------------------------------------------
# Shared setup
# ----------------------------------------------------------------------------------------------



def run_clm_group_texts(block: int):
    """run_clm's group_texts: concatenate a batch's documents, cut into `block`-token blocks (the tail is dropped), labels = input_ids."""

    def group_texts(examples):
        concatenated = {k: sum(examples[k], []) for k in examples}
        total = (len(concatenated["input_ids"]) // block) * block
        result = {k: [t[i : i + block] for i in range(0, total, block)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    return group_texts

def build_fixtures(root: Path, vocab: int) -> tuple[Path, Path]:
    """A jsonl corpus of builtin:pydoc/train and a byte-level BPE tokenizer trained on it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from llmkit.data.sources import iter_texts

    texts = list(iter_texts("builtin:pydoc/train"))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    special = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=list(special.values()), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])
    out = root / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **special).save_pretrained(out)
    return corpus, out


def model_overrides(args) -> dict:
    """The llama config fields shared by both sides."""
    return {
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 3,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden // 64),
        "num_key_value_heads": max(1, args.hidden // 64),
        "max_position_embeddings": max(args.seq_len, 256),
        "tie_word_embeddings": True,
    }


def measure_peak(threads: int, seconds: float = 6.0) -> float:
    """Best fp32 matmul FLOP/s over sizes and repeats: the machine's measured peak."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    deadline = time.time() + seconds
    while time.time() < deadline:
        for n in (512, 768, 1024, 1536, 2048):
            a, b = torch.randn(n, n), torch.randn(n, n)
            a @ b
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


# ----------------------------------------------------------------------------------------------
# Workers (run in subprocesses)
# ----------------------------------------------------------------------------------------------


def steady_rate(stamps: list[float], tokens_per_step: int, warmup: int) -> float:
    """Tokens/s from the median step time after `warmup` steps.

    The median rather than the mean: on a shared machine a neighbour's burst slows a stretch of
    steps, and the median step is the closest to what this side itself costs.
    """
    deltas = [b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True)]
    return tokens_per_step / statistics.median(deltas)


def worker_llmkit(cfg: dict) -> dict:
    """Run `llmkit pretrain` in-process and return its steady-state tokens/s and MFU."""
    from llmkit.recipes import recipe_from_dict
    from llmkit.stages.pretrain import run as pretrain

    out = Path(cfg["workdir"]) / f"llmkit-{cfg['precision']}-{os.getpid()}"
    recipe = {
        "stage": "pretrain",
        "output_dir": str(out),
        "tokenizer": cfg["tokenizer"],
        "model": {"type": "llama", **cfg["model"]},
        "data": {"train": [cfg["corpus"]], "seq_len": cfg["seq_len"], "cache_dir": cfg["cache"]},
        "train": {
            "max_steps": cfg["steps"], "micro_batch_size": cfg["batch"], "lr": 3e-4, "warmup_steps": 0,
            "schedule": "linear", "save_every": 10**6, "eval_every": 10**6, "log_every": 1,
            "mixed_precision": cfg["precision"], "seed": 1234, "compile": cfg.get("compile", False),
            "chunked_loss": cfg.get("chunked_loss", True), "optimizer": cfg.get("optimizer", "adamw"),
        },
    }
    summary = pretrain(recipe_from_dict(recipe, stage="pretrain"))
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stamps = [e["time"] for e in events if e["event"] == "train"]
    rate = steady_rate(stamps, cfg["batch"] * cfg["seq_len"], cfg["warmup"])
    return {"tokens_per_s": rate, "flops_per_token": summary["flops_per_token"], "final_loss": events[-1].get("loss")}


def worker_hf(cfg: dict) -> dict:
    """The run_clm path: datasets.map tokenize + group, Trainer with default_data_collator."""
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    tokenizer = AutoTokenizer.from_pretrained(cfg["tokenizer"])
    raw = load_dataset("json", data_files=cfg["corpus"], split="train", cache_dir=str(Path(cfg["workdir"]) / f"hf-cache-{os.getpid()}"))
    tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    block = cfg["seq_len"]

    blocks = tokenized.map(run_clm_group_texts(block), batched=True)
    config = AutoConfig.for_model("llama", vocab_size=64 * -(-len(tokenizer) // 64), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfg["model"])
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.time())

    args = TrainingArguments(
        output_dir=str(Path(cfg["workdir"]) / f"hf-out-{os.getpid()}"), per_device_train_batch_size=cfg["batch"],
        max_steps=cfg["steps"], learning_rate=3e-4, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.1,
        logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=1234,
        bf16=cfg["precision"] == "bf16", dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator, callbacks=[Stamp()]).train()
    return {"tokens_per_s": steady_rate(stamps, cfg["batch"] * cfg["seq_len"], cfg["warmup"])}


def run_worker(side: str, cfg: dict, threads: int) -> dict:
    """Run one side in a fresh subprocess and parse its JSON result line."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", LLMKIT_PEAK_FLOPS="1e12", TOKENIZERS_PARALLELISM="true")
    proc = subprocess.run([sys.executable, str(HERE), "--worker", side, "--worker-config", json.dumps(cfg)],
                          env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="Steps excluded from the steady-state window.")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    # One thread by default: on a machine shared with other jobs, OpenMP threads spin-wait for each
    # other and 2 threads ran ~3x slower than 1 here. Use --threads N on a dedicated machine.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sides", default="hf-trainer,llmkit-fp32,llmkit-bf16,llmkit-fp32-compile")
    parser.add_argument("--mfu-hidden", type=int, default=1024, help="A larger model for the MFU measurement (0 skips it).")
    parser.add_argument("--mfu-layers", type=int, default=2)
    parser.add_argument("--mfu-steps", type=int, default=12)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        cfg = json.loads(args.worker_config)
        result = {"hf": worker_hf, "llmkit": worker_llmkit}[args.worker](cfg)
        print(json.dumps(result))
        return

    workdir = Path(tempfile.mkdtemp(prefix="pretrain-bench-"))
    corpus, tokenizer = build_fixtures(workdir, args.vocab)
    base = {
        "workdir": str(workdir), "corpus": str(corpus), "tokenizer": str(tokenizer), "cache": str(workdir / "llmkit-cache"),
        "model": model_overrides(args), "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
    }
    sides = {
        "hf-trainer": ("hf", {**base, "precision": "no"}),
        "llmkit-fp32": ("llmkit", {**base, "precision": "no"}),
        "llmkit-bf16": ("llmkit", {**base, "precision": "bf16"}),
        "llmkit-fp32-compile": ("llmkit", {**base, "precision": "no", "compile": True}),
        "llmkit-fp32-unchunked": ("llmkit", {**base, "precision": "no", "chunked_loss": False}),
        "llmkit-fp32-muon": ("llmkit", {**base, "precision": "no", "optimizer": "muon"}),
    }
    chosen = [s for s in args.sides.split(",") if s]
    peak_before = measure_peak(args.threads)
    results: dict[str, list[dict]] = {s: [] for s in chosen}
    for repeat in range(args.repeats):
        order = chosen if repeat % 2 == 0 else list(reversed(chosen))
        for side in order:
            kind, cfg = sides[side]
            results[side].append(run_worker(kind, cfg, args.threads))
            print(f"repeat {repeat + 1} {side}: {results[side][-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)

    mfu_runs = []
    if args.mfu_hidden:
        big = {**base, "precision": "no", "steps": args.mfu_steps, "warmup": min(args.warmup, args.mfu_steps // 3), "model": model_overrides(argparse.Namespace(hidden=args.mfu_hidden, layers=args.mfu_layers, seq_len=args.seq_len))}
        for _ in range(args.repeats):
            mfu_runs.append(run_worker("llmkit", big, args.threads))
    peak = max(peak_before, measure_peak(args.threads))

    def med(side: str) -> float:
        return statistics.median(r["tokens_per_s"] for r in results[side])

    fpt = next((r["flops_per_token"] for s in chosen if s.startswith("llmkit") for r in results[s]), None)
    lines = [
        f"machine: {os.cpu_count()} CPUs, {args.threads} thread(s) used; measured fp32 matmul peak at that thread count {peak / 1e9:.0f} GFLOP/s",
        f"model: llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; {args.batch} x {args.seq_len} tokens a step; "
        f"{args.steps} steps (window from step {args.warmup}); {args.repeats} alternating repeats, medians",
    ]
    for side in chosen:
        rates = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in results[side])
        mfu = f"; MFU {fpt * med(side) / peak:.1%}" if fpt else ""
        lines.append(f"{side:12s} {med(side):>10,.0f} tokens/s  (runs: {rates}){mfu}")
    if "hf-trainer" in chosen and "llmkit-fp32" in chosen:
        lines.append(f"llmkit-fp32 / hf-trainer = {med('llmkit-fp32') / med('hf-trainer'):.2f}x")
    if "llmkit-fp32-compile" in chosen and "hf-trainer" in chosen:
        lines.append(f"llmkit-fp32-compile / hf-trainer = {med('llmkit-fp32-compile') / med('hf-trainer'):.2f}x")
    if "llmkit-fp32-muon" in chosen and "hf-trainer" in chosen:
        lines.append(f"llmkit-fp32-muon / hf-trainer = {med('llmkit-fp32-muon') / med('hf-trainer'):.2f}x")
    if "llmkit-fp32-unchunked" in chosen and "hf-trainer" in chosen:
        lines.append(f"llmkit-fp32-unchunked / hf-trainer = {med('llmkit-fp32-unchunked') / med('hf-trainer'):.2f}x")
    if "llmkit-bf16" in chosen and "llmkit-fp32" in chosen:
        lines.append(f"llmkit bf16 / fp32 = {med('llmkit-bf16') / med('llmkit-fp32'):.2f}x")
    if mfu_runs:
        rate = statistics.median(r["tokens_per_s"] for r in mfu_runs)
        big_fpt = mfu_runs[0]["flops_per_token"]
        runs = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in mfu_runs)
        lines.append(
            f"MFU model: llama {args.mfu_layers} layers, hidden {args.mfu_hidden}: {rate:,.0f} tokens/s x {big_fpt / 1e6:.1f} MFLOP/token "
            f"= {big_fpt * rate / 1e9:.0f} GFLOP/s = MFU {big_fpt * rate / peak:.1%} (runs: {runs})"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
