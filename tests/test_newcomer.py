"""What a newcomer meets on the README's path with their own data: budgets, warnings, prompts, checkpoints.

    pytest tests/test_newcomer.py -q

Each test is one thing the README walkthrough promises or one trap a first real run fell into:
--set budgets and 1e6-style counts, errors blamed on the --set that caused them, built-in
validation data left behind by an overridden data.train, `llmkit generate` on a fine-tune (its
prompt template, multi-line prompts), intermediate checkpoints as models, what eval leaves out,
bytes that are not UTF-8, an offline hub, and what long or resumed runs say.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import typer
import yaml
from pretrain_helpers import assert_clean_error, recipe_dict, run_in_process, write_corpus
from typer.testing import CliRunner

from llmkit.cli import app, handles_errors
from llmkit.errors import DataError, Interrupted, RecipeError
from llmkit.recipes import load_recipe, recipe_from_dict, recipe_to_yaml

runner = CliRunner()


def run(*args: str, **kwargs):
    return runner.invoke(app, list(args), **kwargs)


# ------------------------------------------------------------------------------------------------
# Budgets and counts
# ------------------------------------------------------------------------------------------------


def test_set_max_tokens_replaces_the_bundled_max_steps():
    assert load_recipe("pretrain/tiny").train.max_steps is not None  # the bundled recipe gives steps
    recipe = load_recipe("pretrain/tiny", ["train.max_tokens=1e6"])
    assert recipe.train.max_tokens == 1_000_000 and recipe.train.max_steps is None
    back = load_recipe("pretrain/tiny", ["train.max_tokens=1e6", "train.max_steps=70", "train.max_tokens=null"])
    assert back.train.max_steps == 70 and back.train.max_tokens is None


def test_both_budgets_at_once_is_an_error_naming_both(tmp_path):
    result = run("validate", "pretrain/tiny", "--set", "train.max_tokens=1e6", "--set", "train.max_steps=10")
    assert_clean_error(result, "--set", "train.max_steps (10)", "train.max_tokens (1000000)", "set one")
    raw = yaml.safe_load(load_recipe("pretrain/tiny").model_dump_json())
    raw["train"]["max_tokens"] = 5000
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("train:"))
    assert_clean_error(run("validate", str(path)), f"{path}:{line}", "train.max_tokens (5000)")


@pytest.mark.parametrize(("written", "expected"), [("1e6", 1_000_000), ("2.5e3", 2_500), ("1_000", 1_000), ("3.0e2", 300)])
def test_counts_accept_scientific_notation(written, expected):
    recipe = load_recipe("pretrain/tiny", [f"train.max_tokens={written}", f"data.max_samples={written}"])
    assert recipe.train.max_tokens == expected and recipe.data.max_samples == expected


@pytest.mark.parametrize("written", ["1e-3", "2.5", "many"])
def test_counts_that_are_not_whole_numbers_are_refused(written):
    assert_clean_error(run("validate", "pretrain/tiny", "--set", f"train.max_tokens={written}"), "train.max_tokens", "integer")


def test_a_bad_set_value_is_blamed_on_the_set_not_on_a_line_of_the_bundled_recipe(tmp_path):
    err = assert_clean_error(run("validate", "pretrain/tiny", "--set", "train.max_steps=abc"), "--set train.max_steps=abc")
    assert "tiny.yaml" not in err
    err = assert_clean_error(run("validate", "pretrain/tiny", "--set", "train.warmup_steps=900"), "--set train.warmup_steps=900")
    assert "train.warmup_steps (900) is larger than train.max_steps" in err
    assert_clean_error(run("validate", "pretrain/tiny", "--set", "train.lrr=1"), "--set train.lrr=1", "did you mean 'lr'")
    # A mistake in the file itself still names the file and its line, whatever else is --set.
    path = tmp_path / "mine.yaml"
    path.write_text(load_recipe("pretrain/tiny").model_dump_json().replace('"lr":', '"lrr":'))
    assert_clean_error(run("validate", str(path), "--set", "train.max_steps=20"), f"{path}:1", "train.lrr")


# ------------------------------------------------------------------------------------------------
# Built-in validation data left behind when data.train is overridden
# ------------------------------------------------------------------------------------------------


def _warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


def test_own_train_data_with_the_bundled_builtin_validation_warns_once_with_the_fix(tmp_path):
    corpus = tmp_path / "notes.txt"
    corpus.write_text("my own text\n" * 20)
    result = run("validate", "pretrain/tiny", "--set", f"data.train=[{corpus}]")
    assert result.exit_code == 0, result.output
    (warning,) = _warnings(result)
    assert "data.validation is builtin:pydoc/validation" in warning
    assert "--set data.validation=null --set data.validation_fraction=0.05" in warning
    fixed = run("validate", "pretrain/tiny", "--set", f"data.train=[{corpus}]", "--set", "data.validation=null",
                "--set", "data.validation_fraction=0.05")
    assert fixed.exit_code == 0 and _warnings(fixed) == []
    mine = run("validate", "pretrain/tiny", "--set", f"data.train=[{corpus}]", "--set", f"data.validation=[{corpus}]")
    assert mine.exit_code == 0 and _warnings(mine) == []
    bundled = run("validate", "pretrain/tiny")
    assert bundled.exit_code == 0 and _warnings(bundled) == []


def test_the_tokenizer_and_finetune_warnings_name_their_own_fix(tmp_path):
    from llmkit.data.splits import builtin_validation_warning

    corpus = tmp_path / "notes.txt"
    corpus.write_text("text\n")
    tokenizer = builtin_validation_warning(load_recipe("tokenizer/tiny", [f"data.train=[{corpus}]"]).data)
    assert "--set data.validation=null (holds out 1 in 20" in tokenizer and "validation_fraction" not in tokenizer
    chats = tmp_path / "chat.jsonl"
    chats.write_text("{}\n")
    finetune = builtin_validation_warning(load_recipe("finetune/lora-instruction", [f"data.train=[{chats}]"]).data)
    assert "builtin:docsum/validation" in finetune and "data.validation_fraction=0.05" in finetune


# ------------------------------------------------------------------------------------------------
# llmkit generate on a fine-tuned model
# ------------------------------------------------------------------------------------------------

TEMPLATE = "Summarize the following text.\n\n{document}\n\nSummary:\n"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_model_dir):
    """The tiny model in a directory that holds a summarization fine-tune's recipe.yaml."""
    out = tmp_path_factory.mktemp("finetuned") / "ft"
    shutil.copytree(tiny_model_dir, out)
    recipe = recipe_from_dict({
        "stage": "finetune", "output_dir": str(out), "model": {"path": str(tiny_model_dir)},
        "task": {"type": "summarization", "prompt_template": TEMPLATE},
        "data": {"train": "builtin:docsum/train"}, "train": {"max_steps": 1},
    })
    (out / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    return out


def _library(model_dir: Path, prompts: list[str], tokens: int = 6) -> list[str]:
    from llmkit.generation import generate_texts
    from llmkit.models import load_model
    from llmkit.recipes import GenerationSpec

    model, tokenizer = load_model(str(model_dir), device="cpu")
    return generate_texts(model, tokenizer, prompts, GenerationSpec(max_new_tokens=tokens))


GREEDY = ["--temperature", "0", "--max-new-tokens", "6", "--no-stream"]


def test_generate_applies_the_finetunes_prompt_template_and_says_so(finetuned):
    text = "Lists are mutable sequences."
    templated, raw = _library(finetuned, [TEMPLATE.format(document=text), text])
    assert templated != raw, "the two prompts must lead to different continuations for this test to mean anything"
    result = run("generate", str(finetuned), text, *GREEDY)
    assert result.exit_code == 0, result.output
    assert result.stdout == templated + "\n"
    assert "prompt template" in result.stderr and str(finetuned / "recipe.yaml") in result.stderr and "--raw" in result.stderr
    plain = run("generate", str(finetuned), text, "--raw", *GREEDY)
    assert plain.exit_code == 0 and plain.stdout == raw + "\n"
    assert "prompt template" not in plain.stderr


def test_a_pretrained_model_gets_its_prompt_as_is(tiny_model_dir):
    result = run("generate", str(tiny_model_dir), "The", *GREEDY)
    assert result.exit_code == 0 and "prompt template" not in result.stderr
    assert result.stdout == _library(tiny_model_dir, ["The"])[0] + "\n"


def test_a_file_or_stdin_is_one_multi_line_prompt_unless_one_per_line(tmp_path, finetuned):
    document = "First line of a document.\nSecond line.\n\nA last paragraph.\n"
    path = tmp_path / "document.txt"
    path.write_text(document)
    (expected,) = _library(finetuned, [TEMPLATE.format(document=document.rstrip("\n"))])
    for source in (["--file", str(path)], ["-"]):
        result = run("generate", str(finetuned), *source, *GREEDY, input=document if source == ["-"] else None)
        assert result.exit_code == 0, result.output
        assert "### prompt" not in result.stdout and result.stdout == expected + "\n"
    split = run("generate", str(finetuned), "--file", str(path), "--one-per-line", *GREEDY)
    assert split.exit_code == 0 and split.stdout.count("### prompt") == 3


def test_a_template_with_several_fields_needs_records_not_a_plain_prompt(tmp_path, tiny_model_dir):
    out = tmp_path / "two-fields"
    shutil.copytree(tiny_model_dir, out)
    recipe = recipe_from_dict({
        "stage": "finetune", "output_dir": str(out), "model": {"path": str(tiny_model_dir)},
        "task": {"type": "summarization", "prompt_template": "{title}: {document}\nSummary:\n"},
        "data": {"train": "builtin:docsum/train"}, "train": {"max_steps": 1},
    })
    (out / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    assert_clean_error(run("generate", str(out), "hello", *GREEDY), "2 fields", "title", "--raw")
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"title": "os", "document": "Operating system interfaces."}) + "\n")
    result = run("generate", str(out), "--file", str(records), *GREEDY)
    assert result.exit_code == 0, result.output
    assert result.stdout == _library(out, ["os: Operating system interfaces.\nSummary:\n"])[0] + "\n"


# ------------------------------------------------------------------------------------------------
# Intermediate checkpoints are models
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("ckpt-run")
    corpus = write_corpus(tmp, docs=12)
    recipe = recipe_dict(tmp, tokenizer_dir, corpus, train={"max_steps": 4, "save_every": 2, "eval_every": 100, "warmup_steps": 1})
    run_in_process(recipe)
    return Path(recipe["output_dir"])


def _logits(model_dir: Path):
    import torch

    from llmkit.models import load_model

    model, tokenizer = load_model(str(model_dir), device="cpu")
    with torch.no_grad():
        return model(**tokenizer("The os module provides", return_tensors="pt")).logits


def test_an_intermediate_checkpoint_loads_as_the_model_it_was(pretrained_run):
    import torch

    last = pretrained_run / "checkpoints" / "step-00000004"
    earlier = pretrained_run / "checkpoints" / "step-00000002"
    assert not (last / "config.json").exists()  # a resumable checkpoint, not a model directory
    assert torch.equal(_logits(last), _logits(pretrained_run))  # the final model is the last checkpoint
    assert not torch.equal(_logits(earlier), _logits(pretrained_run))
    result = run("generate", str(earlier), "The", *GREEDY)
    assert result.exit_code == 0, result.output
    assert result.stdout == _library(earlier, ["The"])[0] + "\n"


def test_eval_scores_a_checkpoint_like_the_final_model(tmp_path, pretrained_run):
    last = pretrained_run / "checkpoints" / "step-00000004"
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"text": f"Document {i}: the os module provides functions."}) + "\n" for i in range(7)))
    result = run("eval", "eval/perplexity", "--set", f"model.path=[{pretrained_run}, {last}]", "--set", f"data.test=[{test}]",
                 "--set", "data.seq_len=32", "--set", "data.stride=16", "--set", "data.max_samples=3",
                 "--set", f"output_dir={tmp_path / 'eval'}")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    final, checkpoint = (row["metrics"]["perplexity"] for row in report["models"])
    assert final == checkpoint
    # data.max_samples left 4 of the 7 records out: the log and metrics.json say so.
    assert "scoring the first 3 of 7 records" in result.stderr
    assert report["models"][0]["protocol"]["test_records"] == {"max_samples": 3, "scored": 3, "available": 7}


# ------------------------------------------------------------------------------------------------
# Resumed runs, trackers, messages under a launcher
# ------------------------------------------------------------------------------------------------


def test_raising_max_steps_on_a_finished_run_warns_that_the_schedule_stretches(tmp_path, tokenizer_dir, capsys):
    corpus = write_corpus(tmp_path, docs=12)
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus, train={"max_steps": 4, "save_every": 4, "eval_every": 100, "warmup_steps": 1})
    run_in_process(recipe)
    assert "warning" not in capsys.readouterr().err
    longer = dict(recipe, train={**recipe["train"], "max_steps": 8})
    summary = run_in_process(longer)
    err = capsys.readouterr().err
    assert summary["resumed_from"] == 4 and summary["step"] == 8
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert "trained for 4 steps, this run has 8" in warning and "set train.max_steps=4" in warning
    # The numbers are the two schedules' learning rates at the resume step (the old one ends at min_lr).
    from llmkit.training.optim import lr_multiplier

    before, after = (1e-2 * lr_multiplier(4, warmup_steps=1, max_steps=n, schedule="cosine", min_ratio=0.0) for n in (4, 8))
    assert before == 0.0 < after
    assert f"from {before:.3g} to {after:.3g} at step 4" in warning, warning


def test_the_tensorboard_directory_is_printed(tmp_path, tokenizer_dir, capsys):
    pytest.importorskip("tensorboard")
    corpus = write_corpus(tmp_path, docs=12)
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus, train={"max_steps": 2, "eval_every": 100, "trackers": ["tensorboard"], "warmup_steps": 0})
    run_in_process(recipe)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tensorboard:")]
    logdir = Path(line.split()[1])
    assert logdir.is_dir() and any(logdir.glob("events.out.tfevents.*")), line
    assert f"tensorboard --logdir {recipe['output_dir']}" in line


@pytest.mark.parametrize(("exc", "code"), [(Interrupted("stopped by SIGINT at step 3"), 130), (DataError("corpus: empty"), 2)])
def test_under_a_launcher_one_process_per_machine_prints_the_line(monkeypatch, capsys, exc, code):
    @handles_errors
    def command():
        raise exc

    for local_rank, printed in (("0", 1), ("1", 0)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        with pytest.raises(typer.Exit) as exit_info:
            command()
        assert exit_info.value.exit_code == code
        err = capsys.readouterr().err
        assert err.count(str(exc)) == printed and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# Files and sources
# ------------------------------------------------------------------------------------------------


def test_not_utf8_names_the_file_offset_and_line_and_the_skip_option(tmp_path):
    from llmkit.data.sources import iter_texts

    line = "caf\u00e9 au lait\n".encode()  # 15 bytes, one of them a 2-byte character
    head = line * 80_000  # past the first 1 MB chunk the reader decodes
    path = tmp_path / "latin1.txt"
    path.write_bytes(head + b"na\xefve\n" + line * 10)
    with pytest.raises(DataError) as info:
        list(iter_texts([str(path)]))
    message = str(info.value)
    assert f"byte {len(head) + 2:,}" in message and f"line {80_001:,}" in message, message
    assert "data.encoding_errors" in message
    replaced = "".join(iter_texts([str(path)], encoding_errors="replace"))
    skipped = "".join(iter_texts([str(path)], encoding_errors="skip"))
    assert "na\ufffdve" in replaced and "nave" in skipped and "\ufffd" not in skipped
    assert len(replaced) == len(skipped) + 1


def test_a_tokenizer_recipe_reads_past_bad_bytes_with_encoding_errors_skip(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus, docs=30, name="good.jsonl")
    (corpus / "bad.txt").write_bytes(b"some text with a \xff bad byte\n" * 50)
    recipe = load_recipe("tokenizer/tiny", [f"data.train=[{corpus}]", "data.validation=null", "data.heldout_docs=0", "tokenizer.vocab_size=400",
                                            "tokenizer.pad_vocab_to_multiple_of=1", f"output_dir={tmp_path / 'tok'}"])
    path = tmp_path / "tok.yaml"
    path.write_text(recipe_to_yaml(recipe))
    err = assert_clean_error(run("tokenizer", "train", str(path)), "bad.txt", "byte 17", "data.encoding_errors")
    assert "line 1" in err and not (tmp_path / "tok").exists()
    result = run("tokenizer", "train", str(path), "--set", "data.encoding_errors=skip")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    # A long training run says what it is doing while it reads the corpus.
    assert "tokenizer: read 31 documents" in result.stderr
    assert "training the bpe model (vocab 400) on them" in result.stderr


def test_the_tokenizer_trainers_show_their_own_progress_on_a_terminal():
    from llmkit.recipes import TokenizerSpec
    from llmkit.stages.tokenizer import build_tokenizer

    for kind in ("bpe", "unigram", "wordpiece"):
        spec = TokenizerSpec(type=kind, vocab_size=1000)
        assert build_tokenizer(spec, ["<|unk|>"], show_progress=True)[1].show_progress is True
        assert build_tokenizer(spec, ["<|unk|>"])[1].show_progress is False


@pytest.mark.parametrize("streaming", [True, False])
def test_a_hub_source_fails_at_once_when_the_hub_does_not_resolve(monkeypatch, streaming):
    import socket

    import datasets

    from llmkit.data.sources import iter_texts
    from llmkit.recipes import HubSource

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def no_download(*args, **kwargs):
        raise AssertionError("load_dataset must not be called: it would retry for half a minute")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(datasets, "load_dataset", no_download)
    started = time.perf_counter()
    with pytest.raises(DataError, match="unreachable"):
        next(iter_texts([HubSource(hub="someone/not-cached-here", streaming=streaming)]))
    assert time.perf_counter() - started < 2


def test_plot_says_when_it_creates_the_output_directory(tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    events = [{"event": "train", "step": s, "tokens": 64 * s, "loss": 5.0 / s, "lr": 1e-3} for s in range(1, 4)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    target = tmp_path / "figures" / "deep" / "curves.png"
    result = run("plot", str(run_dir), "-o", str(target))
    assert result.exit_code == 0 and target.is_file()
    assert f"(created the directory {target.parent})" in result.stdout
    again = run("plot", str(run_dir), "-o", str(target))
    assert again.exit_code == 0 and "created" not in again.stdout


def test_the_budget_rule_lives_in_the_schema():
    # recipe_from_dict (no file, no --set) refuses both budgets as well.
    raw = yaml.safe_load(load_recipe("pretrain/tiny").model_dump_json())
    raw["train"]["max_tokens"] = 10
    with pytest.raises(RecipeError, match="both set"):
        recipe_from_dict(raw)


def test_every_computing_command_chooses_threads_the_same_way(monkeypatch):
    # Report 2026-12-06 section 8: only the quickstart adapted to a busy machine; now every command that runs models does.
    import os

    import torch

    from llmkit.commands import COMMANDS
    from llmkit.training import hardware

    assert {c.name for c in COMMANDS if c.computes} == {"pretrain", "finetune", "eval", "generate", "quickstart", "scale sweep", "scale hp", "scale eval"}
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(hardware, "busy_cores", lambda cores: 0.3)  # an idle machine: one thread per core
        assert hardware.choose_threads().startswith("2 per process (2 cores, 0.3 kept busy") and torch.get_num_threads() == 2
        monkeypatch.setattr(hardware, "busy_cores", lambda cores: 1.6)
        note = hardware.choose_threads()
        assert torch.get_num_threads() == 1 and note.startswith("1 per process (2 cores, 1.6 kept busy") and "OMP_NUM_THREADS" in note
        assert hardware.threads_note() == note
        torch.set_num_threads(2)
        monkeypatch.setattr(hardware, "busy_cores", lambda cores: 0.0)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of a launcher share the cores
        assert "2 processes share them" in hardware.choose_threads() and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice wins
        assert hardware.choose_threads() == "2 per process (OMP_NUM_THREADS=2)" and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_a_training_header_states_the_threads(tmp_path, monkeypatch, tokenizer_dir):
    from pretrain_helpers import recipe_dict, write_corpus, write_recipe

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LLMKIT_PEAK_FLOPS", "1e11")
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        recipe = recipe_dict(tmp_path, tokenizer_dir, write_corpus(tmp_path, docs=8), train={"max_steps": 2, "save_every": 2, "eval_every": 2})
        result = run("pretrain", str(write_recipe(tmp_path / "pre.yaml", recipe)))
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert "threads:          1 per process (OMP_NUM_THREADS=1)" in result.output


def test_a_missing_run_that_a_bundled_recipe_writes_names_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh directory: no runs/ yet
    assert_clean_error(run("pretrain", "pretrain/tiny"), "tokenizer: runs/tokenizer-tiny does not exist",
                       "run `llmkit tokenizer train tokenizer/tiny` first")
    assert_clean_error(run("pretrain", "pretrain/tiny", "--set", "tokenizer=runs/mine"), "runs/mine does not exist",
                       "run the stage that writes it first")
    assert not (tmp_path / "runs").exists()


def test_busy_cores_are_measured_from_proc_stat(monkeypatch):
    import os

    from llmkit.training import hardware

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat here")
    busy = hardware.busy_cores(2)
    assert 0.0 <= busy <= 2.0


def test_the_rouge_line_says_when_the_base_outputs_are_empty_or_the_tuned_ones_near_constant(tmp_path):
    # Report 2026-12-06 section 8: the ROUGE jump compared an all-empty base output with near-constant summaries.
    from llmkit.stages.quickstart import _rouge_line

    protocol = {"test_records": {"scored": 4, "available": 10, "max_samples": 4}}
    metrics = {"models": [
        {"model": str(tmp_path / "pretrain"), "metrics": {"rougeL": 0.0}, "protocol": protocol},
        {"model": str(tmp_path / "finetune"), "metrics": {"rougeL": 0.21}, "protocol": protocol},
    ]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")

    def predictions(base: list[str], tuned: list[str]) -> None:
        rows = [{"model": str(tmp_path / "pretrain"), "prediction": p} for p in base]
        rows += [{"model": str(tmp_path / "finetune"), "prediction": p} for p in tuned]
        (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    predictions(["", " ", "", ""], ["Return the path.", "Return the path.", "Return the path.", "Open a file."])
    line = _rouge_line(tmp_path)
    assert line.startswith("fine-tuning took ROUGE-L from 0.000 (pretrained only) to 0.210 (first 4 of 10 test records)")
    assert "all 4 outputs of the pretrained model were empty" in line
    assert "2 distinct summaries for 4 documents" in line
    predictions(["The", "", "a b", "c"], ["Return the path.", "Open a file.", "Close it.", "Read bytes."])
    assert "\n" not in _rouge_line(tmp_path)  # honest outputs on both sides: the plain line
