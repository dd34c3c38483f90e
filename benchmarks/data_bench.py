"""Data preparation at scale: wall time, peak memory and cache size of `llmkit data prepare` versus run_clm's path.

    python benchmarks/data_bench.py                             # 0.05, 0.5 and 2 GB corpora, 1 run each
    python benchmarks/data_bench.py --sizes 0.05,0.5 --repeats 3
    python benchmarks/data_bench.py --sizes 0.05 --before /tmp/llmkit-old   # also an older llmkit checkout
    python benchmarks/data_bench.py --corpus big-records.jsonl --corpus book.txt --sides llmkit   # your own files

Corpus: JSONL built from text already on the machine, nothing downloaded: Python sources of the
standard library and of the installed packages, /usr/share/doc files and man pages (decompressed),
one record per file (so document sizes vary from a few bytes to megabytes, as on real corpora),
cycled until the corpus reaches each size, with one ~4 MB record (texts joined, a book-length
document) after every ~12 MB. Tokenizer: byte-level BPE, vocab 4096, BOS added,
trained on builtin:pydoc (benchmarks/pretrain_bench.py build_fixtures).

Sides, each a fresh process with a fresh cache directory, measured with /usr/bin/time (wall time
and peak resident memory), alternating within every repeat:

- llmkit:    `python -m llmkit data prepare RECIPE` (stream, tokenize, write the flat token file).
- llmkit-2proc: the same under `torchrun --nproc_per_node 2` (each process tokenizes every other chunk,
             one entry at the end; peak RSS is the larger process's).
- before:    the same command with an older llmkit checkout first on PYTHONPATH (--before DIR).
- hf-map:    transformers' run_clm path: datasets.load_dataset("json") (writes Arrow),
             map(tokenize, batched=True), map(group_texts, batched=True).

Cache size is the bytes on disk of each side's cache directory after it finished.
"""

from __future__ import annotations

import argparse
import gzip
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

TEXT_ROOTS = [Path(sys.base_prefix) / "lib", Path(sys.prefix) / "lib", Path("/usr/lib/python3"),
              Path("/usr/share/doc"), Path("/usr/share/man")]
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".html", ".c", ".h", ".pl", ".1", ".3", ".5", ".7", ".8"}


def local_texts(limit_bytes: int) -> list[str]:
    """Distinct texts found on this machine (source files, docs, man pages), up to `limit_bytes` in all."""
    seen: set[Path] = set()
    texts, total = [], 0
    roots = [Path(__file__).resolve().parents[1] / "llmkit"] + [r for r in TEXT_ROOTS if r.is_dir()]
    for root in roots:
        for path in sorted(root.rglob("*")):
            name = path.name[:-3] if path.name.endswith(".gz") else path.name
            if Path(name).suffix not in TEXT_SUFFIXES or not path.is_file() or path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                raw = gzip.open(path).read() if path.name.endswith(".gz") else path.read_bytes()
                text = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError, EOFError):
                continue
            if text.strip():
                texts.append(text)
                total += len(raw)
                if total >= limit_bytes:
                    return texts
    return texts


LONG_DOC_BYTES = 4_000_000
LONG_DOC_EVERY = 12_000_000
"""One record of ~4 MB (a book-length document, texts joined) after every ~12 MB of file-sized records."""


def build_corpus(path: Path, size_bytes: int, texts: list[str]) -> int:
    """Write a JSONL corpus of about `size_bytes` cycling through `texts`: one record per text, plus long records."""
    written = docs = since_long = 0
    with path.open("w", encoding="utf-8") as out:
        while written < size_bytes:
            for i, text in enumerate(texts):
                if since_long >= LONG_DOC_EVERY:
                    parts, length, j = [], 0, i
                    while length < LONG_DOC_BYTES:
                        parts.append(texts[j % len(texts)])
                        length += len(parts[-1])
                        j += 1
                    text, since_long = "\n\n".join(parts), 0
                line = json.dumps({"text": text}) + "\n"
                out.write(line)
                written += len(line.encode("utf-8"))
                since_long += len(line)
                docs += 1
                if written >= size_bytes:
                    break
    return docs


def worker_hf(cfg: dict) -> dict:
    """run_clm: load_dataset json -> map(tokenize) -> map(group_texts)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg["tokenizer"])
    raw = load_dataset("json", data_files=cfg["corpus"], split="train", cache_dir=cfg["cache"])
    tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    blocks = tokenized.map(run_clm_group_texts(cfg["seq_len"]), batched=True)
    return {"documents": len(raw), "blocks": len(blocks)}


def du(path: Path) -> int:
    """Bytes on disk below `path`."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def measure(side: str, cfg: dict, workdir: Path, before: str | None) -> dict:
    """Run one side in a fresh process under /usr/bin/time; wall seconds, peak RSS and cache bytes."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="true")
    cache = Path(cfg["cache"])
    if side == "hf-map":
        cmd = [sys.executable, str(HERE), "--worker", "hf", "--worker-config", json.dumps(cfg)]
    else:
        recipe = workdir / f"recipe-{side}.yaml"
        recipe.write_text(json.dumps({
            "stage": "pretrain", "output_dir": str(workdir / "unused"), "tokenizer": cfg["tokenizer"],
            "model": {"type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 4},
            "data": {"train": [cfg["corpus"]], "seq_len": cfg["seq_len"], "cache_dir": str(cache), "validation_fraction": 0.0},
            "train": {"max_steps": 1},
        }), encoding="utf-8")
        cmd = [sys.executable, "-m", "llmkit", "data", "prepare", str(recipe)]
        if side == "llmkit-2proc":  # two processes of one launch, each tokenizing every other chunk
            cmd[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "-m"]
        # This checkout's llmkit, or the older one, first on the path (not whatever is installed).
        checkout = before if side == "before" else str(HERE.parent.parent)
        env["PYTHONPATH"] = checkout + os.pathsep + env.get("PYTHONPATH", "")
    timing = workdir / "time.txt"
    # cwd=workdir: `python -m` puts the working directory first on sys.path, which would shadow --before.
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(timing), *cmd], env=env, capture_output=True, text=True,
                          cwd=workdir)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
    seconds, peak_kb = timing.read_text().split()[-2:]
    return {"seconds": float(seconds), "peak_rss_mb": int(peak_kb) / 1024, "cache_mb": du(cache) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.05,0.5,2", help="Corpus sizes in GB, comma-separated.")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--sides", default="llmkit,hf-map", help="Which of llmkit, llmkit-2proc, before, hf-map to run.")
    parser.add_argument("--before", help="An older llmkit checkout (adds the 'before' side).")
    parser.add_argument("--workdir", help="Keep corpora and tokenizer here (reused across invocations).")
    parser.add_argument("--corpus", action="append", help="Benchmark this file (.jsonl or .txt) instead of the built corpora; repeatable.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker_hf(json.loads(args.worker_config))))
        return

    from pretrain_bench import build_fixtures

    sides = args.sides.split(",") + (["before"] if args.before and "before" not in args.sides else [])
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="data-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = workdir / "tokenizer"
    if not tokenizer.is_dir():
        build_fixtures(workdir, args.vocab)
    texts: list[str] = []
    print(f"CPUs: {os.cpu_count()}, load average at start: {os.getloadavg()[0]:.1f}; seq_len {args.seq_len}", flush=True)
    print("| corpus | side | wall s (median) | peak RSS MB (median) | cache MB | runs |\n|---|---|---|---|---|---|", flush=True)
    corpora = [Path(c).resolve() for c in args.corpus] if args.corpus else [workdir / f"corpus-{float(s):g}GB.jsonl" for s in args.sizes.split(",")]
    for corpus in corpora:
        if not corpus.is_file():
            texts = texts or local_texts(400_000_000)
            build_corpus(corpus, int(float(corpus.stem.split("-")[1].removesuffix("GB")) * 1e9), texts)
        size_gb = corpus.stat().st_size / 1e9
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for repeat in range(args.repeats):
            order = sides if repeat % 2 == 0 else sides[::-1]
            for side in order:
                cache = workdir / f"cache-{side}"
                subprocess.run(["rm", "-rf", str(cache)], check=True)
                cfg = {"corpus": str(corpus), "tokenizer": str(tokenizer), "seq_len": args.seq_len, "cache": str(cache)}
                started = time.time()
                results[side].append(measure(side, cfg, workdir, args.before))
                r = results[side][-1]
                print(f"  {corpus.name} {side} repeat {repeat + 1}: {r['seconds']:.1f}s, {r['peak_rss_mb']:,.0f} MB peak, "
                      f"cache {r['cache_mb']:,.0f} MB (load {os.getloadavg()[0]:.1f}, {time.time() - started:.0f}s)",
                      file=sys.stderr, flush=True)
                subprocess.run(["rm", "-rf", str(cache)], check=True)
        for side, rs in results.items():
            print(f"| {corpus.name}, {size_gb:.3f} GB | {side} | {statistics.median(r['seconds'] for r in rs):.1f} | "
                  f"{statistics.median(r['peak_rss_mb'] for r in rs):,.0f} | {statistics.median(r['cache_mb'] for r in rs):,.0f} | {len(rs)} |",
                  flush=True)


if __name__ == "__main__":
    main()
