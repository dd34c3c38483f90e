"""Preference losses (DPO, IPO, SimPO, ORPO) and the objective the training loop minimises with them.

    llmkit finetune finetune/lora-dpo --set task.loss=ipo

A loss is one function of a micro-batch's `PairLogps` returning each pair's loss and the rewards of
its two completions, plus one line in `PAIR_LOSSES`. Log-probs are summed over the completion
tokens (EOS included); losses that define a length-normalised log-prob divide by the completion's
token count. With r = beta * (log p - log p_ref) the implicit reward of a completion and
m = r(chosen) - r(rejected):

- dpo   (Rafailov et al. 2023): -log sigmoid(m), or with label smoothing eps (conservative DPO, the
        preference flipped with probability eps): -(1 - eps) log sigmoid(m) - eps log sigmoid(-m).
- ipo   (Azar et al. 2023, eq. 17): (m / beta - 1 / (2 beta))^2 on per-token average log-probs
        (as TRL and the authors' recommendation: the summed form is length-biased).
- simpo (Meng et al. 2024): reference-free, r = beta * average log-prob;
        -log sigmoid(r(chosen) - r(rejected) - gamma), label smoothing as dpo.
- orpo  (Hong et al. 2024): reference-free, -mean log p(chosen) (the chosen completion's NLL per
        token) - lambda * log sigmoid(log odds(chosen) - log odds(rejected)), where
        log odds(y) = a - log(1 - exp(a)) and a is y's average log-prob; rewards are the average log-probs.

Every step logs, as means over pairs: the loss, reward_chosen, reward_rejected, reward_margin and
pref_accuracy (the share of pairs whose chosen reward is the larger).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmkit.metrics.preference import completion_logps
from llmkit.recipes import REFERENCE_FREE_LOSSES, TaskSpec

STATS = ("reward_chosen", "reward_rejected", "reward_margin", "pref_accuracy")
"""What the objective sums per pair besides the loss; logged as means over pairs (val_... in eval events)."""


@dataclass
class PairLogps:
    """Summed completion log-probs of B pairs under the policy (and the reference), with completion lengths."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


PairLoss = Callable[[PairLogps, TaskSpec], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""`loss(logps, task) -> (loss per pair, chosen reward, rejected reward)`, each a [B] tensor."""


def _smoothed_sigmoid_loss(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(logits) - eps log sigmoid(-logits): the pair's label is wrong with probability eps."""
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def dpo_loss(lp: PairLogps, task: TaskSpec):
    """DPO (sigmoid) with conservative label smoothing, on summed log-probs."""
    beta = task.preference_beta
    chosen, rejected = beta * (lp.chosen - lp.ref_chosen), beta * (lp.rejected - lp.ref_rejected)
    return _smoothed_sigmoid_loss(chosen - rejected, task.label_smoothing), chosen, rejected


def ipo_loss(lp: PairLogps, task: TaskSpec):
    """IPO: the squared distance of the average-log-prob log-ratio margin from 1 / (2 beta)."""
    beta = task.preference_beta
    chosen = (lp.chosen - lp.ref_chosen) / lp.chosen_tokens
    rejected = (lp.rejected - lp.ref_rejected) / lp.rejected_tokens
    return (chosen - rejected - 1 / (2 * beta)) ** 2, beta * chosen, beta * rejected


def simpo_loss(lp: PairLogps, task: TaskSpec):
    """SimPO: reference-free, beta-scaled average log-probs, target margin gamma."""
    beta = task.preference_beta
    chosen, rejected = beta * lp.chosen / lp.chosen_tokens, beta * lp.rejected / lp.rejected_tokens
    return _smoothed_sigmoid_loss(chosen - rejected - task.simpo_gamma, task.label_smoothing), chosen, rejected


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean_logp) < 1, computed without cancellation (log(-expm1(a)))."""
    mean_logp = mean_logp.clamp(max=-1e-6)  # a completion the model is certain of would divide by zero
    return mean_logp - torch.log(-torch.expm1(mean_logp))


def orpo_loss(lp: PairLogps, task: TaskSpec):
    """ORPO: the chosen completion's per-token NLL plus lambda times the odds-ratio loss."""
    chosen, rejected = lp.chosen / lp.chosen_tokens, lp.rejected / lp.rejected_tokens
    odds_ratio = -F.logsigmoid(_log_odds(chosen) - _log_odds(rejected))
    return -chosen + task.orpo_lambda * odds_ratio, chosen, rejected


PAIR_LOSSES: dict[str, PairLoss] = {"dpo": dpo_loss, "ipo": ipo_loss, "simpo": simpo_loss, "orpo": orpo_loss}


def pair_losses(lp: PairLogps, task: TaskSpec):
    """(loss, chosen reward, rejected reward) per pair under task.loss."""
    return PAIR_LOSSES[task.loss](lp, task)


def split_pairs(logps: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows 0..B-1 are the chosen completions, B..2B-1 the rejected (llmkit/data/preference.py `pair_collate`)."""
    half = logps.size(0) // 2
    return logps[:half], logps[half:], tokens[:half].to(logps.dtype), tokens[half:].to(logps.dtype)


class PreferenceObjective:
    """The summed preference loss of a micro-batch of pairs, for the training loop (see llmkit/training/loss.py `Objective`).

    The reference log-probs come from the batch ("ref_logps", cached before training), from a
    frozen copy of the starting model (task.reference: live, full fine-tuning), or from the LoRA
    model with its adapters disabled (live, LoRA: the base is the starting model).
    """

    unit = "pair"
    stats = STATS

    def __init__(self, accelerator, model, task: TaskSpec, reference_model=None) -> None:
        self.accelerator, self.model, self.task = accelerator, model, task
        self.reference_model = reference_model
        self.needs_reference = task.loss not in REFERENCE_FREE_LOSSES

    def units(self, batch: dict[str, Any]) -> int:
        """Pairs in the micro-batch."""
        return int(batch["input_ids"].size(0)) // 2

    def _reference(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
            return ref[:, 0], ref[:, 1]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        with torch.no_grad():
            if self.reference_model is not None:
                logps, _ = completion_logps(self.reference_model, inputs)
            else:
                # LoRA: the base model is the reference; eval mode so that no dropout touches it, as in the cached pass.
                unwrapped = self.accelerator.unwrap_model(self.model)
                unwrapped.eval()
                try:
                    with unwrapped.disable_adapter():
                        logps, _ = completion_logps(unwrapped, inputs)
                finally:
                    unwrapped.train()
        half = logps.size(0) // 2
        return logps[:half], logps[half:]

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss over the pairs, summed STATS over the pairs [len(STATS)])."""
        logps, tokens = completion_logps(self.model, batch)
        lp = PairLogps(*split_pairs(logps, tokens))
        if self.needs_reference:
            lp.ref_chosen, lp.ref_rejected = self._reference(batch)
        losses, chosen, rejected = pair_losses(lp, self.task)
        chosen, rejected = chosen.detach(), rejected.detach()
        stats = torch.stack([chosen.sum(), rejected.sum(), (chosen - rejected).sum(), (chosen > rejected).float().sum()])
        return losses.sum(), stats


def frozen_reference(model, device=None):
    """A frozen copy of the starting model for task.reference: live with full fine-tuning (eval mode, no grads)."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    reference.eval()
    return reference.to(device) if device is not None else reference


def preference_objective(task: TaskSpec, reference_model=None) -> Callable[..., PreferenceObjective]:
    """The `TrainData.objective` factory: `(accelerator, model, cfg) -> PreferenceObjective`."""

    def make(accelerator, model, cfg) -> PreferenceObjective:
        reference = reference_model.to(accelerator.device) if reference_model is not None else None
        return PreferenceObjective(accelerator, model, task, reference)

    return make


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def plan_lines(task: TaskSpec, lora: bool, parameters: int, dtype: str, micro_batch_size: int) -> list[str]:
    """What `llmkit validate` says about a preference run: the loss, and the memory the reference mode takes or saves."""
    beta = "" if task.loss == "orpo" else f", beta {task.preference_beta:g}"
    lines = [f"preference:       {task.loss}{beta}; a micro-batch of {micro_batch_size} pairs is {2 * micro_batch_size} padded rows (chosen + rejected)"]
    weights = parameters * DTYPE_BYTES[dtype]
    one = f"one model's weights ({_size(weights)} in {dtype})"
    if not task.uses_reference:
        lines.append(f"reference:        none ({task.loss} is reference-free): training holds {one}")
    elif task.reference == "cached":
        lines.append(
            f"reference:        cached: the starting model scores every pair once before training and the log-probs are kept "
            f"in the data cache, so training holds {one} instead of two ({_size(2 * weights)}): saves {_size(weights)}"
            + ("; no reference forward pass per step either (live with LoRA would run the base with adapters disabled)" if lora else "")
        )
    elif lora:
        lines.append(f"reference:        live: the base model with its LoRA adapters disabled (no copy): {one}, one extra forward per step")
    else:
        lines.append(
            f"reference:        live: a frozen copy of the starting model, so training holds two models' weights ({_size(2 * weights)}); "
            f"task.reference: cached would save {_size(weights)}"
        )
    return lines
