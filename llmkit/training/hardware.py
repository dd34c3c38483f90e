"""Threads, precision and the FLOP/s peak that MFU is measured against.

    LLMKIT_PEAK_FLOPS=989e12 llmkit pretrain pretrain/gpt2-124m    # a peak of your own choosing

MFU = achieved model FLOP/s / peak FLOP/s. The peak, in this order: LLMKIT_PEAK_FLOPS; for a known
GPU in bf16/fp16, its datasheet dense tensor-core number; on a CPU, none: MFU is not reported (null);
otherwise a matmul probe on the GPU (the best of several repeats). A CPU probe was tried and
dropped: on a machine shared with other jobs it read 0.07 TFLOP/s while training reached more, so
MFU sat at its 100% clamp for most of a run; a wrong number is worse than none. The training log says which one it used, and
summary.json records it (peak_flops, peak_source).

Threads: `choose_threads` (called by cli.py for every command that computes) runs torch with the
cores other jobs leave free, unless OMP_NUM_THREADS says otherwise, and says what it chose.

MFU in metrics.jsonl never reads above 1.0 (training/loop.py `_log_train`). A probe is only a lower
bound of the peak (a busy machine reads low), so when training outruns it the probe is raised to
what training reached. A peak the user gave (LLMKIT_PEAK_FLOPS) or a datasheet number is never
changed: if training outruns it, the log warns once that the peak is too low, and `mfu` is written
as null rather than as an impossible fraction.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from llmkit.errors import RecipeError

# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets, in FLOP/s (no sparsity).
DATASHEET_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "A10": 125e12,
}


def busy_cores(cores: int) -> float:
    """How many cores other processes keep busy now: /proc/stat over half a second (this process sleeps meanwhile).

    Falls back to the 1-minute load average where /proc/stat does not exist; that one lags (a run
    that has just finished still counts for a minute), so it is only the fallback.
    """

    def cpu_times() -> list[int]:
        with open("/proc/stat", encoding="ascii") as f:
            return [int(x) for x in f.readline().split()[1:]]  # user nice system idle iowait irq softirq steal ...

    try:
        first = cpu_times()
        time.sleep(0.5)
        second = cpu_times()
    except (OSError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    total = sum(second) - sum(first)
    idle = (second[3] + second[4]) - (first[3] + first[4])
    return cores * (1 - idle / total) if total > 0 else 0.0


_THREADS_NOTE: str | None = None


def threads_note() -> str | None:
    """What `choose_threads` chose and why, for a stage's header; None when the command did not choose."""
    return _THREADS_NOTE


def choose_threads() -> str:
    """Set torch's threads for this process and return the note that says why: the user's OMP_NUM_THREADS, else the free cores.

    The note is kept for the stage's header (`threads_note`) rather than printed here, so that a bad
    recipe still fails with its one error line.

    PyTorch runs one OpenMP thread per core. When other processes keep some cores busy, those
    threads mostly wait for each other at the end of every matmul: a training step of the tiny
    llama took 2.5-3x longer with 2 threads than with 1 at load average 2-3 on 2 cores, 4-5x at
    load 8, and a pretrain ran at 790 tokens/s with 1 thread against 210-330 with 2 at load 11-13.
    So a command uses round(cores - busy cores) threads, at least one, shared among the processes a
    launcher started on this machine (LOCAL_WORLD_SIZE); on an idle machine nothing changes.
    """
    import torch

    global _THREADS_NOTE
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given:
        _THREADS_NOTE = f"{torch.get_num_threads()} per process (OMP_NUM_THREADS={given})"
        return _THREADS_NOTE
    cores = os.cpu_count() or 1
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    busy = busy_cores(cores) if cores > 1 else 0.0
    threads = max(1, round((cores - busy) / local_processes))
    threads = min(threads, torch.get_num_threads())  # never more than torch's own default
    torch.set_num_threads(threads)
    share = f", {local_processes} processes share them" if local_processes > 1 else ""
    _THREADS_NOTE = f"{threads} per process ({cores} cores, {busy:.1f} kept busy by other jobs{share}; OMP_NUM_THREADS sets it)"
    return _THREADS_NOTE


@dataclass
class Peak:
    """A peak FLOP/s and where it came from, for the log."""

    flops: float | None
    """None: no peak is known (a CPU), and MFU is not reported."""
    source: str
    kind: str = "probe"
    """"env" (LLMKIT_PEAK_FLOPS), "datasheet", "probe" or "unknown"; only a probe is raised to what training reaches."""

    @property
    def description(self) -> str:
        """One line for the training log."""
        if self.flops is None:
            return f"MFU not reported ({self.source})"
        return f"MFU against {self.flops / 1e12:.3g} TFLOP/s ({self.source})"


def resolve_mixed_precision(setting: str) -> str:
    """'auto' -> bf16 on a CUDA GPU that supports it, else no; fp16 needs CUDA."""
    import torch

    cuda = torch.cuda.is_available()
    if setting == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if setting == "fp16" and not cuda:
        raise RecipeError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    return setting


def datasheet_peak(device_name: str) -> float | None:
    """The datasheet bf16 peak of a GPU by its name (torch.cuda.get_device_name), None when unknown."""
    for key in sorted(DATASHEET_BF16, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in device_name:
            return DATASHEET_BF16[key]
    return None


def probe_peak_flops(device, dtype, repeats: int = 12) -> float:
    """Matmul FLOP/s this device reaches: best of `repeats` square matmuls of two sizes (one on CUDA)."""
    import torch

    generator = torch.Generator(device=device).manual_seed(0)  # never the global RNG: resume restores it
    sizes = (8192,) if device.type == "cuda" else (1024, 1536)
    best_rate = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        for repeat in range(repeats):  # the first two warm up thread pools and kernels; the best of the rest counts
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat >= 2:
                best_rate = max(best_rate, 2 * n**3 / (time.perf_counter() - t0))
    return best_rate


def peak_flops(device, mixed_precision: str) -> Peak:
    """The peak MFU is reported against (see the module docstring for the order)."""
    import torch

    given = os.environ.get("LLMKIT_PEAK_FLOPS", "").strip()
    if given:
        try:
            flops = float(given)
        except ValueError:
            flops = float("nan")
        if not math.isfinite(flops) or flops <= 0:
            raise RecipeError(f"LLMKIT_PEAK_FLOPS={given!r}: not a positive number of FLOP/s; write it like 989e12, or unset it")
        return Peak(flops, "LLMKIT_PEAK_FLOPS", "env")
    if device.type == "cuda" and mixed_precision in ("bf16", "fp16"):
        name = torch.cuda.get_device_name(device)
        sheet = datasheet_peak(name)
        if sheet is not None:
            return Peak(sheet, f"{name} datasheet, dense {mixed_precision}", "datasheet")
    if device.type == "cpu":
        return Peak(None, "no known peak on a CPU; set LLMKIT_PEAK_FLOPS to your CPU's FLOP/s to get it", "unknown")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    return Peak(probe_peak_flops(device, dtype), f"measured matmul peak on {device}, {str(dtype).removeprefix('torch.')}")
