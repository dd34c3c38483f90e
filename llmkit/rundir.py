"""The run directory contract (`output_dir`), checkpoint names, and atomic writes.

    llmkit pretrain pretrain/tiny              # writes runs/pretrain-tiny/
    llmkit pretrain pretrain/tiny              # same recipe again: resumes (or reuses the finished run)
    llmkit pretrain pretrain/tiny --set train.lr=1e-3 --overwrite   # a different run replaces it

Every stage writes its output_dir the same way:

- `recipe.yaml`, the resolved recipe, says which run a directory holds. Running a recipe on a
  directory that holds the same recipe (up to the keys the schema marks resumable, such as
  train.max_steps) continues or reuses that run; a different recipe of the same stage is refused
  unless `--overwrite`; a run of another stage is always refused, so `--overwrite` can never
  destroy, say, a pretraining run by pointing an eval at it.
- Files are written under a temporary name and renamed into place (`write_text_atomic`,
  `publish_dir`), so a kill at any moment leaves the old file or the new one, never half of one.
- Checkpoints live in `checkpoints/step-00000100/`; only those holding the COMPLETE marker count.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from llmkit.errors import RunDirError
from llmkit.recipes import recipe_to_yaml, resumable_keys

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
PREFIX = "step-"


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort: some file systems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same directory and one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, data: Any, indent: int | None = 1) -> Path:
    """`write_text_atomic` of a JSON document."""
    return write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")


def publish_dir(tmp_dir: Path, target: Path) -> None:
    """Move a finished `tmp_dir` to `target`, replacing what is there only once the new one is complete."""
    tmp_dir, target = Path(tmp_dir), Path(target)
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp_dir.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dir.rename(target)
    fsync_dir(target.parent)


def write_resolved(recipe, output_dir: Path) -> Path:
    """Write output_dir/recipe.yaml (the resolved recipe) atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(output_dir / "recipe.yaml", recipe_to_yaml(recipe))


# ----------------------------------------------------------------------------------------------
# Checkpoint names
# ----------------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    """Zero-padded checkpoint directory name, e.g. step-00000100."""
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in output_dir, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    found = []
    if root.is_dir():
        for path in root.iterdir():
            name = path.name
            if name.startswith(PREFIX) and name[len(PREFIX) :].isdigit() and (path / MARKER).is_file():
                found.append((int(name[len(PREFIX) :]), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------------------------
# Which run a directory holds
# ----------------------------------------------------------------------------------------------


def _flatten(data: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(data, dict):
        out: dict[tuple[str, ...], Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, (*prefix, str(key))))
        return out
    return {prefix: data}


def recipe_difference(old: dict, new: dict, ignore: set[tuple[str, ...]] = frozenset()) -> str | None:
    """The first recipe key (dotted) whose value differs, with both values; None when equal up to `ignore`."""
    a, b = _flatten(old), _flatten(new)
    for key in sorted(set(a) | set(b)):
        if any(key[: len(k)] == k for k in ignore):
            continue
        if a.get(key) != b.get(key):
            return f"{'.'.join(key)} ({a.get(key)!r} there, {b.get(key)!r} now)"
    return None


@dataclass
class RunDir:
    """What `claim` found in an output_dir.

    state: "new" (missing or empty), "same" (holds this recipe: resume or reuse) or "replace"
    (holds a run of this stage or foreign files, and --overwrite was given: start over).
    """

    path: Path
    state: Literal["new", "same", "replace"]


def claim(recipe, overwrite: bool = False, what: str = "run") -> RunDir:
    """Check that `recipe` may write its output_dir; RunDirError (writing nothing) when it may not.

    The recipe is compared with the saved recipe.yaml up to the keys the schema marks resumable.
    """
    output_dir = Path(recipe.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirError(f"output_dir {output_dir}: is a file; choose a directory")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return RunDir(output_dir, "new")
    saved = output_dir / "recipe.yaml"
    if not saved.is_file():
        if overwrite:
            return RunDir(output_dir, "replace")
        raise RunDirError(
            f"output_dir {output_dir}: holds files that are not an llmkit run (no recipe.yaml); "
            "choose another output_dir or pass --overwrite"
        )
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        if overwrite:
            return RunDir(output_dir, "replace")
        raise RunDirError(f"{saved}: unreadable ({exc.__class__.__name__}); pass --overwrite to start over") from None
    old = old if isinstance(old, dict) else {}
    stage = old.get("stage")
    if stage is not None and stage != recipe.stage:
        raise RunDirError(
            f"output_dir {output_dir}: holds a {stage} run; write the {recipe.stage} {what} to its own directory "
            f"(e.g. {output_dir / recipe.stage})"
        )
    if overwrite:
        return RunDir(output_dir, "replace")
    diff = recipe_difference(old, yaml.safe_load(recipe_to_yaml(recipe)), resumable_keys(type(recipe)))
    if diff is None:
        return RunDir(output_dir, "same")
    raise RunDirError(
        f"output_dir {output_dir}: holds a different {what} ({diff}); choose another output_dir or pass --overwrite to replace it"
    )


def check_run_dir(recipe, overwrite: bool = False) -> Path | None:
    """For training stages: `claim` the run directory and return the checkpoint to resume from (or None)."""
    run = claim(recipe, overwrite)
    return latest_checkpoint(run.path) if run.state == "same" else None


def clear_run_dir(output_dir: Path) -> None:
    """Remove a previous run's llmkit files (checkpoints, metrics, recipe, trackers) for --overwrite."""
    output_dir = Path(output_dir)
    for name in (CHECKPOINTS, "runs", "trackers"):
        if (output_dir / name).is_dir():
            shutil.rmtree(output_dir / name)
    for name in ("metrics.jsonl", "recipe.yaml", "summary.json"):
        if (output_dir / name).is_file():
            (output_dir / name).unlink()
