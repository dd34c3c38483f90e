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
