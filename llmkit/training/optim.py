"""Optimizers and learning-rate schedules.

    llmkit pretrain pretrain/tiny --set train.schedule=linear --set train.warmup_steps=20

AdamW with weight decay on the matmul weights only (never on norms, biases or embedding tables),
fused where the installed torch supports it; warmup then cosine, linear or constant schedules.
"""

from __future__ import annotations

import math
from typing import Any


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """The learning rate at optimizer step `step` as a fraction of train.lr.

    Linear warmup over warmup_steps reaching the peak at the last warmup step, then cosine or linear
    decay to min_lr at max_steps (or constant).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress)


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matmul weights; none on norms, biases and embedding tables."""
    import torch

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model, cfg):
    """AdamW, fused where this torch supports it on the parameters' device (CPU and CUDA)."""
    import torch

    groups = param_groups(model, cfg.weight_decay)
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)
