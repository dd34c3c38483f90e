"""The size dial: "a model of about N parameters" (or "of this depth") as a concrete shape, counted on the meta device.

    llmkit validate pretrain/tiny --set model.target_params=2e6     # the shape it picks, with its three counts
    llmkit pretrain pretrain/tiny --set model.depth=6

A pretrain recipe sets `model.target_params` (counted as `model.param_convention`) and/or `model.depth`;
training and `llmkit validate` turn them into explicit model.* sizes (`sized_recipe`), so the run
directory's recipe.yaml says exactly what was built. The rules, for model.type llama, mistral, qwen2,
qwen3 ("llama-style": gated MLP, grouped-query attention) and gpt2:

- head_dim 64 (or model.head_dim where the recipe gives it), attention heads = hidden / head_dim;
- key-value heads = heads (or model.num_key_value_heads, which must divide heads);
- intermediate: llama-style 8/3 x hidden rounded to a multiple of 64; gpt2 4 x hidden (GPT-2's MLP);
- vocabulary: the tokenizer's, padded to a multiple of 64, as training builds it;
- depth alone: hidden = aspect_ratio x depth rounded to a multiple of head_dim (nanochat's 64 x depth);
- target_params: for every hidden size (a multiple of head_dim) the depth that comes nearest the target
  with hidden / depth within [aspect_ratio / 2, 2 x aspect_ratio]; of those, the shape whose count is
  nearest the target in ratio (ties: hidden / depth nearest aspect_ratio). With the depth fixed
  (model.depth or an explicit layer count) only hidden varies; with hidden fixed only the depth.

Counts are exact: a model's count is (its 1-layer count) + (layers - 1) x (one layer), both taken from
meta-device models built through llmkit.models, and the chosen shape is counted whole once more.

Explicit sizes win: model.* sizes given in the recipe are kept and narrow the search. They contradict
the dial (a RecipeError naming both) when the nearest shape that keeps them misses the target by more
than TOLERANCE and by more than the free search would, or when model.depth and the layer count differ.

Tolerance: shapes come in steps of head_dim, so the nearest shape is within 10% of the target from
about 5M non-embedding parameters up (tests/test_scale.py checks 20M for llama and gpt2); below that
the steps are coarser (up to ~2x apart with head_dim 64: set model.head_dim smaller for tiny models).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

from llmkit.errors import RecipeError
from llmkit.models import meta_model, model_config, parameter_counts
from llmkit.recipes import ModelSpec

CONVENTIONS = ("total", "non_embedding", "matmul")
TOLERANCE = 0.10
HEAD_DIM = 64
INTERMEDIATE_MULTIPLE = 64
MAX_HIDDEN_STEPS = 4096  # hidden sizes tried at most: 262,144 with head_dim 64, far beyond any model


@dataclass(frozen=True)
class Family:
    """How one kind of config names its sizes, and its MLP width rule."""

    name: str
    types: tuple[str, ...]
    layers: str
    hidden: str
    heads: str
    kv_heads: str | None
    intermediate: str
    mlp_ratio: float

    def keys(self, has_head_dim: bool) -> dict[str, str]:
        """Role (layers, hidden, heads, kv_heads, intermediate, head_dim) -> config key."""
        roles = {"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "intermediate": self.intermediate}
        if self.kv_heads:
            roles["kv_heads"] = self.kv_heads
        if has_head_dim:
            roles["head_dim"] = "head_dim"
        return roles


FAMILIES = (
    Family("llama-style", ("llama", "mistral", "qwen2", "qwen3"), "num_hidden_layers", "hidden_size",
           "num_attention_heads", "num_key_value_heads", "intermediate_size", 8 / 3),
    Family("gpt2", ("gpt2",), "n_layer", "n_embd", "n_head", None, "n_inner", 4.0),
)


@dataclass(frozen=True)
class Shape:
    """A concrete model shape."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int


@dataclass
class SizedModel:
    """A shape, its parameter counts in every convention, and the target it was chosen for."""

    model_type: str
    shape: Shape
    counts: dict[str, int]  # total, non_embedding, matmul
    target: int | None
    convention: str

    def describe(self) -> str:
        """One line: the shape and its three counts (and how far from the target)."""
        s = self.shape
        kv = f" ({s.kv_heads} kv)" if s.kv_heads != s.heads else ""
        miss = ""
        if self.target:
            miss = f"; target {self.target:,} {self.convention} ({self.counts[self.convention] / self.target - 1:+.1%})"
        return (
            f"{self.model_type}, {s.layers} layers, hidden {s.hidden}, {s.heads} heads{kv} of {s.head_dim}, "
            f"intermediate {s.intermediate}: total {self.counts['total']:,}, non-embedding {self.counts['non_embedding']:,}, "
            f"matmul {self.counts['matmul']:,}{miss}"
        )


def family_of(model_type: str, key: str = "model.target_params") -> Family:
    """The family of a model.type; RecipeError naming `key` for a type the dial does not know."""
    for family in FAMILIES:
        if model_type in family.types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.types)
    raise RecipeError(f"{key}: the size dial knows model.type {known}; for {model_type} give its sizes as model.* keys")


def _config_class(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


@functools.cache
def _roles(model_type: str) -> dict[str, str]:
    """Role -> config key for a model type (building its default config to see whether it has head_dim costs ~10 ms)."""
    family = family_of(model_type)
    return family.keys(has_head_dim=hasattr(_config_class(model_type)(), "head_dim"))


def _explicit(spec: ModelSpec, roles: dict[str, str]) -> dict[str, int]:
    """Role -> value of the sizes the recipe gives itself (under the config key or one of its aliases)."""
    aliases = dict(getattr(_config_class(spec.type), "attribute_map", None) or {})
    by_key = {key: role for role, key in roles.items()}
    found: dict[str, int] = {}
    for key, value in spec.config_overrides.items():
        role = by_key.get(aliases.get(key, key))
        if role is not None and value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RecipeError(f"model.{key}: must be a positive integer, got {value!r}")
            found[role] = value
    return found


def size_keys(model_type: str) -> set[str]:
    """The model.* keys that size a model of this type: its layers, hidden, heads, kv heads, intermediate, head_dim keys and their aliases."""
    keys = set(_roles(model_type).values())
    aliases = dict(getattr(_config_class(model_type), "attribute_map", None) or {})
    return keys | {alias for alias, key in aliases.items() if key in keys}


def without_sizes(spec: ModelSpec) -> dict[str, Any]:
    """The model section as a mapping without its size keys (see `size_keys`)."""
    drop = size_keys(spec.type)
    return {k: v for k, v in spec.model_dump().items() if k not in drop}


# ----------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------

_COUNTS: dict[str, dict[str, int]] = {}


def _shape_keys(roles: dict[str, str], shape: Shape, layers: int | None = None) -> dict[str, int]:
    values = {
        "layers": shape.layers if layers is None else layers, "hidden": shape.hidden, "heads": shape.heads,
        "kv_heads": shape.kv_heads, "intermediate": shape.intermediate, "head_dim": shape.head_dim,
    }
    return {key: values[role] for role, key in roles.items()}


def shape_keys(model_type: str, shape: Shape) -> dict[str, int]:
    """The model.* keys (this type's config names) that build `shape`."""
    return _shape_keys(_roles(model_type), shape)


def _spec_with(spec: ModelSpec, roles: dict[str, str], shape: Shape, layers: int | None = None) -> ModelSpec:
    data = without_sizes(spec)
    data.update(_shape_keys(roles, shape, layers))
    return ModelSpec.model_validate(data)


def count(recipe, shape: Shape, vocab_size: int | None, layers: int | None = None) -> dict[str, int]:
    """Parameters of `shape` (with `layers` instead of shape.layers when given) in every convention, on the meta device."""
    roles = _roles(recipe.model.type)
    spec = _spec_with(recipe.model, roles, shape, layers)
    key = json.dumps([spec.type, vocab_size, spec.config_overrides], sort_keys=True, default=str)
    if key not in _COUNTS:
        # No special token ids: a config's defaults (GPT-2's 50256) lie outside a small vocabulary and only warn.
        no_ids = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id")) if vocab_size else None
        config = model_config(recipe.model_copy(update={"model": spec}), vocab_size, no_ids)
        counts = parameter_counts(meta_model(config))
        _COUNTS[key] = {name: counts[name] for name in CONVENTIONS}
    return _COUNTS[key]


class _Counter:
    """n(layers, hidden) in one convention from two counts per hidden size: n = n1 + (layers - 1) (n2 - n1)."""

    def __init__(self, recipe, vocab_size: int | None, convention: str, shape_at) -> None:
        self.recipe, self.vocab_size, self.convention, self.shape_at = recipe, vocab_size, convention, shape_at

    def per_hidden(self, hidden: int) -> tuple[int, int] | None:
        """(1-layer count, count of each further layer) at this hidden size; None where the heads do not divide it."""
        shape = self.shape_at(1, hidden)
        if shape is None:
            return None
        one = count(self.recipe, shape, self.vocab_size, layers=1)[self.convention]
        two = count(self.recipe, shape, self.vocab_size, layers=2)[self.convention]
        return one, two - one

    def __call__(self, layers: int, hidden: int) -> float:
        counts = self.per_hidden(hidden)
        return math.inf if counts is None else counts[0] + (layers - 1) * counts[1]


# ----------------------------------------------------------------------------------------------
# Choosing a shape
# ----------------------------------------------------------------------------------------------


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _shape_rule(family: Family, fixed: dict[str, int]):
    """(layers, hidden) -> Shape by the rules (fixed roles kept), or None where the explicit sizes do not divide."""
    head_unit = fixed.get("head_dim", HEAD_DIM)

    def shape_at(layers: int, hidden: int) -> Shape | None:
        heads = fixed.get("heads") or max(1, hidden // head_unit)
        if hidden % heads:
            return None
        head_dim = fixed.get("head_dim") or hidden // heads
        kv_heads = fixed.get("kv_heads", heads) if family.kv_heads else heads
        if heads % kv_heads:
            return None
        intermediate = fixed.get("intermediate") or _round_to(family.mlp_ratio * hidden, INTERMEDIATE_MULTIPLE)
        return Shape(layers, hidden, heads, kv_heads, intermediate, head_dim)

    return shape_at


def _hidden_step(fixed: dict[str, int]) -> int:
    """Hidden sizes are tried in steps of head_dim, or of the head count when the recipe fixes it."""
    return fixed["heads"] if "heads" in fixed else fixed.get("head_dim", HEAD_DIM)


def _first(holds, limit: int = MAX_HIDDEN_STEPS) -> int:
    """The smallest k in 1..limit for which the monotone test `holds(k)` is true (limit + 1 when none is): doubling, then bisection."""
    high = 1
    while high < limit and not holds(high):
        high *= 2
    high = min(high, limit)
    if not holds(high):
        return limit + 1
    low = high // 2 + 1 if high > 1 else 1  # holds(high // 2) was false
    while low < high:
        mid = (low + high) // 2
        if holds(mid):
            high = mid
        else:
            low = mid + 1
    return low


def _candidates(n: _Counter, step: int, target: float, aspect: int, layers: int | None, hidden: int | None):
    """(layers, hidden, count) of the shapes next to the target, for whichever of layers and hidden is fixed.

    Counts grow with both layers and hidden, so the search first bisects for the hidden size where the
    target comes within reach, then walks up from there: a 7B target costs tens of counts, not hundreds.
    """

    def near_depth(h: int, low: int, high: int) -> list[int]:
        one, per_layer = n.per_hidden(h)
        exact = 1 + (target - one) / per_layer if per_layer > 0 else low
        return sorted({min(max(d, low), high) for d in (math.floor(exact), math.ceil(exact))})

    def band(h: int) -> tuple[int, int]:
        return max(1, math.ceil(h / (2 * aspect))), max(1, math.floor(2 * h / aspect))

    if hidden is not None:
        if n.per_hidden(hidden) is None:
            return []
        depths = [layers] if layers is not None else near_depth(hidden, 1, 10**6)
        return [(d, hidden, n(d, hidden)) for d in depths]
    if layers is not None:
        hit = _first(lambda k: n(layers, k * step) >= target)
        ks = [k for k in range(max(1, hit - 3), min(hit, MAX_HIDDEN_STEPS) + 1) if n.per_hidden(k * step) is not None]
        return [(layers, k * step, n(layers, k * step)) for k in ks]
    # Below `enter`, even the deepest shape the band allows falls short of the target.
    enter = _first(lambda k: n(band(k * step)[1], k * step) >= target)
    found = []
    for k in range(max(1, enter - 1), MAX_HIDDEN_STEPS + 1):
        h = k * step
        if n.per_hidden(h) is None:
            continue
        low, high = band(h)
        if high < low:
            continue
        found += [(d, h, n(d, h)) for d in near_depth(h, low, high)]
        if n(low, h) >= target:  # every larger hidden size overshoots even at its smallest depth
            return found
    raise RecipeError(f"model.target_params: {target:,.0f} is beyond what the size dial reaches; give the sizes explicitly")


def _nearest(candidates, target: float, aspect: int) -> tuple[int, int, float]:
    def badness(c):
        d, h, count_ = c
        return (round(abs(math.log(count_ / target)), 12), abs(math.log(h / (aspect * d))), count_)

    return min(candidates, key=badness)


def _search(recipe, family: Family, fixed: dict[str, int], vocab_size: int | None, target: int, layers: int | None) -> Shape:
    """The shape nearest `target` that keeps the fixed roles (and `layers`, when given)."""
    spec = recipe.model
    shape_at = _shape_rule(family, fixed)
    n = _Counter(recipe, vocab_size, spec.param_convention, shape_at)
    found = _candidates(n, _hidden_step(fixed), target, spec.aspect_ratio, layers, fixed.get("hidden"))
    if not found:
        raise RecipeError("model: the explicit model.* sizes do not divide (hidden by heads, heads by key-value heads); fix them")
    d, h, _ = _nearest(found, target, spec.aspect_ratio)
    return shape_at(d, h)


def choose(recipe, vocab_size: int | None = None) -> SizedModel:
    """The shape a pretrain recipe's model section describes (size dial or explicit sizes), with its counts."""
    spec = recipe.model
    family = family_of(spec.type, "model.target_params" if spec.target_params else "model.depth")
    roles = dict(_roles(spec.type))
    fixed = _explicit(spec, roles)
    if spec.depth is not None and fixed.get("layers", spec.depth) != spec.depth:
        raise RecipeError(
            f"model.depth ({spec.depth}) contradicts model.{roles['layers']} ({fixed['layers']}); give one of them"
        )
    layers = spec.depth or fixed.get("layers")
    if spec.target_params is None:
        if layers is None:
            raise RecipeError("model: give model.target_params or model.depth to use the size dial")
        step = _hidden_step(fixed)
        hidden = fixed.get("hidden") or _round_to(spec.aspect_ratio * layers, step)
        shape = _shape_rule(family, fixed)(layers, hidden)
        if shape is None:
            raise RecipeError(f"model: hidden size {hidden} does not split into the given attention heads; fix the model.* sizes")
    else:
        shape = _search(recipe, family, fixed, vocab_size, spec.target_params, layers)
        if fixed:
            _check_contradiction(recipe, family, roles, fixed, vocab_size, shape)
    counts = count(recipe, shape, vocab_size)
    return SizedModel(spec.type, shape, counts, spec.target_params, spec.param_convention)


def _check_contradiction(recipe, family, roles, explicit, vocab_size, shape: Shape) -> None:
    """RecipeError when the explicit sizes keep the model further from target_params than TOLERANCE and the free dial."""
    spec = recipe.model
    target = spec.target_params

    def miss(s: Shape) -> float:
        return abs(math.log(count(recipe, s, vocab_size)[spec.param_convention] / target))

    free = _search(recipe, family, {}, vocab_size, target, spec.depth)
    if miss(shape) <= max(math.log1p(TOLERANCE), miss(free)) + 1e-9:
        return
    given = ", ".join(f"model.{roles[role]} {value}" for role, value in explicit.items())
    got = count(recipe, shape, vocab_size)[spec.param_convention]
    raise RecipeError(
        f"model.target_params ({target:,}) contradicts the explicit sizes ({given}): the nearest model with them has "
        f"{got:,} {spec.param_convention} parameters ({got / target - 1:+.0%}); drop target_params or those sizes"
    )


def sized_recipe(recipe, vocab_size: int | None = None):
    """The recipe with its size dial turned into explicit model.* sizes; the recipe itself when it has no dial."""
    spec = recipe.model
    if spec.type is None or not spec.has_size_dial:
        return recipe
    sized = choose(recipe, vocab_size)
    roles = _roles(spec.type)
    return recipe.model_copy(update={"model": _spec_with(spec, roles, sized.shape)})


def dial_recipe(recipe, *, target_params: int | None = None, depth: int | None = None, convention: str | None = None):
    """The recipe with its size keys removed and the dial set instead (what a sweep point or a recommendation builds)."""
    data = without_sizes(recipe.model)
    data.update(target_params=target_params, depth=depth)
    if convention is not None:
        data["param_convention"] = convention
    return recipe.model_copy(update={"model": ModelSpec.model_validate(data)})
