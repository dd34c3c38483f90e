"""How a launch trains across processes: the distributed kind it asked for, the one it got, the Accelerator.

    accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 -m llmkit pretrain pretrain/tiny

The kinds are `single` (one process), `ddp`, `fsdp` (FSDP1 or FSDP2) and `deepspeed` (ZeRO stage
1-3). `accelerate launch` says which one it was asked for in the environment of every process
(ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED, ...); llmkit builds the Accelerator from it, checks
that accelerate gave that kind, and refuses to train when it did not, instead of running DDP under
an FSDP or DeepSpeed config. The run header, the `start` event of metrics.jsonl, summary.json and
every checkpoint name the kind with the process and machine counts.

CPU processes (gloo): accelerate 1.16 turns a launch into FSDP only when its process kind is a
GPU-like one (MULTI_GPU, MULTI_XPU, ...; `AcceleratorState.__init__`), and into DeepSpeed only when
the Accelerator is not built with cpu=True; a CPU launch is MULTI_CPU and needs cpu=True to get a
gloo process group at all. torch's FSDP2 (`fully_shard`) and DeepSpeed's CPU accelerator
(DS_ACCELERATOR=cpu) both run on gloo, so `accelerator_for` sets up the gloo process group first and
then lets accelerate see the launch as MULTI_GPU while it applies the FSDP or DeepSpeed plugin (see
`_cpu_processes_as_sharded`). That is the whole adapter; everything after it is accelerate's own path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from llmkit import dist
from llmkit.errors import RecipeError

_TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class Layout:
    """A distributed kind with its process and machine counts, as recorded in logs and checkpoints."""

    kind: str  # "single" | "ddp" | "fsdp" | "deepspeed"
    processes: int = 1
    machines: int = 1
    zero_stage: int | None = None  # DeepSpeed only
    fsdp_version: int | None = None  # FSDP only

    @property
    def name(self) -> str:
        """The kind as people say it: 'one process', 'DDP', 'FSDP2', 'DeepSpeed ZeRO-3'."""
        if self.kind == "fsdp":
            return f"FSDP{self.fsdp_version or ''}"
        if self.kind == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage}" if self.zero_stage is not None else "DeepSpeed"
        return {"single": "one process", "ddp": "DDP"}[self.kind]

    @property
    def description(self) -> str:
        """'FSDP2, 4 processes on 2 machines'; 'one process'."""
        if self.kind == "single":
            return self.name
        processes = f"{self.processes} process{'es' if self.processes != 1 else ''}"
        machines = f" on {self.machines} machines" if self.machines > 1 else ""
        return f"{self.name}, {processes}{machines}"

    def as_json(self) -> dict:
        """{"kind", "processes", "machines"} plus zero_stage / fsdp_version where they apply."""
        out: dict = {"kind": self.kind, "processes": self.processes, "machines": self.machines}
        if self.zero_stage is not None:
            out["zero_stage"] = self.zero_stage
        if self.fsdp_version is not None:
            out["fsdp_version"] = self.fsdp_version
        return out

    @classmethod
    def from_json(cls, data: dict) -> Layout:
        """The inverse of as_json (unknown keys ignored)."""
        return cls(
            kind=str(data["kind"]), processes=int(data.get("processes", 1)), machines=int(data.get("machines", 1)),
            zero_stage=data.get("zero_stage"), fsdp_version=data.get("fsdp_version"),
        )


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def requested_kind() -> str:
    """The kind the launcher asked for: 'fsdp', 'deepspeed', or 'ddp' / 'single' by process count."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp" if dist.world_size() > 1 else "single"


def _requested_source(kind: str) -> str:
    config = os.environ.get("ACCELERATE_CONFIG_FILE") or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    variable = "ACCELERATE_USE_DEEPSPEED" if kind == "deepspeed" else "ACCELERATE_USE_FSDP"
    return f"the launch asked for {'DeepSpeed' if kind == 'deepspeed' else 'FSDP'} ({variable}=true" + (f", {config}" if config else "") + ")"


def expected_layout(requested: str) -> Layout:
    """The layout this launch will have, read from the launcher's environment before any process group exists."""
    def number(name: str) -> int | None:
        value = os.environ.get(name, "").strip()
        return int(value) if value.isdigit() else None

    return Layout(
        requested, dist.world_size(),
        zero_stage=number("ACCELERATE_DEEPSPEED_ZERO_STAGE") if requested == "deepspeed" else None,
        fsdp_version=(number("FSDP_VERSION") or 1) if requested == "fsdp" else None,
    )


def check_requested(requested: str) -> None:
    """Refuse, before any process group exists, a sharded kind this launch cannot get."""
    import importlib.util

    if requested not in ("fsdp", "deepspeed"):
        return
    if dist.world_size() < 2:
        raise RecipeError(
            f"{_requested_source(requested)} but runs 1 process; sharding needs at least 2: set num_processes "
            "in the accelerate config (or --num_processes 2), or launch without the FSDP/DeepSpeed config"
        )
    if requested == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(f"{_requested_source(requested)} but deepspeed is not installed: pip install deepspeed")


def check_replicated(command: str) -> None:
    """Refuse a sharded launch for a command that keeps a whole model in every process (`llmkit eval`).

    Scoring is data-parallel: each process holds the full model and scores its share of the examples.
    Running it under an FSDP or DeepSpeed config would silently replicate what the user asked to shard.
    """
    requested = requested_kind()
    if requested in ("fsdp", "deepspeed"):
        raise RecipeError(
            f"{_requested_source(requested)}, but llmkit {command} keeps a whole model in each process and "
            f"shares out the examples, not the weights; launch it without that config: "
            f"accelerate launch --num_processes {dist.world_size()} -m llmkit {command} ..."
        )


def _cpu_processes() -> bool:
    import torch

    return not torch.cuda.is_available() and dist.world_size() > 1


class _cpu_processes_as_sharded:
    """While the Accelerator is built, show accelerate a gloo CPU launch as MULTI_GPU (accelerate 1.16).

    Why: `AcceleratorState.__init__` applies the FSDP plugin only when the launch's kind is one of
    MULTI_GPU, MULTI_XPU, ... and never for MULTI_CPU, so an FSDP config on CPU processes silently
    trains DDP. The process group (gloo) and the CPU device are already set up by `PartialState(cpu=True)`
    when this runs; only the kind accelerate reads to choose FSDP changes. The kind is FSDP or
    DeepSpeed afterwards, which accelerate records itself.
    """

    def __enter__(self):
        from accelerate import PartialState
        from accelerate.utils import DistributedType

        PartialState(cpu=True)  # the gloo process group and the CPU device, as for DDP on CPU
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        return self

    def __exit__(self, *exc):
        from accelerate import PartialState
        from accelerate.utils import DistributedType

        if PartialState._shared_state.get("distributed_type") == DistributedType.MULTI_GPU:
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU  # not sharded after all
        return False


def accelerator_for(requested: str, **kwargs):
    """An Accelerator of the requested kind (kwargs go to Accelerator); gloo CPU processes included."""
    from accelerate import Accelerator

    if not _cpu_processes():
        return Accelerator(**kwargs)
    # DeepSpeed (imported by accelerate when installed) picks its device from DS_ACCELERATOR on its
    # first import, and warns when it has to guess; its CPU accelerator talks gloo without oneCCL.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if requested == "fsdp":
        with _cpu_processes_as_sharded():
            return Accelerator(cpu=True, **kwargs)
    if requested == "deepspeed":
        # accelerate applies DeepSpeed only when cpu=False.
        with _cpu_processes_as_sharded():
            return Accelerator(cpu=False, **kwargs)
    # Under a multi-process launcher on a machine without CUDA, accelerate only sets up gloo when told
    # it runs on CPU; otherwise every process would believe it is alone.
    return Accelerator(cpu=True, **kwargs)


def layout_of(accelerator, machines: int = 1) -> Layout:
    """The kind this Accelerator runs, with its process count and the given machine count."""
    from accelerate.utils import DistributedType

    processes = accelerator.num_processes
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        stage = config.get("zero_optimization", {}).get("stage")
        return Layout("deepspeed", processes, machines, zero_stage=int(stage) if stage is not None else 0)
    if kind == DistributedType.FSDP:
        return Layout("fsdp", processes, machines, fsdp_version=int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)))
    return Layout("ddp" if processes > 1 else "single", processes, machines)


def check_obtained(requested: str, layout: Layout) -> None:
    """Refuse a launch that asked for FSDP or DeepSpeed and got something else (never a silent DDP)."""
    if requested in ("fsdp", "deepspeed") and layout.kind != requested:
        raise RecipeError(
            f"{_requested_source(requested)} but accelerate set up {layout.description}; refusing to train "
            "as something else. Check the accelerate config and that this accelerate version supports it on this device"
        )


def check_optimizer(optimizer: str, layout: Layout) -> None:
    """train.optimizer: muon needs whole weight matrices on every process, which FSDP and ZeRO-3 shard."""
    if optimizer == "muon" and layout.kind in ("fsdp", "deepspeed"):
        raise RecipeError(
            f"train.optimizer: muon orthogonalizes whole weight matrices, which {layout.name} shards across "
            "processes (or replaces with its own optimizer); use train.optimizer: adamw there, or DDP "
            "(recipes/accelerate/multi_gpu.yaml) with muon"
        )


def launch_hint(layout: Layout) -> str:
    """The command prefix that starts a launch of this kind and process count."""
    n = layout.processes
    if layout.kind == "single":
        return "plain `llmkit pretrain|finetune RECIPE`, one process"
    if layout.kind == "ddp":
        return f"`accelerate launch --multi_gpu --num_processes {n} -m llmkit ...`"
    if layout.kind == "fsdp":
        return f"`accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes {n} -m llmkit ...`"
    stage = layout.zero_stage if layout.zero_stage in (2, 3) else "N"
    return f"`accelerate launch --config_file recipes/accelerate/deepspeed_zero{stage}.yaml --num_processes {n} -m llmkit ...`"


def check_adapters(recipe, layout: Layout) -> None:
    """LoRA adapters are written from whole parameters, which FSDP and ZeRO-3 keep only in shards."""
    lora = getattr(recipe, "lora", None)
    sharded_parameters = layout.kind == "fsdp" or (layout.kind == "deepspeed" and layout.zero_stage == 3)
    if lora is not None and lora.enabled and sharded_parameters:
        raise RecipeError(
            f"lora.enabled under {layout.name}: llmkit writes the adapters from whole parameters, which {layout.name} "
            "keeps sharded across processes; run LoRA under DDP (recipes/accelerate/multi_gpu.yaml) or DeepSpeed "
            "ZeRO-2 (recipes/accelerate/deepspeed_zero2.yaml), or fine-tune all weights (lora.enabled: false) under it"
        )
