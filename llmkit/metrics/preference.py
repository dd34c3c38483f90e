"""Preference metrics: how often, and by how much, a model prefers the chosen completion of a pair.

    llmkit eval RECIPE          # with metrics: [preference] and data.test of {prompt, chosen, rejected} records

A pair's margin is the difference of the completions' summed log-probs under the model,
log p(chosen | prompt) - log p(rejected | prompt), or, against a reference model, the difference of
their log-ratios, (log p - log p_ref)(chosen) - (log p - log p_ref)(rejected): the DPO implicit
reward margin divided by beta. Accuracy is the share of pairs with a positive margin. Training
(llmkit/training/preference.py) computes its log-probs with `completion_logps` too, so a checkpoint
scored here and the accuracy logged while it trained are the same quantity.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

from llmkit.data.preference import Pair, pair_collate, tokenize_pair

IGNORE_INDEX = -100


def completion_logps(model, batch: dict[str, Any]):
    """(summed log-prob of each row's labelled tokens, labelled tokens per row): two [rows] tensors.

    Row r's token t is scored by the logits at t - 1 (labels are the input ids with -100 where
    nothing is scored: prompt and padding). The softmax runs in float32.
    """
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    mask = labels != IGNORE_INDEX
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = torch.where(mask, picked - torch.logsumexp(logits, dim=-1), torch.zeros_like(picked))
    return token_logps.sum(-1), mask.sum(-1)


def pair_logps(model, pairs: Sequence[Pair], pad_id: int, batch_size: int = 8, device=None, autocast_dtype=None) -> list[tuple[float, float]]:
    """[(chosen log-prob, rejected log-prob)] of every pair under `model` (eval mode, no grad), in order."""
    import torch

    collate = pair_collate(pad_id)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[tuple[float, float]] = []
    cast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    try:
        with torch.no_grad(), cast:
            for start in range(0, len(pairs), batch_size):
                batch = collate(list(pairs[start : start + batch_size]))
                batch = {k: v.to(device) for k, v in batch.items() if k != "ref_logps"}
                logps, _ = completion_logps(model, batch)
                half = logps.size(0) // 2
                out += list(zip(logps[:half].tolist(), logps[half:].tolist(), strict=True))
    finally:
        model.train(was_training)
    return out


def margins(policy: Sequence[tuple[float, float]], reference: Sequence[tuple[float, float]] | None = None) -> list[float]:
    """Each pair's margin: chosen minus rejected log-prob, or minus their reference log-probs too."""
    if reference is None:
        return [c - r for c, r in policy]
    return [(c - rc) - (r - rr) for (c, r), (rc, rr) in zip(policy, reference, strict=True)]


def preference_summary(pair_margins: Sequence[float]) -> dict[str, float]:
    """{"preference_accuracy": share of pairs with a positive margin, "preference_margin": mean margin, "pairs": n}."""
    n = len(pair_margins)
    return {
        "preference_accuracy": sum(1 for m in pair_margins if m > 0) / max(n, 1),
        "preference_margin": sum(pair_margins) / max(n, 1),
        "pairs": n,
    }


def score_preferences(model, pairs: Sequence[Pair], pad_id: int, reference=None, batch_size: int = 8) -> dict[str, float]:
    """Accuracy and mean margin of `model` on tokenized pairs, reference-free or against `reference` (a model)."""
    policy = pair_logps(model, pairs, pad_id, batch_size)
    ref = pair_logps(reference, pairs, pad_id, batch_size) if reference is not None else None
    return preference_summary(margins(policy, ref))


def tokenize_test_pairs(task, located: Sequence[tuple[str, dict]], tokenizer, seq_len: int) -> tuple[list[Pair], list[str], list[str]]:
    """(pairs, where of each pair, where of each record skipped because it does not fit in seq_len)."""
    pairs, kept, skipped = [], [], []
    for where, record in located:
        pair = tokenize_pair(task, record, tokenizer, seq_len, where)
        if pair is None:
            skipped.append(where)
        else:
            pairs.append(pair)
            kept.append(where)
    return pairs, kept, skipped


def evaluate_pairs(model, tokenizer, task, located, seq_len: int, reference=None, batch_size: int = 8) -> tuple[dict[str, Any], list[dict]]:
    """The `preference` metric of `llmkit eval`: ({preference_accuracy, preference_margin, pairs, skipped}, a row per pair)."""
    pairs, kept, skipped = tokenize_test_pairs(task, located, tokenizer, seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy = pair_logps(model, pairs, pad_id, batch_size)
    ref = pair_logps(reference, pairs, pad_id, batch_size) if reference is not None else None
    pair_margins = margins(policy, ref)
    metrics = {**preference_summary(pair_margins), "skipped": len(skipped)}
    rows = [
        {"input": where, "chosen_logp": c, "rejected_logp": r, "margin": m, "preferred": m > 0}
        for where, (c, r), m in zip(kept, policy, pair_margins, strict=True)
    ]
    return metrics, rows
