"""The one tokenization cache: content-keyed directories, built once, verified on every read.

    llmkit data prepare pretrain/tiny      # builds the entry; later runs say "cache hit"
    LLMKIT_CACHE_DIR=/scratch/cache llmkit finetune finetune/tiny-summarization

Both pretraining (packed token files) and fine-tuning (tokenized examples) keep their tokenized
data here, under `data.cache_dir`, else $LLMKIT_CACHE_DIR, else ~/.cache/llmkit/data. An entry is a
directory named by a hash of everything that decides its contents (sources, fields, tokenizer,
task, ...). It is built under a temporary name, its `meta.json` lists the size of every file, and a
COMPLETE marker is written last before one rename publishes it. A read checks the marker, the
meta file and every file's size, so a truncated or tampered entry is rebuilt (with a warning), never
trained on.

Under a multi-process launch the local main process builds a missing entry; the others wait by
polling the file system (no collective, so a long tokenization never hits a distributed timeout).
A main process that fails leaves a FAILED marker that stops them too. Only a marker written after a
process started counts for it, so the marker of an earlier, interrupted launch never stops the next
one; a single process writes none (nobody waits for it). An entry is built in a temporary directory
named after its builder (`llmkit.rundir.temp_path`); those of killed builders are removed by the
next build in the same cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmkit import dist, rundir
from llmkit.errors import DataError, LlmkitError, disk_error

MARKER = "COMPLETE"
FAILED = "FAILED"
META = "meta.json"


def default_cache_dir() -> Path:
    """Where tokenized data is cached: $LLMKIT_CACHE_DIR or ~/.cache/llmkit/data."""
    env = os.environ.get("LLMKIT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmkit" / "data"


def cache_root(data_section) -> Path:
    """The cache directory a recipe's data section uses (data.cache_dir, else the default)."""
    return Path(data_section.cache_dir).expanduser() if data_section.cache_dir else default_cache_dir()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the ids a tokenizer produces (and the prompts a chat template renders)."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode("utf-8"))
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)]).encode())
    template = getattr(tokenizer, "chat_template", None)
    if template:
        h.update(str(template).encode("utf-8"))
    return h.hexdigest()[:16]


def entry_name(kind: str, payload: dict[str, Any]) -> str:
    """`kind-<hash>`: the directory name of the entry that `payload` (JSON-able) describes."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:20]
    return f"{kind}-{digest}"


def read_meta(entry: Path) -> dict[str, Any] | None:
    """The metadata of a complete, intact entry; None when it is missing, incomplete or damaged."""
    if not (entry / MARKER).is_file():
        return None
    try:
        meta = json.loads((entry / META).read_text(encoding="utf-8"))
        sizes = meta["files"]
        intact = isinstance(sizes, dict) and all((entry / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        intact, meta = False, None
    if not intact:
        dist.log(f"warning: the tokenization cache {entry} is incomplete or damaged; rebuilding it")
        return None
    return meta


def _publish(tmp: Path, entry: Path, meta: dict[str, Any]) -> None:
    """Record the size of every file, write the marker last, and rename the entry into place."""
    meta = {**meta, "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}}
    (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    (tmp / MARKER).write_text("ok\n", encoding="utf-8")
    if entry.exists():
        # A damaged entry is moved aside first; removing it in place could race a reader.
        stale = rundir.temp_path(entry.parent, f"{entry.name}.stale")
        entry.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(entry)
    except OSError:
        # Another process (a concurrent `llmkit data prepare`) published the same entry first.
        shutil.rmtree(tmp, ignore_errors=True)


def build_once(
    root: Path,
    name: str,
    build: Callable[[Path], dict[str, Any]],
    *,
    main_process: bool | None = None,
    poll_s: float = 2.0,
) -> tuple[Path, dict[str, Any], bool]:
    """(entry directory, metadata, hit) for cache entry `name`, built by `build(tmp_dir) -> meta` on a miss.

    `build` writes its files into the fresh directory it is given and returns JSON-able metadata; it
    raises to abandon the entry (nothing is published). Only the main process builds.
    """
    root = Path(root)
    entry = root / name
    meta = read_meta(entry)
    if meta is not None:
        return entry, meta, True
    failed = root / f"{name}.{FAILED}"
    started = dist.process_started()
    if not (dist.is_local_main() if main_process is None else main_process):
        while (meta := read_meta(entry)) is None:
            if _mtime(failed) >= started:
                raise DataError(f"data: the main process failed to build the cache {entry}; see its error")
            time.sleep(poll_s)
        return entry, meta, False
    fix = "set data.cache_dir or LLMKIT_CACHE_DIR to a writable directory with free space"
    try:
        created = rundir.make_dirs(root)
        if _mtime(failed) < started:
            failed.unlink(missing_ok=True)  # an earlier launch's; a newer one belongs to a process of this launch
        tmp = rundir.temp_path(root, name)
        tmp.mkdir()
    except OSError as exc:
        raise (disk_error(exc, root, "tokenization cache", fix) or exc) from None
    try:
        meta = build(tmp)
        _publish(tmp, entry, meta)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if dist.world_size() > 1:
            # Only the processes of this launch waiting for the entry need to hear of the failure.
            try:
                failed.write_text("failed\n", encoding="utf-8")
            except OSError:
                pass
        rundir.remove_if_empty(created)  # a cache directory made for nothing goes again
        error = None if isinstance(exc, LlmkitError) or not isinstance(exc, Exception) else disk_error(exc, root, "tokenization cache", fix)
        if error is not None:
            raise error from None
        raise
    return entry, read_meta(entry) or meta, False


def _mtime(path: Path) -> float:
    """Modification time of `path`, -inf when it does not exist."""
    try:
        return path.stat().st_mtime
    except OSError:
        return float("-inf")
