"""What a run records about its distributed kind, and what a launch refuses before it trains (fast tests).

    pytest tests/test_parallelism.py -q

The two-process runs of FSDP, DeepSpeed and DDP are in tests/test_sharded.py and
tests/test_distributed.py (slow).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pretrain_helpers import (
    assert_clean_error,
    read_events,
    recipe_dict,
    run_in_process,
    tree_snapshot,
    write_corpus,
    write_recipe,
)
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.errors import RecipeError
from llmkit.training import checkpoints, parallelism, startup
from llmkit.training.parallelism import Layout


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tokenizer_dir):
    """A finished one-process run (8 steps, checkpoints at 4 and 8)."""
    tmp = tmp_path_factory.mktemp("parallelism")
    corpus = write_corpus(tmp, docs=8)
    recipe = recipe_dict(tmp, tokenizer_dir, corpus, train={"max_steps": 8, "save_every": 4})
    run_in_process(recipe)
    return tmp, recipe


def test_a_run_records_its_kind_in_metrics_summary_and_checkpoints(finished):
    _, recipe = finished
    out = Path(recipe["output_dir"])
    one = {"kind": "single", "processes": 1, "machines": 1}
    assert read_events(out, "start")[0] == {**read_events(out, "start")[0], "step": 0, "distributed": one}
    assert json.loads((out / "summary.json").read_text())["distributed"] == one
    for step in ("step-00000004", "step-00000008"):
        assert json.loads((out / "checkpoints" / step / "trainer_state.json").read_text())["distributed"] == one


def _copy_run(finished, tmp_path: Path, edit) -> tuple[Path, Path]:
    """A copy of the finished run whose newest checkpoint's trainer_state.json is edited; recipe for 12 steps."""
    import shutil

    _, recipe = finished
    out = tmp_path / "run"
    shutil.copytree(recipe["output_dir"], out)
    state_file = out / "checkpoints" / "step-00000008" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    edit(state)
    state_file.write_text(json.dumps(state))
    longer = dict(recipe, output_dir=str(out), train={**recipe["train"], "max_steps": 12})
    return write_recipe(tmp_path / "longer.yaml", longer), out


def test_resuming_with_another_process_count_is_refused(finished, tmp_path):
    def as_two(state):
        state["world_size"] = 2
        state["distributed"] = {"kind": "ddp", "processes": 2, "machines": 1}

    path, out = _copy_run(finished, tmp_path, as_two)
    before = tree_snapshot(out)
    result = CliRunner().invoke(app, ["pretrain", str(path)])
    assert_clean_error(result, "step-00000008 was written by 2 processes, this launch has 1", "repeat or skip training data",
                       "--num_processes 2")
    assert "delete" not in result.stderr
    assert tree_snapshot(out) == before


def test_resuming_another_kind_is_refused_naming_both_and_the_launcher(finished, tmp_path):
    def as_zero3(state):
        state["world_size"] = 1  # the kind is checked first, whatever the counts
        state["distributed"] = {"kind": "deepspeed", "processes": 4, "machines": 2, "zero_stage": 3}

    path, out = _copy_run(finished, tmp_path, as_zero3)
    before = tree_snapshot(out)
    result = CliRunner().invoke(app, ["pretrain", str(path)])
    assert_clean_error(result, "was written by DeepSpeed ZeRO-3, 4 processes on 2 machines, this launch runs one process",
                       "recipes/accelerate/deepspeed_zero3.yaml --num_processes 4", "the checkpoint is valid")
    assert "delete" not in result.stderr
    assert tree_snapshot(out) == before


def _fake_checkpoint(path: Path, files: list[str], **state) -> Path:
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": 4, "tokens": 512, **state}))
    for name in files:
        (path / name).mkdir() if name == "deepspeed" else (path / name).write_bytes(b"x")
    return path


def test_checkpoints_of_older_versions_are_told_by_their_files(tmp_path):
    fsdp = _fake_checkpoint(tmp_path / "a" / "step-00000004", ["pytorch_model_fsdp.bin", "optimizer.bin"], world_size=8)
    ds = _fake_checkpoint(tmp_path / "b" / "step-00000004", ["deepspeed"], world_size=2)
    plain = _fake_checkpoint(tmp_path / "c" / "step-00000004", ["model.safetensors"], world_size=2)
    assert checkpoints.written_by(fsdp) == Layout("fsdp", 8)
    assert checkpoints.written_by(ds) == Layout("deepspeed", 2)
    assert checkpoints.written_by(plain) == Layout("ddp", 2)
    with pytest.raises(checkpoints.CheckpointError, match=r"written by FSDP, 8 processes, this launch runs DDP, 8 processes"):
        checkpoints.check_layout(fsdp, Layout("ddp", 8))
    checkpoints.check_layout(fsdp, Layout("fsdp", 8, fsdp_version=2))  # an unrecorded FSDP version is not refused
    checkpoints.check_layout(plain, Layout("ddp", 2, machines=2))  # the machine count may change


@pytest.mark.parametrize(
    ("then", "now", "refused"),
    [
        (Layout("fsdp", 2, fsdp_version=2), Layout("fsdp", 2, fsdp_version=2), None),
        (Layout("fsdp", 2, fsdp_version=2), Layout("fsdp", 2, fsdp_version=1), "FSDP2, 2 processes, this launch runs FSDP1"),
        (Layout("deepspeed", 2, zero_stage=2), Layout("deepspeed", 2, zero_stage=3), "ZeRO-2, 2 processes, this launch runs DeepSpeed ZeRO-3"),
        (Layout("deepspeed", 2, zero_stage=2), Layout("deepspeed", 4, zero_stage=2), "written by 2 processes, this launch has 4"),
        (Layout("single", 1), Layout("ddp", 2), "written by 1 process, this launch has 2"),
        (Layout("ddp", 4, machines=2), Layout("ddp", 4), None),
    ],
)
def test_which_resumes_are_refused(tmp_path, then, now, refused):
    path = _fake_checkpoint(tmp_path / "step-00000004", ["model.safetensors"], world_size=then.processes, distributed=then.as_json())
    if refused is None:
        checkpoints.check_layout(path, now)
    else:
        with pytest.raises(checkpoints.CheckpointError, match=refused):
            checkpoints.check_layout(path, now)


def test_asking_for_fsdp_with_one_process_is_refused_before_writing(finished, tmp_path, monkeypatch):
    _, recipe = finished
    out = tmp_path / "fsdp-one"
    path = write_recipe(tmp_path / "r.yaml", dict(recipe, output_dir=str(out)))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    result = CliRunner().invoke(app, ["pretrain", str(path)])
    assert_clean_error(result, "the launch asked for FSDP (ACCELERATE_USE_FSDP=true) but runs 1 process")
    assert not out.exists()


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_eval_under_a_sharded_launch_is_refused_naming_the_launch_without_it(tmp_path, monkeypatch, variable, name):
    """Eval keeps a whole model per process; under an FSDP/DeepSpeed config it would silently replicate."""
    out = tmp_path / "eval-out"
    monkeypatch.setenv(variable, "true")
    result = CliRunner().invoke(app, ["eval", "eval/perplexity", "--set", f"output_dir={out}"])
    assert_clean_error(result, f"the launch asked for {name} ({variable}=true), but llmkit eval keeps a whole model in each process")
    assert "accelerate launch --num_processes 1 -m llmkit eval" in result.output
    assert not out.exists()


def test_a_launch_that_gets_another_kind_is_refused():
    parallelism.check_obtained("ddp", Layout("ddp", 2))
    with pytest.raises(RecipeError, match=r"asked for DeepSpeed .* but accelerate set up DDP, 2 processes; refusing"):
        parallelism.check_obtained("deepspeed", Layout("ddp", 2))
    with pytest.raises(RecipeError, match=r"asked for FSDP .* but accelerate set up DeepSpeed ZeRO-2"):
        parallelism.check_obtained("fsdp", Layout("deepspeed", 2, zero_stage=2))
    parallelism.check_optimizer("muon", Layout("ddp", 2))
    with pytest.raises(RecipeError, match=r"train.optimizer: muon .* DeepSpeed ZeRO-3 shards"):
        parallelism.check_optimizer("muon", Layout("deepspeed", 2, zero_stage=3))


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf"])
def test_a_bad_startup_timeout_is_refused(monkeypatch, value):
    monkeypatch.setenv("LLMKIT_STARTUP_TIMEOUT", value)
    with pytest.raises(RecipeError, match="LLMKIT_STARTUP_TIMEOUT"):
        startup.timeout_s()


# Two gloo processes started by hand (no launcher), each running one of these scripts with its rank.
_GROUP = """
import os, sys, datetime
import torch.distributed as td
from llmkit.errors import LaunchError
rank = int(sys.argv[1])
td.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
try:
{body}
    print("ok", flush=True)
except LaunchError as exc:
    print("error:", exc, flush=True)
    os._exit(2)
os._exit(0)
"""


def _two_processes(body: str, tmp_path: Path, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "group.py"
    script.write_text(_GROUP.format(body=textwrap.indent(textwrap.dedent(body), "    ")))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_a_rank_that_never_checks_in_is_named_instead_of_a_hang(tmp_path):
    body = """
    import time
    from llmkit.training import startup
    if rank == 1:
        time.sleep(4)  # stuck before the start-up check
        os._exit(0)
    startup._check_in(2, rank, "host-a", 1.0)
    """
    zero, _ = _two_processes(body, tmp_path)
    assert zero.returncode == 2, zero.stdout + zero.stderr
    assert "rank 1 of 2 did not reach the start-up check within 1 s (this is rank 0 on host-a)" in zero.stdout


def test_output_dir_check_passes_when_shared_and_refuses_on_every_process_when_not(tmp_path):
    # First both ranks pass the same directory; then rank 1 passes its own directory at the place a
    # second machine's local disk would be.
    body = f"""
    from pathlib import Path
    from llmkit import dist
    dist.check_shared_dir(Path({str(tmp_path)!r}) / "shared", "output_dir", wait_s=1.0)
    print("shared ok", flush=True)
    where = Path({str(tmp_path)!r}) / ("shared" if rank == 0 else "local")
    where.mkdir(exist_ok=True)
    dist.check_shared_dir(where, "output_dir", wait_s=1.0)
    """
    (tmp_path / "shared").mkdir()
    for result in _two_processes(body, tmp_path):
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stdout.startswith("shared ok\n")
        assert "is not shared between the machines of this launch: the processes of rank 1" in result.stdout
        assert "put output_dir on a file system that every machine mounts" in result.stdout
    assert list((tmp_path / "shared").iterdir()) == []  # the probe files are gone


def test_lora_under_fsdp_or_zero3_is_refused_before_training(tmp_path, tiny_model_dir, monkeypatch):
    from types import SimpleNamespace

    lora = SimpleNamespace(lora=SimpleNamespace(enabled=True))
    parallelism.check_adapters(lora, Layout("deepspeed", 2, zero_stage=2))  # ZeRO-2 keeps whole parameters: it works
    parallelism.check_adapters(SimpleNamespace(lora=SimpleNamespace(enabled=False)), Layout("fsdp", 2, fsdp_version=2))
    with pytest.raises(RecipeError, match="lora.enabled under DeepSpeed ZeRO-3"):
        parallelism.check_adapters(lora, Layout("deepspeed", 2, zero_stage=3))
    # What `accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2` sets.
    for name, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    data = tmp_path / "inst.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": w}) + "\n" for w in ("a", "b", "c", "d")))
    recipe = {
        "stage": "finetune", "output_dir": str(tmp_path / "run"), "model": {"path": str(tiny_model_dir)},
        "task": {"type": "instruction"}, "data": {"train": str(data), "seq_len": 32, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 2, "micro_batch_size": 2}, "lora": {"enabled": True},
    }
    result = CliRunner().invoke(app, ["finetune", str(write_recipe(tmp_path / "ft.yaml", recipe))])
    assert_clean_error(result, "lora.enabled under FSDP2", "recipes/accelerate/multi_gpu.yaml")
    assert not (tmp_path / "run").exists()
