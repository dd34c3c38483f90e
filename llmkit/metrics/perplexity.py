"""Token-weighted perplexity and bits per byte under a sliding-window protocol.

    llmkit eval eval/perplexity --set model.path=runs/pretrain-tiny --set data.stride=128

Protocol: each document is scored on its own; its tokens t_0..t_{L-1} are what `tokenizer(text)`
returns, with the tokenizer's BOS (else EOS) token put first when the tokenizer adds none (GPT-2 and
Qwen style), so t_0 is always a context-only token and every token of the text is scored: this is
lm-eval's rolling loglikelihood (the first token predicted from the prefix token), and it keeps bits
per byte honest (every byte of the text is paid for by a scored token). Window k ends at e_k = min(seq_len + k*stride, L) and starts at s_k = max(0, e_k - seq_len);
it scores the tokens t_i with max(1, e_{k-1}) <= i < e_k (e_{-1} = 0), each predicted from
t_{s_k}..t_{i-1}. So every token after the first is scored exactly once, with at least
seq_len - stride tokens of context once the document is long enough. Perplexity =
exp(sum of NLL / number of scored tokens); bits per byte = sum NLL / (ln 2 * UTF-8 bytes of the
documents). Sums (never averages of averages) combine across batches and processes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmkit import dist
from llmkit.errors import DataError, RecipeError


def perplexity_windows(length: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) of each window of a document of `length` tokens (the protocol in this module's docstring)."""
    windows = []
    prev_end, k = 0, 0
    while prev_end < length:
        end = min(seq_len + k * stride, length)
        start = max(0, end - seq_len)
        first = max(1, prev_end)  # t_0 has no context, so it is never scored
        if first < end:
            windows.append((start, end, first))
        prev_end, k = end, k + 1
    return windows


@dataclass
class NllTotals:
    """Sums that combine across batches and processes by addition (never averages of averages)."""

    nll_sum: float = 0.0
    tokens: int = 0
    bytes: int = 0
    documents: int = 0

    def add(self, other: NllTotals) -> None:
        """Add another partial sum into this one."""
        self.nll_sum += other.nll_sum
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.documents += other.documents

    def metrics(self) -> dict[str, float]:
        """perplexity, nll (mean per token, nats), bits_per_byte and the counts behind them."""
        if self.tokens == 0:
            raise DataError("no tokens to score: every document is at most one token long")
        mean = self.nll_sum / self.tokens
        return {
            "perplexity": math.exp(mean),
            "nll": mean,
            "bits_per_byte": self.nll_sum / (math.log(2) * self.bytes) if self.bytes else float("nan"),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
        }


def _forward_accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def score_windows(
    model, token_ids: Sequence[Sequence[int]], windows, batch_size: int, pad_id: int = 0
) -> float:
    """Sum of NLL (float64) over the scored tokens of `windows` = [(doc, start, end, first), ...]."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    keep_logits = _forward_accepts(model, "logits_to_keep")
    use_positions = _forward_accepts(model, "position_ids")
    # Windows of equal width share a batch (most are exactly seq_len wide, so most batches need no
    # padding and no attention mask, which keeps SDPA on its fast causal kernels); within a width,
    # windows scoring a similar number of tokens go together, so the logits kept per batch (the
    # last `keep` positions of every left-padded row) are mostly needed ones.
    ordered = sorted(windows, key=lambda w: (w[2] - w[1], w[2] - w[3]), reverse=True)
    batches: list[list] = []
    for window in ordered:
        width = window[2] - window[1]
        last = batches[-1] if batches else None
        # A model that takes no position_ids would see shifted positions in a left-padded row,
        # so its batches hold windows of one width only.
        if (
            last is None
            or len(last) == batch_size
            or (not use_positions and last[0][2] - last[0][1] != width)
        ):
            batches.append([window])
        else:
            last.append(window)
    total = 0.0
    for batch in batches:
        width = max(end - start for _, start, end, _ in batch)
        keep = max(end - first for _, _, end, first in batch) + 1
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        position_ids = torch.zeros((len(batch), width), dtype=torch.long)
        targets = torch.full((len(batch), keep - 1), -100, dtype=torch.long)
        for r, (doc, start, end, first) in enumerate(batch):
            ids = torch.tensor(token_ids[doc][start:end], dtype=torch.long)
            n = end - start
            # Left padding aligns every row's scored tokens at the right edge.
            input_ids[r, width - n :] = ids
            attention_mask[r, width - n :] = 1
            position_ids[r, width - n :] = torch.arange(n)
            scored = end - first
            targets[r, keep - 1 - scored :] = ids[first - start :]
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device)}
        if not bool(attention_mask.all()):
            kwargs["attention_mask"] = attention_mask.to(device)
            if use_positions:
                kwargs["position_ids"] = position_ids.to(device)
        if keep_logits:
            kwargs["logits_to_keep"] = keep
        with torch.inference_mode():
            logits = model(**kwargs, use_cache=False).logits[:, -keep:-1, :]
            targets = targets.to(device)
            batch_nll = torch.zeros((), dtype=torch.float64, device=device)
            for r in range(logits.size(0)):
                # Per-token NLL in float32 whatever the model dtype, one row at a time so the float32
                # copy of the logits stays small with large vocabularies; ignored slots add exactly 0.
                nll = F.cross_entropy(logits[r].float(), targets[r], ignore_index=-100, reduction="none")
                batch_nll += nll.double().sum()
            total += float(batch_nll)
    return total


def perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    seq_len: int,
    stride: int,
    batch_size: int = 8,
) -> NllTotals:
    """Token-weighted NLL sums of `texts` under the sliding-window protocol (this process's share only).

    Under `accelerate launch`, each process scores documents i with i % world_size == rank; combine
    the returned totals with `reduce_totals`.
    """
    if stride >= seq_len:
        raise RecipeError(f"data.stride ({stride}) must be smaller than data.seq_len ({seq_len})")
    world, rank = dist.world()
    mine = [t for i, t in enumerate(texts) if i % world == rank]
    totals = NllTotals(documents=len(mine), bytes=sum(len(t.encode("utf-8")) for t in mine))
    if not mine:
        return totals
    token_ids = document_ids(tokenizer, mine)
    windows = [
        (d, *w) for d, ids in enumerate(token_ids) for w in perplexity_windows(len(ids), seq_len, stride)
    ]
    totals.tokens = sum(end - first for _, _, end, first in windows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    totals.nll_sum = score_windows(model, token_ids, windows, batch_size, pad_id)
    return totals


def prefix_token(tokenizer) -> int | None:
    """The token put before each document when the tokenizer adds no BOS: its BOS, else its EOS (lm-eval's prefix)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"]
    if bos is not None and probe[:1] == [bos]:
        return None  # the tokenizer already starts every text with its BOS
    return bos if bos is not None else getattr(tokenizer, "eos_token_id", None)


def document_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each document as the protocol scores them: t_0 is a BOS (or EOS) that is never scored."""
    token_ids = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    prefix = prefix_token(tokenizer)
    if prefix is None:
        return [list(ids) for ids in token_ids]
    # Without it the text's first token would go unscored while its bytes still count in bits per byte.
    return [[prefix, *ids] for ids in token_ids]


def reduce_totals(totals: NllTotals) -> NllTotals:
    """Sum the totals of every process (a no-op in one process)."""
    world, _ = dist.world()
    if world == 1:
        return totals
    import torch
    import torch.distributed

    state = dist.process_state()
    device = state.device if state.backend == "nccl" else "cpu"
    packed = torch.tensor(
        [totals.nll_sum, totals.tokens, totals.bytes, totals.documents], dtype=torch.float64, device=device
    )
    torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
    nll_sum, tokens, nbytes, docs = packed.tolist()
    return NllTotals(
        nll_sum=nll_sum, tokens=int(round(tokens)), bytes=int(round(nbytes)), documents=int(round(docs))
    )
