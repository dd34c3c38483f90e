"""Evaluation benchmarks: llmkit versus the plain Hugging Face ways, same machine, same run, alternating sides.

    python benchmarks/eval_bench.py                 # all three, ~5 minutes on 2 CPU cores
    python benchmarks/eval_bench.py --only rouge --repeats 5

1. Perplexity throughput (scored tokens/s): `llmkit.evaluation.perplexity` (several windows per
   forward pass, logits only where tokens are scored) versus the loop of the transformers guide
   "Perplexity of fixed-length models" (one window per forward pass, labels masked with -100, the
   model's mean loss times the number of scored tokens), both on the DESIGN.md windows with the same
   stride. The guide's literal weighting (valid labels minus one per window) is also reported: it
   undercounts by one token in every window after the first, so its value drifts from the exact one.
2. Generation for ROUGE (examples/s): `llmkit.generation.generate_ids` (left-padded batches, KV
   cache) versus `pipeline("text-generation")` called one example at a time, greedy, same prompts.
3. ROUGE scoring (pairs/s): `llmkit.metrics.rouge.per_example_scores` versus
   `rouge_score.rouge_scorer.RougeScorer(use_stemmer=True).score` per pair; scores must be identical.
   llmkit's stem cache is cleared before each of its runs, so no run benefits from an earlier one.

The model is a randomly initialised llama (default 4 layers, hidden 256, a 16k BPE vocabulary trained
here on Python's docs: the output layer is about half the FLOPs, as in Pythia-70M or GPT-2 small);
speed does not depend on the weights, and values are compared between the two sides.
Each measurement is repeated, the sides alternate, and medians are reported (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_model(workdir: Path, vocab_size: int, hidden_size: int, layers: int, positions: int = 1024):
    """A random llama and a BPE tokenizer trained on builtin:pydoc/train, saved to `workdir`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from llmkit.data.sources import iter_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(["builtin:pydoc/train"]), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    tokenizer.save_pretrained(workdir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64, num_key_value_heads=hidden_size // 64, max_position_embeddings=positions,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(workdir)


# ----------------------------------------------------------------------------------------------
# 1. Perplexity
# ----------------------------------------------------------------------------------------------


def guide_loop(model, token_ids, seq_len: int, stride: int, literal: bool) -> tuple[float, int]:
    """The transformers guide's loop, one window per forward pass, applied to each document on its own.

    literal=False scores exactly the DESIGN.md windows and weights each window's mean loss by the
    number of tokens it really scores; literal=True keeps the guide's begin = k*stride windows and
    its `num_valid_tokens - batch_size` weighting.
    """
    import torch

    device = next(model.parameters()).device
    nll_sum, n_tokens = 0.0, 0
    for ids in token_ids:
        length = len(ids)
        ids = torch.tensor([ids], device=device)
        prev_end = 0
        for k, begin in enumerate(range(0, length, stride)):
            end = min(begin + seq_len, length)
            if not literal:
                begin = max(0, end - seq_len)
            trg_len = end - prev_end
            input_ids = ids[:, begin:end]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            with torch.no_grad():
                loss = model(input_ids, labels=target_ids).loss
            num_valid = int((target_ids != -100).sum())
            # The model shifts labels left by one, so window position 0 is never a target.
            scored = num_valid - 1 if (literal or k == 0) else num_valid
            if scored > 0:
                nll_sum += float(loss) * scored
                n_tokens += scored
            prev_end = end
            if end == length:
                break
    return nll_sum, n_tokens


def bench_perplexity(
    model_dir: Path, repeats: int, seq_len: int, stride: int, batch_size: int, device: str
) -> dict:
    import torch

    from llmkit.data.sources import iter_texts
    from llmkit.metrics.perplexity import perplexity
    from llmkit.models import load_model

    model, tokenizer = load_model(str(model_dir), device=device)
    texts = list(iter_texts(["builtin:pydoc/test"]))
    token_ids = tokenizer(texts, verbose=False)["input_ids"]
    times = {"llmkit": [], "guide": []}
    values = {}
    for _ in range(repeats):
        t = time.perf_counter()
        totals = perplexity(model, tokenizer, texts, seq_len, stride, batch_size)
        times["llmkit"].append(time.perf_counter() - t)
        values["llmkit"] = (totals.nll_sum, totals.tokens)
        t = time.perf_counter()
        values["guide"] = guide_loop(model, token_ids, seq_len, stride, literal=False)
        times["guide"].append(time.perf_counter() - t)
    values["guide_literal"] = guide_loop(model, token_ids, seq_len, stride, literal=True)
    ppl = {k: math.exp(s / n) for k, (s, n) in values.items()}
    tokens = values["llmkit"][1]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "documents": len(texts),
        "scored_tokens": tokens,
        "seq_len": seq_len,
        "stride": stride,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "speedup": med["guide"] / med["llmkit"],
        # Each repeat runs both sides back to back, so the ratio within a repeat sees the same load.
        "paired_speedup_median": statistics.median(
            g / m for g, m in zip(times["guide"], times["llmkit"], strict=True)
        ),
        "perplexity": ppl,
        "relative_difference": abs(ppl["llmkit"] - ppl["guide"]) / ppl["guide"],
        "guide_literal_relative_difference": abs(ppl["guide_literal"] - ppl["llmkit"]) / ppl["llmkit"],
        "guide_literal_tokens": values["guide_literal"][1],
        "seconds": {k: sorted(v) for k, v in times.items()},
    }


# ----------------------------------------------------------------------------------------------
# 2. Generation
# ----------------------------------------------------------------------------------------------


def bench_generation(
    model_dir: Path, repeats: int, examples: int, max_new_tokens: int, batch_size: int, device: str
) -> dict:
    from transformers import pipeline

    from llmkit.data.sources import load_records
    from llmkit.generation import generate_ids
    from llmkit.models import load_model
    from llmkit.prompts import format_example, prompt_token_ids
    from llmkit.recipes import GenerationSpec, TaskSpec

    model, tokenizer = load_model(str(model_dir), device=device)
    task = TaskSpec(type="summarization")
    records = load_records(["builtin:docsum/test"], max_samples=examples)
    # Prompts capped so prompt + generation fits the model (as llmkit eval does).
    prompts = [format_example(task, r, tokenizer, max_prompt_tokens=384)[0] for r in records]
    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    spec = GenerationSpec(max_new_tokens=max_new_tokens)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device=model.device)
    times = {"llmkit": [], "pipeline": []}
    outputs = {}
    for _ in range(repeats):
        t = time.perf_counter()
        outputs["llmkit"] = [o[0] for o in generate_ids(model, tokenizer, ids, spec, batch_size)]
        times["llmkit"].append(time.perf_counter() - t)
        t = time.perf_counter()
        outputs["pipeline"] = [
            pipe(
                p,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                return_full_text=False,
                pad_token_id=tokenizer.pad_token_id,
            )[0]["generated_text"]
            for p in prompts
        ]
        times["pipeline"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    same = sum(a == b for a, b in zip(outputs["llmkit"], outputs["pipeline"], strict=False))
    return {
        "examples": len(prompts),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "examples_per_s": {k: len(prompts) / v for k, v in med.items()},
        "speedup": med["pipeline"] / med["llmkit"],
        "paired_speedup_median": statistics.median(
            p / m for p, m in zip(times["pipeline"], times["llmkit"], strict=True)
        ),
        "identical_outputs": f"{same}/{len(prompts)}",
        "seconds": {k: sorted(v) for k, v in times.items()},
    }


# ----------------------------------------------------------------------------------------------
# 3. ROUGE
# ----------------------------------------------------------------------------------------------


def bench_rouge(repeats: int) -> dict:
    from rouge_score import rouge_scorer

    from llmkit.data.sources import load_records
    from llmkit.metrics.rouge import per_example_scores, scoring

    records = load_records(["builtin:docsum/train"])
    # Realistic pairs: a lead-40-words "summary" of each document against its reference, plus a
    # two-line version of every tenth prediction so rougeLsum's multi-sentence path is exercised.
    predictions, references = [], []
    for i, r in enumerate(records):
        words = r["document"].split()[:40]
        pred = " ".join(words)
        if i % 10 == 0:
            pred = " ".join(words[:20]) + "\n" + " ".join(words[20:])
        predictions.append(pred)
        references.append(r["summary"])
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=True)
    times = {"llmkit": [], "rouge_score": []}
    for _ in range(repeats):
        scoring._stem.cache_clear()
        t = time.perf_counter()
        ours = per_example_scores(predictions, references)
        times["llmkit"].append(time.perf_counter() - t)
        t = time.perf_counter()
        theirs = [
            {k: v.fmeasure for k, v in scorer.score(ref, pred).items()}
            for pred, ref in zip(predictions, references, strict=False)
        ]
        times["rouge_score"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "pairs": len(predictions),
        "pairs_per_s": {k: len(predictions) / v for k, v in med.items()},
        "speedup": med["rouge_score"] / med["llmkit"],
        "paired_speedup_median": statistics.median(
            r / m for r, m in zip(times["rouge_score"], times["llmkit"], strict=True)
        ),
        "identical_scores": ours == theirs,
        "seconds": {k: sorted(v) for k, v in times.items()},
    }


def main() -> None:
    """Run the benchmarks and print (and optionally save) the results as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["perplexity", "generation", "rouge"], action="append")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--vocab-size", type=int, default=16384, help="BPE vocabulary of the benchmark model."
    )
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--output", type=Path, help="Also write the results to this JSON file.")
    args = parser.parse_args()
    only = set(args.only or ["perplexity", "generation", "rouge"])
    import torch

    from llmkit.models import default_device

    device = args.device or default_device()
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        + (f", {gpu}" if gpu else ""),
        "device": device,
        "model": {
            "type": "llama",
            "vocab_size": args.vocab_size,
            "hidden_size": args.hidden_size,
            "layers": args.layers,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        if only & {"perplexity", "generation"}:
            build_model(model_dir, args.vocab_size, args.hidden_size, args.layers)
        if "perplexity" in only:
            results["perplexity"] = bench_perplexity(
                model_dir, args.repeats, args.seq_len, args.stride, args.batch_size, device
            )
            print(json.dumps({"perplexity": results["perplexity"]}, indent=2), flush=True)
        if "generation" in only:
            results["generation"] = bench_generation(
                model_dir, args.repeats, args.examples, args.max_new_tokens, args.batch_size, device
            )
            print(json.dumps({"generation": results["generation"]}, indent=2), flush=True)
    if "rouge" in only:
        results["rouge"] = bench_rouge(args.repeats)
        print(json.dumps({"rouge": results["rouge"]}, indent=2), flush=True)
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
