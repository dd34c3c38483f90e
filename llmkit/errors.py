"""Errors that llmkit reports to the user as one line and exit code 2 (bad input), never as a traceback."""

from __future__ import annotations

import difflib
import errno
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


class LlmkitError(Exception):
    """A problem with the user's input (recipe, key, value, file, field, model): exit code 2."""

    exit_code = 2


class RecipeError(LlmkitError):
    """A recipe that cannot be read or does not validate."""


class DataError(LlmkitError):
    """A data source that is missing, empty, malformed or lacks a field."""


class ModelError(LlmkitError):
    """A model or tokenizer that is missing, unreadable or does not fit the recipe."""


class RunDirError(LlmkitError):
    """An output directory that holds something we must not overwrite."""


class DiskError(LlmkitError):
    """A path llmkit cannot write: read-only, no permission, no space left, or a file where a directory must be."""


class LaunchError(LlmkitError):
    """A multi-process launch whose processes do not fit together: a rank that never arrives, an output_dir not shared."""


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint (exit code 130)."""

    exit_code = 130


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for the closest choice, or "" when nothing is close."""
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{matches[0]}'?" if matches else ""


class TrainingError(LlmkitError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""

    exit_code = 1


# ----------------------------------------------------------------------------------------------
# Disk problems: one translation of OS errors into one line naming the path and the fix
# ----------------------------------------------------------------------------------------------

# errno -> (what went wrong, what fixes it). Only conditions of the machine that the user must fix;
# other OS errors (a file vanishing under us, EIO) stay tracebacks, because they point at a bug or a
# broken disk rather than at a setting.
DISK_PROBLEMS = {
    errno.EROFS: ("read-only file system", "choose a location on a writable file system"),
    errno.EACCES: ("permission denied", "fix its permissions or choose another location"),
    errno.EPERM: ("operation not permitted", "fix its permissions or choose another location"),
    errno.ENOTDIR: ("a part of this path is a file, not a directory", "move that file or choose another path"),
    errno.EISDIR: ("is a directory, where a file is needed", "choose another path"),
    errno.ENOSPC: ("no space left on device", "free some space or choose another location"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another location"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
}
# Rust-backed writers (safetensors, tokenizers) report the OS error inside their message.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_RUST_PATH = re.compile(r'at path "([^"]+)"')


def disk_problem(exc: BaseException | None) -> tuple[int, str | None] | None:
    """(errno, file name or None) of the disk problem behind `exc`, following its causes; None if there is none.

    torch.save reports a full disk as a RuntimeError whose context is the OSError of the file it writes to.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            filename = exc.filename if isinstance(exc.filename, str) else None
            if exc.errno in DISK_PROBLEMS:
                return exc.errno, filename
            if exc.errno == errno.EEXIST and filename and os.path.exists(filename) and not os.path.isdir(filename):
                return errno.ENOTDIR, filename  # mkdir(parents=True, exist_ok=True) where a file is
        elif (match := _RUST_OS_ERROR.search(str(exc))) and int(match.group(1)) in DISK_PROBLEMS:
            path = _RUST_PATH.search(str(exc))
            return int(match.group(1)), path.group(1) if path else None
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)
    return None


def format_bytes(size: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def free_bytes(path: Path) -> int | None:
    """Free space on the file system holding `path` (or its nearest existing parent); None when unknown."""
    path = Path(path)
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def disk_error(
    exc: BaseException, path: Path | str | None = None, what: str | None = None, fix: str | None = None,
    needed: int | None = None,
) -> DiskError | None:
    """The one-line DiskError that `exc` amounts to when a disk problem is behind it, else None.

    path:   the file or directory to name (default: the one the OS error names).
    what:   the recipe key or role that chose the path (e.g. "output_dir", "data.cache_dir").
    fix:    what to do, instead of the generic fix for that errno.
    needed: bytes the write needed, when known (reported with the free space for ENOSPC / EDQUOT).
    """
    found = disk_problem(exc)
    if found is None:
        return None
    code, filename = found
    reason, default_fix = DISK_PROBLEMS[code]
    where = Path(path) if path is not None else (Path(filename) if filename else None)
    if code in (errno.ENOSPC, errno.EDQUOT) and where is not None:
        free = free_bytes(where)
        sizes = [f"{format_bytes(free)} free"] if free is not None else []
        if needed:
            sizes.append(f"about {format_bytes(needed)} needed")
        if sizes:
            reason += f" ({', '.join(sizes)})"
    subject = " ".join(str(x) for x in (what, where) if x is not None) or "writing a file"
    return DiskError(f"{subject}: {reason}; {fix or default_fix}")


@contextmanager
def writing(path: Path | str, what: str | None = None, fix: str | None = None) -> Iterator[None]:
    """Turn a disk problem raised inside the block into a DiskError naming `path` (and `what`)."""
    try:
        yield
    except LlmkitError:
        raise
    except Exception as exc:
        error = disk_error(exc, path, what, fix)
        if error is None:
            raise
        raise error from None
