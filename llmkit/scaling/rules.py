"""Per-point hyperparameter rules: the learning rate, batch and warmup each sweep point trains with.

    llmkit scale sweep scale/cpu-tiny --set lr_rule=porian --set batch_rule=porian
    llmkit scale hp scale/cpu-tiny-hp             # fits your own rule; lr_rule: fitted uses it

Porian et al. 2024 (arXiv 2406.19146) showed that a learning rate and batch not re-tuned per scale bend
the fitted exponents; the published laws below differ 2-4x at small sizes, so each is a named option
with the convention it was fitted in (what N, C and B count). Every rule gives a peak AdamW learning rate
and a batch in tokens; a sweep turns the batch into whole sequences of data.seq_len.

  constant      the base recipe's train.lr and batch for every point
  inverse_sqrt  lr = base lr x (N_base / N)^0.5 (N_base: the base model's size in the sweep's convention)
  deepseek      DeepSeek LLM 2024 (arXiv 2401.02954): eta = 0.3118 C^-0.1250, B = 0.2920 C^0.3271 tokens,
                C = M D with M the non-embedding FLOPs per token including attention (conventions.py "M")
  step_law      Li et al. 2025, Step Law (arXiv 2503.04715): eta = 1.79 N^-0.713 D^0.307, B = 0.58 D^0.571
                tokens, N non-embedding parameters, D training tokens
  porian        Porian et al. 2024: eta = 3.7 N^-0.36, B = 0.7576 N^0.703 tokens, N the parameters that cost
                matmuls, the output layer included ("matmul")
  fitted        your own eta = a N^b, B = c N^d from `llmkit scale hp` (hp.json), for AdamW or Muon

Warmup rules: fraction (the base's warmup share of its steps) or porian (warmup tokens = N, the
parameter count, Porian et al.'s short warmup; at least one step).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.errors import RecipeError

LR_RULES = ("constant", "inverse_sqrt", "deepseek", "step_law", "porian", "fitted")
BATCH_RULES = ("constant", "deepseek", "step_law", "porian", "fitted")
WARMUP_RULES = ("fraction", "porian")
HP_VERSION = 1


@dataclass(frozen=True)
class Published:
    """A published law: eta = lr_coef x X^lr_exp..., B = batch_coef x Y^batch_exp (tokens), and what X and Y count."""

    name: str
    citation: str
    lr: str
    batch: str
    inputs: str


PUBLISHED = {
    "deepseek": Published(
        "deepseek", "DeepSeek LLM 2024 (arXiv 2401.02954)", "0.3118 C^-0.1250", "0.2920 C^0.3271 tokens",
        "C = M D: M = 6 x non-embedding parameters + 6 x layers x hidden x seq_len FLOPs per token, D tokens",
    ),
    "step_law": Published(
        "step_law", "Li et al. 2025, Step Law (arXiv 2503.04715)", "1.79 N^-0.713 D^0.307", "0.58 D^0.571 tokens",
        "N non-embedding parameters, D training tokens",
    ),
    "porian": Published(
        "porian", "Porian et al. 2024 (arXiv 2406.19146)", "3.7 N^-0.36", "0.7576 N^0.703 tokens",
        "N parameters including the output layer (matmul convention)",
    ),
}


@dataclass(frozen=True)
class PointInputs:
    """What a rule may read about one point: its parameter counts, tokens, DeepSeek's M per token, and the base's values."""

    counts: dict[str, int]  # total, non_embedding, matmul
    tokens: int
    M_per_token: float
    convention: str  # the sweep's param_convention
    base_lr: float
    base_batch_tokens: int
    base_params: int | None  # the base model's size in the convention (inverse_sqrt)


def deepseek_lr(C: float) -> float:
    """DeepSeek LLM: eta_opt = 0.3118 C^-0.125, C = M D."""
    return 0.3118 * C**-0.1250


def deepseek_batch(C: float) -> float:
    """DeepSeek LLM: B_opt = 0.2920 C^0.3271 tokens."""
    return 0.2920 * C**0.3271


def step_law_lr(N: float, D: float) -> float:
    """Step Law: eta = 1.79 N^-0.713 D^0.307 (N non-embedding parameters, D tokens)."""
    return 1.79 * N**-0.713 * D**0.307


def step_law_batch(D: float) -> float:
    """Step Law: B = 0.58 D^0.571 tokens."""
    return 0.58 * D**0.571


def porian_lr(N: float) -> float:
    """Porian et al.: eta = 3.7 N^-0.36 (N with the output layer)."""
    return 3.7 * N**-0.36


def porian_batch(N: float) -> float:
    """Porian et al.: B = 0.7576 N^0.703 tokens."""
    return 0.7576 * N**0.703


@dataclass(frozen=True)
class HpFit:
    """A user's own rule from `llmkit scale hp`: eta = lr_coef N^lr_exp, B = batch_coef N^batch_exp tokens."""

    lr_coef: float
    lr_exp: float
    batch_coef: float
    batch_exp: float
    convention: str
    optimizer: str
    path: str
    fitted_sizes: tuple[float, ...] = ()  # the hp grid's sizes the rule was fitted at (N in `convention`)

    def lr(self, N: float) -> float:
        """The fitted learning rate at size N."""
        return self.lr_coef * N**self.lr_exp

    def batch(self, N: float) -> float:
        """The fitted batch in tokens at size N."""
        return self.batch_coef * N**self.batch_exp


def load_hp(path: Path, key: str = "hp_fit") -> HpFit:
    """The rule in an hp.json of `llmkit scale hp`; RecipeError naming `key` and the fix otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{key}: {path} does not exist; run `llmkit scale hp RECIPE` first, or choose a published rule") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecipeError(f"{key}: {path} is not readable as JSON ({exc.__class__.__name__}); rerun `llmkit scale hp`") from None
    rule = data.get("rule") if isinstance(data, dict) else None
    values = {}
    for name in ("lr_coef", "lr_exp", "batch_coef", "batch_exp"):
        value = rule.get(name) if isinstance(rule, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecipeError(f"{key}: {path} is not an hp.json of `llmkit scale hp` (rule.{name} is {value!r}); rerun it")
        values[name] = float(value)
    per_size = data.get("per_size") if isinstance(data.get("per_size"), list) else []
    sizes = tuple(sorted(float(p["N"]) for p in per_size if isinstance(p, dict) and isinstance(p.get("N"), (int, float))))
    return HpFit(**values, convention=str(rule.get("convention", "non_embedding")), optimizer=str(rule.get("optimizer", "adamw")),
                 path=str(path), fitted_sizes=sizes)


def extrapolation_note(hp: HpFit, sizes: list[int]) -> str | None:
    """A note when the sweep's sizes reach beyond the sizes the fitted rule was measured at (a power law extrapolated)."""
    if not hp.fitted_sizes:
        return None
    low, high = hp.fitted_sizes[0], hp.fitted_sizes[-1]
    outside = [N for N in sizes if N < low / 1.05 or N > high * 1.05]
    if not outside:
        return None
    reach = max(max(outside) / high, low / min(outside))
    return (f"hp_fit: the fitted rule was measured at N = {low:,.0f} .. {high:,.0f} ({hp.convention}); points of N = "
            f"{', '.join(f'{N:,}' for N in sorted(set(outside)))} extrapolate it up to {reach:.1f}x beyond (add those sizes to hp.sizes)")


def lr_for(rule: str, p: PointInputs, hp: HpFit | None = None) -> float:
    """The peak learning rate of a point by `rule`."""
    if rule == "constant":
        return p.base_lr
    if rule == "inverse_sqrt":
        if not p.base_params:
            raise RecipeError("lr_rule: inverse_sqrt needs the base model's size; give the base recipe explicit sizes")
        return p.base_lr * math.sqrt(p.base_params / p.counts[p.convention])
    if rule == "deepseek":
        return deepseek_lr(p.M_per_token * p.tokens)
    if rule == "step_law":
        return step_law_lr(p.counts["non_embedding"], p.tokens)
    if rule == "porian":
        return porian_lr(p.counts["matmul"])
    if hp is None:
        raise RecipeError("lr_rule: fitted needs hp_fit: the hp.json written by `llmkit scale hp`")
    return hp.lr(p.counts[hp.convention])


def batch_tokens_for(rule: str, p: PointInputs, hp: HpFit | None = None) -> float:
    """The batch of a point in tokens by `rule` (before rounding to whole sequences)."""
    if rule == "constant":
        return float(p.base_batch_tokens)
    if rule == "deepseek":
        return deepseek_batch(p.M_per_token * p.tokens)
    if rule == "step_law":
        return step_law_batch(p.tokens)
    if rule == "porian":
        return porian_batch(p.counts["matmul"])
    if hp is None:
        raise RecipeError("batch_rule: fitted needs hp_fit: the hp.json written by `llmkit scale hp`")
    return hp.batch(p.counts[hp.convention])


def batch_layout(batch_tokens: float, seq_len: int, max_micro: int) -> tuple[int, int]:
    """(micro_batch_size, grad_accum_steps) whose product of sequences is nearest batch_tokens / seq_len, at least one
    sequence, with micro-batches of at most max_micro sequences (the base's micro_batch_size, what fits in memory)."""
    sequences = max(1, int(round(batch_tokens / seq_len)))
    fewest = math.ceil(sequences / max_micro)
    # Among up to twice the fewest accumulation steps, the layout nearest the wanted sequences (18 = 3 x 6, not 4 x 5).
    layouts = [(min(max_micro, max(1, round(sequences / accum))), accum) for accum in range(fewest, 2 * fewest + 1)]
    micro, accum = min(layouts, key=lambda m_a: (abs(m_a[0] * m_a[1] - sequences), m_a[1]))
    return micro, accum


def warmup_steps_for(rule: str, base_fraction: float, steps: int, N: int, tokens_per_step: int) -> int:
    """Warmup steps of a run of `steps` steps: the base's fraction of them, or N tokens (Porian et al.), at least one."""
    if rule == "porian":
        return max(1, math.ceil(N / tokens_per_step))
    return int(round(base_fraction * steps))


def describe(lr_rule: str, batch_rule: str, warmup_rule: str, hp: HpFit | None) -> list[str]:
    """One line per rule in use, with its constants and convention (for plans, fit.json and docs)."""
    lines = []
    for kind, rule in (("lr", lr_rule), ("batch", batch_rule)):
        if rule in PUBLISHED:
            law = PUBLISHED[rule]
            lines.append(f"{kind} {rule}: {law.lr if kind == 'lr' else law.batch} ({law.citation}; {law.inputs})")
        elif rule == "fitted" and hp is not None:
            formula = f"{hp.lr_coef:.4g} N^{hp.lr_exp:.3f}" if kind == "lr" else f"{hp.batch_coef:.4g} N^{hp.batch_exp:.3f} tokens"
            lines.append(f"{kind} fitted: {formula} (N {hp.convention}, {hp.optimizer}; {hp.path})")
        else:
            lines.append(f"{kind} {rule}")
    lines.append(f"warmup {warmup_rule}" + (": N tokens (Porian et al. 2024)" if warmup_rule == "porian" else ": the base's share of the steps"))
    return lines


def provenance(lr_rule: str, batch_rule: str, warmup_rule: str, hp: HpFit | None) -> dict[str, Any]:
    """The rules as fit.json records them."""
    return {"lr_rule": lr_rule, "batch_rule": batch_rule, "warmup_rule": warmup_rule,
            "hp_fit": None if hp is None else {"path": hp.path, "lr_coef": hp.lr_coef, "lr_exp": hp.lr_exp,
                                                "batch_coef": hp.batch_coef, "batch_exp": hp.batch_exp,
                                                "convention": hp.convention, "optimizer": hp.optimizer},
            "lines": describe(lr_rule, batch_rule, warmup_rule, hp)}


def _vertex(x: list[float], loss: list[float]) -> float:
    """The x (in log space) of the lowest loss: the vertex of a parabola through the best point and its neighbours, when
    it opens upwards and lies between them, else the best point itself."""
    import numpy as np

    order = np.argsort(x)
    xs, ys = np.log(np.asarray(x, dtype=float)[order]), np.asarray(loss, dtype=float)[order]
    best = int(np.argmin(ys))
    if len(xs) < 3 or best in (0, len(xs) - 1):
        return float(np.exp(xs[best]))
    window = slice(best - 1, best + 2)
    a, b, _ = np.polyfit(xs[window], ys[window], 2)
    if a <= 0:
        return float(np.exp(xs[best]))
    return float(np.exp(min(max(-b / (2 * a), xs[best - 1]), xs[best + 1])))


def fit_hp(records: list[dict[str, Any]], convention: str, optimizer: str) -> dict[str, Any]:
    """Your own rule from an lr x batch grid: per size the best lr (at the best batch) and best batch (at that lr), then
    least squares of log lr* and log B* on log N. records: rows with N, lr, tokens_per_step, loss."""
    import numpy as np

    sizes = sorted({r["N"] for r in records})
    per_size = []
    for N in sizes:
        mine = [r for r in records if r["N"] == N and math.isfinite(r["loss"])]
        if not mine:
            raise RecipeError(f"hp: every run at N = {N:,} diverged (no finite loss); try smaller hp.lrs")
        best = min(mine, key=lambda r: r["loss"])
        at_batch = [r for r in mine if r["tokens_per_step"] == best["tokens_per_step"]]
        at_lr = [r for r in mine if r["lr"] == best["lr"]]
        lr = _vertex([r["lr"] for r in at_batch], [r["loss"] for r in at_batch])
        batch = _vertex([r["tokens_per_step"] for r in at_lr], [r["loss"] for r in at_lr])
        edge = best["lr"] in (min(r["lr"] for r in at_batch), max(r["lr"] for r in at_batch))
        # A best batch at the end of hp.batch_tokens only bounds the optimum, as a best lr at the end of hp.lrs does.
        batches = {r["tokens_per_step"] for r in at_lr}
        batch_edge = len(batches) > 1 and best["tokens_per_step"] in (min(batches), max(batches))
        per_size.append({"N": N, "lr": lr, "batch_tokens": batch, "loss": best["loss"], "lr_at_grid_edge": edge,
                         "batch_at_grid_edge": batch_edge})
    log_N = np.log([p["N"] for p in per_size])
    lr_exp, lr_log_coef = np.polyfit(log_N, np.log([p["lr"] for p in per_size]), 1)
    batch_exp, batch_log_coef = np.polyfit(log_N, np.log([p["batch_tokens"] for p in per_size]), 1)
    return {
        "version": HP_VERSION,
        "rule": {"lr_coef": float(np.exp(lr_log_coef)), "lr_exp": float(lr_exp), "batch_coef": float(np.exp(batch_log_coef)),
                 "batch_exp": float(batch_exp), "convention": convention, "optimizer": optimizer},
        "per_size": per_size,
        "method": "per size: lr* = vertex of a parabola of loss in log lr at the best batch (the best grid lr when it is an "
                  "edge), B* likewise in log batch at that lr; then least squares of log lr* and log B* on log N",
    }
