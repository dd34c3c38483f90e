"""`llmkit pretrain`: causal-LM pretraining from scratch (or continued from a checkpoint).

    llmkit pretrain pretrain/tiny --set train.max_steps=50
    accelerate launch --multi_gpu --num_processes 2 -m llmkit pretrain pretrain/tiny

Pretraining differs from fine-tuning only in its data (packed blocks of raw text, cached or
streamed: llmkit/data/lm.py) and its model (built from model.type, or loaded from model.path).
"""

from __future__ import annotations

from typing import Any

from llmkit import models, rundir
from llmkit.data.lm import check_lm_data, lm_train_data
from llmkit.recipes import PretrainRecipe
from llmkit.training.loop import fit


def check(recipe: PretrainRecipe, overwrite: bool = False) -> None:
    """Checks that read no weights and no data: the run directory and the data sources."""
    rundir.check_run_dir(recipe, overwrite=overwrite)
    check_lm_data(recipe)


def run(recipe: PretrainRecipe, overwrite: bool = False) -> dict[str, Any]:
    """`llmkit pretrain RECIPE`: build the tokenizer, model and packed data from the recipe, then `fit`."""
    # 1. Cheap checks first: a refused run directory or a missing file fails before any work.
    check(recipe, overwrite)
    # 2. Tokenizer, model (seeded by train.seed), packed blocks (tokenized once, cached).
    tokenizer = models.load_tokenizer(recipe.tokenizer)
    model = models.build_model(recipe, tokenizer)
    data = lm_train_data(recipe, tokenizer)
    # 3. The shared loop.
    return fit(recipe, model, tokenizer, data, overwrite=overwrite)
