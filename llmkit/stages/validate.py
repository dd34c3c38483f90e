"""`llmkit validate`: what a recipe will do (parameters, tokens per step, steps, FLOPs), before anything runs.

    llmkit validate pretrain/tiny --set train.lr=1e-3

Builds no weights and reads no data: the model is instantiated on the meta device to count it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmkit.data.mixture import mixture_of
from llmkit.data.sources import source_names
from llmkit.data.splits import builtin_validation_warning
from llmkit.errors import ModelError
from llmkit.models import (
    VOCAB_MULTIPLE,
    load_tokenizer,
    meta_model,
    model_config,
    model_summary_lines,
    padded_vocab_size,
    parameter_counts,
    special_token_ids,
)
from llmkit.recipes import (
    EvalRecipe,
    FinetuneRecipe,
    PretrainRecipe,
    Recipe,
    ScaleRecipe,
    TokenizerRecipe,
    recipe_to_yaml,
)
from llmkit.scaling.shapes import sized_recipe
from llmkit.stages import scale
from llmkit.training.preference import plan_lines as preference_plan


def describe_plan(recipe: Recipe) -> str:
    """A few lines: what runs, on which data, for how many steps and tokens, and the model's cost."""
    if isinstance(recipe, TokenizerRecipe):
        spec = recipe.tokenizer
        return "\n".join(
            [
                f"stage:          tokenizer ({spec.type}, vocab_size {spec.vocab_size}, min_frequency {spec.min_frequency})",
                f"train sources:  {source_names(recipe.data.train)}",
                f"output_dir:     {recipe.output_dir}",
            ]
        )
    if isinstance(recipe, (PretrainRecipe, FinetuneRecipe)):
        return "\n".join(plan_lines(recipe))
    if isinstance(recipe, ScaleRecipe):
        return "\n".join(scale.plan_lines(recipe))
    if isinstance(recipe, EvalRecipe):
        return "\n".join(
            [
                f"stage:          eval ({', '.join(recipe.metrics)})",
                f"models:         {', '.join(recipe.model.paths)}",
                f"test sources:   {source_names(recipe.data.test)}",
                f"output_dir:     {recipe.output_dir}",
            ]
        )
    raise TypeError(f"unknown recipe type {type(recipe).__name__}")


def _plan_vocab(recipe) -> tuple[int | None, dict, str]:
    """Vocab size and special ids from the recipe's tokenizer when it is already there (it may not be yet)."""
    name = getattr(recipe, "tokenizer", None)
    if name is None:
        return None, {}, ""
    if not Path(name).expanduser().is_dir():
        # validate never touches the network: a hub tokenizer is only read when training starts
        return None, {}, f"tokenizer {name} is not a local directory (yet): vocab size taken from the config"
    try:
        tokenizer = load_tokenizer(name)
    except ModelError:
        return None, {}, f"tokenizer {name} not found yet: vocab size taken from the config"
    return padded_vocab_size(len(tokenizer)), special_token_ids(tokenizer), f"tokenizer {name}: {len(tokenizer)} tokens, padded to a multiple of {VOCAB_MULTIPLE}"


def plan_lines(recipe) -> list[str]:
    """The plan `llmkit validate` prints for a pretrain or finetune recipe; builds no weights, reads no data."""
    if isinstance(recipe, FinetuneRecipe) or recipe.model.type is None:
        vocab, note = None, ""
        config = model_config(recipe)
        source = f"from checkpoint {recipe.model.path}"
    else:
        vocab, special, note = _plan_vocab(recipe)
        config = model_config(recipe, vocab, special)
        source = "from config (random init)"
    model = meta_model(config)
    counts = parameter_counts(model)
    lora = getattr(recipe, "lora", None)
    if lora is not None and lora.enabled:
        counts.pop("trainable", None)
    lines = [f"stage:            {recipe.stage} ({config.model_type} {source})"]
    lines += model_summary_lines(config, counts, recipe)
    if isinstance(recipe, PretrainRecipe) and recipe.data.is_mixture:
        mix = mixture_of(recipe.data)
        lines.append("mixture:          " + ", ".join(f"{label} {share:.1%}" for label, share in zip(mix.labels, mix.shares, strict=True))
                     + " of the tokens (weights normalised)")
    spec = recipe.model
    if spec.target_params is not None:
        got = counts[spec.param_convention]
        lines.append(f"size dial:        target_params {spec.target_params:,} {spec.param_convention} -> {got:,} ({got / spec.target_params - 1:+.1%})")
    elif spec.depth is not None:
        lines.append(f"size dial:        depth {spec.depth}, aspect_ratio {spec.aspect_ratio}")
    if isinstance(recipe, FinetuneRecipe) and recipe.task.type == "preference":
        lines += preference_plan(recipe.task, bool(lora and lora.enabled), counts["total"], recipe.model.dtype, recipe.train.micro_batch_size)
    if note:
        lines.append(f"vocab:            {note}")
    lines.append(f"output_dir:       {recipe.output_dir}")
    return lines


def run(recipe: Recipe) -> str:
    """`llmkit validate RECIPE`: the resolved recipe and its plan, as printed text."""
    if isinstance(recipe, PretrainRecipe):
        recipe = sized_recipe(recipe, _plan_vocab(recipe)[0])  # the size dial as the explicit sizes training builds
    plan = describe_plan(recipe)  # before printing anything: a plan that fails prints one error line only
    data = getattr(recipe, "data", None)
    warning = builtin_validation_warning(data) if hasattr(data, "train") else None
    if warning:
        print(warning, file=sys.stderr)
    return f"{recipe_to_yaml(recipe).rstrip()}\n\n# plan\n{plan}"
