"""Two processes (gloo on CPU) under `accelerate launch`: same loss as one process, exact resume per rank.

    pytest tests/test_distributed.py -q
"""

from __future__ import annotations

import json
import math
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
    run_in_process,
    subprocess_env,
    write_corpus,
    write_recipe,
)

# Two gloo processes per test, tens of seconds each: run with `python -m pytest -m slow` (.ci/run does).
pytestmark = pytest.mark.slow


STEPS = 30


def _launch_cmd(recipe_path: Path) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "llmkit", "pretrain", str(recipe_path),
    ]


def _trace(directory: Path, rank: int) -> list[list[int]]:
    return [json.loads(line)["ids"] for line in (directory / f"samples-rank{rank}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    """A corpus and an uninterrupted 2-process run with per-rank sample traces."""
    tmp = tmp_path_factory.mktemp("distributed")
    corpus = write_corpus(tmp, docs=12)
    recipe = recipe_dict(tmp, tokenizer_dir, corpus, train={"max_steps": STEPS, "log_every": 1, "save_every": 10, "eval_every": 1000})
    recipe["output_dir"] = str(tmp / "two")
    path = write_recipe(tmp / "two.yaml", recipe)
    trace = tmp / "trace-two"
    trace.mkdir()
    result = subprocess.run(_launch_cmd(path), env=subprocess_env(LLMKIT_TRACE_SAMPLES=str(trace)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, corpus, recipe, trace


def test_two_processes_match_one_process_with_the_same_global_batch(setup, tokenizer_dir):
    tmp, corpus, recipe, trace = setup
    single = dict(recipe, output_dir=str(tmp / "one"), train={**recipe["train"], "grad_accum_steps": 2})
    one_trace = tmp / "trace-one"
    one_trace.mkdir()
    import os

    os.environ["LLMKIT_TRACE_SAMPLES"] = str(one_trace)
    try:
        run_in_process(single)
    finally:
        del os.environ["LLMKIT_TRACE_SAMPLES"]
    # Process r takes global micro-batch r of each step: one process accumulating both sees the same samples.
    assert _trace(one_trace, 0) == [a + b for a, b in zip(_trace(trace, 0), _trace(trace, 1), strict=True)]
    two_loss = [e["loss"] for e in read_events(recipe["output_dir"], "train")]
    one_loss = [e["loss"] for e in read_events(single["output_dir"], "train")]
    assert len(two_loss) == len(one_loss) == STEPS
    for step, (a, b) in enumerate(zip(two_loss, one_loss, strict=True), start=1):
        assert math.isclose(a, b, rel_tol=2e-4), f"step {step}: {a} (2 processes) vs {b} (1 process)"
    assert [e["tokens"] for e in read_events(recipe["output_dir"], "train")][-1] == STEPS * 2 * 4 * 32


def test_sigterm_under_accelerate_launch_then_resume_sees_each_sample_once_per_rank(setup):
    tmp, _, recipe, reference_trace = setup
    interrupted = dict(recipe, output_dir=str(tmp / "interrupted"))
    path = write_recipe(tmp / "interrupted.yaml", interrupted)
    trace = tmp / "trace-interrupted"
    trace.mkdir()
    env = subprocess_env(LLMKIT_TRACE_SAMPLES=str(trace))
    proc = subprocess.Popen(_launch_cmd(path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = trace / "samples-rank0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if samples.is_file() and len(samples.read_text().splitlines()) >= 13:
            proc.send_signal(signal.SIGTERM)  # the launcher forwards it to both workers
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=300)
    out = Path(interrupted["output_dir"])
    assert not (out / "model.safetensors").exists(), "finished before the signal"
    stopped = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert stopped and stopped[-1] != "step-00000010", err[-3000:]  # saved at the signal, not only at save_every
    resumed_at = int(stopped[-1].split("-")[1])
    result = subprocess.run(_launch_cmd(path), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / stopped[-1]}" in result.stdout + result.stderr
    for rank in (0, 1):
        seen = _trace(trace, rank)
        assert seen[:resumed_at] + seen[-(STEPS - resumed_at):] == _trace(reference_trace, rank)
    a, b = final_weights(out), final_weights(recipe["output_dir"])
    assert all(a[k].equal(b[k]) for k in a)


def test_muon_under_ddp_matches_one_process(setup, tokenizer_dir):
    tmp, corpus, recipe, _ = setup
    muon = dict(recipe, output_dir=str(tmp / "muon-two"), train={**recipe["train"], "max_steps": 10, "optimizer": "muon"})
    result = subprocess.run(_launch_cmd(write_recipe(tmp / "muon-two.yaml", muon)), env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    single = dict(muon, output_dir=str(tmp / "muon-one"), train={**muon["train"], "grad_accum_steps": 2})
    run_in_process(single)
    # Every process orthogonalizes the same averaged gradient: the same steps as one process
    # accumulating both micro-batches.
    two = [e["loss"] for e in read_events(muon["output_dir"], "train")]
    one = [e["loss"] for e in read_events(single["output_dir"], "train")]
    assert len(two) == len(one) == 10 and two[-1] < two[0]
    for step, (a, b) in enumerate(zip(two, one, strict=True), start=1):
        assert math.isclose(a, b, rel_tol=2e-4), f"step {step}: {a} (2 processes) vs {b} (1 process)"


def _two_machines(tmp: Path, recipe: dict, output_dirs: tuple[str, str]) -> list[subprocess.CompletedProcess]:
    """One launcher per simulated machine on this host (1 process each), as `recipes/accelerate/multi_node.yaml` runs."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for machine, out in enumerate(output_dirs):
        path = write_recipe(tmp / f"machine{machine}.yaml", dict(recipe, output_dir=out))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
               "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
               "-m", "llmkit", "pretrain", str(path)]
        # Output to files, not pipes: a launcher blocked on a full pipe would stall the other machine too.
        out, err = open(tmp / f"machine{machine}.out", "w"), open(tmp / f"machine{machine}.err", "w")
        procs.append((subprocess.Popen(cmd, env=subprocess_env(), stdout=out, stderr=err), out, err))
    results = []
    for proc, out, err in procs:
        code = proc.wait(timeout=600)
        out.close()
        err.close()
        results.append(subprocess.CompletedProcess(proc.args, code, Path(out.name).read_text(), Path(err.name).read_text()))
    return results


def test_two_machines_are_counted_and_an_unshared_output_dir_is_refused_on_both(setup):
    tmp, _, recipe, _ = setup
    short = dict(recipe, train={**recipe["train"], "max_steps": 4})
    shared = str(tmp / "two-machines")
    first, second = _two_machines(tmp, short, (shared, shared))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    assert "distributed:      DDP, 2 processes on 2 machines" in first.stdout
    assert read_events(shared, "start")[0]["distributed"] == {"kind": "ddp", "processes": 2, "machines": 2}
    # The second machine's output_dir is another directory at the path (its own disk): both stop at start.
    results = _two_machines(tmp, short, (str(tmp / "disk-a"), str(tmp / "disk-b")))
    for result in results:
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "is not shared between the machines of this launch: the processes of rank 1" in errors[0], result.stderr[-2000:]
    assert not (tmp / "disk-a").exists() and not (tmp / "disk-b").exists()
