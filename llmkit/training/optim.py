"""Optimizers and learning-rate schedules.

    llmkit pretrain pretrain/tiny --set train.schedule=linear --set train.warmup_steps=20
    llmkit pretrain pretrain/tiny --set train.optimizer=muon --set train.schedule=wsd

AdamW with weight decay on the matmul weights only (never on norms, biases or embedding tables),
fused where the installed torch supports it; warmup then cosine, linear, constant or wsd
(warmup-stable-decay) schedules.

train.optimizer: muon puts the hidden weight matrices of the transformer blocks (attention and MLP
projections: the 2-D weights of nn.Linear / transformers Conv1D modules inside the model's layer
list) under torch.optim.Muon, and everything else (embeddings, the output layer, tied or not, norms,
biases) under AdamW with the usual decay groups. `MuonWithAdamW` makes the two one optimizer for
accelerate, gradient clipping, the grad scaler, the LambdaLR schedule (one multiplier on every
group's base lr) and checkpoints. Muon needs whole matrices, so FSDP and DeepSpeed, which shard
them, are refused (training/loop.py); under DDP every process orthogonalizes the same averaged
gradient, which costs a little compute and gives the same result on every process.

torch's Muon scales each matrix's lr by sqrt(max(1, A/B)) for a weight of shape [A, B]
(adjust_lr_fn="original", Keller Jordan's convention) and reads the shape as nn.Linear's [out, in].
transformers' Conv1D (gpt2) stores [in, out], so its groups carry an lr (and, to keep the decay
lr * weight_decay unchanged, a weight decay) corrected to the [out, in] reading; Newton-Schulz
orthogonalization itself does not depend on the orientation. gpt2's fused c_attn ([hidden, 3 *
hidden]) is orthogonalized as one matrix, not as separate q, k and v.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from llmkit.errors import RecipeError
from llmkit.recipes import wsd_decay_steps


def lr_multiplier(
    step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float, decay_fraction: float = 0.2
) -> float:
    """The learning rate at optimizer step `step` (0-based) as a fraction of the peak (train.lr, train.muon_lr).

    Linear warmup over warmup_steps reaching the peak at the last warmup step, then cosine or linear
    decay to min_lr at max_steps, or constant. wsd (warmup-stable-decay, "trapezoidal") stays at the
    peak until the last D = round(decay_fraction * max_steps) steps, then decays as 1 - sqrt(progress)
    towards min_lr (the cooldown shape Hägele et al. 2024 found better than linear); step
    max_steps - D is the last at the peak and the last step sits one decay step above min_lr, as the
    last step of cosine and linear does.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = wsd_decay_steps(max_steps, decay_fraction)
        decay_start = max(warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return min_ratio + (1.0 - min_ratio) * (1.0 - math.sqrt(progress))
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress)


def param_groups(model, weight_decay: float, exclude: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """AdamW groups: decay on matmul weights; none on norms, biases and embedding tables.

    exclude: ids of parameters another optimizer owns (Muon's hidden matrices).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in exclude:
            continue
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def hidden_matrices(model) -> dict[str, bool]:
    """{parameter name: stored [in, out]} of the weights Muon trains: the blocks' hidden matrices.

    A hidden matrix is the trainable 2-D weight of an nn.Linear or transformers Conv1D module that
    sits inside one of the model's nn.ModuleLists (the decoder layers) and is not an input or output
    embedding. Embeddings, the output layer (tied or not), norms and biases are not. The flag is True
    for Conv1D (gpt2), whose weight is stored transposed.
    """
    from transformers.pytorch_utils import Conv1D

    outside: set[int] = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(model, getter)() if hasattr(model, getter) else None
        if getattr(layer, "weight", None) is not None:
            outside.add(id(layer.weight))
    blocks = [f"{name}." for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    transposed: dict[int, bool] = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and any(name.startswith(prefix) for prefix in blocks):
            weight = module.weight
            if weight.requires_grad and weight.ndim == 2 and id(weight) not in outside:
                transposed[id(weight)] = isinstance(module, Conv1D)
    return {name: transposed[id(p)] for name, p in model.named_parameters() if id(p) in transposed}


def _muon_scale(shape: tuple[int, int], stored_transposed: bool, adjust: str) -> float:
    """lr factor that makes torch's per-shape Muon adjustment read a [in, out] weight as [out, in]."""
    if not stored_transposed or adjust != "original":
        return 1.0  # match_rms_adamw's 0.2 * sqrt(max(A, B)) is symmetric
    rows, cols = shape
    return math.sqrt(max(1.0, cols / rows)) / math.sqrt(max(1.0, rows / cols))


def muon_param_groups(model, cfg) -> list[dict[str, Any]]:
    """Muon groups of the hidden matrices: one per lr correction (1.0 except for gpt2's Conv1D shapes)."""
    params = dict(model.named_parameters())
    by_scale: dict[float, list] = {}
    for name, stored_transposed in hidden_matrices(model).items():
        scale = _muon_scale(tuple(params[name].shape), stored_transposed, cfg.muon_adjust_lr)
        by_scale.setdefault(scale, []).append(params[name])
    return [
        {"params": group, "lr": cfg.muon_lr * scale, "weight_decay": cfg.muon_weight_decay / scale}
        for scale, group in sorted(by_scale.items())
    ]


class _RoutedState(Mapping):
    """Several optimizers' state as one mapping, each parameter's entry read from the optimizer that trains it.

    Not a ChainMap: its lookup would try the first optimizer's state, a defaultdict, and plant an
    empty entry there for a parameter that the second one trains.
    """

    def __init__(self, optimizers: tuple[torch.optim.Optimizer, ...]) -> None:
        self.optimizers = optimizers

    def __getitem__(self, param):
        for optimizer in self.optimizers:
            if param in optimizer.state:
                return optimizer.state[param]
        for optimizer in self.optimizers:
            if any(p is param for group in optimizer.param_groups for p in group["params"]):
                return optimizer.state[param]  # a parameter without state yet: its own optimizer's empty entry
        raise KeyError(param)

    def __contains__(self, param) -> bool:
        return any(param in optimizer.state for optimizer in self.optimizers)

    def __iter__(self) -> Iterator:
        return (param for optimizer in self.optimizers for param in optimizer.state)

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self.optimizers)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the hidden matrices and AdamW on the rest, as one optimizer.

    One step, one zero_grad, one state dict ({"adamw": ..., "muon": ...}: tensors and plain values,
    so torch.load(weights_only=True) reads it) and one param_groups list holding the inner
    optimizers' own group dicts, AdamW's first: param_groups[0]["lr"] is train.lr's schedule, and a
    LambdaLR on this optimizer sets every group's lr from its own base lr.
    """

    def __init__(self, adamw: torch.optim.Optimizer, muon: torch.optim.Optimizer) -> None:
        self.adamw, self.muon = adamw, muon
        super().__init__([*adamw.param_groups, *muon.param_groups], {})

    @property
    def state(self) -> Mapping:
        """The inner optimizers' state, keyed by parameter (a live view)."""
        return _RoutedState((self.adamw, self.muon))

    @state.setter
    def state(self, value) -> None:
        pass  # Optimizer.__init__ assigns an empty state; the inner optimizers own theirs

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step and one Muon step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Both inner state dicts."""
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore both; re-link param_groups, since torch's load_state_dict replaces the group dicts."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"adamw", "muon"}:
            raise ValueError("not a Muon + AdamW optimizer state (was it saved by a run with train.optimizer: adamw?)")
        self.adamw.load_state_dict(state_dict["adamw"])
        self.muon.load_state_dict(state_dict["muon"])
        self.param_groups = [*self.adamw.param_groups, *self.muon.param_groups]


def _adamw(groups: list[dict[str, Any]], cfg) -> torch.optim.AdamW:
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


def make_optimizer(model, cfg):
    """The optimizer train.optimizer names: AdamW (fused where this torch supports it on the parameters' device), or MuonWithAdamW."""
    if cfg.optimizer == "adamw":
        return _adamw(param_groups(model, cfg.weight_decay), cfg)
    if not hasattr(torch.optim, "Muon"):
        raise RecipeError(f"train.optimizer: muon needs torch.optim.Muon (PyTorch 2.9 or newer); this is torch {torch.__version__}")
    muon_groups = muon_param_groups(model, cfg)
    if not muon_groups:
        raise RecipeError(
            "train.optimizer: muon found no hidden weight matrices (nn.Linear / Conv1D weights inside the model's layer list) "
            "to train; use train.optimizer: adamw for this model"
        )
    hidden = frozenset(id(p) for group in muon_groups for p in group["params"])
    muon = torch.optim.Muon(
        muon_groups, lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum,
        nesterov=True, adjust_lr_fn=cfg.muon_adjust_lr,
    )
    return MuonWithAdamW(_adamw(param_groups(model, cfg.weight_decay, exclude=hidden), cfg), muon)


def describe_optimizer(optimizer) -> str:
    """One line for the training log: which optimizer trains how many tensors and parameters."""
    def count(groups, what: str) -> str:
        tensors = [p for g in groups for p in g["params"]]
        return f"{len(tensors)} {what} ({sum(p.numel() for p in tensors):,} parameters)"

    if isinstance(optimizer, MuonWithAdamW):
        return f"Muon on {count(optimizer.muon.param_groups, 'hidden matrices')}, AdamW on {count(optimizer.adamw.param_groups, 'other tensors')}"
    return f"{type(optimizer).__name__} on {count(optimizer.param_groups, 'tensors')}"
