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
- One run at a time: every stage that writes a run directory holds its lock (`locked`) from
  before the recipe comparison to its last write; a second run on the same directory is refused.
- Temporary names carry their owner (`temp_path`: `.NAME.tmp-PID@HOST`); whoever creates one
  first removes those of processes of this machine that are gone, so killed runs leave nothing
  behind for long.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from llmkit import dist
from llmkit.errors import RunDirError, writing
from llmkit.recipes import REPLACED_KEYS, recipe_to_yaml, resumable_keys

try:
    import fcntl
except ImportError:  # POSIX only: on Windows runs are not locked
    fcntl = None

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
PREFIX = "step-"
LOCK = ".lock"
FINAL_STAGING = ".final-tmp"
"""Where the final model is assembled before its files are moved to the top of output_dir."""

# What llmkit stages write at the top of an output_dir: `clear_run_dir` removes these from a directory
# that also holds other files, so no file of an earlier model can pass for the new run's.
WRITTEN_NAMES = (
    "recipe.yaml", "metrics.jsonl", "summary.json", "report.json", "metrics.json", "predictions.jsonl",
    "comparison.json", "comparison.md", CHECKPOINTS, "runs", "trackers", FINAL_STAGING, "README.md",
    "config.json", "generation_config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter", "adapter_config.json", "adapter_model.*",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.*",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
)


# ----------------------------------------------------------------------------------------------
# Temporary names: tagged with their owner, removed once the owner is gone
# ----------------------------------------------------------------------------------------------

TEMP_NAME = re.compile(r"^\.(?P<stem>.+)\.tmp-(?P<pid>\d+)@(?P<node>[^/]+)$")


@functools.cache
def _node() -> str:
    """This machine and PID namespace: a PID only identifies a process there (containers may share a host name)."""
    node = socket.gethostname() or "localhost"
    try:
        node += "~" + "".join(ch for ch in os.readlink("/proc/self/ns/pid") if ch.isdigit())
    except OSError:
        pass
    return node.replace("/", "_")


def _alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_dead_temps(directory: Path) -> list[Path]:
    """Delete the temporaries in `directory` whose owner (a process of this machine) is gone; return them.

    A temporary of another machine (a cache or run directory on a shared file system) is never
    touched: its PID means nothing here.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_NAME.match(entry.name)
        if match is None or match["node"] != _node() or _alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue  # not ours to delete (another user's), or already gone
        removed.append(path)
    return removed


def temp_path(directory: Path, stem: str) -> Path:
    """A temporary name for `stem` in `directory` owned by this process: `.STEM.tmp-PID@HOST`.

    Asking for one first removes the temporaries of dead processes there, so what a killed run left
    (a half-built cache entry, a half-trained tokenizer, a half-written file) goes with the next run.
    """
    directory = Path(directory)
    remove_dead_temps(directory)
    return directory / f".{stem}.tmp-{os.getpid()}@{_node()}"


def _bookkeeping(name: str) -> bool:
    """The lock file and temporaries: present in a directory without making it hold a run."""
    return name == LOCK or TEMP_NAME.match(name) is not None


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
    tmp = temp_path(path.parent, path.name)
    try:
        with writing(path):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_json_atomic(path: Path, data: Any, indent: int | None = 1) -> Path:
    """`write_text_atomic` of a JSON document."""
    return write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")


def publish_dir(tmp_dir: Path, target: Path) -> None:
    """Move a finished `tmp_dir` to `target`, replacing what is there only once the new one is complete."""
    tmp_dir, target = Path(tmp_dir), Path(target)
    if target.exists():
        old = temp_path(target.parent, f"{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp_dir.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dir.rename(target)
    fsync_dir(target.parent)


def write_resolved(recipe, output_dir: Path) -> Path:
    """Write output_dir/recipe.yaml (the resolved recipe) atomically; a file that already says the same is left alone."""
    output_dir = Path(output_dir)
    path, text = output_dir / "recipe.yaml", recipe_to_yaml(recipe)
    try:
        if path.read_text(encoding="utf-8") == text:
            return path
    except (OSError, UnicodeDecodeError):
        pass
    with writing(output_dir, "output_dir"):
        output_dir.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, text)


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

    The recipe is compared with the saved recipe.yaml up to the keys the schema marks resumable, and
    up to output_dir itself: that is where the run is, not what it computes, so a run directory that
    was moved or copied resumes at its new path.
    """
    output_dir = Path(recipe.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirError(f"output_dir {output_dir}: is a file; choose a directory")
    if not output_dir.is_dir() or all(_bookkeeping(p.name) for p in output_dir.iterdir()):
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
    # REPLACED_KEYS: a run started by an older llmkit resumes although its recipe.yaml still holds them.
    ignored = {("output_dir",), *resumable_keys(type(recipe)), *REPLACED_KEYS}
    diff = recipe_difference(old, yaml.safe_load(recipe_to_yaml(recipe)), ignored)
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
    """Remove the previous run for --overwrite (or a restart), so nothing of it can pass for the new run.

    An llmkit run directory (it holds recipe.yaml) is emptied: checkpoints, metrics, the final model,
    tokenizer files, model card, adapters, anything. A directory of other files keeps those and loses
    only the names llmkit writes (`WRITTEN_NAMES`). Everything goes into one temporary directory first
    (renames, so a kill leaves the old files or none, never a mix) and that is then deleted.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    everything = (output_dir / "recipe.yaml").exists()
    doomed = [
        p for p in output_dir.iterdir()
        if not _bookkeeping(p.name) and (everything or any(fnmatch.fnmatch(p.name, n) for n in WRITTEN_NAMES))
    ]
    if not doomed:
        return
    trash = temp_path(output_dir, "trash")
    with writing(output_dir, "output_dir"):
        trash.mkdir()
        for path in doomed:
            path.rename(trash / path.name)
    fsync_dir(output_dir)
    shutil.rmtree(trash, ignore_errors=True)


def remove_interrupted_writes(output_dir: Path) -> None:
    """Delete what killed runs left half-written in a run directory; call it holding the directory's lock.

    The lock proves that no other run writes here, so every checkpoint being written
    (`checkpoints/.tmp-step-*`) and final model being assembled (`.final-tmp`) is a dead run's.
    """
    output_dir = Path(output_dir)
    shutil.rmtree(output_dir / FINAL_STAGING, ignore_errors=True)
    for path in (output_dir / CHECKPOINTS).glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
    remove_dead_temps(output_dir)


# ----------------------------------------------------------------------------------------------
# One run per directory
# ----------------------------------------------------------------------------------------------

_held: set[str] = set()
"""Lock files this process holds (`locked` nests: only the outermost takes and releases the lock)."""


def lock_file(output_dir: Path, beside: bool = False) -> Path:
    """output_dir/.lock, or `.NAME.lock` beside output_dir for stages that replace the whole directory."""
    output_dir = Path(output_dir)
    return output_dir.parent / f".{output_dir.name}.lock" if beside else output_dir / LOCK


def make_dirs(directory: Path) -> list[Path]:
    """mkdir -p that returns the directories it created, outermost first."""
    missing = []
    for path in (directory, *directory.parents):
        if path.is_dir():
            break
        missing.append(path)
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        created.append(path)
    return created


def _acquire(path: Path, output_dir: Path) -> int | None:
    """An exclusive flock on `path` (created if needed), or None on a file system without flock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode("utf-8", "replace").split()
            os.close(fd)
            pid = holder[0] if holder else "unknown"
            host = f" on {holder[1]}" if len(holder) > 1 and holder[1] != socket.gethostname() else ""
            raise RunDirError(
                f"output_dir {output_dir} is in use by another llmkit run (PID {pid}{host}); wait for it or stop it"
            ) from None
        except OSError as exc:
            # Some shared file systems (Lustre without -o flock) refuse flock: run, but say it is unguarded.
            os.close(fd)
            print(f"warning: {path}: cannot lock ({exc.strerror}); nothing stops a second run on {output_dir}", file=sys.stderr)
            return None
        # The holder before us deletes the file before unlocking it: if we locked a deleted file, retry.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev):
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            except OSError:
                path.unlink(missing_ok=True)  # a full disk: say so now, not after loading the model
                os.close(fd)
                raise
            return fd
        os.close(fd)


@contextmanager
def locked(output_dir: Path, beside: bool = False) -> Iterator[None]:
    """Hold the lock of run directory `output_dir` for the block; RunDirError when another run holds it.

    Taking it is also the write probe: it creates output_dir (and the lock file), so an output_dir
    that is read-only, full of inodes, or below a regular file fails here with one line, before any
    model or data is loaded. On the way out the lock file goes, and so does output_dir when this
    lock created it and nothing was written to it (a run refused for bad input leaves no trace).

    Under a multi-process launch only global rank 0 takes it: all processes of one launch share
    the directory, and a second launch is stopped by its own rank 0 (torchrun then stops the
    rest). It is an flock, so the kernel releases it when its process dies, and it nests within
    one process (a stage holds it, then `fit` takes it again).
    """
    output_dir = Path(output_dir)
    if dist.rank() != 0 or fcntl is None:
        yield
        return
    if not beside and output_dir.exists() and not output_dir.is_dir():
        raise RunDirError(f"output_dir {output_dir}: is a file; choose a directory")
    if output_dir.is_symlink() and not output_dir.exists():
        raise RunDirError(
            f"output_dir {output_dir}: is a symbolic link to {os.readlink(output_dir)}, which does not exist; "
            "create that directory or choose another output_dir"
        )
    path = lock_file(output_dir, beside)
    with writing(output_dir, "output_dir"):
        created = make_dirs(path.parent)
    key = os.path.realpath(path)
    if key in _held:
        yield
        return
    try:
        with writing(output_dir, "output_dir"):
            fd = _acquire(path, output_dir)
    except BaseException:
        remove_if_empty(created)
        raise
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        if fd is not None:
            path.unlink(missing_ok=True)  # before unlocking: see _acquire
            os.close(fd)
        remove_if_empty(created)


def remove_if_empty(created: list[Path]) -> None:
    """Remove the directories `make_dirs` created, innermost first, as long as they are empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            break


def training_checkpoint(path: str | Path) -> Path | None:
    """The run directory of an intermediate training checkpoint (RUN/checkpoints/step-N), None for anything else.

    Such a checkpoint holds the trained weights but no config.json or tokenizer: the model is rebuilt
    from the run's recipe.yaml exactly as training built it (`load_model`), so eval and generate take
    `runs/x/checkpoints/step-00000100` like any model directory.
    """
    local = Path(path).expanduser()
    run = local.parent.parent
    if local.parent.name == CHECKPOINTS and (local / MARKER).is_file() and (run / "recipe.yaml").is_file():
        return None if (local / "config.json").is_file() else run
    return None


def run_dir_of(path: str | Path) -> Path:
    """The run directory a model path belongs to: itself, or the run of an intermediate checkpoint."""
    return training_checkpoint(path) or Path(path).expanduser()
