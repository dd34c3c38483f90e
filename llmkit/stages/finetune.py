"""`llmkit finetune`: task records -> tokenized examples with loss masks -> the shared training loop.

    llmkit finetune finetune/tiny-summarization --set train.max_steps=50
    llmkit data inspect finetune/lora-instruction

Fine-tuning differs from pretraining only in how batches are built (llmkit/data/sft.py: prompt
tokens masked, target + EOS trained, length grouping or packing) and how the model is loaded
(llmkit/models.py: from model.path, optionally wrapped in LoRA adapters); the loop, checkpoints,
resume, signals and logging are llmkit/training/loop.py. Every eval_every steps the loop logs the
validation loss and the metrics of train.evals (llmkit/evals/training.py), e.g. ROUGE of generations
on the validation records, scored exactly as `llmkit eval` scores them.
"""

from __future__ import annotations

import sys
from typing import Any

from llmkit import dist, models, prompts, rundir
from llmkit.data import sft
from llmkit.data.splits import builtin_validation_warning
from llmkit.errors import RecipeError
from llmkit.evals.training import training_evals
from llmkit.recipes import FinetuneRecipe
from llmkit.training.loop import check_launch, fit


def check(recipe: FinetuneRecipe) -> None:
    """Checks that read no model and no data: templates, LoRA availability, the model directory."""
    task = prompts.task_defaults(recipe.task)
    if task.prompt_template is not None:
        prompts.template_fields(task.prompt_template)
        if "{labels}" in task.prompt_template and task.type != "classification":
            raise RecipeError("task.prompt_template: {labels} is only filled for the classification task")
    models.check_lora_available(recipe)
    models.check_model_dir(recipe.model.path, tokenizer=recipe.tokenizer)
    warning = builtin_validation_warning(recipe.data)
    if warning:
        dist.log(warning)


def load_tokenizer(recipe: FinetuneRecipe):
    """The tokenizer named by `tokenizer`, else the one saved with model.path; chat template for instructions."""
    key = "tokenizer" if recipe.tokenizer else "model.path"
    tokenizer = models.load_tokenizer(recipe.tokenizer or recipe.model.path, key)
    if recipe.task.type == "instruction":
        prompts.ensure_chat_template(tokenizer)
    return tokenizer


def run(recipe: FinetuneRecipe, overwrite: bool = False) -> dict[str, Any]:
    """`llmkit finetune RECIPE`: check, load records and tokenizer, tokenize, load the model, then `fit`."""
    # A run directory in use by another run, or that cannot be written, fails before any work.
    with rundir.locked(recipe.output_dir):
        return _run(recipe, overwrite)


def _run(recipe: FinetuneRecipe, overwrite: bool) -> dict[str, Any]:
    # 1. Everything that can fail cheaply fails before any model weights are read.
    check(recipe)
    tokenizer = load_tokenizer(recipe)
    train, validation = sft.checked_records(recipe)  # also fills task.labels and task.record_format, which resume compares
    # train.evals reads its records now; without data.test a task scores the run's validation records.
    extra_eval = training_evals(recipe.train.evals, tokenizer, run_task=recipe.task, validation=validation)
    models.training_config(recipe, tokenizer)
    check_launch(recipe, rundir.check_run_dir(recipe, overwrite=overwrite))

    # 2. Tokenize (cached) and report what did not fit.
    examples = sft.tokenize_splits(recipe, tokenizer, train, validation)
    if recipe.task.record_format == "chat":
        if recipe.task.prompt_template is not None:
            dist.log("note: task.prompt_template is not used: the records are conversations (chat template only)")
        dist.log(prompts.describe_chat_training(recipe.task, tokenizer))
    print(examples.train_stats.line("train"))
    if validation:
        print(examples.validation_stats.line("validation"))

    # 3. Model (+ adapters), and the batch layout the model supports.
    model = models.build_model(recipe, tokenizer)
    if extra_eval is not None:
        extra_eval.plan(model.config)
    packing = recipe.data.packing
    if packing and not models.enable_packing(model):
        print(
            f"note: {type(model).__name__} does not isolate packed examples through position ids "
            f"(attn_implementation={recipe.model.attn_implementation}); using length-grouped batches instead",
            file=sys.stderr,
        )
        packing = False
    if recipe.lora.enabled:
        model = models.apply_lora(model, recipe)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    data = sft.build_train_data(recipe, examples, tokenizer, packing)

    # 4. The shared loop: checkpoints, resume, signals, eval (+ task metric), final save.
    save_final = None
    if recipe.lora.enabled:

        def save_final(model, tokenizer, output_dir) -> None:
            """LoRA runs write the adapter (and, with lora.merge, the merged model)."""
            models.save_lora(model, tokenizer, output_dir, merge=recipe.lora.merge)

    return fit(
        recipe,
        model,
        tokenizer,
        data,
        extra_eval=extra_eval,
        save_final=save_final,
        overwrite=overwrite,
    )
