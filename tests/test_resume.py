"""Exact resume: SIGKILL or SIGTERM mid-run then rerun ends bit-identical; checkpoints are atomic and safe.

    pytest tests/test_resume.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pretrain_helpers import (
    final_weights,
    llmkit_cmd,
    read_events,
    recipe_dict,
    run_in_process,
    subprocess_env,
    write_corpus,
    write_recipe,
)
from typer.testing import CliRunner

from llmkit.cli import app

STEPS = 60


def _recipe(tmp: Path, tokenizer_dir: Path, corpus: Path, name: str) -> dict:
    recipe = recipe_dict(tmp, tokenizer_dir, corpus, train={"max_steps": STEPS, "save_every": 5, "eval_every": 1000, "keep_checkpoints": 2})
    recipe["output_dir"] = str(tmp / name)
    recipe["data"]["cache_dir"] = str(tmp.parent / "shared-cache")
    return recipe


def _trace(path: Path) -> list[list[int]]:
    return [json.loads(line)["ids"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    """Corpus, and the uninterrupted reference run with its per-step sample trace."""
    tmp = tmp_path_factory.mktemp("resume")
    corpus = write_corpus(tmp, docs=24)
    recipe = _recipe(tmp, tokenizer_dir, corpus, "reference")
    os.environ["LLMKIT_TRACE_SAMPLES"] = str(tmp / "trace-reference")
    (tmp / "trace-reference").mkdir()
    try:
        run_in_process(recipe)
    finally:
        del os.environ["LLMKIT_TRACE_SAMPLES"]
    return tmp, corpus, final_weights(recipe["output_dir"]), _trace(tmp / "trace-reference" / "samples-rank0.jsonl")


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].equal(b[name]), f"{name} differs"


def _start_and_interrupt(tmp: Path, recipe: dict, sig: int, after_step: int) -> tuple[subprocess.Popen, str]:
    """Launch `llmkit pretrain` in a subprocess and send `sig` once it has trained `after_step` steps."""
    path = write_recipe(tmp / f"{Path(recipe['output_dir']).name}.yaml", recipe)
    trace = tmp / f"trace-{Path(recipe['output_dir']).name}"
    trace.mkdir()
    proc = subprocess.Popen(
        llmkit_cmd("pretrain", str(path)),
        env=subprocess_env(LLMKIT_TRACE_SAMPLES=str(trace)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    samples = trace / "samples-rank0.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if samples.is_file() and len(samples.read_text().splitlines()) >= after_step:
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=240)
    return proc, err


def _resume_and_check(tmp: Path, recipe: dict, reference: dict, reference_trace: list) -> dict:
    trace = tmp / f"trace-{Path(recipe['output_dir']).name}"
    os.environ["LLMKIT_TRACE_SAMPLES"] = str(trace)
    try:
        summary = run_in_process(recipe)
    finally:
        del os.environ["LLMKIT_TRACE_SAMPLES"]
    _assert_same_weights(final_weights(recipe["output_dir"]), reference)
    # Every step's samples were seen exactly once across the interruption: the trace of the killed
    # run up to its checkpoint, then the resumed run, equals the uninterrupted run's trace.
    seen = _trace(trace / "samples-rank0.jsonl")
    resumed_at = summary["resumed_from"]
    assert seen[:resumed_at] + seen[-(STEPS - resumed_at):] == reference_trace
    steps = [e["step"] for e in read_events(recipe["output_dir"], "train")]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    return summary


def test_sigkill_mid_run_then_resume_is_bit_identical(setup, tokenizer_dir):
    tmp, corpus, reference, reference_trace = setup
    recipe = _recipe(tmp, tokenizer_dir, corpus, "killed")
    proc, err = _start_and_interrupt(tmp, recipe, signal.SIGKILL, after_step=12)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    out = Path(recipe["output_dir"])
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert checkpoints, err[-2000:]
    summary = _resume_and_check(tmp, recipe, reference, reference_trace)
    assert summary["resumed_from"] == int(checkpoints[-1].split("-")[1])


def test_sigterm_saves_at_the_next_step_and_resume_is_bit_identical(setup, tokenizer_dir):
    tmp, corpus, reference, reference_trace = setup
    recipe = _recipe(tmp, tokenizer_dir, corpus, "terminated")
    proc, err = _start_and_interrupt(tmp, recipe, signal.SIGTERM, after_step=7)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by SIGTERM at step" in err
    stopped_at = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
    out = Path(recipe["output_dir"])
    assert (out / "checkpoints" / f"step-{stopped_at:08d}" / "COMPLETE").is_file()
    assert not (out / "model.safetensors").exists()
    summary = _resume_and_check(tmp, recipe, reference, reference_trace)
    assert summary["resumed_from"] == stopped_at


class _Crash(Exception):
    """Stands in for the process dying in the middle of writing a checkpoint."""


def test_kill_during_checkpoint_write_keeps_the_previous_one(setup, tokenizer_dir, monkeypatch):
    from llmkit import rundir
    from llmkit.training import checkpoints

    tmp, corpus, reference, reference_trace = setup
    recipe = _recipe(tmp, tokenizer_dir, corpus, "crashed")
    real = checkpoints._write_json

    def crash_at_step_15(path, data):
        if path.name == "trainer_state.json" and data["step"] == 15:
            raise _Crash
        real(path, data)

    monkeypatch.setattr(checkpoints, "_write_json", crash_at_step_15)
    with pytest.raises(_Crash):
        run_in_process(recipe)
    monkeypatch.setattr(checkpoints, "_write_json", real)
    root = Path(recipe["output_dir"]) / "checkpoints"
    assert (root / ".tmp-step-00000015").is_dir() and not (root / "step-00000015").exists()
    assert rundir.latest_checkpoint(recipe["output_dir"]).name == "step-00000010"
    (tmp / "trace-crashed").mkdir()
    # The trace of the crashed run is gone, so only check the weights and where it resumed.
    os.environ["LLMKIT_TRACE_SAMPLES"] = str(tmp / "trace-crashed")
    try:
        summary = run_in_process(recipe)
    finally:
        del os.environ["LLMKIT_TRACE_SAMPLES"]
    assert summary["resumed_from"] == 10
    _assert_same_weights(final_weights(recipe["output_dir"]), reference)
    assert _trace(tmp / "trace-crashed" / "samples-rank0.jsonl") == reference_trace[10:]
    # keep_checkpoints: 2, and the interrupted temporary directory was cleaned up
    assert sorted(p.name for p in root.iterdir()) == ["step-00000055", "step-00000060"]


def _resumable_run(tmp: Path, tokenizer_dir: Path, corpus: Path, name: str) -> tuple[Path, Path]:
    recipe = _recipe(tmp, tokenizer_dir, corpus, name)
    recipe["train"]["max_steps"] = 10
    run_in_process(recipe)
    recipe["train"]["max_steps"] = 20  # rerunning with a larger budget resumes from step 10
    return write_recipe(tmp / f"{name}.yaml", recipe), Path(recipe["output_dir"]) / "checkpoints" / "step-00000010"


def test_planted_malicious_pickle_is_refused_without_running(setup, tokenizer_dir, tmp_path):
    import torch

    tmp, corpus, _, _ = setup
    recipe_path, checkpoint = _resumable_run(tmp, tokenizer_dir, corpus, "evil")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": {0: Evil()}, "param_groups": []}, checkpoint / "optimizer.pt")
    result = CliRunner().invoke(app, ["pretrain", str(recipe_path)])
    assert result.exit_code == 2, result.output
    assert "optimizer.pt: refused to load" in result.output
    assert not marker.exists()


def test_truncated_checkpoint_names_the_file(setup, tokenizer_dir):
    tmp, corpus, _, _ = setup
    recipe_path, checkpoint = _resumable_run(tmp, tokenizer_dir, corpus, "truncated")
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = CliRunner().invoke(app, ["pretrain", str(recipe_path)])
    assert result.exit_code == 2, result.output
    assert f"{weights}: corrupt or truncated" in result.output
