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

import functools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import DataError, Interrupted, LlmkitError, RecipeError

BatchOrder = Callable[[int, int, int], list[list[int]]]
"""`batch_order(seed, epoch, micro_batch_size) -> micro-batches`: lists of example indices, in order.

It must be a pure function of its arguments (no global RNG), because resume recomputes it and skips
the micro-batches already consumed. Micro-batch j of an epoch goes to process j % world_size; each
optimizer step takes grad_accum_steps micro-batches per process. Micro-batches left over at the end of
an epoch that do not fill a whole optimizer step on every process are not used in that epoch.
"""

Example = Mapping[str, Any]
"""One tokenized example: {"input_ids": list[int], "labels": list[int] (-100 = not trained on), ...}."""


Position = dict[str, Any]
"""A JSON-able position in a stream, e.g. {"epoch": 0, "doc": 1234, "offset": 56}."""

Stream = Callable[[Position | None], Iterator[tuple[Example, Position]]]
"""`stream(position) -> (example, position after it), ...` forever (epoch after epoch), from `position`
(None = the very beginning). Every process reads the same stream and keeps its share of it."""


@dataclass
class TrainData:
    """Everything `fit` needs to know about the data; pretraining and fine-tuning build it differently.

    train:           map-style dataset (len() and [i]) of tokenized examples (see `Example`); may also
                     hold extra keys such as "position_ids" that collate_fn understands.
    collate_fn:      list of examples -> dict of tensors with at least input_ids and labels (same
                     shape, -100 where nothing is trained: masked prompt tokens, padding) and optionally
                     attention_mask and position_ids, passed to the model as they are. Labels are NOT
                     shifted: the loop shifts them. Throughput counts attention_mask.sum() tokens when an
                     attention_mask is given, else every input id.
    batch_order:     see `BatchOrder`; default: `shuffled_batch_order(len(train))`. Must return the same
                     number of micro-batches every epoch.
    validation:      optional map-style dataset of examples, evaluated in order every eval_every steps
                     and at the end; the loss is token-weighted over every validation token.
    eval_collate_fn: collate for validation (default: collate_fn).
    stream:          instead of `train`, an endless `Stream` (pretraining with data.streaming); its
                     position is saved in checkpoints so that resume continues where it stopped.
    description:     one line for the log, e.g. "12,345 blocks of 128 tokens (1.58M tokens)".
    extra:           free-form facts recorded in summary.json (e.g. packing counts).
    """

    train: Sequence[Example] | None
    collate_fn: Callable[[list[Example]], dict[str, Any]]
    batch_order: BatchOrder | None = None
    validation: Sequence[Example] | None = None
    eval_collate_fn: Callable[[list[Example]], dict[str, Any]] | None = None
    stream: Stream | None = None
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
        """Micro-batches of epoch `epoch`; a final incomplete micro-batch is left for the next epoch's shuffle."""
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


# ==============================================================================================
# Implementation
# ==============================================================================================


EVAL_KEYS = ("event", "step", "tokens", "val_loss", "val_ppl", "val_tokens")


class TrainingError(LlmkitError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""

    exit_code = 1


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """The learning rate at optimizer step `step` as a fraction of train.lr.

    Linear warmup over warmup_steps reaching the peak at the last warmup step, then cosine or linear
    decay to min_lr at max_steps (or constant).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress)


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matmul weights; none on norms, biases and embedding tables."""
    import torch

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model, cfg):
    """AdamW, fused where this torch supports it on the parameters' device (CPU and CUDA)."""
    import torch

    groups = param_groups(model, cfg.weight_decay)
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


def resolve_mixed_precision(setting: str) -> str:
    """'auto' -> bf16 on a CUDA GPU that supports it, else no; fp16 needs CUDA."""
    import torch

    cuda = torch.cuda.is_available()
    if setting == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if setting == "fp16" and not cuda:
        raise RecipeError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    return setting


def distributed_kind(accelerator) -> str:
    """'deepspeed', 'fsdp' or 'plain' (single process or DDP): how state must be saved."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "plain"


def measured_peak_flops(device, dtype) -> float:
    """Matmul FLOP/s this device reaches (a short square-matmul benchmark), the denominator of MFU.

    LLMKIT_PEAK_FLOPS overrides it (e.g. a datasheet number).
    """
    import torch

    if os.environ.get("LLMKIT_PEAK_FLOPS"):
        return float(os.environ["LLMKIT_PEAK_FLOPS"])
    sizes = (8192,) if device.type == "cuda" else (1024, 1536)
    best_rate = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for repeat in range(12):  # the first two warm up thread pools and kernels; the best of the rest counts
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat >= 2:
                best_rate = max(best_rate, 2 * n**3 / (time.perf_counter() - t0))
    return best_rate


def _flat_config(recipe) -> dict[str, Any]:
    """The recipe as {dotted.key: scalar} for trackers that only take scalars."""
    out: dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = node if isinstance(node, (int, float, str, bool)) else json.dumps(node)

    walk(recipe.model_dump(mode="json"), "")
    return out


def _available_trackers(names: list[str]) -> list[str]:
    import importlib.util

    found = []
    for name in names:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
        if importlib.util.find_spec(module) is None and not (name == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            print(f"warning: train.trackers: {name} is not installed (pip install {name}); not logging to it", file=sys.stderr)
        else:
            found.append(name)
    return found


class MetricsLog:
    """metrics.jsonl (main process), accelerate trackers, and the progress bar's numbers."""

    def __init__(self, accelerator, path: Path, resume_step: int | None) -> None:
        self.accelerator = accelerator
        self.path = path
        if accelerator.is_main_process:
            if resume_step is not None and path.is_file():
                # Drop events logged after the checkpoint we resume from: they will be logged again.
                kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_step]
                tmp = path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
                tmp.replace(path)
            elif resume_step is None and path.exists():
                path.unlink()

    def write(self, event: dict[str, Any]) -> None:
        """Append one event (main process) and forward its numbers to the trackers."""
        if not self.accelerator.is_main_process:
            return
        event = {"time": round(time.time(), 3), **event}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
        numbers = {f"{event['event']}/{k}": v for k, v in event.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self.accelerator.trackers:
            self.accelerator.log(numbers, step=event["step"])


class MicroBatches:
    """This process's micro-batches, optimizer step by optimizer step, from a map-style dataset or a stream.

    Map-style: the epoch's batch order is recomputed from (seed, epoch), so starting at step k is
    skipping k steps' worth of micro-batches; nothing else is stored. Stream: the stream restarts
    from the position saved after the last completed step.
    """

    def __init__(self, data: TrainData, cfg, rank: int, world: int, device, start_step: int, stream_position: Position | None):
        self.data, self.cfg, self.rank, self.world, self.device = data, cfg, rank, world, device
        self.per_step = cfg.grad_accum_steps * world  # global micro-batches per optimizer step
        trace_dir = os.environ.get("LLMKIT_TRACE_SAMPLES")
        self.trace = Path(trace_dir) / f"samples-rank{rank}.jsonl" if trace_dir else None
        if data.stream is not None:
            self._iter = self._from_stream(stream_position)
            return
        if data.train is None:
            raise TypeError("TrainData needs train or stream")
        self.order = data.batch_order or shuffled_batch_order(len(data.train))
        first = self.order(cfg.seed, 0, cfg.micro_batch_size)
        self.steps_per_epoch = len(first) // self.per_step
        if self.steps_per_epoch == 0:
            raise DataError(
                f"data.train: {len(data.train)} examples make {len(first)} micro-batches of {cfg.micro_batch_size}, fewer than one "
                f"optimizer step needs ({self.per_step} = grad_accum_steps x processes); add data or lower train.micro_batch_size"
            )
        self._iter = self._from_dataset(start_step)

    def _loader(self, dataset, batches):
        from torch.utils.data import DataLoader

        return DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=self.data.collate_fn,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _from_dataset(self, start_step: int):
        epoch, skip_steps = divmod(start_step, self.steps_per_epoch)
        while True:
            order = self.order(self.cfg.seed, epoch, self.cfg.micro_batch_size)
            used = self.steps_per_epoch * self.per_step
            if len(order) < used:
                raise DataError(f"batch order of epoch {epoch} has {len(order)} micro-batches, fewer than epoch 0's")
            # Global micro-batch j goes to process j % world: the same split for any interruption point.
            mine = order[self.rank : used : self.world][skip_steps * self.cfg.grad_accum_steps :]
            skip_steps = 0
            step_batches: list = []
            for k, batch in enumerate(self._loader(self.data.train, mine)):
                step_batches.append(batch)
                if len(step_batches) == self.cfg.grad_accum_steps:
                    ids = [i for b in mine[k + 1 - len(step_batches) : k + 1] for i in b]
                    yield step_batches, {"epoch": epoch, "ids": ids}
                    step_batches = []
            epoch += 1

    def _from_stream(self, position: Position | None):
        size = self.cfg.micro_batch_size
        examples: list = []
        for example, after in self.data.stream(position):
            examples.append(example)
            if len(examples) == size * self.per_step:
                # Global micro-batch j of this step is examples[j*size:(j+1)*size]; this process takes j % world == rank.
                mine = [examples[j * size : (j + 1) * size] for j in range(self.rank, self.per_step, self.world)]
                yield [self.data.collate_fn(m) for m in mine], after
                examples = []

    def next_step(self) -> tuple[list[dict[str, Any]], Position]:
        """The grad_accum_steps micro-batches of the next optimizer step, and the data position after it."""
        batches, position = next(self._iter)
        if self.trace is not None:
            # LLMKIT_TRACE_SAMPLES=DIR records which examples each process trained on (a debugging aid,
            # and how the tests check that resume neither repeats nor skips a sample).
            with open(self.trace, "a", encoding="utf-8") as f:
                f.write(json.dumps(position) + "\n")
        return batches, position


def _to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


def _model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}


def make_sum_nll(accelerator, model, cfg) -> Callable[[dict[str, Any]], tuple[Any, Any]]:
    """`sum_nll(batch) -> (summed next-token NLL, scored tokens)` of the prepared `model`; labels are shifted here.

    With train.chunked_loss, models whose logits are plain lm_head(hidden states) skip the full
    [batch, seq, vocab] logits (llmkit.lm_loss: same loss and gradients, ~1/3 less output-layer time
    on a CPU, less memory on a GPU). FSDP and DeepSpeed shard lm_head's weight outside its own
    forward, and a compiled model would not run the hook, so those keep the plain path.
    """
    from llmkit.lm_loss import ChunkedHead, plain_sum_nll

    head = None
    if cfg.chunked_loss and not cfg.compile and distributed_kind(accelerator) == "plain":
        head = ChunkedHead.attach(accelerator.unwrap_model(model))

    def sum_nll(batch: dict[str, Any]):
        """Summed NLL and scored-token count of one micro-batch."""
        inputs = _model_inputs(batch)
        if head is not None and head.verified(inputs, accelerator.autocast):
            return head.sum_nll(model, inputs, batch["labels"], accelerator.autocast)
        return plain_sum_nll(model(**inputs).logits, batch["labels"])

    return sum_nll


def _input_tokens(batch: dict[str, Any]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def evaluate_loss(accelerator, model, data: TrainData, cfg, sum_nll=None) -> tuple[float, int]:
    """Token-weighted validation loss over every validation token (or the first eval_batches batches).

    Every process runs the same number of forward passes (FSDP and DeepSpeed need that): a
    process without a batch of its own re-runs batch 0 with weight zero. `sum_nll`: from make_sum_nll.
    """
    import torch

    sum_nll = sum_nll or make_sum_nll(accelerator, model, cfg)

    dataset = data.validation
    collate = data.eval_collate_fn or data.collate_fn
    size = cfg.micro_batch_size
    batches = [list(range(i, min(i + size, len(dataset)))) for i in range(0, len(dataset), size)]
    if cfg.eval_batches:
        batches = batches[: cfg.eval_batches]
    world, rank = accelerator.num_processes, accelerator.process_index
    rounds = math.ceil(len(batches) / world)
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    model.eval()
    with torch.no_grad():
        for r in range(rounds):
            j = r * world + rank
            weight = 1.0 if j < len(batches) else 0.0
            batch = _to_device(collate([dataset[i] for i in batches[j if weight else 0]]), accelerator.device)
            nll, count = sum_nll(batch)
            totals += torch.stack([nll.double(), torch.as_tensor(count, dtype=torch.float64, device=accelerator.device)]) * weight
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    nll, count = totals.tolist()
    return nll / max(count, 1.0), int(count)


def _progress(accelerator, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not accelerator.is_main_process,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=1.0,
    )


def _save_final(accelerator, model, tokenizer, output_dir: Path, save_final: SaveFinal | None) -> None:
    """Write the final model at the top of output_dir, each file replaced atomically."""
    from llmkit.modeling import save_hf_model

    kind = distributed_kind(accelerator)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    state_dict = accelerator.get_state_dict(model) if kind != "plain" else None
    if not accelerator.is_main_process:
        return
    staging = output_dir / ".final-tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    if save_final is not None:
        save_final(unwrapped, tokenizer, staging)
    elif state_dict is not None:
        unwrapped.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        save_hf_model(unwrapped, tokenizer, staging, weights=False)
    else:
        save_hf_model(unwrapped, tokenizer, staging)
    for item in sorted(staging.iterdir()):
        target = output_dir / item.name
        if target.is_dir() and item.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()


def _run(recipe, model, tokenizer, data: TrainData, *, extra_eval, save_final, overwrite) -> dict[str, Any]:
    """The loop behind `fit`, phase by phase."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from llmkit import checkpoints
    from llmkit.modeling import flops_per_token, model_summary_lines, parameter_counts, write_model_card
    from llmkit.recipes import write_resolved

    cfg = recipe.train
    output_dir = Path(recipe.output_dir)

    # 1. Run directory: refuse another run before writing anything; find the checkpoint to resume.
    resume_from = checkpoints.check_run_dir(recipe, overwrite=overwrite)
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)

    # 2. Accelerator, seeds, trackers.
    trackers = _available_trackers(list(cfg.trackers))
    # Under a multi-process launcher on a machine without CUDA, accelerate only sets up gloo when told
    # it runs on CPU; otherwise every process would believe it is alone.
    cpu_multiprocess = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    accelerator = Accelerator(
        cpu=cpu_multiprocess,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=trackers or None,
        project_dir=str(output_dir),
    )
    world = accelerator.num_processes
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * recipe.data.seq_len * world
    max_steps = cfg.max_steps or math.ceil(cfg.max_tokens / tokens_per_step)
    if cfg.warmup_steps > max_steps:
        raise RecipeError(f"train.warmup_steps ({cfg.warmup_steps}) is larger than the {max_steps} steps of train.max_tokens")
    # The data position comes from the checkpoint's trainer state; building the batch iterator here
    # also rejects data too small for one optimizer step before anything is written.
    state: dict[str, Any] = {"step": 0, "tokens": 0, "skipped_steps": 0, "stream_position": None, "val_loss": None, "val_ppl": None}
    if resume_from is not None:
        state.update(checkpoints.read_trainer_state(resume_from))
    batches = MicroBatches(data, cfg, accelerator.process_index, world, accelerator.device, state["step"], state["stream_position"])
    if accelerator.is_main_process:
        if resume_from is None:
            checkpoints.clear_run_dir(output_dir)
        write_resolved(recipe, output_dir)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed, device_specific=True)  # per-process dropout streams; the data order has its own seed
    if trackers:
        accelerator.init_trackers(output_dir.name, config=_flat_config(recipe))

    # 3. Model, optimizer, schedule. The scheduler is stepped by hand once per optimizer step
    #    (accelerate's prepared scheduler would step once per process).
    counts = parameter_counts(model)
    config = getattr(model, "config", None)
    fpt = flops_per_token(config, counts["matmul"], recipe.data.seq_len)
    if cfg.gradient_checkpointing:
        # transformers 5 renamed it; non-reentrant checkpointing works with DDP's no_sync and frozen inputs.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        # No KV cache in training: gradient checkpointing needs that, and without a cache transformers
        # infers per-document attention from restarting position ids (data.doc_masking: attention).
        config.use_cache = False
    optimizer = make_optimizer(model, cfg)
    multiplier = functools.partial(
        lr_multiplier, warmup_steps=cfg.warmup_steps, max_steps=max_steps, schedule=cfg.schedule, min_ratio=cfg.min_lr / cfg.lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    if distributed_kind(accelerator) == "deepspeed":
        # DeepSpeed cannot infer the micro-batch size from our own loader, and its accumulation and
        # clipping settings override the Accelerator's: take all three from the recipe.
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
        ds["gradient_accumulation_steps"] = cfg.grad_accum_steps
        ds["train_batch_size"] = cfg.micro_batch_size * cfg.grad_accum_steps * world
        ds["gradient_clipping"] = cfg.grad_clip or 0.0
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    sum_nll = make_sum_nll(accelerator, model, cfg)

    # 4. Resume: model, optimizer, scheduler, RNG states and the data position.
    if resume_from is not None:
        state.update(checkpoints.load_checkpoint(resume_from, accelerator, model, optimizer, scheduler))
        accelerator.print(f"resuming from {resume_from} (step {state['step']}, {state['tokens']:,} tokens)")
    start_step = state["step"]
    log = MetricsLog(accelerator, output_dir / "metrics.jsonl", start_step if resume_from is not None else None)
    peak = measured_peak_flops(accelerator.device, torch.bfloat16 if mixed_precision == "bf16" else torch.float16 if mixed_precision == "fp16" else torch.float32)
    if accelerator.is_main_process:
        for line in model_summary_lines(config, counts, recipe, world_size=world, max_steps=max_steps):
            accelerator.print(line)
        accelerator.print(f"data:             {data.description}")
        accelerator.print(f"precision:        {mixed_precision}; matmul peak measured at {peak / 1e12:.3g} TFLOP/s ({accelerator.device})")

    # 5. Train.
    summary = {"val_loss": state["val_loss"], "val_ppl": state["val_ppl"], "train_loss": None}
    last_saved = start_step if resume_from is not None else None
    window = {"tokens": 0, "time": time.perf_counter(), "nll": 0.0, "count": 0}
    bar = _progress(accelerator, max_steps, start_step)
    step = start_step
    with checkpoints.StopSignals() as signals:
        model.train()
        while step < max_steps:
            micro, position = batches.next_step()
            position = position if data.stream is not None else None
            micro = [_to_device(b, accelerator.device) for b in micro]
            local = torch.tensor(
                [sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro), sum(_input_tokens(b) for b in micro)],
                dtype=torch.float64, device=accelerator.device,
            )
            scored, step_tokens = accelerator.reduce(local, reduction="sum").tolist()
            nll_local = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            for batch in micro:
                with accelerator.accumulate(model):
                    nll, _ = sum_nll(batch)
                    # Gradient of (step's summed NLL / step's scored tokens over all processes): accelerate
                    # divides by grad_accum_steps and DDP averages over processes, so multiply both back.
                    accelerator.backward(nll * (cfg.grad_accum_steps * world / max(scored, 1.0)))
                    nll_local += nll.detach().double()
            flags = torch.stack([nll_local, torch.tensor(float(signals.received is not None), dtype=torch.float64, device=accelerator.device)])
            nll_sum, stop = accelerator.reduce(flags, reduction="sum").tolist()
            loss = nll_sum / max(scored, 1.0)
            grad_norm = None
            if math.isfinite(loss) and cfg.grad_clip is not None:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                grad_norm = float(grad_norm) if grad_norm is not None else None
            finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm) or mixed_precision == "fp16")
            lr = scheduler.get_last_lr()[0]
            if finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not finite:
                if state["skipped_steps"] >= cfg.skip_nonfinite_steps:
                    bar.close()
                    latest = checkpoints.latest_checkpoint(output_dir)
                    log.write({"event": "nonfinite", "step": step + 1, "tokens": state["tokens"], "loss": str(loss)})
                    raise TrainingError(
                        f"non-finite loss ({loss}) at step {step + 1}; stopped without saving. "
                        + (f"The last good checkpoint is {latest}. " if latest else "No checkpoint was written. ")
                        + "Lower train.lr, enable train.grad_clip, or set train.skip_nonfinite_steps to skip a few such steps"
                    )
                state["skipped_steps"] += 1
                log.write({"event": "skip", "step": step + 1, "tokens": state["tokens"], "loss": str(loss)})
                accelerator.print(f"warning: non-finite loss at step {step + 1}: skipped ({state['skipped_steps']}/{cfg.skip_nonfinite_steps})")
            scheduler.step()
            step += 1
            state.update(step=step, tokens=state["tokens"] + int(step_tokens), stream_position=position)
            window["tokens"] += step_tokens
            if finite:
                window["nll"] += nll_sum
                window["count"] += scored
            bar.update(1)

            if step % cfg.log_every == 0 or step == max_steps:
                elapsed = time.perf_counter() - window["time"]
                tokens_per_s = window["tokens"] / max(elapsed, 1e-9)
                mfu = fpt * tokens_per_s / peak
                train_loss = window["nll"] / max(window["count"], 1.0)
                summary["train_loss"] = train_loss
                event = {"event": "train", "step": step, "tokens": state["tokens"], "loss": round(train_loss, 6), "lr": lr,
                         "tokens_per_s": round(tokens_per_s, 1), "mfu": round(mfu, 4)}
                if grad_norm is not None:
                    event["grad_norm"] = round(grad_norm, 6)
                log.write(event)
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}", refresh=False)
                window = {"tokens": 0, "time": time.perf_counter(), "nll": 0.0, "count": 0}

            if data.validation is not None and (step % cfg.eval_every == 0 or step == max_steps):
                eval_start = time.perf_counter()
                val_loss, val_tokens = evaluate_loss(accelerator, model, data, cfg, sum_nll)
                event = {"event": "eval", "step": step, "tokens": state["tokens"], "val_loss": round(val_loss, 6),
                         "val_ppl": round(math.exp(min(val_loss, 700)), 4), "val_tokens": val_tokens}
                if extra_eval is not None:
                    unwrapped = accelerator.unwrap_model(model)
                    unwrapped.eval()
                    with torch.no_grad():
                        event.update(extra_eval(unwrapped, step) or {})
                    unwrapped.train()
                summary.update(val_loss=event["val_loss"], val_ppl=event["val_ppl"])
                state.update(val_loss=event["val_loss"], val_ppl=event["val_ppl"])
                log.write(event)
                if accelerator.is_main_process:
                    extras = "".join(f", {k} {v:.4g}" for k, v in event.items() if k not in EVAL_KEYS and isinstance(v, (int, float)))
                    bar.write(f"step {step}: val_loss {val_loss:.4f}, val_ppl {event['val_ppl']:.2f}{extras}")
                window["time"] += time.perf_counter() - eval_start  # evaluation is not training throughput

            stopping = stop > 0
            if step % cfg.save_every == 0 or step == max_steps or stopping:
                save_start = time.perf_counter()
                path = checkpoints.save_checkpoint(accelerator, model, optimizer, scheduler, dict(state), output_dir, cfg.keep_checkpoints)
                last_saved = step
                window["time"] += time.perf_counter() - save_start
            if stopping:
                bar.close()
                name = signals.received or "a signal on another process"
                log.write({"event": "stop", "step": step, "tokens": state["tokens"], "signal": name})
                accelerator.end_training()
                raise Interrupted(f"stopped by {name} at step {step}; checkpoint saved to {path}. Run the same command again to resume")
    bar.close()

    # 6. Final model in Hugging Face format, model card, summary.
    if last_saved != step:
        checkpoints.save_checkpoint(accelerator, model, optimizer, scheduler, dict(state), output_dir, cfg.keep_checkpoints)
    if use_cache is not None:
        config.use_cache = use_cache  # generation wants the cache back
    _save_final(accelerator, model, tokenizer, output_dir, save_final)
    summary.update(
        step=step, tokens=state["tokens"], stopped="completed", output_dir=str(output_dir),
        resumed_from=start_step if resume_from is not None else None, skipped_steps=state["skipped_steps"],
        parameters=counts["total"], flops_per_token=fpt, model_type=getattr(config, "model_type", None),
        data=data.extra,
    )
    if accelerator.is_main_process:
        write_model_card(output_dir, recipe, summary, counts)
        tmp = output_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
        tmp.replace(output_dir / "summary.json")
        accelerator.print(f"done: {step} steps, {state['tokens']:,} tokens; model saved to {output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
