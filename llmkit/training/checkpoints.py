"""Resumable checkpoints: atomic save, rotation and safe loading.

    llmkit pretrain pretrain/tiny --set train.save_every=50   # then Ctrl-C and run it again: it resumes

Layout of one checkpoint, `output_dir/checkpoints/step-00000100/`:

    model.safetensors      trainable parameters (safetensors: no code runs on load)
    optimizer.pt           optimizer state, read back with torch.load(weights_only=True)
    scheduler.json         learning-rate scheduler state
    rng-rank{R}.json       python and numpy RNG states of process R
    rng-rank{R}.safetensors torch CPU (and CUDA) RNG states of process R
    trainer_state.json     step, tokens, data position, counters
    COMPLETE               written last; a directory without it is never resumed from

It is written under `checkpoints/.tmp-step-00000100/`, completed with the COMPLETE marker and then
renamed, so a kill at any moment leaves either the old set of checkpoints or the new one. Rotation
deletes old checkpoints only after the new one is complete; a run that resumes with a lower
train.keep_checkpoints deletes the surplus at once, so a disk with room for only that many can go on.
A full disk stops the run with one line (DiskError) and the partial checkpoint deleted.
Under FSDP the model and optimizer go through accelerate's FSDP savers (full or sharded state
dict, read back with weights_only=True); under DeepSpeed through the engine's own save_checkpoint/load_checkpoint.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
from pathlib import Path
from typing import Any

from llmkit.dist import distributed_kind
from llmkit.errors import RunDirError, disk_error, disk_problem
from llmkit.rundir import CHECKPOINTS, MARKER, PREFIX, complete_checkpoints, fsync_dir, step_dir_name
from llmkit.training.parallelism import Layout, launch_hint


class CheckpointError(RunDirError):
    """A checkpoint that is truncated, corrupt or unsafe to load."""


# ----------------------------------------------------------------------------------------------
# RNG states (JSON + safetensors, never pickle)
# ----------------------------------------------------------------------------------------------


def _rng_state() -> tuple[dict, dict]:
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return py, tensors


def _set_rng_state(py: dict, tensors: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = py["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = py["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def trainable_state_dict(model) -> dict:
    """The parameters that training changes (all of them, or only adapters when the rest is frozen)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(accelerator, model, optimizer, scheduler, state: dict, output_dir: Path, keep: int, layout: dict | None = None) -> Path:
    """Write a complete checkpoint for state["step"] atomically, then delete all but the newest `keep`.

    `layout` (parallelism.Layout.as_json(): kind, processes, machines) goes into trainer_state.json
    as "distributed", so that a resume can tell what wrote the checkpoint (check_layout).

    A full (or read-only) disk raises DiskError naming the checkpoints directory, the space a checkpoint
    takes and train.keep_checkpoints, after deleting the partial checkpoint; the older ones are intact.
    """
    root = Path(output_dir) / CHECKPOINTS
    try:
        return _write_checkpoint(accelerator, model, optimizer, scheduler, state, output_dir, keep, layout)
    except Exception as exc:
        problem = disk_problem(exc)
        if problem is None:
            raise
        shutil.rmtree(root / f".tmp-{step_dir_name(state['step'])}", ignore_errors=True)  # give the space back
        found = complete_checkpoints(output_dir)
        kept = f"the checkpoints up to {found[-1][1].name} are intact" if found else "no checkpoint was written yet"
        if problem[0] in (errno.ENOSPC, errno.EDQUOT):
            fix = (f"{kept}; free some space or lower train.keep_checkpoints (now {keep}; the surplus is deleted "
                   "when the run resumes, before it saves), then run the same command again")
        else:
            fix = f"{kept}; make it writable, then run the same command again"
        needed = _tree_bytes(found[-1][1]) if found else _estimated_bytes(model)
        raise disk_error(exc, root, f"writing {step_dir_name(state['step'])} to", fix, needed) from None


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _estimated_bytes(model) -> int:
    """Weights plus two Adam moments of the trainable parameters: what one checkpoint holds."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _write_checkpoint(accelerator, model, optimizer, scheduler, state: dict, output_dir: Path, keep: int, layout: dict | None) -> Path:
    import torch
    from safetensors.torch import save_file

    root = Path(output_dir) / CHECKPOINTS
    final = root / step_dir_name(state["step"])
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    kind = distributed_kind(accelerator)
    if kind == "deepspeed":
        model.save_checkpoint(str(tmp / "deepspeed"), tag="state")
    elif kind == "fsdp":
        from accelerate.utils import save_fsdp_model, save_fsdp_optimizer

        plugin = accelerator.state.fsdp_plugin
        save_fsdp_model(plugin, accelerator, model, str(tmp))
        save_fsdp_optimizer(plugin, accelerator, optimizer, model, str(tmp))
    elif accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        weights = {k: v.contiguous().cpu() for k, v in trainable_state_dict(unwrapped).items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # Through a Python file object, so a full disk surfaces as the OSError behind torch's RuntimeError.
        with open(tmp / "optimizer.pt", "wb") as f:
            torch.save(optimizer.state_dict(), f)

    rank = accelerator.process_index
    py, tensors = _rng_state()
    _write_json(tmp / f"rng-rank{rank}.json", py)
    save_file(tensors, str(tmp / f"rng-rank{rank}.safetensors"))
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:
            _write_json(tmp / "scaler.json", scaler.state_dict())
        recorded = {"distributed": layout} if layout is not None else {}
        _write_json(tmp / "trainer_state.json", {**state, "world_size": accelerator.num_processes, **recorded})
        # The marker goes in last, then one rename publishes the whole directory.
        (tmp / MARKER).write_text(f"step {state['step']}\n", encoding="utf-8")
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
        rotate(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def rotate(output_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and leftovers of interrupted writes."""
    found = complete_checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
    root = Path(output_dir) / CHECKPOINTS
    newest = found[-1][0] if found else -1
    for path in root.glob(f".tmp-{PREFIX}*"):
        # A leftover temporary directory is an interrupted older write; never the one being written now.
        step = path.name[len(f".tmp-{PREFIX}") :]
        if step.isdigit() and int(step) <= newest:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------


def _need(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint; delete {path.parent} to resume from an older one")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_need(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path}: corrupt or truncated ({exc.__class__.__name__}); delete {path.parent} to resume from an older one"
        ) from None


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(_need(path)))
    except Exception as exc:  # safetensors raises its own error types for truncated headers and data
        raise CheckpointError(
            f"{path}: corrupt or truncated ({exc.__class__.__name__}: {str(exc).splitlines()[0][:120]}); "
            f"delete {path.parent} to resume from an older one"
        ) from None


def safe_torch_load(path: Path) -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary objects."""
    import pickle

    import torch

    try:
        return torch.load(_need(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain values "
            f"({str(exc).splitlines()[0][:160]}); it may be tampered with. Delete {path.parent} to resume from an older one"
        ) from None
    except (EOFError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: corrupt or truncated ({exc.__class__.__name__}: {str(exc).splitlines()[0][:120]}); "
            f"delete {path.parent} to resume from an older one"
        ) from None


def _corrupt(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt ({problem}); delete {path.parent} to resume from an older one")


_JSON_KIND = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object"}


def _kind(value: Any) -> str:
    return "null" if value is None else _JSON_KIND.get(type(value), type(value).__name__)


def _shape_problem(expected: Any, saved: Any, where: str = "") -> str | None:
    """How `saved` (read from JSON) differs in shape from `expected` (what this run writes), or None.

    Every key of `expected` (extra keys are allowed: an older torch may have written them), same
    list lengths, same kinds of values (a float may be written as an integer); a None in `expected`
    accepts anything, since a value that is unset now may be set in a checkpoint.
    """
    at = f" at {where}" if where else ""
    if expected is None:
        return None
    if isinstance(expected, bool) or isinstance(saved, bool):
        return None if isinstance(expected, bool) and isinstance(saved, bool) else f"expected {_kind(expected)}{at}, got {_kind(saved)}"
    if isinstance(expected, (int, float)):
        ok = isinstance(saved, int) if isinstance(expected, int) else isinstance(saved, (int, float))
        return None if ok else f"expected {_kind(expected)}{at}, got {_kind(saved)}"
    if isinstance(expected, (list, tuple)):
        if not isinstance(saved, list):
            return f"expected an array{at}, got {_kind(saved)}"
        if len(saved) != len(expected):
            return f"expected {len(expected)} values{at}, got {len(saved)}"
        return next((p for i, (e, v) in enumerate(zip(expected, saved, strict=True)) if (p := _shape_problem(e, v, f"{where}[{i}]"))), None)
    if isinstance(expected, dict):
        if not isinstance(saved, dict):
            return f"expected an object{at}, got {_kind(saved)}"
        absent = [k for k in expected if k not in saved]
        if absent:
            return f"no key {absent[0]!r}{at}"
        return next((p for k in expected if (p := _shape_problem(expected[k], saved[k], f"{where}.{k}" if where else str(k)))), None)
    return None if isinstance(saved, type(expected)) else f"expected {_kind(expected)}{at}, got {_kind(saved)}"


def _read_json_like(path: Path, expected: Any) -> Any:
    """JSON that must have the shape of `expected` (the state this run would write); CheckpointError if not."""
    saved = _read_json(path)
    problem = _shape_problem(expected, saved)
    if problem is not None:
        raise _corrupt(path, problem)
    return saved


def read_trainer_state(path: Path) -> dict:
    """The trainer_state.json of a checkpoint directory, checked: counters are non-negative integers, step matches."""
    file = Path(path) / "trainer_state.json"
    state = _read_json(file)
    if not isinstance(state, dict):
        raise _corrupt(file, f"expected an object, got {_kind(state)}")
    for key in ("step", "tokens", "skipped_steps", "world_size"):
        value = state.get(key, 0)
        if key in ("step", "tokens") and key not in state:
            raise _corrupt(file, f"no {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _corrupt(file, f"{key!r} must be a non-negative integer, got {value!r}")
    for key in ("val_loss", "val_ppl", "train_loss"):
        value = state.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise _corrupt(file, f"{key!r} must be a number or null, got {value!r}")
    position = state.get("stream_position")
    if position is not None and not (
        isinstance(position, dict)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in position.values())
    ):
        raise _corrupt(file, f"'stream_position' must be null or an object of non-negative integers, got {position!r}")
    named = Path(path).name[len(PREFIX) :] if Path(path).name.startswith(PREFIX) else ""
    if named.isdigit() and int(named) != state["step"]:
        raise _corrupt(file, f"'step' is {state['step']} in the checkpoint of step {int(named)}")
    return state


def written_by(path: Path) -> Layout:
    """The distributed kind and process count that wrote a checkpoint: recorded, or told by its files (older ones)."""
    path = Path(path)
    state = read_trainer_state(path)
    recorded = state.get("distributed")
    if isinstance(recorded, dict) and recorded.get("kind") in ("single", "ddp", "fsdp", "deepspeed"):
        try:
            return Layout.from_json(recorded)
        except (TypeError, ValueError):
            raise _corrupt(path / "trainer_state.json", f"'distributed' is not a kind with counts: {recorded!r}") from None
    processes = state.get("world_size", 1)
    if (path / "deepspeed").is_dir():
        return Layout("deepspeed", processes)
    if any(path.glob("pytorch_model_fsdp*")):
        return Layout("fsdp", processes)
    return Layout("ddp" if processes > 1 else "single", processes)


def _same_files(then: Layout, now: Layout) -> bool:
    """Whether a checkpoint's files fit this launch: DDP and one process write the same ones; a ZeRO stage or
    FSDP version that one side does not know (older checkpoints, a launch not yet set up) is not compared."""
    plain = ("single", "ddp")
    if then.kind in plain or now.kind in plain:
        return then.kind in plain and now.kind in plain
    def known(a, b):
        return a is None or b is None or a == b
    return then.kind == now.kind and known(then.zero_stage, now.zero_stage) and known(then.fsdp_version, now.fsdp_version)


def check_layout(path: Path, now: Layout) -> None:
    """Refuse to resume a checkpoint under another distributed kind or process count (CheckpointError, one line).

    The kinds keep model and optimizer state in different files (and ZeRO stages and FSDP versions
    partition them differently), and each process's data position and random streams are part of
    the checkpoint, so another process count would repeat or skip training data. The machine count
    may change: 2 machines x 4 processes resume as 1 x 8.
    """
    path = Path(path)
    then = written_by(path)
    if not _same_files(then, now):
        raise CheckpointError(
            f"{path} was written by {then.description}, this launch runs {now.description}: the checkpoint is valid, "
            f"but {then.name} keeps the model and optimizer state in its own files. Resume it with the launch that wrote it "
            f"({launch_hint(then)}); to train on with {now.name}, start a new run in another output_dir"
        )
    if then.processes != now.processes:
        raise CheckpointError(
            f"{path} was written by {then.processes} process{'es' if then.processes != 1 else ''}, this launch has "
            f"{now.processes}: the data position and each process's random streams belong to {then.processes}, so another "
            f"count would repeat or skip training data. Resume with {then.processes} ({launch_hint(then)})"
        )


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler, grad scaler and this process's RNG states; return trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    kind = distributed_kind(accelerator)
    if kind == "deepspeed":
        load_path, _ = model.load_checkpoint(str(path / "deepspeed"), tag="state")
        if load_path is None:
            raise CheckpointError(f"{path / 'deepspeed'}: DeepSpeed could not load this checkpoint")
    elif kind == "fsdp":
        from accelerate.utils import load_fsdp_model, load_fsdp_optimizer

        plugin = accelerator.state.fsdp_plugin
        load_fsdp_model(plugin, accelerator, model, str(path))
        load_fsdp_optimizer(plugin, accelerator, optimizer, model, str(path))
    else:
        weights = _read_safetensors(path / "model.safetensors")
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        params = dict(unwrapped.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
        unexpected = [n for n in weights if n not in params]
        resized = [n for n in weights if n in params and tuple(weights[n].shape) != tuple(params[n].shape)]
        if missing or unexpected or resized:
            raise CheckpointError(
                f"{path / 'model.safetensors'}: does not match the model "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shape {resized[:3]}); was it written by another recipe?"
            )
        import torch

        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        _load_optimizer(optimizer, path / "optimizer.pt")
    _load_json_state(scheduler, path / "scheduler.json")
    if scheduler.last_epoch != state["step"]:  # the loop steps the schedule once per optimizer step
        raise _corrupt(path / "scheduler.json", f"'last_epoch' is {scheduler.last_epoch}, the checkpoint is of step {state['step']}")
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and (path / "scaler.json").is_file():
        _load_json_state(scaler, path / "scaler.json")
    rank = accelerator.process_index
    rng_json = path / f"rng-rank{rank}.json"
    if rng_json.is_file():
        expected_py, _ = _rng_state()
        py = _read_json_like(rng_json, expected_py)
        tensors = _read_safetensors(path / f"rng-rank{rank}.safetensors")
        try:
            _set_rng_state(py, tensors)
        except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as exc:
            names = f"{rng_json.name} / {rng_json.with_suffix('.safetensors').name}"
            raise _corrupt(rng_json, f"{names} hold no valid RNG state: {type(exc).__name__}: {str(exc)[:120]}") from None
    return state


def _load_json_state(obj, path: Path) -> None:
    """obj.load_state_dict of a JSON file, checked against the shape of obj's own state first."""
    saved = _read_json_like(path, obj.state_dict())
    try:
        obj.load_state_dict(saved)
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {str(exc)[:120]}") from None


def _load_optimizer(optimizer, path: Path) -> None:
    """optimizer.load_state_dict of optimizer.pt, refusing one of another model (groups, sizes) with one line."""
    saved = safe_torch_load(path)
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _corrupt(path, f"does not match this model's optimizer: {type(exc).__name__}: {str(exc)[:120]}") from None
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if getattr(value, "dim", None) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
                    raise _corrupt(path, f"its {name} of shape {tuple(value.shape)} is for a parameter of another shape {tuple(param.shape)}")


# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------


