"""DPO: llmkit versus TRL's DPOTrainer on the same model, pairs, steps and batch; with and without precomputed reference log-probs.

    python3 -m venv /work/venv-pref && . /work/venv-pref/bin/activate
    pip install torch==2.13.0 && pip install -e . trl
    python benchmarks/dpo_bench.py                       # CPU defaults: 4 sides x 2 repeats, tens of minutes on a busy 2-core box
    python benchmarks/dpo_bench.py --steps 60 --repeats 3 --hidden 256 --layers 4

Data: built-in docstring pairs (the real summary line preferred over another function's, as
builtin:docsum-pref, with the document cut to --doc-chars so the rows stay short on a CPU), the
first --train-pairs of the train split for training and the validation split held out. Only pairs
that fit in --seq-len go in, so neither side truncates. Model: a llama built from config with a
fixed seed (vocab from a byte-level BPE trained on Python's pydoc topics, no BOS), saved once; every
run loads it. Both sides: float32 on CPU, AdamW (lr --lr, no weight decay), constant schedule, no
warmup, gradient clipping at 1.0, beta 0.1, sigmoid loss, --batch pairs per step, --steps steps.

Sides (each run is a fresh subprocess; the sides alternate within each repeat; medians):

- llmkit-cached: `llmkit finetune` with task.reference: cached (a fresh cache: the reference pass is timed)
- llmkit-live:   task.reference: live (a frozen copy of the starting model stays in memory)
- trl-precomputed: DPOTrainer(precompute_ref_log_probs=True)
- trl-live:      DPOTrainer with its default reference model (a copy of the starting model)

Measured: wall seconds from after the imports to the saved model (tokenization, reference pass,
training and saving included: what a user waits for), pair tokens/s (the real tokens of the pairs
the steps consumed, prompt counted in both rows, divided by that wall time), peak RSS of the run's
process (ru_maxrss), and the held-out preference accuracy and mean margin of the final model,
scored afterwards by one scorer for both sides (llmkit.metrics.preference, margins of log-ratios
against the starting model: the DPO reward margin / beta).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SIDES = ("llmkit-cached", "trl-precomputed", "llmkit-live", "trl-live")


# ----------------------------------------------------------------------------------------------
# Setup: tokenizer, model, pairs (once)
# ----------------------------------------------------------------------------------------------


def build_tokenizer(out: Path, vocab: int) -> None:
    """A byte-level BPE on pydoc topics with bos/eos/pad, no BOS added on encoding (both sides encode alike)."""
    import pydoc_data.topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(special.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([t for _, t in sorted(pydoc_data.topics.topics.items())], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **special).save_pretrained(out)


def build_model(out: Path, hidden: int, layers: int, seq_len: int) -> None:
    """A seeded random llama saved with the tokenizer in `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64), max_position_embeddings=seq_len,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)


def build_pairs(work: Path, args) -> dict:
    """train.jsonl / heldout.jsonl of docstring pairs that fit in seq_len under llmkit's tokenization."""
    import random

    from transformers import AutoTokenizer

    from llmkit.data.builtin import DOCSUM_PREF_TEMPLATE, docsum_records, shorten
    from llmkit.data.preference import tokenize_pair
    from llmkit.recipes import TaskSpec

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    task = TaskSpec(type="preference").model_copy(update={"prompt_template": "{prompt}"})
    stats = {}
    for split, limit, name in (("train", args.train_pairs, "train"), ("validation", None, "heldout")):
        records = [r for s, r in docsum_records() if s == split]
        summaries = sorted({r["summary"] for r in records})
        out, tokens = [], []
        for record in records:
            rng = random.Random(f"pref/{record['id']}")
            rejected = rng.choice(summaries)
            while rejected == record["summary"]:
                rejected = rng.choice(summaries)
            pair = {"prompt": DOCSUM_PREF_TEMPLATE.format(document=shorten(record["document"], args.doc_chars)),
                    "chosen": record["summary"], "rejected": rejected}
            ids = tokenize_pair(task, pair, tokenizer, args.seq_len)
            if ids is None:
                continue
            out.append(pair)
            tokens.append(2 * len(ids["prompt"]) + len(ids["chosen"]) + len(ids["rejected"]))
            if limit and len(out) == limit:
                break
        (work / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in out), encoding="utf-8")
        stats[name] = {"pairs": len(out), "mean_pair_tokens": sum(tokens) / len(tokens)}
    return stats


# ----------------------------------------------------------------------------------------------
# Workers (one per subprocess)
# ----------------------------------------------------------------------------------------------


def run_llmkit(work: Path, out: Path, reference: str, args) -> None:
    from llmkit.recipes import recipe_from_dict
    from llmkit.stages.finetune import run

    recipe = {
        "stage": "finetune", "output_dir": str(out), "model": {"path": str(work / "model")},
        "task": {"type": "preference", "loss": "dpo", "beta": 0.1, "reference": reference},
        "data": {"train": str(work / "train.jsonl"), "seq_len": args.seq_len, "cache_dir": str(out.parent / f"cache-{out.name}")},
        "train": {"max_steps": args.steps, "micro_batch_size": args.batch, "lr": args.lr, "schedule": "constant",
                  "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0, "log_every": 10, "eval_every": 10**6,
                  "save_every": 10**6, "mixed_precision": "no", "seed": 0},
    }  # fmt: skip
    run(recipe_from_dict(recipe))


def run_trl(work: Path, out: Path, precompute: bool, args) -> None:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(work / "train.jsonl"), split="train")
    config = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.1, loss_type="sigmoid", max_length=args.seq_len, precompute_ref_log_probs=precompute,
        logging_steps=10, save_strategy="no", report_to=[], seed=0, use_cpu=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(out))


def score(work: Path, model_dir: Path) -> dict:
    """Held-out accuracy and mean margin of a trained model against the starting model, as llmkit eval computes them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.data.preference import tokenize_pair
    from llmkit.metrics.preference import margins, pair_logps, preference_summary
    from llmkit.recipes import TaskSpec

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    task = TaskSpec(type="preference").model_copy(update={"prompt_template": "{prompt}"})
    records = [json.loads(line) for line in (work / "heldout.jsonl").read_text().splitlines()]
    pairs = [tokenize_pair(task, r, tokenizer, 10**6) for r in records]
    start = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    tuned = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = pair_logps(start, pairs, tokenizer.pad_token_id)
    policy = pair_logps(tuned, pairs, tokenizer.pad_token_id)
    return preference_summary(margins(policy, ref))


def worker(args) -> None:
    """One side, one repeat: train, then print a JSON line with wall time and peak RSS."""
    work, out = Path(args.work), Path(args.out)
    import torch  # noqa: F401  (imports are outside the clock on both sides)
    import transformers  # noqa: F401

    if args.worker.startswith("trl"):
        import trl  # noqa: F401
    else:
        import llmkit.stages.finetune  # noqa: F401
    started = time.perf_counter()
    if args.worker == "llmkit-cached":
        run_llmkit(work, out, "cached", args)
    elif args.worker == "llmkit-live":
        run_llmkit(work, out, "live", args)
    else:
        run_trl(work, out, args.worker == "trl-precomputed", args)
    wall = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"wall_s": wall, "peak_rss_mb": peak_mb}), flush=True)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/_work/dpo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seq-len", type=int, default=192)
    parser.add_argument("--doc-chars", type=int, default=240)
    parser.add_argument("--train-pairs", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--worker", choices=SIDES)
    parser.add_argument("--score")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    work = Path(args.work).resolve()
    if args.score:
        print("RESULT " + json.dumps(score(work, Path(args.score))), flush=True)
        return

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model" / "config.json").is_file():
        build_tokenizer(work / "model", args.vocab)
        build_model(work / "model", args.hidden, args.layers, args.seq_len)
    data = build_pairs(work, args)
    print(f"pairs: {json.dumps(data)}", flush=True)
    tokens = args.steps * args.batch * data["train"]["mean_pair_tokens"]
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k in ("steps", "batch", "lr", "seq_len", "doc_chars", "train_pairs")]  # fmt: skip
    sides = args.sides.split(",")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for repeat in range(args.repeats):
        order = sides[repeat % len(sides):] + sides[: repeat % len(sides)]  # rotate who goes first
        for side in order:
            out = work / "runs" / f"{side}-{repeat}"
            subprocess.run(["rm", "-rf", str(out), str(out.parent / f"cache-{out.name}")], check=True)
            load = load_average()
            done = subprocess.run([sys.executable, __file__, f"--worker={side}", f"--work={work}", f"--out={out}", *passthrough],
                                  capture_output=True, text=True)  # fmt: skip
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{side} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            result = json.loads(line[7:])
            scored = subprocess.run([sys.executable, __file__, f"--work={work}", f"--score={out}"], capture_output=True, text=True)
            sline = next((x for x in scored.stdout.splitlines() if x.startswith("RESULT ")), None)
            if sline is None:
                sys.exit(f"scoring {side} failed:\n{scored.stderr[-3000:]}")
            result.update(json.loads(sline[7:]), load=load, tokens_per_s=tokens / result["wall_s"])
            results[side].append(result)
            print(f"{side} #{repeat}: " + json.dumps(result), flush=True)

    print(f"\n{args.steps} steps x {args.batch} pairs, {data['train']['pairs']} training pairs "
          f"(mean {data['train']['mean_pair_tokens']:.0f} tokens per pair), {data['heldout']['pairs']} held-out pairs; medians of {args.repeats}")
    print("| side | wall s | pair tokens/s | peak RSS MB | held-out accuracy | held-out margin |")
    print("|---|---:|---:|---:|---:|---:|")
    for side in sides:
        rows = results[side]
        med = {k: statistics.median(r[k] for r in rows) for k in ("wall_s", "tokens_per_s", "peak_rss_mb", "preference_accuracy", "preference_margin")}
        print(f"| {side} | {med['wall_s']:.1f} | {med['tokens_per_s']:.0f} | {med['peak_rss_mb']:.0f} | "
              f"{med['preference_accuracy']:.3f} | {med['preference_margin']:.3f} |")
    (work / "results.json").write_text(json.dumps({"args": vars(args), "data": data, "results": results}, indent=1))


if __name__ == "__main__":
    main()
