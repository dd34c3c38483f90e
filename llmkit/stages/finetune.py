"""`llmkit finetune`: task records -> tokenized examples with loss masks -> the shared training loop.

    llmkit finetune finetune/tiny-summarization --set train.max_steps=50
    llmkit data inspect finetune/lora-instruction

Fine-tuning differs from pretraining only in how batches are built (llmkit/data/sft.py: prompt
tokens masked, target + EOS trained, length grouping or packing) and how the model is loaded
(llmkit/models.py: from model.path, optionally wrapped in LoRA adapters); the loop, checkpoints,
resume, signals and logging are llmkit/training/loop.py. Every eval_every steps the loop logs the
validation loss and the metrics of train.evals (llmkit/evals/training.py), e.g. ROUGE of generations
on the validation records, scored exactly as `llmkit eval` scores them.

Preference tasks (task.type: preference) build pairs instead (llmkit/data/preference.py) and train
the preference objective (llmkit/training/preference.py); with a reference-based loss and
task.reference: cached, the starting model scores every pair once before training, so the reference
model never sits in memory next to the one being trained.
"""

from __future__ import annotations

import sys
from typing import Any

from llmkit import dist, models, prompts, rundir
from llmkit.data import preference, sft
from llmkit.data.batches import check_same_data
from llmkit.data.splits import builtin_validation_warning
from llmkit.errors import RecipeError
from llmkit.evals.training import training_evals
from llmkit.metrics.preference import pair_logps
from llmkit.recipes import FinetuneRecipe
from llmkit.training import checkpoints
from llmkit.training.hardware import resolve_mixed_precision
from llmkit.training.loop import check_launch, fit
from llmkit.training.preference import frozen_reference, preference_objective


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


def check_run_dir(recipe: FinetuneRecipe, overwrite: bool) -> None:
    """The run directory, the launch against its checkpoint, and before tokenizing, a resume whose training
    records changed since its checkpoint (refused, naming the file)."""
    resume_from = rundir.check_run_dir(recipe, overwrite=overwrite)
    check_launch(recipe, resume_from)
    if resume_from is not None:
        saved = checkpoints.read_trainer_state(resume_from).get("data_fingerprint")
        check_same_data(saved, sft.training_files(recipe), resume_from)


def load_tokenizer(recipe: FinetuneRecipe):
    """The tokenizer named by `tokenizer`, else the one saved with model.path; chat template for instructions."""
    key = "tokenizer" if recipe.tokenizer else "model.path"
    tokenizer = models.load_tokenizer(recipe.tokenizer or recipe.model.path, key)
    if recipe.task.type in ("instruction", "preference"):
        prompts.ensure_chat_template(tokenizer)
    return tokenizer


def run(recipe: FinetuneRecipe, overwrite: bool = False) -> dict[str, Any]:
    """`llmkit finetune RECIPE`: check, load records and tokenizer, tokenize, load the model, then `fit`."""
    # A run directory in use by another run, or that cannot be written, fails before any work.
    with rundir.locked(recipe.output_dir):
        return _run(recipe, overwrite)


def _run(recipe: FinetuneRecipe, overwrite: bool) -> dict[str, Any]:
    if recipe.task.type == "preference":
        return _run_preference(recipe, overwrite)
    # 1. Everything that can fail cheaply fails before any model weights are read.
    check(recipe)
    tokenizer = load_tokenizer(recipe)
    train, validation = sft.checked_records(recipe)  # also fills task.labels and task.record_format, which resume compares
    # train.evals reads its records now; without data.test a task scores the run's validation records.
    extra_eval = training_evals(recipe.train.evals, tokenizer, run_task=recipe.task, validation=validation)
    models.training_config(recipe, tokenizer)
    check_run_dir(recipe, overwrite)

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
    model = _lora(recipe, model)
    data = sft.build_train_data(recipe, examples, tokenizer, packing)

    # 4. The shared loop: checkpoints, resume, signals, eval (+ task metric), final save.
    return fit(recipe, model, tokenizer, data, extra_eval=extra_eval, save_final=_save_final(recipe), overwrite=overwrite)


def _save_final(recipe: FinetuneRecipe):
    """LoRA runs write the adapter (and, with lora.merge, the merged model); None = the loop's default."""
    if not recipe.lora.enabled:
        return None

    def save_final(model, tokenizer, output_dir) -> None:
        """Write the adapter (and the merged model with lora.merge)."""
        models.save_lora(model, tokenizer, output_dir, merge=recipe.lora.merge)

    return save_final


def _lora(recipe: FinetuneRecipe, model):
    """The model wrapped in LoRA adapters (with a line saying how much trains), or the model itself."""
    if not recipe.lora.enabled:
        return model
    model = models.apply_lora(model, recipe)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"LoRA: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return model


def preference_records(recipe: FinetuneRecipe):
    """Train and validation (where, record) pairs of a preference recipe, each checked (file:line on the first bad one)."""
    train, validation = sft.split_records(recipe)
    preference.check_records(recipe, train)
    preference.check_records(recipe, validation)
    preference.resolve_record_format(recipe, [*train, *validation])  # recipe.yaml records it: how generate prompts the run
    return train, validation


def score_reference(recipe: FinetuneRecipe, model, tokenizer, data: preference.PairData) -> None:
    """Cached reference log-probs: the starting model scores every pair once (or the cache has them)."""
    import torch

    precision = resolve_mixed_precision(recipe.train.mixed_precision)
    device = torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sft.require_eos(tokenizer)

    def score(pairs):
        """Summed completion log-probs of `pairs` under the starting model, on this process's device."""
        if not pairs:
            return []
        dist.log(f"reference: scoring {len(pairs):,} pairs with the starting model (once; kept in the data cache)")
        model.to(device)
        try:
            return pair_logps(model, pairs, pad_id, batch_size=recipe.train.micro_batch_size, device=device, autocast_dtype=dtype)
        finally:
            model.to("cpu")  # fit places the model itself

    preference.attach_reference(recipe, data, score, precision)


def _run_preference(recipe: FinetuneRecipe, overwrite: bool) -> dict[str, Any]:
    """`llmkit finetune` on preference pairs: check, tokenize, (reference pass), LoRA, then `fit` with the preference objective."""
    # 1. Everything that can fail cheaply fails before any model weights are read.
    check(recipe)
    tokenizer = load_tokenizer(recipe)
    train, validation = preference_records(recipe)
    # train.evals (benchmarks scored while training) works as for every fine-tune; pairs are not its validation records.
    extra_eval = training_evals(recipe.train.evals, tokenizer, run_task=recipe.task)
    models.training_config(recipe, tokenizer)
    check_run_dir(recipe, overwrite)

    # 2. Tokenize (cached) and report what did not fit.
    pairs = preference.tokenize_splits(recipe, tokenizer, train, validation)
    print(pairs.train_stats.line("train"))
    if validation:
        print(pairs.validation_stats.line("validation"))

    # 3. The starting model; it is also the reference: scored once into the cache, or kept (live).
    model = models.build_model(recipe, tokenizer)
    if extra_eval is not None:
        extra_eval.plan(model.config)
    task, reference_model = recipe.task, None
    if task.uses_reference and task.reference == "cached":
        score_reference(recipe, model, tokenizer, pairs)
    elif task.uses_reference and not recipe.lora.enabled:
        reference_model = frozen_reference(model)  # live, full fine-tuning: a second copy of the weights
    # (live with LoRA: the reference is the same model with its adapters disabled; no copy)
    model = _lora(recipe, model)
    data = preference.build_train_data(recipe, pairs, tokenizer, preference_objective(task, reference_model))

    # 4. The shared loop; the eval event carries the validation pairs' rewards and accuracy.
    return fit(
        recipe, model, tokenizer, data,
        extra_eval=extra_eval,
        save_final=_save_final(recipe), overwrite=overwrite,
    )  # fmt: skip
