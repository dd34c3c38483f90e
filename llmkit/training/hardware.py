"""Precision and the FLOP/s peak that MFU is measured against.

    LLMKIT_PEAK_FLOPS=989e12 llmkit pretrain pretrain/gpt2-124m    # a peak of your own choosing

MFU = achieved model FLOP/s / peak FLOP/s. The peak, in this order: LLMKIT_PEAK_FLOPS; for a known
GPU in bf16/fp16, its datasheet dense tensor-core number; otherwise a matmul probe on the device
(the best of several repeats of two sizes). The training log says which one it used, and
summary.json records it (peak_flops, peak_source).

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


@dataclass
class Peak:
    """A peak FLOP/s and where it came from, for the log."""

    flops: float
    source: str
    kind: str = "probe"
    """"env" (LLMKIT_PEAK_FLOPS), "datasheet" or "probe"; only a probe is raised to what training reaches."""

    @property
    def description(self) -> str:
        """One line for the training log."""
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
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    return Peak(probe_peak_flops(device, dtype), f"measured matmul peak on {device}, {str(dtype).removeprefix('torch.')}")
