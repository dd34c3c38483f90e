"""Perplexity and bits per byte of raw text under the sliding-window protocol (llmkit/metrics/perplexity.py).

    llmkit eval eval/perplexity --set model.path=runs/pretrain-tiny --set data.stride=128
"""

from __future__ import annotations

import time
from typing import Any

from llmkit.data.sources import check_sources, iter_texts
from llmkit.errors import RecipeError
from llmkit.evals.base import Evaluator, Plan, Scored, chunks, no_progress, require_test
from llmkit.metrics.perplexity import NllTotals, perplexity, prefix_token, reduce_totals
from llmkit.models import max_positions

DEFAULT_MAX_SEQ_LEN = 1024
DOCUMENTS_PER_CHUNK = 64  # the progress bar advances per chunk; totals add exactly across chunks

PROTOCOL = {
    "tokens": "tokenizer(text) with special tokens; when the tokenizer adds no BOS, its BOS (else EOS) token is put "
    "first as context (lm-eval's rolling loglikelihood), so every token of the text is scored; t_0 is never scored",
    "windows": "each document on its own; window k ends at e_k = min(seq_len + k*stride, L), "
    "starts at max(0, e_k - seq_len), scores t_i for max(1, e_{k-1}) <= i < e_k",
    "aggregation": "token-weighted: perplexity = exp(sum NLL / tokens); "
    "bits_per_byte = sum NLL / (ln 2 * UTF-8 bytes of the documents)",
}


class PerplexityEvaluator(Evaluator):
    """Token-weighted perplexity, mean NLL and bits per byte of data.test's texts."""

    metrics = ("perplexity",)
    protocol_key = "perplexity"

    def check(self) -> None:
        """The test sources exist and read (records are streamed at scoring time)."""
        require_test(self.task, "perplexity")
        check_sources(self.task.data.test)

    def plan(self, path: str, config, where: str) -> Plan:
        """data.seq_len (default: the model's positions, at most 1024) and data.stride (default: half)."""
        limit = max_positions(config)
        data = self.task.data
        seq_len = data.seq_len or min(limit or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
        if limit is not None and seq_len > limit:
            raise RecipeError(
                f"data.seq_len ({seq_len}) is larger than the {limit} positions of {path}; set data.seq_len to at most {limit}"
            )
        stride = data.stride or max(1, seq_len // 2)
        if stride >= seq_len:
            raise RecipeError(f"data.stride ({stride}) must be smaller than data.seq_len ({seq_len})")
        return Plan(path, where, limit, {"seq_len": seq_len, "stride": stride})

    def score(self, model, tokenizer, plan: Plan, progress=no_progress) -> Scored:
        """Sum the NLL of every window over every document (and process), then divide once."""
        data = self.task.data
        texts = list(iter_texts(data.test, data.text_field, data.max_samples, data.encoding_errors))
        started = time.perf_counter()
        totals = NllTotals()
        bar = progress(len(texts), "perplexity", "doc")
        for part in chunks(len(texts), DOCUMENTS_PER_CHUNK):
            window = [texts[i] for i in part]
            totals.add(perplexity(model, tokenizer, window, plan.settings["seq_len"], plan.settings["stride"], data.batch_size))
            bar.update(len(window))
        bar.close()
        totals = reduce_totals(totals)
        metrics = totals.metrics()
        timing = {"tokens_per_second": totals.tokens / max(time.perf_counter() - started, 1e-9)}
        return Scored(metrics, timing=timing)

    def protocol(self, plan: Plan, tokenizer) -> dict[str, Any]:
        """seq_len, stride, text field and the window rule."""
        prefix = prefix_token(tokenizer) if tokenizer is not None else None
        return {
            "perplexity": {
                "seq_len": plan.settings["seq_len"],
                "stride": plan.settings["stride"],
                "text_field": self.task.data.text_field,
                **PROTOCOL,
                "prefix_token": prefix,
            }
        }

    def summary(self, metrics: dict[str, Any]) -> str:
        """perplexity, bits/byte and the counts."""
        return (
            f"perplexity {metrics['perplexity']:.4f}  bits/byte {metrics['bits_per_byte']:.4f}  "
            f"({metrics['tokens']:,} tokens, {metrics['documents']} documents)"
        )

    def metrics_shown(self) -> tuple[str, ...]:
        """Comparison columns."""
        return ("perplexity", "nll", "bits_per_byte")
