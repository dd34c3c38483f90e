"""The one training loop of llmkit, shared by pretraining and fine-tuning, on accelerate.Accelerator.

    llmkit pretrain pretrain/tiny --set train.max_steps=50
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m llmkit pretrain pretrain/gpt2-124m

Contract for callers (llmkit/stages/pretrain.py and llmkit/stages/finetune.py):

1. Build the model (on CPU, float32 master weights) and load the tokenizer (llmkit/models.py).
2. Build a `TrainData` (llmkit/data/batches.py): tokenized examples, a collate function, a seeded
   batch order, optional validation examples.
3. Call `fit(recipe, model, tokenizer, data, extra_eval=..., overwrite=...)`. It creates the
   Accelerator, the optimizer and schedule, resumes from the newest complete checkpoint in
   `recipe.output_dir`, trains, evaluates, checkpoints, handles SIGINT/SIGTERM/SIGUSR1, and writes
   the final Hugging Face model at the top of `output_dir`.

Call `llmkit.rundir.check_run_dir(recipe, overwrite)` yourself before loading anything heavy, so
that a refused run directory fails fast; `fit` checks it again before writing. `fit` holds the
run-directory lock (`llmkit.rundir.locked`) from then to its last write; a stage that takes it
first (to fail fast on a directory in use or unwritable) keeps holding it, since the lock nests.

Randomness: after `set_seed` the global RNGs drive only the model (dropout). Everything else that
needs randomness draws from its own generator (the batch order from (seed, epoch), the DataLoader,
the peak-FLOPs probe), so a run resumed from a checkpoint's RNG states continues bit for bit.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmkit import dist, errors, rundir
from llmkit.data.batches import TrainData, check_same_data
from llmkit.data.mixture import report_lines
from llmkit.errors import Interrupted, RecipeError, TrainingError
from llmkit.models import (
    flops_per_token,
    model_summary_lines,
    parameter_counts,
    save_hf_model,
    write_model_card,
)
from llmkit.recipes import check_wsd
from llmkit.training import checkpoints, parallelism, startup
from llmkit.training.hardware import Peak, peak_flops, resolve_mixed_precision, threads_note
from llmkit.training.log import MetricsLog, available_trackers, flat_config, progress_bar
from llmkit.training.loss import evaluate_loss_by_part, make_objective, scored_and_input_tokens
from llmkit.training.microbatches import MicroBatches, to_device
from llmkit.training.optim import describe_optimizer, lr_multiplier, make_optimizer
from llmkit.training.signals import StopSignals

ExtraEval = Callable[[Any, int], dict[str, float]]
"""`extra_eval(model, step) -> {"rougeL": 0.31, ...}`: task metrics merged into each eval event.

Called on every process (the model is the unwrapped model, in eval mode, under torch.no_grad());
values returned by the main process are logged.
"""

SaveFinal = Callable[[Any, Any, Any], None]
"""`save_final(model, tokenizer, output_dir)`: write the final model (default: `save_hf_model`).

Fine-tuning with LoRA passes its own, to write adapters (and optionally a merged model)."""

EVAL_KEYS = ("event", "step", "tokens", "val_loss", "val_ppl", "val_tokens", "val_pairs")


@dataclass
class TrainState:
    """The loop's position: what trainer_state.json in every checkpoint holds besides the weights."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    stream_position: dict | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    # The last logged training loss: kept in the checkpoint so that a run resumed (or a finished run
    # rerun) after its last log line still reports it in summary.json.
    train_loss: float | None = None
    max_steps: int | None = None  # the schedule's length when the checkpoint was written (None: older checkpoints)
    data_fingerprint: dict | None = None  # the training files and cache entries (TrainData.fingerprint)

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        """The state saved in a checkpoint (unknown keys such as world_size are ignored)."""
        known = {k: saved[k] for k in cls.__dataclass_fields__ if k in saved}
        return cls(**known)


@dataclass
class Window:
    """Throughput and loss since the last log line."""

    tokens: float = 0.0
    nll: float = 0.0  # summed loss (NLL for language modelling)
    scored: float = 0.0  # units it is summed over (scored tokens, preference pairs)
    stats: dict[str, float] = field(default_factory=dict)  # the objective's other sums, e.g. reward_margin
    started: float = field(default_factory=time.perf_counter)

    def pause(self, seconds: float) -> None:
        """Exclude `seconds` (evaluation, checkpointing) from the training throughput."""
        self.started += seconds


@dataclass
class StepResult:
    """One optimizer step, reduced over processes."""

    loss: float
    nll_sum: float
    lr: float
    grad_norm: float | None
    finite: bool
    scored: float
    tokens: float
    stop: bool
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    """Everything `fit` sets up before the first step."""

    recipe: Any
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    batches: MicroBatches
    log: MetricsLog
    objective: Any  # llmkit/training/loss.py `Objective`: what a step minimises
    max_steps: int
    mixed_precision: str
    counts: dict[str, int]
    flops_per_token: int
    peak: Peak
    resume_from: Path | None
    start_step: int
    state: TrainState
    config: Any
    use_cache: bool | None
    layout: parallelism.Layout
    warned_peak: bool = False

    @property
    def cfg(self):
        """The recipe's train section."""
        return self.recipe.train

    @property
    def output_dir(self) -> Path:
        """The run directory."""
        return Path(self.recipe.output_dir)


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
    TrainingError on a non-finite loss, naming the step.
    """
    # One run per directory: the lock is held until the last file is written (a no-op when the stage holds it).
    with rundir.locked(recipe.output_dir):
        # 1. Run directory, accelerator, model, optimizer, schedule; resume.
        run = _setup(recipe, model, data, overwrite)
        # 2. Train, evaluating, logging and checkpointing as the recipe says.
        summary = _train(run, data, extra_eval)
        # 3. Final model in Hugging Face format, model card, summary.
        return _finish(run, tokenizer, data, save_final, summary)


def check_launch(recipe, resume_from: Path | None) -> None:
    """The launch's cheap checks, for a stage to run before it reads data or weights (RecipeError / CheckpointError).

    The distributed kind the launcher asked for can be had, train.optimizer and lora fit it, and the
    checkpoint to resume from was written by the same kind and process count. `fit` checks the same
    again against the Accelerator it built.
    """
    requested = parallelism.requested_kind()
    parallelism.check_requested(requested)
    expected = parallelism.expected_layout(requested)
    parallelism.check_optimizer(recipe.train.optimizer, expected)
    parallelism.check_adapters(recipe, expected)
    if resume_from is not None:
        checkpoints.check_layout(resume_from, expected)


# ----------------------------------------------------------------------------------------------
# 1. Setup
# ----------------------------------------------------------------------------------------------


def _accelerator(cfg, output_dir: Path, mixed_precision: str, trackers: list[str]):
    """The Accelerator of the kind the launch asked for (refused, never downgraded, when it cannot be had)."""
    requested = parallelism.requested_kind()
    parallelism.check_requested(requested)
    accelerator = parallelism.accelerator_for(
        requested,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=trackers or None,
        project_dir=str(output_dir),
    )
    return accelerator, requested


def _max_steps(recipe, world: int) -> int:
    cfg = recipe.train
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * recipe.data.seq_len * world
    max_steps = cfg.max_steps or math.ceil(cfg.max_tokens / tokens_per_step)
    if cfg.warmup_steps > max_steps:
        raise RecipeError(f"train.warmup_steps ({cfg.warmup_steps}) is larger than the {max_steps} steps of train.max_tokens")
    if cfg.schedule == "wsd":
        try:
            check_wsd(cfg.warmup_steps, max_steps, cfg.decay_fraction)
        except ValueError as exc:
            raise RecipeError(f"{exc} (from train.max_tokens)") from None
    return max_steps


def _prepare_model(model, cfg):
    """Gradient checkpointing and no KV cache for training; returns the config's use_cache to restore."""
    if cfg.gradient_checkpointing:
        # transformers 5 renamed it; non-reentrant checkpointing works with DDP's no_sync and frozen inputs.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        # No KV cache in training: gradient checkpointing needs that, and without a cache transformers
        # infers per-document attention from restarting position ids (data.doc_masking: attention).
        config.use_cache = False
    return use_cache


def _warn_stretched_schedule(state: TrainState, max_steps: int, multiplier, cfg) -> None:
    """Say so on stderr when a resumed run's schedule is not the one its checkpoint was trained on.

    train.max_steps (and max_tokens) are resumable, so raising them on a finished run trains on from
    its last checkpoint; but the schedule is a function of max_steps, so it stretches to the new
    length and the learning rate at the resume step jumps (for cosine, back up from min_lr).
    """
    import sys

    if state.max_steps is None or state.max_steps == max_steps or cfg.schedule == "constant":
        return
    before = cfg.lr * multiplier.func(state.step, **{**multiplier.keywords, "max_steps": state.max_steps})
    after = cfg.lr * multiplier(state.step)
    print(
        f"warning: the checkpoint at step {state.step} was trained for {state.max_steps} steps, this run has {max_steps}: "
        f"the {cfg.schedule} schedule stretches to {max_steps} steps, so the learning rate goes from {before:.3g} to "
        f"{after:.3g} at step {state.step}; set train.max_steps={state.max_steps} to keep the old schedule",
        file=sys.stderr,
        flush=True,
    )


def _configure_deepspeed(accelerator, cfg) -> None:
    # DeepSpeed cannot infer the micro-batch size from our own loader, and its accumulation and
    # clipping settings override the Accelerator's: take all three from the recipe.
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum_steps
    ds["train_batch_size"] = cfg.micro_batch_size * cfg.grad_accum_steps * accelerator.num_processes
    ds["gradient_clipping"] = cfg.grad_clip or 0.0


def _setup(recipe, model, data: TrainData, overwrite: bool) -> Run:
    """Phases 1a-1e: everything before the first optimizer step."""
    import torch
    from accelerate.utils import set_seed

    cfg = recipe.train
    output_dir = Path(recipe.output_dir)

    # 1a. Run directory: refuse another run before writing anything; find the checkpoint to resume.
    resume_from = rundir.check_run_dir(recipe, overwrite=overwrite)
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    trackers = available_trackers(list(cfg.trackers))
    accelerator, requested = _accelerator(cfg, output_dir, mixed_precision, trackers)
    world = accelerator.num_processes
    layout = parallelism.layout_of(accelerator, startup.check_processes(accelerator, output_dir))
    parallelism.check_obtained(requested, layout)
    parallelism.check_optimizer(cfg.optimizer, layout)
    parallelism.check_adapters(recipe, layout)
    max_steps = _max_steps(recipe, world)
    kind = dist.distributed_kind(accelerator)

    # 1b. The data position comes from the checkpoint's trainer state; building the batch iterator
    #     here also rejects data too small for one optimizer step before anything is written.
    if resume_from is not None:
        # A checkpoint is resumed only by the distributed kind and process count that wrote it.
        checkpoints.check_layout(resume_from, layout)
    state = TrainState.from_checkpoint(checkpoints.read_trainer_state(resume_from)) if resume_from else TrainState()
    check_same_data(state.data_fingerprint, data.fingerprint, resume_from)  # changed training files: refuse, name the file
    state.data_fingerprint = data.fingerprint
    batches = MicroBatches(data, cfg, accelerator.process_index, world, accelerator.device, state.step, state.stream_position)
    # Measured before seeding: the probe must not consume the RNG streams that resume restores (and
    # before writing: a malformed LLMKIT_PEAK_FLOPS is bad input).
    peak = peak_flops(accelerator.device, mixed_precision)
    if accelerator.is_main_process and resume_from is None:
        rundir.clear_run_dir(output_dir)  # all of an earlier run goes, its final model included
        rundir.write_resolved(recipe, output_dir)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed, device_specific=True)  # per-process dropout streams; the data order has its own seed
    if trackers:
        accelerator.init_trackers(output_dir.name, config=flat_config(recipe))
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":  # accelerate writes it under output_dir/<run name>
                accelerator.print(f"tensorboard:      {tracker.logging_dir} (view: tensorboard --logdir {output_dir})")

    # 1c. Model, optimizer, schedule. The scheduler is stepped by hand once per optimizer step
    #     (accelerate's prepared scheduler would step once per process).
    counts = parameter_counts(model)
    config = getattr(model, "config", None)
    fpt = flops_per_token(config, counts["matmul"], recipe.data.seq_len)
    use_cache = _prepare_model(model, cfg)
    optimizer = make_optimizer(model, cfg)
    optimizer_line = describe_optimizer(optimizer)
    # One multiplier for every group: AdamW's groups start from train.lr, Muon's from train.muon_lr.
    multiplier = functools.partial(
        lr_multiplier, warmup_steps=cfg.warmup_steps, max_steps=max_steps, schedule=cfg.schedule,
        min_ratio=cfg.min_lr / cfg.lr, decay_fraction=cfg.decay_fraction,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    if kind == "deepspeed":
        _configure_deepspeed(accelerator, cfg)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)

    # 1d. Resume: model, optimizer, scheduler, RNG states and the data position.
    if resume_from is not None:
        state = TrainState.from_checkpoint(checkpoints.load_checkpoint(resume_from, accelerator, model, optimizer, scheduler))
        accelerator.print(f"resuming from {resume_from} (step {state.step}, {state.tokens:,} tokens)")
        if accelerator.is_main_process:
            _warn_stretched_schedule(state, max_steps, multiplier, cfg)
            # Only once the checkpoint has loaded: a corrupt one must leave the directory as it was.
            rundir.write_resolved(recipe, output_dir)  # resumable keys may have changed
            rundir.remove_interrupted_writes(output_dir)
            # A lowered train.keep_checkpoints frees its space now, before the next save needs it.
            checkpoints.rotate(output_dir, cfg.keep_checkpoints)
        accelerator.wait_for_everyone()
    state.max_steps = max_steps
    log = MetricsLog(accelerator, output_dir / "metrics.jsonl", state.step if resume_from is not None else None)
    log.write({"event": "start", "step": state.step, "tokens": state.tokens, "distributed": layout.as_json()})

    # 1e. What this run is, in a few lines.
    if accelerator.is_main_process:
        for line in model_summary_lines(config, counts, recipe, world_size=world, max_steps=max_steps):
            accelerator.print(line)
        accelerator.print(f"distributed:      {layout.description}")
        accelerator.print(f"data:             {data.description}")
        accelerator.print(f"optimizer:        {optimizer_line}")
        accelerator.print(f"precision:        {mixed_precision}; {peak.description}")
        if threads_note():
            accelerator.print(f"threads:          {threads_note()}")
    return Run(
        recipe=recipe, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
        batches=batches, log=log, objective=make_objective(accelerator, model, cfg, data), max_steps=max_steps,
        mixed_precision=mixed_precision, counts=counts, flops_per_token=fpt, peak=peak,
        resume_from=resume_from, start_step=state.step, state=state, config=config, use_cache=use_cache, layout=layout,
    )


# ----------------------------------------------------------------------------------------------
# 2. Training
# ----------------------------------------------------------------------------------------------


def _step(run: Run, data: TrainData, signals: StopSignals) -> StepResult:
    """Forward and backward over this step's micro-batches, clip, and take the optimizer step."""
    import torch

    accelerator, model, cfg = run.accelerator, run.model, run.cfg
    world = accelerator.num_processes
    micro, position = run.batches.next_step()
    micro = [to_device(b, accelerator.device) for b in micro]
    objective = run.objective
    units = sum(objective.units(b) for b in micro)  # scored tokens, or pairs
    counts = torch.tensor([units, scored_and_input_tokens(micro)[1]], dtype=torch.float64, device=accelerator.device)
    scored, step_tokens = accelerator.reduce(counts, reduction="sum").tolist()
    # Summed loss, then the objective's stats, then the stop flag: one reduction.
    sums = torch.zeros(2 + len(objective.stats), dtype=torch.float64, device=accelerator.device)
    for batch in micro:
        with accelerator.accumulate(model):
            nll, stats = objective(batch)
            # Gradient of (step's summed loss / step's units over all processes): accelerate
            # divides by grad_accum_steps and DDP averages over processes, so multiply both back.
            accelerator.backward(nll * (cfg.grad_accum_steps * world / max(scored, 1.0)))
            sums[0] += nll.detach().double()
            sums[1 : 1 + len(objective.stats)] += stats.detach().double()
    sums[-1] = float(signals.received is not None)
    sums = accelerator.reduce(sums, reduction="sum").tolist()
    nll_sum, stop = sums[0], sums[-1]
    stat_sums = dict(zip(objective.stats, sums[1:-1], strict=True))
    loss = nll_sum / max(scored, 1.0)
    grad_norm = None
    if math.isfinite(loss) and cfg.grad_clip is not None:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        grad_norm = float(grad_norm) if grad_norm is not None else None
    finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm) or run.mixed_precision == "fp16")
    lr = run.scheduler.get_last_lr()[0]
    if finite:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    state = run.state
    state.step += 1
    state.tokens += int(step_tokens)
    state.stream_position = position if data.stream is not None else None
    return StepResult(
        loss=loss, nll_sum=nll_sum, lr=lr, grad_norm=grad_norm, finite=finite, scored=scored, tokens=step_tokens, stop=stop > 0, stats=stat_sums
    )


def _skip_nonfinite(run: Run, result: StepResult, bar) -> None:
    """Count a skipped non-finite step, or stop with TrainingError once train.skip_nonfinite_steps is used up."""
    state = run.state
    if state.skipped_steps >= run.cfg.skip_nonfinite_steps:
        bar.close()
        latest = rundir.latest_checkpoint(run.output_dir)
        run.log.write({"event": "nonfinite", "step": state.step, "tokens": state.tokens, "loss": str(result.loss)})
        raise TrainingError(
            f"non-finite loss ({result.loss}) at step {state.step}; stopped without saving. "
            + (f"The last good checkpoint is {latest}. " if latest else "No checkpoint was written. ")
            + "Lower train.lr, enable train.grad_clip, or set train.skip_nonfinite_steps to skip a few such steps"
        )
    state.skipped_steps += 1
    run.log.write({"event": "skip", "step": state.step, "tokens": state.tokens, "loss": str(result.loss)})
    run.accelerator.print(f"warning: non-finite loss at step {state.step}: skipped ({state.skipped_steps}/{run.cfg.skip_nonfinite_steps})")


def _log_train(run: Run, window: Window, result: StepResult, bar) -> float:
    """Write the train event of the window that ends at this step; returns its loss."""
    elapsed = time.perf_counter() - window.started
    tokens_per_s = window.tokens / max(elapsed, 1e-9)
    achieved = run.flops_per_token * tokens_per_s
    peak = run.peak
    if peak.kind == "probe":
        # A probe taken on a busy machine can underestimate the peak; what training reached is a
        # lower bound of it, so MFU never reads above 100%.
        peak.flops = max(peak.flops, achieved)
    mfu: float | None = None if peak.flops is None else achieved / peak.flops
    if mfu is not None and mfu > 1.0:
        # A peak the user gave (or a datasheet's) is respected, never raised; but no MFU above 100%
        # is written: it says, once, that the peak is wrong.
        if not run.warned_peak:
            run.warned_peak = True
            bar.write(f"warning: training reached {achieved / 1e12:.3g} TFLOP/s, above the peak from {peak.source} "
                      f"({peak.flops / 1e12:.3g} TFLOP/s); mfu is logged as null until the peak is corrected")
        mfu = None
    train_loss = window.nll / max(window.scored, 1.0)
    event = {"event": "train", "step": run.state.step, "tokens": run.state.tokens, "loss": round(train_loss, 6), "lr": result.lr,
             "tokens_per_s": round(tokens_per_s, 1), "mfu": None if mfu is None else round(mfu, 4)}
    if result.grad_norm is not None:
        event["grad_norm"] = round(result.grad_norm, 6)
    # The objective's own statistics (preference: rewards, margin, accuracy), means per unit of the window.
    means = {name: value / max(window.scored, 1.0) for name, value in window.stats.items()}
    event.update({name: round(value, 6) for name, value in means.items()})
    run.log.write(event)
    shown = {"margin": means["reward_margin"], "acc": means["pref_accuracy"]} if "reward_margin" in means else {}
    bar.set_postfix(loss=f"{train_loss:.4f}", **{k: f"{v:.3f}" for k, v in shown.items()}, lr=f"{result.lr:.2e}",
                    tok_s=f"{tokens_per_s:,.0f}", mfu="n/a" if mfu is None else f"{mfu:.1%}", refresh=False)
    return train_loss


def _evaluate(run: Run, data: TrainData, extra_eval: ExtraEval | None, bar) -> None:
    """Validation loss over every validation token (plus the task metric), logged as an eval event."""
    import torch

    state, accelerator = run.state, run.accelerator
    result = evaluate_loss_by_part(accelerator, run.model, data, run.cfg, run.objective)
    val_loss = result.loss
    per_token = run.objective.unit == "token"
    # A perplexity only means something for a per-token NLL; a preference loss is per pair.
    event = {"event": "eval", "step": state.step, "tokens": state.tokens, "val_loss": round(val_loss, 6),
             "val_ppl": round(math.exp(min(val_loss, 700)), 4) if per_token else None,
             "val_tokens" if per_token else f"val_{run.objective.unit}s": result.units}
    # Named validation parts (a mixture's sources): val_loss/LABEL next to the loss over all of them.
    event.update({f"val_loss/{label}": round(loss, 6) for label, (loss, _) in result.parts.items()})
    event.update({f"val_{name}": round(value, 6) for name, value in result.stats.items()})
    if extra_eval is not None:
        unwrapped = accelerator.unwrap_model(run.model)
        unwrapped.eval()
        with torch.no_grad():
            event.update(extra_eval(unwrapped, state.step) or {})
        unwrapped.train()
    state.val_loss, state.val_ppl = event["val_loss"], event["val_ppl"]
    run.log.write(event)
    if accelerator.is_main_process:
        extras = "".join(f", {k} {v:.4g}" for k, v in event.items() if k not in EVAL_KEYS and isinstance(v, (int, float)))
        ppl = f", val_ppl {event['val_ppl']:.2f}" if per_token else ""
        bar.write(f"step {state.step}: val_loss {val_loss:.4f}{ppl}{extras}")


def _save(run: Run) -> Path:
    """A complete, resumable checkpoint of the current step."""
    return checkpoints.save_checkpoint(
        run.accelerator, run.model, run.optimizer, run.scheduler, asdict(run.state), run.output_dir, run.cfg.keep_checkpoints,
        run.layout.as_json(),
    )


def _train(run: Run, data: TrainData, extra_eval: ExtraEval | None) -> dict[str, Any]:
    """Phases 2a-2d, once per optimizer step until max_steps; returns what the summary needs."""
    cfg, state = run.cfg, run.state
    last_saved = state.step if run.resume_from is not None else None
    window = Window()
    bar = progress_bar(run.accelerator, run.max_steps, state.step)
    with StopSignals() as signals, bar:  # an error leaves the bar closed, so its message starts a line of its own
        run.model.train()
        while state.step < run.max_steps:
            # 2a. One optimizer step (skipped when its loss is not finite).
            result = _step(run, data, signals)
            if not result.finite:
                _skip_nonfinite(run, result, bar)
            window.tokens += result.tokens
            if result.finite:
                window.nll += result.nll_sum
                window.scored += result.scored
                for name, value in result.stats.items():
                    window.stats[name] = window.stats.get(name, 0.0) + value
            bar.update(1)
            last = state.step == run.max_steps

            # 2b. Log.
            if state.step % cfg.log_every == 0 or last:
                state.train_loss = _log_train(run, window, result, bar)
                window = Window()

            # 2c. Evaluate (not counted in the training throughput).
            if data.validation is not None and (state.step % cfg.eval_every == 0 or last):
                started = time.perf_counter()
                _evaluate(run, data, extra_eval, bar)
                window.pause(time.perf_counter() - started)

            # 2d. Checkpoint, and stop on a signal once it is saved.
            if state.step % cfg.save_every == 0 or last or result.stop:
                started = time.perf_counter()
                path = _save(run)
                last_saved = state.step
                window.pause(time.perf_counter() - started)
            if result.stop:
                bar.close()
                name = signals.received or "a signal on another process"
                run.log.write({"event": "stop", "step": state.step, "tokens": state.tokens, "signal": name})
                run.accelerator.end_training()
                raise Interrupted(f"stopped by {name} at step {state.step}; checkpoint saved to {path}. Run the same command again to resume")
    bar.close()
    if last_saved != state.step:
        _save(run)
    return {"train_loss": state.train_loss}


# ----------------------------------------------------------------------------------------------
# 3. Final model
# ----------------------------------------------------------------------------------------------


def _save_final(accelerator, model, tokenizer, output_dir: Path, save_final: SaveFinal | None) -> None:
    """Write the final model at the top of output_dir, each file replaced atomically."""
    kind = dist.distributed_kind(accelerator)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    state_dict = accelerator.get_state_dict(model) if kind != "plain" else None
    if state_dict is not None:
        # A gathered FSDP / DeepSpeed state dict names a tied weight twice (lm_head.weight beside the
        # embedding); the model written must hold it once, as a single-process export does.
        unique = {name for name, _ in unwrapped.named_parameters()}
        aliases = {name for name, _ in unwrapped.named_parameters(remove_duplicate=False)} - unique
        state_dict = {name: value for name, value in state_dict.items() if name not in aliases}
    if not accelerator.is_main_process:
        return
    staging = output_dir / rundir.FINAL_STAGING
    if staging.exists():
        shutil.rmtree(staging)
    try:
        with errors.writing(output_dir, "output_dir", "free some space or make it writable, then run the same command "
                            "again: it resumes from the last checkpoint and writes the final model"):
            staging.mkdir()
            if save_final is not None:
                save_final(unwrapped, tokenizer, staging)
            elif state_dict is not None:
                unwrapped.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
                save_hf_model(unwrapped, tokenizer, staging, weights=False)
            else:
                save_hf_model(unwrapped, tokenizer, staging)
    except errors.DiskError:
        shutil.rmtree(staging, ignore_errors=True)  # give the space back
        raise
    for item in sorted(staging.iterdir()):
        target = output_dir / item.name
        if target.is_dir() and item.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()


def _finish(run: Run, tokenizer, data: TrainData, save_final: SaveFinal | None, summary: dict[str, Any]) -> dict[str, Any]:
    """Phase 3: the final model, the model card and summary.json."""
    accelerator, state = run.accelerator, run.state
    config = run.config
    if run.use_cache is not None:
        config.use_cache = run.use_cache  # generation wants the cache back
    mixture = None
    if data.report is not None:
        # What the run trained on, per source of a mixture: realised token share and epochs.
        consumed = state.step * run.cfg.micro_batch_size * run.cfg.grad_accum_steps * accelerator.num_processes
        mixture = data.report(consumed, state.stream_position)
        run.log.write({"event": "mixture", "step": state.step, "tokens": state.tokens, "sources": mixture})
        for line in report_lines(mixture, "trained"):
            accelerator.print(line)
    _save_final(accelerator, run.model, tokenizer, run.output_dir, save_final)
    summary = {
        "val_loss": state.val_loss, "val_ppl": state.val_ppl, **summary,
        "step": state.step, "tokens": state.tokens, "stopped": "completed", "output_dir": str(run.output_dir),
        "resumed_from": run.start_step if run.resume_from is not None else None,
        "skipped_steps": state.skipped_steps, "parameters": run.counts["total"], "flops_per_token": run.flops_per_token,
        "model_type": getattr(config, "model_type", None), "data": data.extra,
        "peak_flops": run.peak.flops, "peak_source": run.peak.source, "distributed": run.layout.as_json(),
        **({"mixture": mixture} if mixture is not None else {}),
    }
    if accelerator.is_main_process:
        write_model_card(run.output_dir, run.recipe, summary, run.counts)
        rundir.write_json_atomic(run.output_dir / "summary.json", summary)
        accelerator.print(f"done: {state.step} steps, {state.tokens:,} tokens; model saved to {run.output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
