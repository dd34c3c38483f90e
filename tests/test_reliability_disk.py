"""Reliability of what llmkit keeps on disk: the tokenization cache, the run directory, its lock, disk errors.

    pytest tests/test_reliability_disk.py -q

Each test reproduces one failure of an adversarial run (a truncated cache, a stale FAILED marker, a
killed run's temporary files, an --overwrite killed before its final save, two runs on one
directory, a read-only or full disk, a moved run directory) and asserts what llmkit promises
instead: exit code 2 with one line naming the path or key, the disk as it was, the previous
checkpoint intact, and an exact resume.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from pretrain_helpers import (
    final_weights,
    llmkit_cmd,
    read_events,
    recipe_dict,
    run_cli,
    run_in_process,
    subprocess_env,
    tree_snapshot,
    write_corpus,
    write_recipe,
)
from typer.testing import CliRunner

from llmkit import rundir
from llmkit.cli import app
from llmkit.errors import DataError, DiskError, RunDirError


class _Crash(Exception):
    """Stands in for the process being killed at that point."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), docs=24)


def cli(*args: str, **env: str):
    """Run the CLI in this process (one thread, no FLOPs probe); reset accelerate's state afterwards."""
    import torch
    from accelerate.state import AcceleratorState

    saved = {k: os.environ.get(k) for k in ("LLMKIT_PEAK_FLOPS", *env)}
    os.environ.update({"LLMKIT_PEAK_FLOPS": "1e11", **env})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def assert_one_line_error(result, *needles: str, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.output.count("error: ") == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


def crash_at_checkpoint(monkeypatch, step: int) -> None:
    """Make the checkpoint of `step` die half-written (after its weights, before its marker)."""
    from llmkit.training import checkpoints

    real = checkpoints._write_json

    def crash(path, data):
        if path.name == "trainer_state.json" and data["step"] == step:
            raise _Crash
        real(path, data)

    monkeypatch.setattr(checkpoints, "_write_json", crash)


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


@pytest.fixture
def readonly_dir(tmp_path):
    """An empty directory nobody may write: a read-only tmpfs when we are root (root ignores modes), else mode 0555."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,ro", "tmpfs", str(path)], capture_output=True)
        if mounted.returncode != 0:
            pytest.skip(f"running as root and cannot mount a read-only tmpfs: {mounted.stderr.decode().strip()}")
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], check=True)  # lazy: never leave it mounted
    else:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


# ----------------------------------------------------------------------------------------------
# The tokenization cache (defects 1, 7, 9, 17, 18, 20)
# ----------------------------------------------------------------------------------------------


def _expected_train_tokens(tokenizer, corpus: Path) -> int:
    """Tokens of the corpus as the cache must hold them: what tokenizer(text) returns, plus one EOS per document."""
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    return sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts)


@pytest.mark.parametrize("damage", ["tokens-half", "tokens-odd-size", "meta-truncated", "meta-deleted"])
def test_damaged_cache_entry_is_rebuilt_and_trains_on_the_whole_corpus(tmp_path, tokenizer_dir, tokenizer, corpus, damage, capsys):
    from llmkit.data.lm import lm_train_data
    from llmkit.recipes import recipe_from_dict

    recipe = recipe_from_dict(recipe_dict(tmp_path, tokenizer_dir, corpus), stage="pretrain")
    first = lm_train_data(recipe, tokenizer, world_size=1)
    entry, blocks = Path(first.extra["cache"]), len(first.train)
    expected = _expected_train_tokens(tokenizer, corpus)
    assert first.extra["pack_stats"]["tokens"] == expected
    del first  # its memory map must not outlive the file it maps

    tokens, meta = entry / "train.tokens.bin", entry / "meta.json"
    if damage == "tokens-half":
        os.truncate(tokens, tokens.stat().st_size // 2)
    elif damage == "tokens-odd-size":
        os.truncate(tokens, tokens.stat().st_size - 1)  # not a whole number of uint16 tokens
    elif damage == "meta-truncated":
        meta.write_bytes(meta.read_bytes()[:40])
    else:
        meta.unlink()
    capsys.readouterr()

    second = lm_train_data(recipe, tokenizer, world_size=1)
    err = capsys.readouterr().err
    assert f"the tokenization cache {entry} is incomplete or damaged; rebuilding it" in err
    assert "cache hit" not in err
    assert second.extra["pack_stats"]["tokens"] == expected and len(second.train) == blocks
    assert Path(second.extra["cache"]) == entry
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # nothing of the damaged entry left


def test_finetune_caches_under_LLMKIT_CACHE_DIR(tmp_path, tiny_model_dir, monkeypatch):
    from llmkit.recipes import recipe_from_dict
    from llmkit.stages.data import prepare

    train = tmp_path / "text.jsonl"
    train.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(12)), encoding="utf-8")
    monkeypatch.setenv("LLMKIT_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    recipe = recipe_from_dict({
        "stage": "finetune", "output_dir": str(tmp_path / "run"), "model": {"path": str(tiny_model_dir)},
        "task": {"type": "text"}, "data": {"train": [str(train)], "seq_len": 32}, "train": {"max_steps": 2},
    }, stage="finetune")  # fmt: skip
    prepare(recipe)
    assert len(list((tmp_path / "env-cache").glob("sft-*/COMPLETE"))) == 1
    assert not (tmp_path / "home").exists()


def _waiter(root: Path, name: str, result: dict) -> threading.Thread:
    """A non-main process waiting for cache entry `name` (as under accelerate launch), in a thread."""
    from llmkit.data.cache import build_once

    def wait():
        try:
            result["entry"] = build_once(root, name, None, main_process=False, poll_s=0.02)[0]
        except Exception as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=wait)
    thread.start()
    return thread


def _write_entry(tmp: Path) -> dict:
    (tmp / "data.bin").write_bytes(b"\x00" * 64)
    return {"ok": True}


def test_a_failed_marker_of_an_earlier_launch_does_not_stop_the_next(tmp_path, monkeypatch):
    from llmkit.data.cache import build_once

    monkeypatch.setenv("WORLD_SIZE", "2")
    root = tmp_path / "cache"
    root.mkdir()
    marker = root / "lm-x.FAILED"  # an earlier launch was interrupted while tokenizing
    marker.write_text("failed\n", encoding="utf-8")
    an_hour_ago = time.time() - 3600
    os.utime(marker, (an_hour_ago, an_hour_ago))
    result: dict = {}
    waiter = _waiter(root, "lm-x", result)
    time.sleep(0.3)
    assert waiter.is_alive(), result  # it waits for this launch's main process, not for the old marker
    entry, _, hit = build_once(root, "lm-x", _write_entry, main_process=True)
    waiter.join(timeout=10)
    assert not hit and result == {"entry": entry} and (entry / "data.bin").is_file()
    assert not marker.exists()


def test_a_failure_of_this_launch_still_stops_the_waiting_processes(tmp_path, monkeypatch):
    from llmkit.data.cache import build_once

    monkeypatch.setenv("WORLD_SIZE", "2")
    root = tmp_path / "cache"
    result: dict = {}
    waiter = _waiter(root, "lm-y", result)

    def bad(tmp):
        raise DataError("data.train: broken")

    with pytest.raises(DataError, match="broken"):
        build_once(root, "lm-y", bad, main_process=True)
    waiter.join(timeout=10)
    assert "the main process failed to build the cache" in str(result["error"])


def test_a_data_error_in_one_process_leaves_no_cache_files(tmp_path, tokenizer_dir):
    train = tmp_path / "numbers.jsonl"
    train.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(5)), encoding="utf-8")
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(tmp_path, tokenizer_dir, train))
    result = cli("pretrain", str(path))
    assert_one_line_error(result, "field 'text' holds int, not text")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_temporaries_of_killed_builders_are_removed_by_the_next_build(tmp_path, tokenizer_dir, tokenizer, corpus):
    from llmkit.data.lm import prepare_cache
    from llmkit.recipes import recipe_from_dict

    cache = tmp_path / "cache"
    cache.mkdir()
    # A builder SIGKILLed mid-tokenization: its temporary entry, named the way llmkit names it.
    killed = subprocess.run(
        [sys.executable, "-c",
         "import os, signal, sys\nfrom llmkit import rundir\n"
         "tmp = rundir.temp_path(sys.argv[1], 'lm-0123'); tmp.mkdir(); (tmp / 'train.tokens.bin').write_bytes(bytes(4096))\n"
         "print(tmp, flush=True); os.kill(os.getpid(), signal.SIGKILL)", str(cache)],
        capture_output=True, text=True, env=subprocess_env(),
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftover = Path(killed.stdout.strip())
    assert leftover.is_dir() and leftover.parent == cache
    alive = rundir.temp_path(cache, "lm-4567")  # a build still running (this process)
    alive.mkdir()
    elsewhere = cache / ".lm-89ab.tmp-1@another-machine"  # a build on another machine of a shared file system
    elsewhere.mkdir()
    entry = prepare_cache(recipe_from_dict(recipe_dict(tmp_path, tokenizer_dir, corpus), stage="pretrain"), tokenizer)
    assert not leftover.exists()
    assert alive.is_dir() and elsewhere.is_dir() and (entry / "COMPLETE").is_file()


def test_temporaries_of_a_killed_tokenizer_run_are_removed_by_the_next(tmp_path, corpus):
    out = tmp_path / "tok"
    leftover = tmp_path / f".tok.tmp-{dead_pid()}@{rundir._node()}"
    (leftover / "partial").mkdir(parents=True)
    recipe = {"stage": "tokenizer", "output_dir": str(out), "data": {"train": [str(corpus)], "heldout_docs": 2},
              "tokenizer": {"type": "bpe", "vocab_size": 400}}  # fmt: skip
    result = cli("tokenizer", "train", str(write_recipe(tmp_path / "tok.yaml", recipe)))
    assert result.exit_code == 0, result.output
    assert (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok", "tok.yaml"]


@pytest.mark.parametrize("how", ["data.cache_dir", "LLMKIT_CACHE_DIR", "HOME"])
def test_unwritable_cache_dir_exits_2_naming_the_key(tmp_path, tokenizer_dir, corpus, readonly_dir, how):
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus)
    env = {}
    if how == "data.cache_dir":
        recipe["data"]["cache_dir"] = str(readonly_dir / "cache")
    else:
        del recipe["data"]["cache_dir"]
        env = {"LLMKIT_CACHE_DIR": str(readonly_dir / "cache")} if how == "LLMKIT_CACHE_DIR" else {"HOME": str(readonly_dir)}
    saved = os.environ.pop("LLMKIT_CACHE_DIR", None)
    try:
        result = cli("pretrain", str(write_recipe(tmp_path / "r.yaml", recipe)), **env)
    finally:
        if saved is not None:
            os.environ["LLMKIT_CACHE_DIR"] = saved
    assert_one_line_error(result, f"tokenization cache {readonly_dir}", "data.cache_dir or LLMKIT_CACHE_DIR")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_data_prepare_with_an_unwritable_cache_dir(tmp_path, tokenizer_dir, tiny_model_dir, corpus, readonly_dir, stage):
    argv = _stage_recipe(stage, tmp_path, tmp_path / "run", tokenizer_dir, tiny_model_dir, corpus)
    recipe = yaml.safe_load(Path(argv[-1]).read_text())
    recipe["data"]["cache_dir"] = str(readonly_dir / "cache")
    result = cli("data", "prepare", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert_one_line_error(result, f"tokenization cache {readonly_dir / 'cache'}", "data.cache_dir or LLMKIT_CACHE_DIR")


def test_a_complete_cache_on_a_read_only_share_is_used(tmp_path, tokenizer_dir, corpus):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only file system over a filled cache")
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert cli("data", "prepare", str(path)).exit_code == 0
    cache = Path(recipe["data"]["cache_dir"])
    if subprocess.run(["mount", "--bind", "-o", "ro", str(cache), str(cache)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount read-only")
    try:
        with pytest.raises(OSError):
            (cache / "probe").write_text("x", encoding="utf-8")
        result = cli("data", "prepare", str(path))
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=True)  # lazy: never leave it mounted
    assert result.exit_code == 0 and "cache hit" in result.output, result.output


# ----------------------------------------------------------------------------------------------
# The run directory: unwritable, overwritten, moved, corrupt checkpoints (defects 5, 8, 18, 21)
# ----------------------------------------------------------------------------------------------


def _stage_recipe(stage: str, tmp_path: Path, output_dir: Path, tokenizer_dir, tiny_model_dir, corpus) -> list[str]:
    """argv of `stage` writing to output_dir, on the tiny corpus and model."""
    if stage == "pretrain":
        recipe = dict(recipe_dict(tmp_path, tokenizer_dir, corpus), output_dir=str(output_dir))
        return ["pretrain", str(write_recipe(tmp_path / "r.yaml", recipe))]
    if stage == "finetune":
        recipe = {"stage": "finetune", "output_dir": str(output_dir), "model": {"path": str(tiny_model_dir)},
                  "task": {"type": "text"}, "data": {"train": [str(corpus)], "seq_len": 32, "cache_dir": str(tmp_path / "cache")},
                  "train": {"max_steps": 2}}  # fmt: skip
        return ["finetune", str(write_recipe(tmp_path / "r.yaml", recipe))]
    if stage == "eval":
        recipe = {"stage": "eval", "output_dir": str(output_dir), "model": {"path": str(tiny_model_dir)},
                  "data": {"test": str(corpus), "seq_len": 32}, "metrics": ["perplexity"]}  # fmt: skip
        return ["eval", str(write_recipe(tmp_path / "r.yaml", recipe))]
    recipe = {"stage": "tokenizer", "output_dir": str(output_dir), "data": {"train": [str(corpus)]},
              "tokenizer": {"type": "bpe", "vocab_size": 400}}  # fmt: skip
    return ["tokenizer", "train", str(write_recipe(tmp_path / "r.yaml", recipe))]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a stage loads a tokenizer or model, or starts training a tokenizer."""

    def forbidden(*args, **kwargs):
        raise AssertionError("loaded a model or tokenizer before checking output_dir")

    from llmkit import models
    from llmkit.stages import tokenizer

    for target, name in ((models, "load_tokenizer"), (models, "load_model"), (models, "build_model"), (tokenizer, "_train_into")):
        monkeypatch.setattr(target, name, forbidden)


STAGES = ["pretrain", "finetune", "eval", "tokenizer"]


@pytest.mark.parametrize("stage", STAGES)
def test_output_dir_below_a_file_exits_2_before_any_work(tmp_path, tokenizer_dir, tiny_model_dir, corpus, stage, no_work):
    (tmp_path / "afile").write_text("not a directory\n", encoding="utf-8")
    out = tmp_path / "afile" / "sub"
    result = cli(*_stage_recipe(stage, tmp_path, out, tokenizer_dir, tiny_model_dir, corpus))
    assert_one_line_error(result, f"output_dir {out}", "is a file, not a directory")
    assert (tmp_path / "afile").read_text(encoding="utf-8") == "not a directory\n"


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("where", ["missing", "existing-empty"])
def test_read_only_output_dir_exits_2_before_any_work(tmp_path, tokenizer_dir, tiny_model_dir, corpus, readonly_dir, stage, where, no_work):
    if stage == "tokenizer" and where == "existing-empty":
        pytest.skip("a tokenizer run writes beside its output_dir and replaces it whole: the parent must be writable")
    out = readonly_dir / "run" if where == "missing" else readonly_dir
    result = cli(*_stage_recipe(stage, tmp_path, out, tokenizer_dir, tiny_model_dir, corpus))
    reason = "read-only file system" if os.geteuid() == 0 else "permission denied"
    assert_one_line_error(result, "output_dir", str(out), reason)
    assert list(readonly_dir.iterdir()) == []


@pytest.mark.parametrize("stage", STAGES)
def test_output_dir_that_is_a_dangling_symlink(tmp_path, tokenizer_dir, tiny_model_dir, corpus, stage, no_work):
    out = tmp_path / "link"
    out.symlink_to(tmp_path / "scratch" / "gone")
    result = cli(*_stage_recipe(stage, tmp_path, out, tokenizer_dir, tiny_model_dir, corpus))
    assert_one_line_error(result, f"output_dir {out}: is a symbolic link to {tmp_path / 'scratch' / 'gone'}, which does not exist")
    assert out.is_symlink() and not (tmp_path / "scratch").exists()


def test_overwrite_removes_the_previous_model_before_training(tmp_path, tokenizer_dir, corpus, monkeypatch):
    from llmkit.training import loop

    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus, train={"max_steps": 4, "save_every": 2})
    run_in_process(recipe)
    out = Path(recipe["output_dir"])
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    # Files an earlier LoRA run of this directory would have left, which would pass for a model too.
    (out / "adapter_config.json").write_text("{}", encoding="utf-8")
    (out / "adapter").mkdir()
    other = dict(recipe, train={**recipe["train"], "lr": 5e-3})

    def killed_before_the_final_save(*args, **kwargs):
        raise _Crash

    monkeypatch.setattr(loop, "_save_final", killed_before_the_final_save)
    with pytest.raises(_Crash):
        run_in_process(other, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl", "recipe.yaml"]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["lr"] == 5e-3
    result = cli("generate", str(out), "hi", "--max-new-tokens", "3")
    assert_one_line_error(result, "no config.json", "the final model is written when training finishes")
    eval_recipe = {"stage": "eval", "output_dir": str(tmp_path / "eval"), "model": {"path": str(out)},
                   "data": {"test": str(corpus), "seq_len": 32}, "metrics": ["perplexity"]}  # fmt: skip
    result = cli("eval", str(write_recipe(tmp_path / "eval.yaml", eval_recipe)))
    assert_one_line_error(result, "no config.json", "the final model is written when training finishes")


def test_overwrite_of_a_directory_of_other_files_keeps_them(tmp_path, tokenizer_dir, corpus):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n", encoding="utf-8")
    (out / "config.json").write_text('{"model_type": "gpt2"}', encoding="utf-8")  # someone else's model
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus, train={"max_steps": 2, "save_every": 2})
    result = cli("pretrain", str(write_recipe(tmp_path / "r.yaml", recipe)), "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine\n"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def _resumable(tmp_path: Path, tokenizer_dir, corpus, name: str, monkeypatch, crash_step: int) -> dict:
    """A 12-step run killed while writing its checkpoint of `crash_step` (the one before is complete)."""
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus, train={"max_steps": 12, "save_every": 4, "eval_every": 1000})
    recipe["output_dir"] = str(tmp_path / name)
    crash_at_checkpoint(monkeypatch, crash_step)
    with pytest.raises(_Crash):
        run_in_process(recipe)
    monkeypatch.undo()
    return recipe


def test_a_corrupt_checkpoint_leaves_the_run_directory_as_it_was(tmp_path, tokenizer_dir, corpus, monkeypatch):
    recipe = _resumable(tmp_path, tokenizer_dir, corpus, "run", monkeypatch, crash_step=8)
    out = Path(recipe["output_dir"])
    (out / "checkpoints" / "step-00000004" / "scheduler.json").write_text('{"base_lrs": [0.0', encoding="utf-8")
    recipe["train"]["max_steps"] = 16  # a resumable key: resuming would rewrite recipe.yaml
    before = tree_snapshot(out)
    result = cli("pretrain", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert_one_line_error(result, "step-00000004/scheduler.json: corrupt or truncated")
    assert tree_snapshot(out) == before


def test_a_moved_run_directory_resumes_bit_identical(tmp_path, tokenizer_dir, corpus, monkeypatch):
    reference = recipe_dict(tmp_path, tokenizer_dir, corpus, train={"max_steps": 12, "save_every": 4, "eval_every": 1000})
    reference["output_dir"] = str(tmp_path / "reference")
    run_in_process(reference)
    recipe = _resumable(tmp_path, tokenizer_dir, corpus, "interrupted", monkeypatch, crash_step=8)
    moved = tmp_path / "moved"
    shutil.copytree(recipe["output_dir"], moved, symlinks=True)  # cp -a
    (moved / ".final-tmp").mkdir()  # as if a final save had been killed too
    recipe["output_dir"] = str(moved)
    result = cli("pretrain", str(write_recipe(tmp_path / "moved.yaml", recipe)))
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "step-00000004" in result.output
    assert same_weights(final_weights(moved), final_weights(reference["output_dir"]))
    assert yaml.safe_load((moved / "recipe.yaml").read_text())["output_dir"] == str(moved)
    assert not (moved / ".final-tmp").exists() and not list((moved / "checkpoints").glob(".tmp-*"))
    assert [e["step"] for e in read_events(moved, "train")] == [2, 4, 6, 8, 10, 12]


# ----------------------------------------------------------------------------------------------
# A full disk while checkpointing (defect 10)
# ----------------------------------------------------------------------------------------------


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, tokenizer_dir, corpus, monkeypatch):
    from llmkit.training import checkpoints

    reference = recipe_dict(tmp_path, tokenizer_dir, corpus, train={"max_steps": 12, "save_every": 4, "eval_every": 1000})
    reference["output_dir"] = str(tmp_path / "reference")
    run_in_process(reference)

    recipe = dict(reference, output_dir=str(tmp_path / "run"))
    recipe["train"] = {**reference["train"], "keep_checkpoints": 2}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    real_write = checkpoints._write_json

    def disk_full_at_step_12(file, data):
        if file.name == "scheduler.json" and file.parent.name == ".tmp-step-00000012":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(file, data)

    monkeypatch.setattr(checkpoints, "_write_json", disk_full_at_step_12)
    result = cli("pretrain", str(path))
    out = Path(recipe["output_dir"])
    assert_one_line_error(result, f"writing step-00000012 to {out / 'checkpoints'}: no space left on device",
                          "about", "needed", "step-00000008 are intact", "train.keep_checkpoints (now 2")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
    assert not (out / "model.safetensors").exists()

    # Lowering keep_checkpoints on resume frees the surplus before the next save needs the space.
    seen = []
    real_save = checkpoints.save_checkpoint

    def recording_save(*args, **kwargs):
        seen.append([p.name for _, p in rundir.complete_checkpoints(out)])
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "_write_json", real_write)
    monkeypatch.setattr(checkpoints, "save_checkpoint", recording_save)
    result = cli("pretrain", str(path), "--set", "train.keep_checkpoints=1")
    assert result.exit_code == 0, result.output
    assert seen == [["step-00000008"]]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000012"]
    assert same_weights(final_weights(out), final_weights(reference["output_dir"]))


def test_disk_full_on_a_real_small_file_system(tmp_path, tokenizer_dir, corpus):
    """The same on a tmpfs with room for two checkpoints only: the run stops at the third, then resumes exactly."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    reference = recipe_dict(tmp_path, tokenizer_dir, corpus, train={"max_steps": 12, "save_every": 4, "eval_every": 1000, "keep_checkpoints": 3})
    reference["output_dir"] = str(tmp_path / "reference")
    run_in_process(reference)
    checkpoint = sum(p.stat().st_size for p in (Path(reference["output_dir"]) / "checkpoints" / "step-00000004").iterdir())
    small = tmp_path / "small"
    small.mkdir()
    size_kb = int(2.5 * checkpoint / 1024) + 64
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(small)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs")
    try:
        recipe = dict(reference, output_dir=str(small / "run"))
        path = write_recipe(tmp_path / "r.yaml", recipe)
        result = cli("pretrain", str(path))
        assert_one_line_error(result, f"writing step-00000012 to {small / 'run' / 'checkpoints'}: no space left on device",
                              "free", "train.keep_checkpoints (now 3")
        names = sorted(p.name for p in (small / "run" / "checkpoints").iterdir())
        assert names == ["step-00000004", "step-00000008"]
        result = cli("pretrain", str(path), "--set", "train.keep_checkpoints=1")
        assert result.exit_code == 0, result.output
        assert same_weights(final_weights(small / "run"), final_weights(reference["output_dir"]))
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)  # lazy: never leave it mounted


def test_disk_full_during_the_final_save_resumes_and_writes_it(tmp_path, tokenizer_dir, corpus, monkeypatch):
    from llmkit.training import loop

    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus, train={"max_steps": 8, "save_every": 4, "eval_every": 1000})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    out = Path(recipe["output_dir"])
    real = loop.save_hf_model

    def full(model, tokenizer, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(bytes(1024))  # part of it was written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop, "save_hf_model", full)
    result = cli("pretrain", str(path))
    assert_one_line_error(result, f"output_dir {out}: no space left on device", "resumes from the last checkpoint")
    assert not (out / rundir.FINAL_STAGING).exists() and not (out / "model.safetensors").exists()
    assert rundir.latest_checkpoint(out).name == "step-00000008"
    monkeypatch.setattr(loop, "save_hf_model", real)
    result = cli("pretrain", str(path))
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file() and (out / "model.safetensors").stat().st_size > 1024


def test_disk_full_while_tokenizing_names_the_cache(tmp_path, tokenizer_dir, corpus):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs")
    try:
        recipe = recipe_dict(tmp_path, tokenizer_dir, corpus)  # about 110 KB of tokens
        recipe["data"]["cache_dir"] = str(small / "cache")
        result = cli("pretrain", str(write_recipe(tmp_path / "r.yaml", recipe)))
        assert_one_line_error(result, f"tokenization cache {small / 'cache'}: no space left on device", "LLMKIT_CACHE_DIR")
        assert list(small.iterdir()) == []  # the partial entry is gone, and the cache directory made for it
        assert not (tmp_path / "run").exists()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)  # lazy: never leave it mounted


def test_cache_dir_that_is_a_file(tmp_path, tokenizer_dir, corpus):
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus)
    (tmp_path / "cachefile").write_text("x", encoding="utf-8")
    recipe["data"]["cache_dir"] = str(tmp_path / "cachefile")
    result = cli("pretrain", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert_one_line_error(result, f"tokenization cache {tmp_path / 'cachefile'}", "is a file, not a directory")


# ----------------------------------------------------------------------------------------------
# One run per directory (defect 6)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path, tokenizer_dir, corpus):
    """Two `llmkit pretrain` processes on one output_dir: the second exits 2 naming the first's PID; the first goes on."""
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus, train={"max_steps": 100000, "save_every": 1, "eval_every": 100000, "log_every": 1})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    out = Path(recipe["output_dir"])
    first = subprocess.Popen(llmkit_cmd("pretrain", str(path)), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not list((out / "checkpoints").glob("step-*/COMPLETE")) and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[1][-2000:]
        second = run_cli("pretrain", str(path), timeout=240)
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.strip().splitlines()[-1] == (
            f"error: output_dir {out} is in use by another llmkit run (PID {first.pid}); wait for it or stop it"
        )
        assert first.poll() is None  # the first run goes on, undisturbed
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-2000:]
    step = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert rundir.latest_checkpoint(out).name == f"step-{step:08d}"
    assert not (out / rundir.LOCK).exists()


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_that_writes_a_run_dir_takes_the_lock(tmp_path, tokenizer_dir, tiny_model_dir, corpus, stage):
    out = tmp_path / "out"
    beside = stage == "tokenizer"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom llmkit import rundir\n"
         "with rundir.locked(sys.argv[1], beside=sys.argv[2] == '1'):\n    print('locked', flush=True); time.sleep(120)",
         str(out), "1" if beside else "0"],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(),
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = cli(*_stage_recipe(stage, tmp_path, out, tokenizer_dir, tiny_model_dir, corpus))
        assert_one_line_error(result, f"output_dir {out} is in use by another llmkit run (PID {holder.pid}); wait for it or stop it")
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_nests_and_leaves_no_trace(tmp_path):
    out = tmp_path / "a" / "run"
    with rundir.locked(out):
        assert (out / rundir.LOCK).read_text().split()[0] == str(os.getpid())
        with rundir.locked(out):  # a stage holds it, then fit takes it again
            pass
        assert (out / rundir.LOCK).is_file()
        assert rundir.claim(type("R", (), {"output_dir": out, "stage": "pretrain"})()).state == "new"
    assert not (tmp_path / "a").exists()  # created for the lock, empty again: removed
    (tmp_path / "f").write_text("x", encoding="utf-8")
    with pytest.raises(RunDirError, match="is a file"), rundir.locked(tmp_path / "f"):
        pass


# ----------------------------------------------------------------------------------------------
# Neighbours: other commands that write files
# ----------------------------------------------------------------------------------------------


def test_recipes_copy_into_an_unwritable_place(tmp_path, readonly_dir):
    result = cli("recipes", "copy", "pretrain/tiny", str(readonly_dir))
    assert_one_line_error(result, str(readonly_dir))
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    result = cli("recipes", "copy", "pretrain/tiny", str(tmp_path / "afile" / "sub" / "my.yaml"))
    assert_one_line_error(result, "afile", "is a file, not a directory")


def test_plot_into_an_unwritable_place(tmp_path, readonly_dir):
    run = tmp_path / "run"
    run.mkdir()
    events = [{"event": "train", "step": s, "tokens": 128 * s, "loss": 5.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    result = cli("plot", str(run), "-o", str(readonly_dir / "curves.png"))
    assert_one_line_error(result, f"--output {readonly_dir / 'curves.png'}")
    assert list(readonly_dir.iterdir()) == []
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    result = cli("plot", str(run), "-o", str(tmp_path / "afile" / "curves.png"))
    assert_one_line_error(result, "--output", "is a file, not a directory")
    assert cli("plot", str(run), "-o", str(tmp_path / "ok.png")).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ok.png", "ro", "run"]


def test_disk_errors_are_translated_once_for_every_command():
    from llmkit.errors import disk_error

    full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    full.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert "no space left on device" in str(disk_error(full, "/x/ckpt"))
    rust = Exception('Error while serializing: I/O error: Read-only file system (os error 30) at path "/m/.tmpA1"')
    assert str(disk_error(rust)).startswith("/m/.tmpA1: read-only file system")
    assert isinstance(disk_error(OSError(errno.EACCES, "Permission denied", "/etc/x")), DiskError)
    assert disk_error(FileNotFoundError(errno.ENOENT, "gone", "/x")) is None  # a vanished file is a bug, not a setting
    assert disk_error(ValueError("bad")) is None
