"""What a recipe will do, printed by `llmkit validate` before anything runs.

    llmkit validate pretrain/tiny
"""

from __future__ import annotations

from llmkit.recipes import EvalRecipe, FinetuneRecipe, PretrainRecipe, Recipe, TokenizerRecipe


def describe_plan(recipe: Recipe) -> str:
    """A few lines: what runs, on which data, for how many steps and tokens, and the model's cost."""
    if isinstance(recipe, TokenizerRecipe):
        spec = recipe.tokenizer
        return "\n".join(
            [
                f"stage:          tokenizer ({spec.type}, vocab_size {spec.vocab_size}, min_frequency {spec.min_frequency})",
                f"train sources:  {_sources(recipe.data.train)}",
                f"output_dir:     {recipe.output_dir}",
            ]
        )
    if isinstance(recipe, (PretrainRecipe, FinetuneRecipe)):
        from llmkit.modeling import plan_lines

        return "\n".join(plan_lines(recipe))
    if isinstance(recipe, EvalRecipe):
        return "\n".join(
            [
                f"stage:          eval ({', '.join(recipe.metrics)})",
                f"models:         {', '.join(recipe.model.paths)}",
                f"test sources:   {_sources(recipe.data.test)}",
                f"output_dir:     {recipe.output_dir}",
            ]
        )
    raise TypeError(f"unknown recipe type {type(recipe).__name__}")


def _sources(sources) -> str:
    return ", ".join(s if isinstance(s, str) else f"hub:{s.hub}" for s in sources)
