"""The one tokenization cache: content-keyed directories, built once, verified on every read.

    llmkit data prepare pretrain/tiny      # builds the entry; later runs say "cache hit"
    LLMKIT_CACHE_DIR=/scratch/cache llmkit finetune finetune/tiny-summarization

Both pretraining (packed token files) and fine-tuning (tokenized examples) keep their tokenized
data here, under `data.cache_dir`, else $LLMKIT_CACHE_DIR, else ~/.cache/llmkit/data. An entry is a
directory named by a hash of everything that decides its contents (sources, fields, tokenizer,
task, ...). It is built under a temporary name, its `meta.json` lists the size and xxh3 checksum of
every file, and a COMPLETE marker is written last before one rename publishes it. A read checks the
marker, the meta file and every file's size and checksum, so a truncated or tampered entry is
rebuilt (with a warning), never trained on. An intact published entry is never renamed or deleted
(another run, on this or another machine, may have it memory-mapped).

Fine-tuning entries (`build_once`): under a multi-process launch the local main process builds a
missing entry; the others wait by polling the file system. Pretraining entries (`build_shared`):
the processes of a launch on each machine tokenize shards in parallel and local rank 0 merges and
publishes; on a cache shared by machines, one machine claims the build (a `.NAME.claim` file with
a heartbeat) and the others wait. A failing builder leaves a FAILED marker that stops the waiting
processes of its launch. Only a marker written after a process started counts for it, so the
marker of an earlier, interrupted launch never stops the next one; a single process writes none.
An entry is built in a temporary directory named after its builder (`llmkit.rundir.temp_path`);
those of killed builders are removed by the next build in the same cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from llmkit import dist, rundir
from llmkit.data.tokens import file_checksum
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


CHECKSUMS = "xxh3_64"
"""The content hash of every file of an entry, in meta.json: verified on every read (several GB/s)."""

CLAIM_STALE_S = 120.0
"""A build claim whose heartbeat is older than this (its builder on another machine died) may be taken over."""

HEARTBEAT_S = 10.0


def read_meta(entry: Path, quiet: bool = False) -> dict[str, Any] | None:
    """The metadata of a complete, intact entry; None when it is missing, incomplete or damaged.

    Intact means the COMPLETE marker, and every file listed in meta.json with its size and its
    xxh3 checksum (so a file of the right size and the wrong content is caught, not trained on).
    """
    if not (entry / MARKER).is_file():
        return None
    try:
        meta = json.loads((entry / META).read_text(encoding="utf-8"))
        sizes, sums = meta["files"], meta["checksums"]
        intact = (
            isinstance(sizes, dict) and isinstance(sums, dict) and set(sizes) == set(sums)
            and all((entry / name).stat().st_size == size for name, size in sizes.items())
            and all(file_checksum(entry / name) == digest for name, digest in sums.items())
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        intact, meta = False, None
    if not intact:
        if quiet:
            return None
        dist.log(f"warning: the tokenization cache {entry} is incomplete or damaged; rebuilding it (a file is missing, or its size or checksum differs)")
        return None
    return meta


def _remove_damaged(entry: Path) -> None:
    """Move a damaged entry aside under a name only this process uses, then delete it.

    Only an entry that failed verification goes this way; an intact one is never renamed or
    deleted, so a run that has it memory-mapped (on this or another machine) keeps reading it.
    """
    aside = rundir.temp_path(entry.parent, f"{entry.name}.damaged")
    try:
        entry.rename(aside)
    except OSError:
        return  # another process moved it first
    shutil.rmtree(aside, ignore_errors=True)


def _publish(tmp: Path, entry: Path, meta: dict[str, Any]) -> None:
    """Record the size and checksum of every file, write the marker last, and rename the entry into place.

    An intact entry already published under the name (by a concurrent build on this or another
    machine) is kept and ours discarded: an entry in use is never renamed or deleted.
    """
    files = [p for p in sorted(tmp.iterdir()) if p.is_file()]
    meta = {**meta, "files": {p.name: p.stat().st_size for p in files}, "checksums": {p.name: file_checksum(p) for p in files}}
    (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    (tmp / MARKER).write_text("ok\n", encoding="utf-8")
    if entry.exists():
        if read_meta(entry, quiet=True) is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        _remove_damaged(entry)
    try:
        tmp.rename(entry)
    except OSError:
        # Another process published the same entry between our check and the rename.
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
        return entry, _wait_for(entry, failed, started, poll_s), False
    created, tmp = _start(root, name, failed, started)
    try:
        meta = build(tmp)
        _publish(tmp, entry, meta)
    except BaseException as exc:
        _abandon([tmp], [failed], created, root, exc)
    return entry, read_meta(entry) or meta, False


FIX = "set data.cache_dir or LLMKIT_CACHE_DIR to a writable directory with free space"


def _wait_for(entry: Path, failed: Path, started: float, poll_s: float) -> dict[str, Any]:
    """Poll until `entry` is published; DataError when its builder of this launch failed."""
    while (meta := read_meta(entry)) is None:
        if _mtime(failed) >= started:
            raise DataError(f"data: the main process failed to build the cache {entry}; see its error")
        time.sleep(poll_s)
    return meta


def _start(root: Path, name: str, failed: Path, started: float) -> tuple[Path | None, Path]:
    """(cache directory made now or None, a fresh temporary directory for entry `name`)."""
    try:
        created = rundir.make_dirs(root)
        if _mtime(failed) < started:
            failed.unlink(missing_ok=True)  # an earlier launch's; a newer one belongs to a process of this launch
        tmp = rundir.temp_path(root, name)
        tmp.mkdir()
    except OSError as exc:
        raise (disk_error(exc, root, "tokenization cache", FIX) or exc) from None
    return created, tmp


def _abandon(tmps: list[Path], failed: list[Path], created: Path | None, root: Path, exc: BaseException):
    """Remove a failed build's temporaries, tell this launch's waiting processes, and raise the error as one line."""
    for tmp in tmps:
        shutil.rmtree(tmp, ignore_errors=True)
    if dist.world_size() > 1:
        # Only the processes of this launch waiting for the entry need to hear of the failure.
        for marker in failed:
            try:
                marker.write_text("failed\n", encoding="utf-8")
            except OSError:
                pass
    rundir.remove_if_empty(created)  # a cache directory made for nothing goes again
    error = None if isinstance(exc, LlmkitError) or not isinstance(exc, Exception) else disk_error(exc, root, "tokenization cache", FIX)
    if error is not None:
        raise error from None
    raise exc


# ----------------------------------------------------------------------------------------------
# Builds shared by the processes of a launch (pretraining token files)
# ----------------------------------------------------------------------------------------------


class ShardedBuild(Protocol):
    """How one entry is built by several processes: each tokenizes a shard, one merges."""

    def shard(self, tmp: Path, worker: int, workers: int) -> dict[str, Any]:
        """Write worker `worker`'s share of the entry into `tmp`; return what `merge` needs to know of it."""

    def merge(self, tmp: Path, parts: list[dict[str, Any]], workers: int) -> dict[str, Any]:
        """Turn the workers' files in `tmp` into the entry's files; return the entry's metadata."""


def _launch_id() -> dict[str, Any]:
    """What the processes of one launch on this machine share: the machine and the launcher (their parent)."""
    return {"node": rundir._node(), "launcher": os.getppid()}


def build_shared(
    root: Path,
    builds: list[tuple[str, ShardedBuild]],
    *,
    check: Callable[[list[dict[str, Any]]], None] | None = None,
    worker: int | None = None,
    workers: int | None = None,
    poll_s: float = 2.0,
) -> list[tuple[Path, dict[str, Any], bool]]:
    """(entry, metadata, hit) for each (name, build), tokenized in parallel by this machine's processes.

    The local main process (worker 0) claims the build with a `.NAME.claim` file in the cache; the
    other processes of its launch on the same machine (workers 1..n-1, n = LOCAL_WORLD_SIZE) see the
    claim and each tokenize their shard into the claimed temporary directory; worker 0 merges the
    shards, runs `check` on every entry's metadata, in order (a DataError there publishes nothing), and
    publishes every entry. On a cache shared by several machines the first to claim builds and the
    others wait for the entries; a claim whose builder died (same machine: its PID is gone; another
    machine: no heartbeat for CLAIM_STALE_S) is taken over. A published intact entry is never
    renamed or deleted.
    """
    root = Path(root)
    worker = dist.local_rank() if worker is None else worker
    workers = dist.local_world_size() if workers is None else workers
    started = dist.process_started()
    names = [name for name, _ in builds]
    claim = root / f".{entry_name('claim', names)}.claim"
    failed = [root / f"{name}.{FAILED}" for name in names]
    if worker == 0:
        results = _lead(root, builds, claim, failed, started, workers, check, poll_s)
    else:
        results = _help(root, builds, claim, failed, started, worker, poll_s)
    return results


def _all_hits(root: Path, names: list[str]) -> list[tuple[Path, dict[str, Any], bool]] | None:
    """(entry, meta, True) for every name when all entries are published and intact, else None."""
    out = []
    for name in names:
        meta = read_meta(root / name)
        if meta is None:
            return None
        out.append((root / name, meta, True))
    return out


def _lead(root, builds, claim: Path, failed: list[Path], started: float, workers: int, check, poll_s: float):
    """Worker 0: claim and build the missing entries, or wait for the machine that claimed them."""
    names = [name for name, _ in builds]
    while True:
        hits = [(root / name, read_meta(root / name)) for name in names]
        if all(meta is not None for _, meta in hits):
            return [(entry, meta, True) for entry, meta in hits]
        missing = [i for i, (_, meta) in enumerate(hits) if meta is None]
        created, tmps = None, {}
        for i in missing:
            made, tmps[i] = _start(root, names[i], failed[i], started)
            created = created or made
        content = {**_launch_id(), "pid": os.getpid(), "workers": workers, "dirs": {names[i]: str(tmps[i]) for i in missing}}
        if _try_claim(claim, content):
            break
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)
        _wait_for_claim(root, names, claim, failed, started, poll_s)
    stop = _heartbeat(claim)
    try:
        metas: dict[str, dict[str, Any]] = {}
        for i in missing:
            name, build = builds[i]
            parts = [build.shard(tmps[i], 0, workers)]
            for k in range(1, workers):
                parts.append(_wait_for_part(tmps[i], k, poll_s))
            metas[name] = build.merge(tmps[i], parts, workers)
        if check is not None:
            check([metas.get(name) or meta for name, (_, meta) in zip(names, hits, strict=True)])
        for i in missing:
            _publish(tmps[i], root / names[i], metas[names[i]])
    except BaseException as exc:
        stop()
        claim.unlink(missing_ok=True)
        _abandon(list(tmps.values()), [failed[i] for i in missing], created, root, exc)
    stop()
    claim.unlink(missing_ok=True)
    out = []
    for i, name in enumerate(names):
        meta = read_meta(root / name) if i in missing else hits[i][1]
        out.append((root / name, meta if meta is not None else metas.get(name, {}), i not in missing))
    return out


def _try_claim(claim: Path, content: dict[str, Any]) -> bool:
    """Create the claim file atomically (a hard link fails when it exists, on NFS too), or take over a stale one."""
    for _ in range(2):
        tmp = rundir.temp_path(claim.parent, claim.name)
        tmp.write_text(json.dumps(content), encoding="utf-8")
        try:
            os.link(tmp, claim)
            return True
        except FileExistsError:
            if not _stale(claim):
                return False
            # Move the dead builder's claim aside under a name only we use, then delete it: no one else holds it.
            aside = rundir.temp_path(claim.parent, f"{claim.name}.stale")
            try:
                claim.rename(aside)
                aside.unlink()
            except OSError:
                return False
        finally:
            tmp.unlink(missing_ok=True)
    return False


def _read_claim(claim: Path) -> dict[str, Any] | None:
    try:
        return json.loads(claim.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _stale(claim: Path) -> bool:
    """Whether a claim's builder is gone: a dead PID on this machine, or no heartbeat for CLAIM_STALE_S."""
    content = _read_claim(claim)
    if content is None:
        return _mtime(claim) < time.time() - CLAIM_STALE_S
    if content.get("node") == rundir._node():
        return not rundir._alive(int(content.get("pid", 0)))
    return _mtime(claim) < time.time() - CLAIM_STALE_S


def _heartbeat(claim: Path) -> Callable[[], None]:
    """Touch the claim every HEARTBEAT_S in a background thread, so other machines know its builder lives."""
    import threading

    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_S):
            try:
                os.utime(claim)
            except OSError:
                return

    threading.Thread(target=beat, daemon=True).start()
    return done.set


def _wait_for_claim(root: Path, names: list[str], claim: Path, failed: list[Path], started: float, poll_s: float) -> None:
    """Wait while another process or machine holds the claim: until its entries exist or its claim goes."""
    while claim.exists() and not _stale(claim):
        if _all_hits(root, names) is not None:
            return
        for marker, name in zip(failed, names, strict=True):
            if _mtime(marker) >= started:
                raise DataError(f"data: the main process failed to build the cache {root / name}; see its error")
        time.sleep(poll_s)


def _wait_for_part(tmp: Path, worker: int, poll_s: float) -> dict[str, Any]:
    """The part description worker `worker` writes when its shard is done; DataError when it failed."""
    done, bad = tmp / f"part-{worker}.json", tmp / f"part-{worker}.failed"
    while True:
        if done.is_file():
            return json.loads(done.read_text(encoding="utf-8"))
        if bad.is_file():
            raise DataError(f"data: process {worker} failed while tokenizing its shard: {bad.read_text(encoding='utf-8').strip()}")
        time.sleep(poll_s)


def _help(root, builds, claim: Path, failed: list[Path], started: float, worker: int, poll_s: float):
    """Workers 1..n-1: tokenize this process's shard of each entry the local main process claimed, then wait."""
    me = _launch_id()
    for (name, build), marker in zip(builds, failed, strict=True):
        while True:
            if read_meta(root / name) is not None:
                break
            if _mtime(marker) >= started:
                raise DataError(f"data: the main process failed to build the cache {root / name}; see its error")
            content = _read_claim(claim)
            if (content and content.get("node") == me["node"] and content.get("launcher") == me["launcher"]
                    and worker < content.get("workers", 0) and name in content.get("dirs", {})):
                tmp = Path(content["dirs"][name])
                if not (tmp / f"part-{worker}.json").exists():
                    try:
                        part = build.shard(tmp, worker, content["workers"])
                    except BaseException as exc:
                        (tmp / f"part-{worker}.failed").write_text(f"{type(exc).__name__}: {exc}\n", encoding="utf-8")
                        raise
                    rundir.write_text_atomic(tmp / f"part-{worker}.json", json.dumps(part))
                break
            time.sleep(poll_s)
    return [(root / name, _wait_for(root / name, marker, started, poll_s), False) for (name, _), marker in zip(builds, failed, strict=True)]


def _mtime(path: Path) -> float:
    """Modification time of `path`, -inf when it does not exist."""
    try:
        return path.stat().st_mtime
    except OSError:
        return float("-inf")
