"""Fine-tuning throughput (non-padding tokens/s) of llmkit versus the plain HF Trainer, and LoRA vs full memory.

    python benchmarks/finetune_bench.py                        # CPU defaults, a few minutes
    python benchmarks/finetune_bench.py --device cuda --hidden 1024 --layers 12 --batch 16 --steps 60

Same data (builtin:docsum/train, tokenized once with llmkit's SFT formatting and loss masks, so both
sides train on identical examples), same model (a llama built from config with a fixed seed, saved
once and loaded by every run), same micro-batch size, float32 on CPU (bf16 on CUDA). Sides:

- hf-padded:     transformers.Trainer, random sampler, DataCollatorForSeq2Seq(padding="longest"):
                 the plain HF path, padding every batch to its longest example.
- hf-grouped:    the same Trainer with train_sampling_strategy="group_by_length" (for reference: the
                 peer's own length grouping).
- llmkit-grouped: llmkit.train.fit with length-grouped micro-batches (data.group_by_length).
- llmkit-packed:  llmkit.train.fit with packed rows of data.seq_len tokens (data.packing), one row per
                 micro-batch slot, examples isolated by position ids.

Throughput counts only real (non-padding) tokens: each collate call is wrapped to record the batch's
real tokens and a timestamp; tokens/s is measured over steps [warmup, steps - 1) from those stamps,
so setup, evaluation and final saving are outside the window. Sides alternate within each repeat
and the median over repeats is reported, because the machine is shared.

Memory: each of full fine-tuning and LoRA (r=16, all linear layers) runs in its own subprocess;
the number is the growth of peak RSS (ru_maxrss) during training over the RSS after the model and
data were loaded (CPU), or torch.cuda.max_memory_allocated (CUDA).
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

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_tokenizer(out: Path, vocab_size: int) -> Path:
    """A byte-level BPE trained on the built-in pydoc corpus (a few seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from llmkit.data.sources import iter_texts

    specials = {
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "unk_token": "<|unk|>",
    }
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts("builtin:pydoc/train"), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))]
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **specials).save_pretrained(out)
    return out


def build_model(out: Path, tokenizer_dir: Path, hidden: int, layers: int, seq_len: int) -> Path:
    """A llama from config with a fixed seed, saved once so every run starts from the same weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_recipe(model_dir: Path, output_dir: Path, args, packing: bool, lora: bool = False):
    from llmkit.recipes import recipe_from_dict

    return recipe_from_dict(
        {
            "stage": "finetune",
            "output_dir": str(output_dir),
            "model": {"path": str(model_dir), "attn_implementation": "sdpa"},
            "task": {"type": "summarization"},
            "data": {
                "train": "builtin:docsum/train",
                "seq_len": args.seq_len,
                "packing": packing,
                "group_by_length": True,
                "cache_dir": str(output_dir.parent / "cache"),
            },
            "train": {
                "max_steps": args.steps,
                "micro_batch_size": args.batch,
                "lr": 1e-4,
                "schedule": "constant",
                "log_every": 1000,
                "save_every": 100000,
                "eval_every": 100000,
                "seed": 0,
                "mixed_precision": "bf16" if args.device == "cuda" else "no",
            },
            "lora": {"enabled": lora, "r": 16, "alpha": 32, "dropout": 0.0},
            "task_eval": {"samples": 0},
        }
    )


class Stamps:
    """Wraps a collate function: records (time, real tokens) per batch."""

    def __init__(self, collate):
        self.collate, self.times, self.tokens = collate, [], []

    def __call__(self, examples):
        self.times.append(time.perf_counter())
        self.tokens.append(sum(len(e["input_ids"]) for e in examples))
        return self.collate(examples)

    def tokens_per_s(self, warmup: int, steps: int) -> float:
        end = min(steps - 1, len(self.times) - 1)
        return sum(self.tokens[warmup:end]) / (self.times[end] - self.times[warmup])


def sft_examples(model_dir: Path, args):
    """Tokenized docsum examples, exactly as llmkit trains on them (shared by every side)."""
    from llmkit.data.sft import split_records, tokenize_splits
    from llmkit.stages.finetune import load_tokenizer

    recipe = make_recipe(model_dir, Path(args.work) / "unused", args, packing=False)
    tokenizer = load_tokenizer(recipe)
    train, _ = split_records(recipe)
    return tokenize_splits(recipe, tokenizer, train, []), tokenizer


def run_llmkit(model_dir: Path, sft, tokenizer, args, packing: bool, run_dir: Path) -> float:
    """tokens/s of llmkit.train.fit on the shared examples."""
    import shutil

    from llmkit.data.sft import build_train_data
    from llmkit.models import build_model as load_model
    from llmkit.models import enable_packing
    from llmkit.training.loop import fit

    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = make_recipe(model_dir, run_dir, args, packing=packing)
    model = load_model(recipe, tokenizer)
    if packing:
        assert enable_packing(model)
    data = build_train_data(recipe, sft, tokenizer, packing)
    stamps = Stamps(data.collate_fn)
    data.collate_fn = stamps
    fit(recipe, model, tokenizer, data, overwrite=True)
    return stamps.tokens_per_s(args.warmup, args.steps)


def run_hf(model_dir: Path, sft, tokenizer, args, grouped: bool, run_dir: Path) -> float:
    """tokens/s of transformers.Trainer padding each batch to its longest example."""
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    train = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in sft.train]
    stamps = Stamps(
        DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")
    )
    targs = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
        use_cpu=args.device == "cpu",
        bf16=args.device == "cuda",
        **_sampling(grouped),
    )
    Trainer(model=model, args=targs, train_dataset=train, data_collator=stamps).train()
    return stamps.tokens_per_s(args.warmup, args.steps)


def _sampling(grouped: bool) -> dict:
    """Trainer's length-grouping switch: train_sampling_strategy in recent transformers, group_by_length before."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    return {"group_by_length": grouped}


def throughput(args) -> dict:
    work = Path(args.work)
    tokenizer_dir = build_tokenizer(work / "tokenizer", args.vocab)
    model_dir = build_model(work / "model", tokenizer_dir, args.hidden, args.layers, args.seq_len)
    sft, tokenizer = sft_examples(model_dir, args)
    real = sum(len(e["input_ids"]) for e in sft.train)
    print(
        f"data: {sft.train_stats.line('train')}; mean example {real / len(sft.train):.0f} tokens", flush=True
    )
    sides = {
        "hf-padded": lambda d: run_hf(model_dir, sft, tokenizer, args, False, d),
        "hf-grouped": lambda d: run_hf(model_dir, sft, tokenizer, args, True, d),
        "llmkit-grouped": lambda d: run_llmkit(model_dir, sft, tokenizer, args, False, d),
        "llmkit-packed": lambda d: run_llmkit(model_dir, sft, tokenizer, args, True, d),
    }
    results: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]  # alternate, so drift in machine load hits every side
        for name in order:
            tps = sides[name](work / f"run-{name}")
            results[name].append(tps)
            print(f"repeat {r + 1}: {name:<15} {tps:10.0f} real tokens/s", flush=True)
    return {name: {"median": statistics.median(v), "runs": v} for name, v in results.items()}


def memory_worker(args) -> None:
    """One training run in this process; prints a JSON line with its memory growth."""
    import torch

    from llmkit.data.sft import build_train_data
    from llmkit.models import apply_lora, enable_packing, save_lora
    from llmkit.models import build_model as load_model
    from llmkit.training.loop import fit

    model_dir = Path(args.work) / "model-memory"
    sft, tokenizer = sft_examples(model_dir, args)
    recipe = make_recipe(
        model_dir,
        Path(args.work) / f"mem-{args.memory_worker}",
        args,
        packing=True,
        lora=args.memory_worker == "lora",
    )
    model = load_model(recipe, tokenizer)
    enable_packing(model)
    if recipe.lora.enabled:
        model = apply_lora(model, recipe)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = build_train_data(recipe, sft, tokenizer, packing=True)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    rss_before = _rss_bytes()
    sampler = PeakRss()
    with sampler:
        fit(
            recipe,
            model,
            tokenizer,
            data,
            save_final=(lambda m, t, d: save_lora(m, t, d, recipe.lora.merge)) if recipe.lora.enabled else None,
            overwrite=True,
        )
    if args.device == "cuda":
        growth, what = (
            torch.cuda.max_memory_allocated() - before,
            "torch.cuda.max_memory_allocated growth during fit",
        )
    else:
        growth, what = sampler.peak - rss_before, "peak RSS growth during fit (sampled every 5 ms)"
    print(
        json.dumps(
            {"mode": args.memory_worker, "trainable": trainable, "growth_bytes": growth, "measure": what}
        )
    )


class PeakRss:
    """Samples this process's RSS every 5 ms in a thread (ru_maxrss would include peaks from data loading)."""

    def __enter__(self):
        import threading

        self.peak, self.stop = _rss_bytes(), threading.Event()

        def sample():
            while not self.stop.wait(0.005):
                self.peak = max(self.peak, _rss_bytes())

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(args) -> dict:
    """Full fine-tuning vs LoRA, each in a fresh process, on a larger model (--memory-hidden/--memory-layers)."""
    work = Path(args.work)
    tokenizer_dir = (
        work / "tokenizer"
        if (work / "tokenizer").is_dir()
        else build_tokenizer(work / "tokenizer", args.vocab)
    )
    build_model(work / "model-memory", tokenizer_dir, args.memory_hidden, args.memory_layers, args.seq_len)
    out = {}
    for mode in ("full", "lora"):
        cmd = [
            sys.executable,
            __file__,
            "--memory-worker",
            mode,
            "--work",
            args.work,
            "--device",
            args.device,
            "--steps",
            str(args.memory_steps),
            "--batch",
            str(args.memory_batch),
            "--seq-len",
            str(args.memory_seq_len),
            "--vocab",
            str(args.vocab),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"memory worker {mode} failed:\n{proc.stderr[-3000:]}")
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"memory {mode}: {out[mode]['growth_bytes'] / 2**20:.0f} MiB ({out[mode]['measure']}), "
            f"{out[mode]['trainable']:,} trainable parameters",
            flush=True,
        )
    out["model"] = (
        f"llama hidden {args.memory_hidden} x {args.memory_layers} layers, {args.memory_batch} packed rows of {args.memory_seq_len}"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the throughput window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="micro-batch size (examples, or packed rows)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument(
        "--memory-hidden", type=int, default=768, help="hidden size of the memory-benchmark model"
    )
    parser.add_argument("--memory-layers", type=int, default=8)
    parser.add_argument(
        "--memory-batch", type=int, default=2, help="packed rows per micro-batch in the memory runs"
    )
    parser.add_argument("--memory-seq-len", type=int, default=512, help="row length in the memory runs")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--memory-worker", choices=["full", "lora"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        return memory_worker(args)
    if args.memory_only:
        args.work = args.work or tempfile.mkdtemp()
        Path(args.work).mkdir(parents=True, exist_ok=True)
        print(json.dumps(memory(args), indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.work = args.work or tmp
        Path(args.work).mkdir(parents=True, exist_ok=True)
        import torch

        print(
            f"device {args.device}, torch threads {torch.get_num_threads()}, model hidden {args.hidden} x {args.layers} layers, "
            f"micro-batch {args.batch}, seq_len {args.seq_len}, {args.steps} steps ({args.warmup} warmup), {args.repeats} repeats",
            flush=True,
        )
        results = {"throughput": throughput(args)}
        base = results["throughput"]["hf-padded"]["median"]
        print("\n| side | median real tokens/s | vs hf-padded |\n|---|---|---|")
        for name, r in results["throughput"].items():
            print(f"| {name} | {r['median']:,.0f} | {r['median'] / base:.2f}x |")
        if not args.skip_memory:
            results["memory"] = memory(args)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
