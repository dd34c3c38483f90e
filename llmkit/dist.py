"""Rank, world size and main-process checks, read in one place.

    accelerate launch --multi_gpu --num_processes 2 -m llmkit pretrain pretrain/tiny

Before the Accelerator exists (tokenization caches, data checks) the launcher's environment
(RANK, LOCAL_RANK, WORLD_SIZE) is the only safe source: creating accelerate's state early would
fix the process-group backend on first use. After that, stages that need collectives go through
`process_state()`.
"""

from __future__ import annotations

import os
import sys
import time

from llmkit.errors import LaunchError

_IMPORTED = time.time()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def world_size() -> int:
    """Processes in this launch (1 without a launcher)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """Global rank of this process (0 without a launcher)."""
    return _env_int("RANK", 0)


def local_rank() -> int:
    """Rank on this node; the process that builds node-local files such as the tokenization cache."""
    return _env_int("LOCAL_RANK", rank())


def local_world_size() -> int:
    """Processes of this launch on this machine (LOCAL_WORLD_SIZE from torchrun / accelerate; 1 when unknown)."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1))


def is_local_main() -> bool:
    """Local rank 0: correct for both shared and node-local caches."""
    return local_rank() == 0


def process_started() -> float:
    """When this process started (Unix time), from /proc on Linux; the import time of this module elsewhere.

    All processes of one launch start together, before any of them can fail, so a marker file older
    than this was left by an earlier launch (llmkit/data/cache.py relies on it).
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # Field 22 (after the parenthesised command name, which may hold spaces): start in clock ticks since boot.
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED


def log(message: str) -> None:
    """A progress line on stderr, from the local main process only."""
    if is_local_main():
        print(message, file=sys.stderr, flush=True)


def process_state():
    """accelerate's PartialState; gloo on CPU-only machines (accelerate picks no backend there unless told cpu=True)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def world() -> tuple[int, int]:
    """(world_size, rank) of an accelerate / torchrun launch, (1, 0) otherwise; sets up the process group."""
    if world_size() > 1:
        state = process_state()
        return state.num_processes, state.process_index
    return 1, 0


def gather_lists(items: list) -> list:
    """Concatenate per-process lists in rank order (a no-op in one process)."""
    if world()[0] == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def distributed_kind(accelerator) -> str:
    """'deepspeed', 'fsdp' or 'plain' (single process or DDP): how state must be saved."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "plain"


def check_shared_dir(path, name: str, wait_s: float = 20.0) -> None:
    """Refuse on every process a directory that some machine of the launch does not see (LaunchError).

    A collective: call it on every process once the process group exists, with `path` already
    created by global rank 0. Rank 0 writes a file with a fresh random name and content there; every
    process looks for it (for up to `wait_s` seconds: an NFS client may need a moment to see a new
    directory) and the results are gathered, so all processes fail together with the same line,
    naming the machines that do not see it. Rank 0 removes the file again. `name` is the recipe key
    the directory comes from (output_dir, data.cache_dir).
    """
    import socket
    import uuid
    from pathlib import Path

    import torch.distributed as td

    if not td.is_available() or not td.is_initialized() or td.get_world_size() == 1:
        return
    me = td.get_rank()
    nonce = [uuid.uuid4().hex if me == 0 else None]
    td.broadcast_object_list(nonce, src=0)
    marker = Path(path) / f".llmkit-shared-{nonce[0]}"
    if me == 0:
        marker.write_text(nonce[0], encoding="ascii")
    td.barrier()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            seen = marker.read_text(encoding="ascii") == nonce[0]
        except OSError:
            seen = False
        if seen or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    rows: list = [None] * td.get_world_size()
    td.all_gather_object(rows, (me, socket.gethostname(), seen))
    if me == 0:
        marker.unlink(missing_ok=True)
    blind = sorted({host for _, host, ok in rows if not ok})
    if blind:
        ranks = [r for r, _, ok in rows if not ok]
        raise LaunchError(
            f"{name} {path} is not shared between the machines of this launch: the processes of rank "
            f"{', '.join(map(str, ranks))} (on {', '.join(blind)}) do not see the file rank 0 wrote there; "
            f"put {name} on a file system that every machine mounts at the same path (NFS, Lustre, ...)"
        )
