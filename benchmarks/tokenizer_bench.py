"""Tokenizer training speed: `llmkit tokenizer train` vs `tokenizers` called directly vs sentencepiece BPE.

    python benchmarks/tokenizer_bench.py --repeats 3 --vocab-size 32000 --min-mb 20

1. Builds a corpus of at least --min-mb MB under benchmarks/_work/tokenizer-corpus/ from text every
   Python install carries (the pydoc topics, then the standard library's .py files), cut into
   newline-aligned shards of under 1 MB (so llmkit reads each shard as exactly one document, the
   same documents the direct run gets), plus one held-out shard for llmkit's report.
2. Times, in a fresh subprocess each (imports not timed), alternating the order every repeat:
   - llmkit: `llmkit.tokenizer.train_tokenizer` end to end (stream, train, save, report);
   - tokenizers: the same byte-level BPE settings through `Tokenizer.train_from_iterator`, then save;
   - sentencepiece: `SentencePieceTrainer.train(model_type="bpe")` at the same vocab size.
3. Prints medians and a markdown table; raw timings go to benchmarks/_work/tokenizer_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

WORK = Path(__file__).resolve().parent / "_work"
CORPUS = WORK / "tokenizer-corpus"
SHARD_CHARS = 1_000_000  # under llmkit's 1 MB (2**20 characters) document size: one shard = one document
SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"]


def build_corpus(min_mb: float) -> dict:
    """Write train shards (>= min_mb MB) and one validation shard; reuse them when already there."""
    meta_file = CORPUS / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta["min_mb"] == min_mb:  # reused as is, also when copied to another machine to compare on it
            return meta
    from pydoc_data.topics import topics

    def texts():
        yield from (topics[k] for k in sorted(topics))
        root = Path(sysconfig.get_paths()["stdlib"])
        for path in sorted(root.rglob("*.py")):
            if "site-packages" not in path.parts:
                yield path.read_bytes().decode("utf-8", errors="replace")

    (CORPUS / "train").mkdir(parents=True, exist_ok=True)
    for old in (CORPUS / "train").glob("*.txt"):
        old.unlink()
    shards, buffer, size = [], [], 0
    target = int(min_mb * 1e6)
    total = 0

    def flush():
        nonlocal buffer, size, total
        text = "".join(buffer)
        path = CORPUS / "train" / f"shard-{len(shards):04d}.txt" if total < target else CORPUS / "validation.txt"
        path.write_text(text, encoding="utf-8")
        total += len(text.encode("utf-8")) if path.parent.name == "train" else 0
        shards.append(path)
        buffer, size = [], 0

    for text in texts():
        for line in text.splitlines(keepends=True):
            if size + len(line) > SHARD_CHARS and buffer:
                flush()
                if shards[-1].name == "validation.txt":
                    break
            buffer.append(line[:SHARD_CHARS])
            size += len(line[:SHARD_CHARS])
        if shards and shards[-1].name == "validation.txt":
            break
    if not (CORPUS / "validation.txt").is_file() or shards[-1].name != "validation.txt":
        sys.exit(f"the standard library holds less than {min_mb} MB of text here; lower --min-mb")
    meta = {"min_mb": min_mb, "python": platform.python_version(), "train_bytes": total, "train_files": len(shards) - 1}
    meta_file.write_text(json.dumps(meta))
    return meta


# --------------------------------------------------------------------------------------------
# One timed run per subprocess
# --------------------------------------------------------------------------------------------


def run_llmkit(vocab_size: int) -> dict:
    from llmkit.recipes import recipe_from_dict
    from llmkit.stages.tokenizer import run as train_tokenizer

    recipe = recipe_from_dict(
        {
            "stage": "tokenizer",
            "output_dir": str(WORK / "tok-llmkit"),
            "data": {"train": [str(CORPUS / "train" / "*.txt")], "validation": [str(CORPUS / "validation.txt")]},
            "tokenizer": {"type": "bpe", "vocab_size": vocab_size, "min_frequency": 2, "normalization": "none",
                          "add_bos": True},
        }
    )
    start = time.perf_counter()
    report = train_tokenizer(recipe, overwrite=True)
    return {"seconds": time.perf_counter() - start, "training_seconds": report["training_seconds"],
            "vocab_size": report["vocab_size"], "docs": report["train_docs"]}


def run_tokenizers(vocab_size: int) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    def documents():
        for path in sorted((CORPUS / "train").glob("*.txt")):
            yield path.read_text(encoding="utf-8")

    start = time.perf_counter()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents(), trainer=trainer)
    training_seconds = time.perf_counter() - start
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)]),
    ])
    out = WORK / "tok-tokenizers"
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    return {"seconds": time.perf_counter() - start, "training_seconds": training_seconds,
            "vocab_size": tokenizer.get_vocab_size()}


def run_sentencepiece(vocab_size: int) -> dict:
    import sentencepiece as spm

    out = WORK / "tok-sentencepiece"
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p) for p in (CORPUS / "train").glob("*.txt"))
    start = time.perf_counter()
    spm.SentencePieceTrainer.train(
        input=files, model_prefix=str(out / "spm"), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, num_threads=os.cpu_count() or 1,
        max_sentence_length=1 << 16, user_defined_symbols=SPECIAL[:3], unk_piece=SPECIAL[3],
        bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2,
    )
    return {"seconds": time.perf_counter() - start, "vocab_size": vocab_size}


RUNNERS = {"llmkit": run_llmkit, "tokenizers": run_tokenizers, "sentencepiece": run_sentencepiece}


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: less sensitive than wall time to other load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(side: str, vocab_size: int) -> dict:
    """Run one side, adding the CPU seconds spent inside it (imports done before the clock starts)."""
    import importlib

    modules = {"llmkit": ["transformers.tokenization_utils_tokenizers", "llmkit.tokenizer"],
               "tokenizers": ["tokenizers"], "sentencepiece": ["sentencepiece"]}[side]
    for name in modules:
        importlib.import_module(name)
    cpu_before = cpu_seconds()
    result = RUNNERS[side](vocab_size)
    result["cpu_seconds"] = cpu_seconds() - cpu_before
    return result


def same_merges() -> bool:
    """Whether llmkit and the direct tokenizers run learned the very same vocabulary and merges."""
    a = json.loads((WORK / "tok-llmkit" / "tokenizer.json").read_text())["model"]
    b = json.loads((WORK / "tok-tokenizers" / "tokenizer.json").read_text())["model"]
    return a["vocab"] == b["vocab"] and a["merges"] == b["merges"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--min-mb", type=float, default=20.0)
    parser.add_argument("--sides", default="llmkit,tokenizers,sentencepiece")
    parser.add_argument("--one", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(timed(args.one, args.vocab_size)))
        return

    meta = build_corpus(args.min_mb)
    print(f"corpus: {meta['train_bytes'] / 1e6:.1f} MB in {meta['train_files']} shards under {CORPUS}", flush=True)
    sides = args.sides.split(",")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    for repeat in range(args.repeats):
        order = sides[repeat % len(sides):] + sides[: repeat % len(sides)]  # rotate who goes first
        for side in order:
            cmd = [sys.executable, __file__, "--one", side, "--vocab-size", str(args.vocab_size)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[side].append(result)
            print(f"repeat {repeat + 1} {side:<14} {result['seconds']:8.2f} s wall {result['cpu_seconds']:8.2f} s CPU", flush=True)

    medians = {s: statistics.median(r["seconds"] for r in results[s]) for s in sides}
    cpu_medians = {s: statistics.median(r["cpu_seconds"] for r in results[s]) for s in sides}
    summary = {"corpus": meta, "vocab_size": args.vocab_size, "repeats": args.repeats, "cpus": os.cpu_count(),
               "medians_s": medians, "cpu_medians_s": cpu_medians, "runs": results}
    if "llmkit" in sides and "tokenizers" in sides:
        summary["identical_vocab_and_merges"] = same_merges()
        summary["training_seconds_medians"] = {
            side: statistics.median(r["training_seconds"] for r in results[side]) for side in ("llmkit", "tokenizers")
        }
    (WORK / "tokenizer_bench.json").write_text(json.dumps(summary, indent=2))
    print("\n| side | median wall s | wall runs (s) | wall vs tokenizers | median CPU s | CPU vs tokenizers |")
    print("|---|---|---|---|---|---|")
    base, cpu_base = medians.get("tokenizers"), cpu_medians.get("tokenizers")
    for side in sides:
        runs = ", ".join(f"{r['seconds']:.1f}" for r in results[side])
        ratio = f"{medians[side] / base:.3f}x" if base else "-"
        cpu_ratio = f"{cpu_medians[side] / cpu_base:.3f}x" if cpu_base else "-"
        print(f"| {side} | {medians[side]:.2f} | {runs} | {ratio} | {cpu_medians[side]:.2f} | {cpu_ratio} |")
    if "identical_vocab_and_merges" in summary:
        print(f"\nllmkit and tokenizers learned identical vocab and merges: {summary['identical_vocab_and_merges']}")
        train = summary["training_seconds_medians"]
        print(f"train_from_iterator only (stream + train, no save/report), median s: llmkit {train['llmkit']:.2f}, "
              f"tokenizers {train['tokenizers']:.2f} ({train['llmkit'] / train['tokenizers']:.3f}x)")


if __name__ == "__main__":
    main()
