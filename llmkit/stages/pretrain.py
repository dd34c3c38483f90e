"""`llmkit pretrain`: causal-LM pretraining from scratch (or continued from a checkpoint).

    llmkit pretrain pretrain/tiny --set train.max_steps=50
    accelerate launch --multi_gpu --num_processes 2 -m llmkit pretrain pretrain/tiny

Pretraining differs from fine-tuning only in its data (packed blocks of raw text, cached or
streamed: llmkit/data/lm.py) and its model (built from model.type, or loaded from model.path).
"""

from __future__ import annotations

from typing import Any

from llmkit import dist, models, rundir
from llmkit.data.batches import check_same_data
from llmkit.data.lm import check_lm_data, lm_train_data, training_files
from llmkit.data.splits import builtin_validation_warning
from llmkit.evals.training import training_evals
from llmkit.recipes import PretrainRecipe
from llmkit.scaling.shapes import sized_recipe
from llmkit.training import checkpoints
from llmkit.training.loop import check_launch, fit


def check(recipe: PretrainRecipe, overwrite: bool = False) -> None:
    """Checks that read no weights and no data: the run directory and the data sources."""
    resume_from = rundir.check_run_dir(recipe, overwrite=overwrite)
    check_launch(recipe, resume_from)
    check_lm_data(recipe)
    if resume_from is not None:
        # Before tokenizing: changed training files are refused without building a cache entry for them.
        saved = checkpoints.read_trainer_state(resume_from).get("data_fingerprint")
        check_same_data(saved, training_files(recipe), resume_from)
    warning = builtin_validation_warning(recipe.data)
    if warning:
        dist.log(warning)


def run(recipe: PretrainRecipe, overwrite: bool = False) -> dict[str, Any]:
    """`llmkit pretrain RECIPE`: build the tokenizer, model and packed data from the recipe, then `fit`."""
    # 1. Cheap checks first: a run directory in use, unwritable or refused, or a missing file, fails before any work.
    with rundir.locked(recipe.output_dir):
        # The size dial (model.target_params / model.depth) becomes explicit model.* sizes first, so that
        # recipe.yaml, and the resume check against it, name the model that is built.
        tokenizer = None
        if recipe.model.has_size_dial:
            tokenizer = models.load_tokenizer(recipe.tokenizer)
            recipe = sized_recipe(recipe, models.padded_vocab_size(len(tokenizer)))
        check(recipe, overwrite)
        # 2. Tokenizer, model (seeded by train.seed), packed blocks (tokenized once, cached).
        if tokenizer is None:
            tokenizer = models.load_tokenizer(recipe.tokenizer)
        # train.evals' records are read (and a bad record refused) before the model is built.
        extra_eval = training_evals(recipe.train.evals, tokenizer)
        model = models.build_model(recipe, tokenizer)
        if extra_eval is not None:
            extra_eval.plan(model.config)
        data = lm_train_data(recipe, tokenizer)
        # 3. The shared loop.
        return fit(recipe, model, tokenizer, data, extra_eval=extra_eval, overwrite=overwrite)
