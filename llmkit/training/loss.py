"""The training loss: summed next-token NLL of a micro-batch, and the validation loss over a split.

    llmkit pretrain pretrain/tiny --set train.chunked_loss=false   # the plain full-logits path

`make_sum_nll` picks the path per model; `evaluate_loss` scores every validation token.

Chunked output layer + cross-entropy: the summed loss without materialising [batch, seq, vocab] logits.

    head = ChunkedHead.attach(model)   # None when the model's logits are not plain lm_head(hidden)
    if head is not None and head.verified(inputs, autocast):
        nll, scored = head.sum_nll(wrapped_model, inputs, labels, autocast)  # = plain_sum_nll(model(**inputs).logits, labels)

The output layer and cross-entropy of a small-vocab model are ~40% of a CPU training step, mostly
memory traffic over the float32 logits and their gradient. Here the model runs with logits for its
last position only, a forward hook keeps the decoder's final hidden states, and
`LinearCrossEntropy` projects them in token chunks (see chunk_rows), computing each chunk's loss and
its gradients (w.r.t. hidden states and the output weight) while the chunk's logits are still in
cache; backward only scales the stored gradients by the incoming one.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from llmkit.data.batches import TrainData
from llmkit.dist import distributed_kind
from llmkit.training.microbatches import to_device

# Config attributes that change logits after lm_head(hidden): a model with any of them set (not
# None, not 1.0 for scales) keeps the plain path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale", "logit_soft_cap")


def chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk: ~2 MB of float32 logits on a CPU (stays in L2), ~256 MB on a GPU."""
    budget = 2**19 if device.type == "cpu" else 2**26
    return max(1, budget // vocab_size)


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden[rows] @ weight.T, targets), chunk by chunk.

    Inputs: hidden [N, H], weight [V, H], rows (long [M], the rows with a target), targets (long
    [M]), chunk (rows per chunk), with_grad (False under no_grad, which needs_input_grad ignores:
    evaluation then skips the gradient matmuls). Under autocast, the matmuls run in the autocast
    dtype and the softmax in float32, as autocast does for lm_head + cross_entropy(logits.float()).
    """

    @staticmethod
    def forward(ctx, hidden, weight, rows, targets, chunk, with_grad):
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        need_hidden, need_weight = with_grad and ctx.needs_input_grad[0], with_grad and ctx.needs_input_grad[1]
        with torch.autocast(device_type, enabled=False):
            w = weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.zeros_like(hidden) if need_hidden else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
            arange = torch.arange(min(chunk, rows.numel()), device=hidden.device)
            for start in range(0, rows.numel(), chunk):
                index, target = rows[start : start + chunk], targets[start : start + chunk]
                h = hidden.index_select(0, index).to(dtype)
                logprobs = torch.log_softmax(torch.mm(h, w.t()).float(), dim=-1)
                picked = arange[: index.numel()]
                total -= logprobs[picked, target].sum()
                if need_hidden or need_weight:
                    # d(sum NLL)/d logits = softmax - one_hot(target), computed in place over the log-probs.
                    grad_logits = logprobs.exp_()
                    grad_logits[picked, target] -= 1.0
                    grad_logits = grad_logits.to(dtype)
                    if need_hidden:
                        grad_hidden.index_copy_(0, index, torch.mm(grad_logits, w).to(hidden.dtype))
                    if need_weight and grad_logits.dtype == grad_weight.dtype:
                        grad_weight.addmm_(grad_logits.t(), h)  # in place: no [V, H] temporary per chunk
                    elif need_weight:
                        grad_weight.add_(torch.mm(grad_logits.t(), h))
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if need_weight else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_total if grad_hidden is not None else None,
            grad_weight * grad_total if grad_weight is not None else None,
            None, None, None, None,
        )


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels shifted left by one and padded with -100: position t is scored on token t+1."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), -100)], dim=1)


class ChunkedHead:
    """The model's output layer + cross-entropy, applied chunk by chunk to the decoder's last hidden states."""

    def __init__(self, model, body: torch.nn.Module, head: torch.nn.Linear) -> None:
        self.model, self.head = model, head
        self.ok: bool | None = None  # None until `verified` has compared logits once
        self.armed = False
        self.hidden: torch.Tensor | None = None
        body.register_forward_hook(self._keep_hidden)

    @classmethod
    def attach(cls, model) -> ChunkedHead | None:
        """A ChunkedHead for a transformers causal LM (or a peft model wrapping one), or None when unsafe.

        Safe means: forward takes logits_to_keep, the output layer is a bias-free nn.Linear computing
        logits from the base model's last_hidden_state, and no config attribute rescales or caps them.
        `verified` then compares its logits with the model's own once, on real inputs.
        """
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
        config = getattr(inner, "config", None)
        if config is None or not hasattr(inner, "get_output_embeddings") or not hasattr(inner, "base_model"):
            return None
        if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
            return None
        if any(getattr(config, name, None) not in (None, 1.0) for name in LOGIT_TRANSFORMS):
            return None
        head, body = inner.get_output_embeddings(), inner.base_model
        if type(head) is not torch.nn.Linear or head.bias is not None or body is inner:
            return None
        return cls(model, body, head)

    def _keep_hidden(self, module, args, output) -> None:
        if self.armed:
            self.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def _hidden_states(self, model, inputs: dict[str, Any], logits_to_keep: int):
        self.armed, self.hidden = True, None
        try:
            out = model(**inputs, logits_to_keep=logits_to_keep)
        finally:
            self.armed = False
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("ChunkedHead: the base model's forward hook did not run")
        return out, hidden

    @torch.no_grad()
    def verified(self, inputs: dict[str, Any], autocast) -> bool:
        """Whether lm_head(hidden states) reproduces the model's own logits (checked once, on one row of `inputs`)."""
        if self.ok is None:
            model, was_training = self.model, self.model.training
            model.eval()  # no dropout, so the two must agree to rounding
            try:
                with autocast():
                    out, hidden = self._hidden_states(model, {k: v[:1] for k, v in inputs.items()}, 0)
                    mine = self.head(hidden)
            finally:
                model.train(was_training)
            self.ok = mine.shape == out.logits.shape and torch.allclose(mine.float(), out.logits.float(), rtol=1e-4, atol=1e-5)
        return self.ok

    def sum_nll(self, model, inputs: dict[str, Any], labels: torch.Tensor, autocast):
        """(summed next-token NLL, scored tokens) of `model` on `inputs`, as _sum_nll over model(**inputs).logits."""
        _, hidden = self._hidden_states(model, inputs, 1)  # logits for one position only: nearly free
        shifted = shifted_labels(labels).reshape(-1)
        rows = (shifted != -100).nonzero().squeeze(1)
        hidden = hidden.reshape(-1, hidden.size(-1))
        weight = self.head.weight
        with autocast():
            targets, chunk = shifted.index_select(0, rows), chunk_rows(weight.size(0), hidden.device)
            nll = LinearCrossEntropy.apply(hidden, weight, rows, targets, chunk, torch.is_grad_enabled())
        return nll, rows.numel()


def plain_sum_nll(logits: torch.Tensor, labels: torch.Tensor):
    """Summed next-token NLL over full logits and the number of scored tokens (labels != -100).

    The labels are shifted left (and padded with -100) rather than the logits shifted right: slicing
    the logits would copy the largest activation of the step.
    """
    shifted = shifted_labels(labels)
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), shifted.reshape(-1), ignore_index=-100, reduction="sum")
    return nll, (shifted != -100).sum()


def _model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a batch that the model's forward takes."""
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}


def make_sum_nll(accelerator, model, cfg) -> Callable[[dict[str, Any]], tuple[Any, Any]]:
    """`sum_nll(batch) -> (summed next-token NLL, scored tokens)` of the prepared `model`; labels are shifted here.

    With train.chunked_loss, models whose logits are plain lm_head(hidden states) skip the full
    [batch, seq, vocab] logits (ChunkedHead above: same loss and gradients, ~1/3 less output-layer time
    on a CPU, less memory on a GPU). FSDP and DeepSpeed shard lm_head's weight outside its own
    forward, and a compiled model would not run the hook, so those keep the plain path.
    """
    head = None
    if cfg.chunked_loss and not cfg.compile and distributed_kind(accelerator) == "plain":
        head = ChunkedHead.attach(accelerator.unwrap_model(model))

    def sum_nll(batch: dict[str, Any]):
        """Summed NLL and scored-token count of one micro-batch."""
        inputs = _model_inputs(batch)
        if head is not None and head.verified(inputs, accelerator.autocast):
            return head.sum_nll(model, inputs, batch["labels"], accelerator.autocast)
        return plain_sum_nll(model(**inputs).logits, batch["labels"])

    return sum_nll


class Objective(Protocol):
    """What a training step minimises: a sum over units (scored tokens, preference pairs) of one micro-batch.

    The loop divides the step's summed loss by the step's units over all processes, so the gradient
    is that of the mean per unit, whatever the split into micro-batches and processes. `stats` names
    further per-unit sums that __call__ returns (e.g. preference accuracy), logged as means per unit.
    """

    unit: str
    stats: tuple[str, ...]

    def units(self, batch: dict[str, Any]) -> int:
        """Units of the micro-batch (known before the forward pass)."""

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, summed stats [len(stats)]) of the micro-batch."""


class TokenNLL:
    """The language-modelling objective: next-token NLL summed over scored tokens (labels != -100)."""

    unit = "token"
    stats: tuple[str, ...] = ()

    def __init__(self, sum_nll: Callable[[dict[str, Any]], tuple[Any, Any]]) -> None:
        self.sum_nll = sum_nll

    def units(self, batch: dict[str, Any]) -> int:
        """Scored tokens of the micro-batch."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL, no stats)."""
        nll, _ = self.sum_nll(batch)
        return nll, nll.new_zeros(0)


def make_objective(accelerator, model, cfg, data: TrainData) -> Objective:
    """The objective of `data` (TrainData.objective), else the summed next-token NLL of `make_sum_nll`."""
    if data.objective is not None:
        return data.objective(accelerator, model, cfg)
    return TokenNLL(make_sum_nll(accelerator, model, cfg))


def scored_and_input_tokens(micro_batches: list[dict[str, Any]]) -> tuple[float, float]:
    """(tokens with a label, input tokens) of a step's micro-batches; with an attention mask, only attended tokens count."""
    scored = inputs = 0
    for batch in micro_batches:
        scored += int((batch["labels"][:, 1:] != -100).sum())
        mask = batch.get("attention_mask")
        inputs += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
    return float(scored), float(inputs)


def evaluate_loss(accelerator, model, data: TrainData, cfg, objective: Objective | None = None) -> tuple[float, int]:
    """Validation loss per unit over every validation unit (or the first eval_batches batches).

    Every process runs the same number of forward passes (FSDP and DeepSpeed need that): a
    process without a batch of its own re-runs batch 0 with weight zero. `objective`: from make_objective.
    """
    result = evaluate_loss_by_part(accelerator, model, data, cfg, objective)
    return result.loss, result.units


@dataclass
class Validation:
    """The validation loss per unit, its units, each named part's (loss, units), and each stat's mean per unit."""

    loss: float
    units: int
    parts: dict[str, tuple[float, int]]
    stats: dict[str, float]


def evaluate_loss_by_part(accelerator, model, data: TrainData, cfg, objective: Objective | None = None) -> Validation:
    """Loss over all validation units, and (loss, units) of each of data.validation_parts, as `evaluate_loss`.

    With parts, batches stay within a part and train.eval_batches caps each part.
    """
    objective = objective or make_objective(accelerator, model, cfg, data)

    dataset = data.validation
    collate = data.eval_collate_fn or data.collate_fn
    size = cfg.micro_batch_size
    parts = data.validation_parts or [("", 0, len(dataset))]
    batches: list[tuple[int, list[int]]] = []  # (part, indices)
    for part, (_, start, end) in enumerate(parts):
        mine = [(part, list(range(i, min(i + size, end)))) for i in range(start, end, size)]
        batches += mine[: cfg.eval_batches] if cfg.eval_batches else mine
    world, rank = accelerator.num_processes, accelerator.process_index
    rounds = math.ceil(len(batches) / world)
    # Per part: summed loss, units, then each stat's sum.
    totals = torch.zeros(len(parts), 2 + len(objective.stats), dtype=torch.float64, device=accelerator.device)
    model.eval()
    with torch.no_grad():
        for r in range(rounds):
            j = r * world + rank
            weight = 1.0 if j < len(batches) else 0.0
            part, indices = batches[j if weight else 0]
            batch = to_device(collate([dataset[i] for i in indices]), accelerator.device)
            loss, stats = objective(batch)
            units = torch.as_tensor([objective.units(batch)], dtype=torch.float64, device=accelerator.device)
            totals[part] += torch.cat([loss.double().reshape(1), units, stats.double()]) * weight
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    summed = totals.sum(dim=0).tolist()
    loss, units = summed[0], summed[1]
    named = {label: (row[0] / max(row[1], 1.0), int(row[1])) for (label, _, _), row in zip(parts, totals.tolist(), strict=True) if label}
    stats = {name: value / max(units, 1.0) for name, value in zip(objective.stats, summed[2:], strict=True)}
    return Validation(loss / max(units, 1.0), int(units), named, stats)
