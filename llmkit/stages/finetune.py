"""`llmkit finetune`: task records -> tokenized examples with loss masks -> the shared training loop.

    llmkit finetune finetune/tiny-summarization --set train.max_steps=50
    llmkit data inspect finetune/lora-instruction

Fine-tuning differs from pretraining only in how batches are built (llmkit/data/sft.py: prompt
tokens masked, target + EOS trained, length grouping or packing) and how the model is loaded
(llmkit/models.py: from model.path, optionally wrapped in LoRA adapters); the loop, checkpoints,
resume, signals and logging are llmkit/training/loop.py. Every eval_every steps the loop logs the
validation loss and a task metric from generations on a validation sample (ROUGE for summarization
and instruction, accuracy for classification).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from llmkit import dist, models, prompts, rundir
from llmkit.data import sft
from llmkit.data.splits import builtin_validation_warning
from llmkit.errors import RecipeError
from llmkit.generation import generate_texts
from llmkit.metrics.choice_tasks import with_choice_eval
from llmkit.metrics.rouge import rouge_scores
from llmkit.metrics.text import accuracy
from llmkit.recipes import FinetuneRecipe, GenerationSpec
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


def task_metric(recipe: FinetuneRecipe, tokenizer, validation: Sequence[tuple[str, dict]]):
    """An `extra_eval(model, step)` that generates on a validation sample and scores it, or None.

    ROUGE for summarization and instruction, accuracy for classification (the same scoring as
    `llmkit eval`); the text task has no task metric.
    """
    samples = recipe.task_eval.samples
    kind = recipe.task.type
    if samples == 0 or not validation or kind == "text":
        return None
    spec = GenerationSpec(max_new_tokens=recipe.task_eval.max_new_tokens)
    budget = max(recipe.data.seq_len - spec.max_new_tokens, recipe.data.seq_len // 2)
    texts, references = [], []
    for where, record in validation[:samples]:
        formatted = prompts.format_record(recipe.task, record, tokenizer, max_prompt_tokens=budget, where=where)
        texts.append(formatted.prompt)
        references.append(formatted.target)

    def extra_eval(model, step: int) -> dict[str, float]:
        """Generate for the sample and score it."""
        predictions = generate_texts(model, tokenizer, texts, spec, batch_size=min(8, len(texts)))
        if kind == "classification":
            return {"accuracy": accuracy(predictions, references)}
        scores = rouge_scores(predictions, references)
        return {k: float(v) for k, v in scores.items() if k.startswith("rouge")}

    return extra_eval


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
        extra_eval=with_choice_eval(task_metric(recipe, tokenizer, validation), recipe.train.choice_eval, tokenizer),
        save_final=save_final,
        overwrite=overwrite,
    )
