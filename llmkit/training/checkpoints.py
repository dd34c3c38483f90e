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
deletes old checkpoints only after the new one is complete. Under FSDP the model and optimizer go
through accelerate's FSDP savers (full or sharded state dict, read back with weights_only=True);
under DeepSpeed through the engine's own save_checkpoint/load_checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from llmkit.dist import distributed_kind
from llmkit.errors import RunDirError
from llmkit.rundir import CHECKPOINTS, MARKER, PREFIX, complete_checkpoints, fsync_dir, step_dir_name


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


def save_checkpoint(accelerator, model, optimizer, scheduler, state: dict, output_dir: Path, keep: int) -> Path:
    """Write a complete checkpoint for state["step"] atomically, then delete all but the newest `keep`."""
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
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")

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
        _write_json(tmp / "trainer_state.json", {**state, "world_size": accelerator.num_processes})
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


def read_trainer_state(path: Path) -> dict:
    """The trainer_state.json of a checkpoint directory."""
    return _read_json(Path(path) / "trainer_state.json")


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
        if missing or unexpected:
            raise CheckpointError(
                f"{path / 'model.safetensors'}: does not match the model "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was it written by another recipe?"
            )
        import torch

        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        optimizer.load_state_dict(safe_torch_load(path / "optimizer.pt"))
    scheduler.load_state_dict(_read_json(path / "scheduler.json"))
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and (path / "scaler.json").is_file():
        scaler.load_state_dict(_read_json(path / "scaler.json"))
    rank = accelerator.process_index
    rng_json = path / f"rng-rank{rank}.json"
    if rng_json.is_file():
        _set_rng_state(_read_json(rng_json), _read_safetensors(path / f"rng-rank{rank}.safetensors"))
    return state


# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------


