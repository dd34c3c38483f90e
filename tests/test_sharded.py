"""FSDP2 and DeepSpeed ZeRO-2/3 on two gloo CPU processes under `accelerate launch`, against DDP.

    pytest tests/test_sharded.py -m slow -q

Each launch takes 10-30 s on a busy 2-core machine; the first DeepSpeed launch on a machine also
compiles DeepSpeed's shared-memory collective once (a few minutes, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pretrain_helpers import (
    final_weights,
    read_events,
    recipe_dict,
    subprocess_env,
    write_corpus,
    write_recipe,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate"
STEPS = 12
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install -e '.[dev]' installs deepspeed")


def _launch(recipe_path: Path, config: str | None) -> list[str]:
    kind = ["--config_file", str(CONFIGS / config)] if config else ["--multi_gpu"]
    return [
        sys.executable, "-m", "accelerate.commands.launch", *kind, "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", "0", "-m", "llmkit", "pretrain", str(recipe_path),
    ]


def _run(tmp: Path, recipe: dict, name: str, config: str | None, **env: str) -> subprocess.CompletedProcess:
    recipe = dict(recipe, output_dir=str(tmp / name))
    path = write_recipe(tmp / f"{name}.yaml", recipe)
    return subprocess.run(_launch(path, config), env=subprocess_env(**env), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    """A corpus, a tiny tied-embedding llama recipe and its uninterrupted 2-process DDP run."""
    tmp = tmp_path_factory.mktemp("sharded")
    corpus = write_corpus(tmp, docs=12)
    recipe = recipe_dict(tmp, tokenizer_dir, corpus, train={"max_steps": STEPS, "log_every": 1, "save_every": 4, "eval_every": 1000})
    result = _run(tmp, recipe, "ddp", None)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, recipe


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a refused launch (the launcher itself exits 1 and prints its own summary)."""
    assert result.returncode != 0, result.stdout[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines and len(set(lines)) == 1, result.stderr[-3000:]
    # No traceback through llmkit's code (the launcher's own ChildFailedError summary is not ours).
    assert not [line for line in result.stderr.splitlines() if line.lstrip().startswith('File "') and "/llmkit/" in line], result.stderr[-3000:]
    return lines[0]


def _losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in read_events(run_dir, "train")]


def _assert_like_ddp(tmp: Path, name: str, kind: dict) -> None:
    """Same losses and weights as DDP within float tolerance, the same exported tensors, the kind recorded."""
    ddp, run = tmp / "ddp", tmp / name
    a, b = _losses(run), _losses(ddp)
    assert len(a) == len(b) == STEPS and a[-1] < a[0]
    for step, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        assert math.isclose(x, y, rel_tol=1e-4), f"step {step}: {x} ({name}) vs {y} (DDP)"
    mine, reference = final_weights(run), final_weights(ddp)
    # Exactly the tensors a single-process export writes: the tied lm_head.weight is not a second tensor.
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert "lm_head.weight" not in mine
    for key in mine:
        assert (mine[key] - reference[key]).abs().max().item() < 1e-4, key
    start = read_events(run, "start")[0]["distributed"]
    assert start == {"processes": 2, "machines": 1, **kind}
    assert json.loads((run / "summary.json").read_text())["distributed"] == start
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert json.loads((newest / "trainer_state.json").read_text())["distributed"] == start

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _kill_and_resume(tmp: Path, recipe: dict, name: str, config: str) -> None:
    """SIGKILL both workers once 6 steps are trained, resume with the same launch: the final weights equal."""
    out = tmp / f"{name}-killed"
    path = write_recipe(tmp / f"{name}-killed.yaml", dict(recipe, output_dir=str(out)))
    trace = tmp / f"trace-{name}"
    trace.mkdir()
    env = subprocess_env(LLMKIT_TRACE_SAMPLES=str(trace))
    proc = subprocess.Popen(_launch(path, config), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import psutil

    samples = trace / "samples-rank0.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if samples.is_file() and len(samples.read_text().splitlines()) >= 6:
            for child in psutil.Process(proc.pid).children(recursive=True):  # the workers, as if their machine died
                child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and not (out / "model.safetensors").exists(), "finished before the kill"
    stopped = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert stopped == ["step-00000004"], (stopped, err[-2000:])
    result = subprocess.run(_launch(path, config), env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'step-00000004'}" in result.stdout + result.stderr
    resumed, uninterrupted = final_weights(out), final_weights(tmp / name)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert resumed[key].equal(uninterrupted[key]), f"{key} differs after resume"
    assert [e["step"] for e in read_events(out, "train")] == list(range(1, STEPS + 1))


def test_fsdp2_matches_ddp_exports_tied_weights_once_and_resumes_exactly(setup):
    tmp, recipe = setup
    result = _run(tmp, recipe, "fsdp", "fsdp.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed:      FSDP2, 2 processes" in result.stdout
    _assert_like_ddp(tmp, "fsdp", {"kind": "fsdp", "fsdp_version": 2})
    _kill_and_resume(tmp, recipe, "fsdp", "fsdp.yaml")


@needs_deepspeed
def test_deepspeed_zero2_matches_ddp_and_resumes_exactly(setup):
    tmp, recipe = setup
    result = _run(tmp, recipe, "zero2", "deepspeed_zero2.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed:      DeepSpeed ZeRO-2, 2 processes" in result.stdout
    _assert_like_ddp(tmp, "zero2", {"kind": "deepspeed", "zero_stage": 2})
    _kill_and_resume(tmp, recipe, "zero2", "deepspeed_zero2.yaml")


@needs_deepspeed
def test_deepspeed_zero3_matches_ddp(setup):
    tmp, recipe = setup
    result = _run(tmp, recipe, "zero3", "deepspeed_zero3.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_like_ddp(tmp, "zero3", {"kind": "deepspeed", "zero_stage": 3})


def test_fsdp_checkpoint_resumed_without_fsdp_is_refused_naming_both_kinds(setup):
    tmp, recipe = setup
    if not (tmp / "fsdp" / "checkpoints").is_dir():
        assert _run(tmp, recipe, "fsdp", "fsdp.yaml").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp / "fsdp").rglob("*")}
    longer = dict(recipe, train={**recipe["train"], "max_steps": STEPS + 4})  # a finished run resumes from its last checkpoint
    result = _run(tmp, longer, "fsdp", None)  # DDP, 2 processes
    err = _error_line(result)
    assert "was written by FSDP2, 2 processes, this launch runs DDP, 2 processes" in err
    assert "recipes/accelerate/fsdp.yaml --num_processes 2" in err and "delete" not in err
    assert {p: p.stat().st_mtime_ns for p in (tmp / "fsdp").rglob("*")} == before


def test_muon_under_fsdp_is_refused(setup):
    tmp, recipe = setup
    muon = dict(recipe, train={**recipe["train"], "optimizer": "muon"})
    result = _run(tmp, muon, "muon-fsdp", "fsdp.yaml")
    err = _error_line(result)
    assert err.startswith("error: train.optimizer: muon") and "FSDP2" in err
    assert not (tmp / "muon-fsdp" / "checkpoints").exists()


def test_two_process_checkpoint_resumed_by_one_process_is_refused(setup):
    tmp, recipe = setup
    longer = dict(recipe, output_dir=str(tmp / "ddp"), train={**recipe["train"], "max_steps": STEPS + 4})
    path = write_recipe(tmp / "ddp-one.yaml", longer)
    result = subprocess.run([sys.executable, "-m", "llmkit", "pretrain", str(path)], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    err = result.stderr.strip().splitlines()[-1]
    assert "was written by 2 processes, this launch has 1" in err and "--num_processes 2" in err, err
    assert os.path.exists(tmp / "ddp" / "model.safetensors")
