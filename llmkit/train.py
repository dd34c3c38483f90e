"""The one training loop of llmkit, shared by pretraining and fine-tuning, on accelerate.Accelerator.

    llmkit pretrain pretrain/tiny --set train.max_steps=50
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m llmkit pretrain pretrain/gpt2-124m

Contract for callers (pretraining here, fine-tuning in llmkit/finetuning.py):

1. Build the model (on CPU, float32 master weights) and load the tokenizer.
2. Build a `TrainData`: tokenized examples, a collate function, a seeded batch order, optional
   validation examples.
3. Call `fit(recipe, model, tokenizer, data, extra_eval=..., overwrite=...)`. It creates the
   Accelerator, the optimizer and schedule, resumes from the newest complete checkpoint in
   `recipe.output_dir`, trains, evaluates, checkpoints, handles SIGINT/SIGTERM/SIGUSR1, and writes
   the final Hugging Face model at the top of `output_dir`.

Call `llmkit.checkpoints.check_run_dir(recipe, overwrite)` yourself before loading anything heavy,
so that a refused run directory fails fast; `fit` checks it again before writing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

BatchOrder = Callable[[int, int, int], list[list[int]]]
"""`batch_order(seed, epoch, micro_batch_size) -> micro-batches`: lists of example indices, in order.

It must be a pure function of its arguments (no global RNG), because resume recomputes it and skips
the micro-batches already consumed. Micro-batch j of an epoch goes to process j % world_size; each
optimizer step takes grad_accum_steps micro-batches per process. Micro-batches left over at the end of
an epoch that do not fill a whole optimizer step on every process are not used in that epoch.
"""

Example = Mapping[str, Any]
"""One tokenized example: {"input_ids": list[int], "labels": list[int] (-100 = not trained on), ...}."""


@dataclass
class TrainData:
    """Everything `fit` needs to know about the data; pretraining and fine-tuning build it differently.

    train:           map-style dataset (len() and [i]) of tokenized examples (see `Example`); may also
                     hold extra keys such as "position_ids" or "seq_id" that collate_fn understands.
    collate_fn:      list of examples -> dict of tensors with at least input_ids, labels (same shape,
                     -100 on positions that are not trained on and on padding) and optionally
                     attention_mask and position_ids. Labels are NOT shifted: the loop shifts them.
    batch_order:     see `BatchOrder`; default: a seeded shuffle cut into micro_batch_size chunks.
    validation:      optional map-style dataset of examples, evaluated in order every eval_every steps
                     and at the end; the loss is token-weighted over every validation token.
    eval_collate_fn: collate for validation (default: collate_fn).
    description:     one line for the log, e.g. "12,345 blocks of 128 tokens (1.58M tokens)".
    """

    train: Sequence[Example]
    collate_fn: Callable[[list[Example]], dict[str, Any]]
    batch_order: BatchOrder | None = None
    validation: Sequence[Example] | None = None
    eval_collate_fn: Callable[[list[Example]], dict[str, Any]] | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


ExtraEval = Callable[[Any, int], dict[str, float]]
"""`extra_eval(model, step) -> {"rougeL": 0.31, ...}`: task metrics merged into each eval event.

Called on every process (the model is the unwrapped model, in eval mode, under torch.no_grad());
values returned by the main process are logged.
"""

SaveFinal = Callable[[Any, Any, Any], None]
"""`save_final(model, tokenizer, output_dir)`: write the final model (default: `save_hf_model`).

Fine-tuning with LoRA passes its own, to write adapters (and optionally a merged model)."""


def shuffled_batch_order(num_examples: int) -> BatchOrder:
    """The default batch order: a permutation seeded by (seed, epoch), cut into micro-batches."""
    import numpy as np

    def order(seed: int, epoch: int, micro_batch_size: int) -> list[list[int]]:
        perm = np.random.default_rng([seed, epoch]).permutation(num_examples).tolist()
        usable = len(perm) - len(perm) % micro_batch_size
        return [perm[i : i + micro_batch_size] for i in range(0, usable, micro_batch_size)]

    return order


def fit(
    recipe,
    model,
    tokenizer,
    data: TrainData,
    *,
    extra_eval: ExtraEval | None = None,
    save_final: SaveFinal | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train `model` on `data` as `recipe.train` says; resume, evaluate, checkpoint, save. Returns a summary.

    recipe:     a PretrainRecipe or FinetuneRecipe (uses output_dir, data.seq_len and the train section).
    model:      a transformers PreTrainedModel (or a peft model wrapping one) on CPU.
    tokenizer:  saved with every checkpoint's final model.
    overwrite:  replace a different finished run in output_dir instead of raising RunDirError.

    The summary dict holds: step, tokens, train_loss (last logged), val_loss, val_ppl (last eval,
    None without validation), stopped ("completed" | "signal"), output_dir, resumed_from (step or None).
    Raises llmkit.errors.Interrupted after saving a checkpoint when a signal stops the run, and
    TrainingError (an LlmkitError) on a non-finite loss, naming the step.
    """
    return _run(recipe, model, tokenizer, data, extra_eval=extra_eval, save_final=save_final, overwrite=overwrite)


def pretrain(recipe, overwrite: bool = False) -> dict[str, Any]:
    """`llmkit pretrain RECIPE`: build the model and packed data from the recipe, then `fit`."""
    from llmkit import checkpoints, data, modeling

    checkpoints.check_run_dir(recipe, overwrite=overwrite)
    tokenizer = modeling.load_tokenizer(recipe.tokenizer)
    model = modeling.build_model(recipe, tokenizer)
    train_data = data.lm_train_data(recipe, tokenizer)
    return fit(recipe, model, tokenizer, train_data, overwrite=overwrite)
