"""Data preparation throughput (tokenize + pack) of llmkit versus the run_clm path, and tokens dropped.

    python benchmarks/data_bench.py                   # pydoc corpus x 3 (~7 MB), seq_len 256, 3 repeats
    python benchmarks/data_bench.py --copies 10 --seq-len 1024 --repeats 5

Sides, each in a fresh subprocess with a fresh cache directory, alternating within every repeat:

- hf-run_clm: what transformers' run_clm example does: datasets.load_dataset("json") (writes Arrow),
              map(tokenize, batched=True), then map(group_texts, batched=True) concatenating each
              batch of 1000 documents and cutting it into seq_len blocks (the remainder of every
              batch is dropped; no EOS is put between documents).
- llmkit:     llmkit.data.prepare_cache + PackedBlocks: stream the jsonl, tokenize in batches with
              the Rust tokenizer, append ids (with EOS after every document) to a flat uint16 file,
              pack as a view; only the final partial block is left out.

Both use the same fast tokenizer (byte-level BPE, vocab 4096, BOS added) and the same texts; the
timer covers reading the file to having the packed blocks. Throughput is tokens produced by the
tokenizer per second (each side's own count; llmkit's includes one EOS per document). Dropped = tokens
tokenized but in no block.
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
from pretrain_bench import run_clm_group_texts  # noqa: E402  (the run_clm path the Trainer peers share)


def worker_llmkit(cfg: dict) -> dict:
    """Tokenize and pack with llmkit's cache; report time and counts."""
    from llmkit.data.lm import open_cache, prepare_cache
    from llmkit.data.packing import PackedBlocks
    from llmkit.models import load_tokenizer
    from llmkit.recipes import recipe_from_dict

    recipe = recipe_from_dict(
        {
            "stage": "pretrain", "output_dir": str(Path(cfg["workdir"]) / "unused"), "tokenizer": cfg["tokenizer"],
            "model": {"type": "llama"}, "data": {"train": [cfg["corpus"]], "seq_len": cfg["seq_len"], "cache_dir": cfg["cache"]},
            "train": {"max_steps": 1},
        },
        stage="pretrain",
    )
    tokenizer = load_tokenizer(cfg["tokenizer"])
    start = time.perf_counter()
    path = prepare_cache(recipe, tokenizer)
    tokens, docs = open_cache(path, "train")
    stats = PackedBlocks(tokens, docs, cfg["seq_len"], positions=False).stats()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": stats.tokens, "documents": stats.documents, "blocks": stats.blocks, "dropped": stats.dropped_tokens}


def worker_hf(cfg: dict) -> dict:
    """run_clm: load_dataset json -> map(tokenize) -> map(group_texts)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg["tokenizer"])
    block = cfg["seq_len"]
    start = time.perf_counter()
    raw = load_dataset("json", data_files=cfg["corpus"], split="train", cache_dir=cfg["cache"])
    tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])

    blocks = tokenized.map(run_clm_group_texts(block), batched=True)
    seconds = time.perf_counter() - start
    total = sum(len(ids) for ids in tokenized["input_ids"])
    return {"seconds": seconds, "tokens": total, "documents": len(raw), "blocks": len(blocks), "dropped": total - len(blocks) * block}


def run_worker(side: str, cfg: dict) -> dict:
    """One side in a fresh subprocess."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="true")
    proc = subprocess.run([sys.executable, str(HERE), "--worker", side, "--worker-config", json.dumps(cfg)],
                          env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=3, help="Times the pydoc corpus is repeated in the jsonl.")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"hf": worker_hf, "llmkit": worker_llmkit}[args.worker](json.loads(args.worker_config))))
        return

    from pretrain_bench import build_fixtures

    workdir = Path(tempfile.mkdtemp(prefix="data-bench-"))
    corpus, tokenizer = build_fixtures(workdir, args.vocab)
    lines = corpus.read_text(encoding="utf-8")
    corpus.write_text(lines * args.copies, encoding="utf-8")
    size_mb = corpus.stat().st_size / 1e6
    results: dict[str, list[dict]] = {"hf-run_clm": [], "llmkit": []}
    for repeat in range(args.repeats):
        order = ["hf-run_clm", "llmkit"] if repeat % 2 == 0 else ["llmkit", "hf-run_clm"]
        for side in order:
            cfg = {"workdir": str(workdir), "corpus": str(corpus), "tokenizer": str(tokenizer), "seq_len": args.seq_len,
                   "cache": str(workdir / f"cache-{side}-{repeat}")}
            results[side].append(run_worker("hf" if side.startswith("hf") else "llmkit", cfg))
            r = results[side][-1]
            print(f"repeat {repeat + 1} {side}: {r['seconds']:.2f}s, {r['tokens'] / r['seconds']:,.0f} tokens/s", file=sys.stderr)

    def rate(side: str) -> float:
        return statistics.median(r["tokens"] / r["seconds"] for r in results[side])

    out = [f"corpus: {size_mb:.1f} MB jsonl ({results['llmkit'][0]['documents']:,} documents), seq_len {args.seq_len}, "
           f"{args.repeats} alternating repeats, medians; CPUs: {os.cpu_count()}"]
    for side, rs in results.items():
        r = rs[0]
        out.append(
            f"{side:11s} {rate(side):>12,.0f} tokens/s  median {statistics.median(x['seconds'] for x in rs):.2f}s  "
            f"tokens {r['tokens']:,}  blocks {r['blocks']:,}  dropped {r['dropped']:,}"
        )
    out.append(f"llmkit / hf-run_clm = {rate('llmkit') / rate('hf-run_clm'):.2f}x tokens/s")
    print("\n".join(out))


if __name__ == "__main__":
    main()
