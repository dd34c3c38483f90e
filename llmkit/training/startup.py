"""The start-up check of a multi-process launch: every rank present and reachable, output_dir shared.

    accelerate launch --config_file recipes/accelerate/multi_node.yaml --machine_rank 0 ... -m llmkit pretrain RECIPE

Run once, right after the process group exists and before anything is trained or written:

1. Every process checks in under its rank in the launch's key-value store (the one torch's process
   group was set up with) and waits at most LLMKIT_STARTUP_TIMEOUT seconds (default 300) for all
   the others; on timeout every waiting process stops with one line naming the ranks that never
   arrived, instead of hanging in the first collective.
2. One all-reduce over the process group, with the same timeout: processes that all reached the
   store but cannot reach each other (a firewall, the wrong network interface) are named as such.
3. The machines are counted (one per launcher node, or per host name without a launcher), and
   `output_dir` is checked to be one directory on all of them (llmkit.dist.check_shared_dir):
   without a shared file system a run would otherwise fail at its first checkpoint.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

from llmkit import dist
from llmkit.errors import LaunchError, RecipeError

DEFAULT_TIMEOUT_S = 300.0


def timeout_s() -> float:
    """LLMKIT_STARTUP_TIMEOUT (seconds) or the default; RecipeError for a value that is not a positive number."""
    raw = os.environ.get("LLMKIT_STARTUP_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise RecipeError(f"LLMKIT_STARTUP_TIMEOUT={raw!r}: give a positive number of seconds, e.g. 300")
    return value


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks[:16])) + (" ..." if len(ranks) > 16 else "")


def _check_in(world: int, me: int, host: str, seconds: float) -> None:
    """Every rank writes its key; wait for all keys, and name the missing ranks on timeout."""
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    store.set(f"llmkit/startup/{me}", host)
    keys = [f"llmkit/startup/{r}" for r in range(world)]
    try:
        store.wait(keys, timedelta(seconds=seconds))
    except Exception:  # torch raises DistStoreError (a RuntimeError) on timeout, or a connection error
        missing = [r for r, key in enumerate(keys) if not _present(store, key)]
        if not missing:
            return
        raise LaunchError(
            f"{_ranks(missing)} of {world} did not reach the start-up check within {seconds:g} s (this is rank {me} on {host}): "
            "start the same command on every machine with its own --machine_rank and the same --num_machines, "
            "--num_processes and --main_process_ip, or raise LLMKIT_STARTUP_TIMEOUT if those machines start late"
        ) from None


def _present(store, key: str) -> bool:
    try:
        return bool(store.check([key]))
    except Exception:  # the store itself is gone: nothing is present
        return False


def _all_reduce(world: int, me: int, host: str, seconds: float, device) -> None:
    """One all-reduce of ones: proves the processes reach each other over the process group's transport."""
    import torch
    import torch.distributed as td

    ones = torch.ones(1, device=device)
    work = td.all_reduce(ones, async_op=True)
    try:
        work.wait(timedelta(seconds=seconds))
    except Exception as exc:
        raise LaunchError(
            f"all {world} processes reached the start-up check, but an all-reduce between them did not finish within {seconds:g} s "
            f"(this is rank {me} on {host}: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}): the machines "
            "cannot reach each other on the network interface torch chose; set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME "
            "to the interface that connects them, and check the firewall"
        ) from None
    if int(ones.item()) != world:
        raise LaunchError(f"the start-up all-reduce gave {ones.item()} instead of {world}: the process group is broken")


def check_processes(accelerator, output_dir: Path) -> int:
    """Run the start-up check (module docstring) on every process; returns the number of machines."""
    import torch.distributed as td

    world = accelerator.num_processes
    if world == 1 or not td.is_initialized():
        return 1
    seconds = timeout_s()
    me, host = accelerator.process_index, socket.gethostname()
    _check_in(world, me, host, seconds)
    _all_reduce(world, me, host, seconds, accelerator.device)
    # One machine per launcher node (torchrun's GROUP_RANK); by host name under a bare srun.
    node = os.environ.get("GROUP_RANK") or host
    nodes: list = [None] * world
    td.all_gather_object(nodes, node)
    dist.check_shared_dir(output_dir, "output_dir")
    return len(set(nodes))
