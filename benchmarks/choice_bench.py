"""Multiple-choice scoring throughput: llmkit.metrics.choice.score_choices versus one forward pass per choice.

    python benchmarks/choice_bench.py                    # 200 builtin docsum questions, 3 repeats, ~3 min on 2 cores
    python benchmarks/choice_bench.py --examples 400 --repeats 5 --batch-size 16

Sides, alternating within every repeat (the first side rotates), medians reported:

- naive loop:   each (context, choice) pair in its own forward pass of the plain model, full logits,
                float32 log_softmax, sum of the continuation positions (what a hand-written scorer does).
- llmkit pairs: score_choices(share_context=False): one row per (context, choice), right-padded
                batches sorted longest first, logits kept only from the first scored position
                (lm-eval's HFLM batching, plus logits_to_keep).
- llmkit:       score_choices() as shipped: one row per question, the context once and each choice
                as a branch under a 4D attention mask, batches sorted longest first.

All three use the same token ids (context = tokenizer(context), continuation = " " + choice without
special tokens) and must agree: every summed log-prob within 1e-4, and acc and acc_norm identical.
The questions are llmkit.metrics.choice_builtin.docsum_choice_examples (a stdlib docstring of at
most 600 characters, "Summary:", four candidate summary lines). The model is a randomly initialised
llama (default 4 layers, hidden 256) with a BPE vocabulary trained here on Python's docs, built by
eval_bench.build_model; speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIDES = ("naive loop", "llmkit pairs", "llmkit")


def naive_scores(model, tokenizer, examples) -> list[list[float]]:
    """One forward pass per (context, choice): log_softmax of the full logits, summed over the continuation."""
    import torch

    out = []
    for example in examples:
        context_ids = tokenizer(example.context).input_ids
        row = []
        for choice in example.choices:
            continuation_ids = tokenizer(" " + choice, add_special_tokens=False).input_ids
            with torch.inference_mode():
                logits = model(torch.tensor([context_ids + continuation_ids])).logits[0]
            logprobs = torch.log_softmax(logits, dim=-1)
            start = len(context_ids) - 1
            targets = torch.tensor(continuation_ids)
            row.append(
                float(logprobs[start : start + len(continuation_ids)].gather(1, targets[:, None]).sum())
            )
        out.append(row)
    return out


def run_side(side: str, model, tokenizer, examples, batch_size: int) -> tuple[float, list[list[float]]]:
    """(seconds, per-choice log-probs) of one side over all examples."""
    from llmkit.metrics.choice import score_choices

    start = time.perf_counter()
    if side == "naive loop":
        logprobs = naive_scores(model, tokenizer, examples)
    else:
        scores = score_choices(
            model, tokenizer, examples, batch_size=batch_size, share_context=side == "llmkit"
        )
        assert not any(s.truncated for s in scores), "the benchmark model's window must fit every question"
        logprobs = [s.logprobs for s in scores]
    return time.perf_counter() - start, logprobs


def accuracies(logprobs, examples) -> dict[str, float]:
    """acc and acc_norm of per-choice log-probs, through choice_metrics."""
    from llmkit.metrics.choice import ChoiceScores, choice_metrics

    scores = [ChoiceScores(lp, [False] * len(lp), [0] * len(lp)) for lp in logprobs]
    metrics = choice_metrics(scores, examples)
    return {"acc": metrics["acc"], "acc_norm": metrics["acc_norm"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    import torch
    from eval_bench import build_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.metrics.choice_builtin import docsum_choice_examples

    examples = docsum_choice_examples("train", limit=args.examples)
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp), args.vocab_size, args.hidden_size, args.layers, positions=1024)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    run_side("llmkit", model, tokenizer, examples[:8], args.batch_size)  # warm-up: first-call allocations

    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    logprobs: dict[str, list[list[float]]] = {}
    for repeat in range(args.repeats):
        order = SIDES[repeat % len(SIDES) :] + SIDES[: repeat % len(SIDES)]
        for side in order:
            elapsed, logprobs[side] = run_side(side, model, tokenizer, examples, args.batch_size)
            seconds[side].append(elapsed)
            print(f"repeat {repeat + 1} {side}: {elapsed:.2f}s", file=sys.stderr, flush=True)

    reference = logprobs["naive loop"]
    for side in SIDES[1:]:
        worst = max(
            abs(a - b)
            for x, y in zip(reference, logprobs[side], strict=True)
            for a, b in zip(x, y, strict=True)
        )
        assert worst < 1e-4, f"{side} differs from the naive loop by {worst:.2e} in a log-prob"
        assert accuracies(logprobs[side], examples) == accuracies(reference, examples), side
    tokens = sum(
        len(tokenizer(e.context).input_ids) + sum(len(tokenizer(" " + c, add_special_tokens=False).input_ids) for c in e.choices)
        for e in examples
    )  # fmt: skip
    median = {side: statistics.median(v) for side, v in seconds.items()}
    acc = accuracies(reference, examples)
    print(
        f"{len(examples)} docsum questions x 4 choices ({tokens / len(examples):.0f} tokens per question, context + choices), "
        f"llama {args.layers} layers hidden {args.hidden_size} vocab {len(tokenizer)}, float32, batch size {args.batch_size}, "
        f"{args.repeats} alternating repeats, medians; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, torch {torch.__version__}\n"
    )
    print("| side | examples/s | median s | vs naive loop | paired ratio | acc | acc_norm |")
    print("|---|---|---|---|---|---|---|")
    for side in SIDES:
        # Within one repeat the sides run back to back under the same load; the median of those
        # ratios is steadier than the ratio of medians on a shared machine.
        paired = statistics.median(n / s for n, s in zip(seconds["naive loop"], seconds[side], strict=True))
        print(
            f"| {side} | {len(examples) / median[side]:.1f} | {median[side]:.2f} | "
            f"{median['naive loop'] / median[side]:.2f}x | {paired:.2f}x | {acc['acc']:.3f} | {acc['acc_norm']:.3f} |"
        )


if __name__ == "__main__":
    main()
