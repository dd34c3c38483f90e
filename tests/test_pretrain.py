"""Pretraining end to end on tiny models: loss falls, the output loads and generates, bad input exits 2.

    pytest tests/test_pretrain.py -q
"""

from __future__ import annotations

import json
import math

import pytest
import yaml
from pretrain_helpers import (
    read_events,
    recipe_dict,
    run_in_process,
    tree_snapshot,
    write_corpus,
    write_recipe,
)
from typer.testing import CliRunner

from llmkit.cli import app


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Train and validation jsonl files of pydoc topics."""
    d = tmp_path_factory.mktemp("corpus")
    return write_corpus(d, docs=24), write_corpus(d, docs=6, name="val.jsonl", offset=40)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer_dir, corpus):
    """One complete tiny run (40 steps) with validation."""
    tmp = tmp_path_factory.mktemp("pretrain")
    recipe = recipe_dict(tmp, tokenizer_dir, corpus[0], corpus[1], train={"max_steps": 40, "eval_every": 20, "save_every": 20})
    summary = run_in_process(recipe)
    return recipe, summary


def test_loss_falls_and_metrics_are_logged(finished_run):
    recipe, summary = finished_run
    train = read_events(recipe["output_dir"], "train")
    evals = read_events(recipe["output_dir"], "eval")
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, (train[0], train[-1])
    assert [e["step"] for e in evals] == [20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert math.isclose(evals[-1]["val_ppl"], math.exp(evals[-1]["val_loss"]), rel_tol=1e-4)
    for key in ("event", "step", "tokens", "loss", "lr", "tokens_per_s", "mfu"):
        assert key in train[-1]
    # tokens counts every input token: 4 sequences x 32 tokens per step
    assert train[-1]["tokens"] == 40 * 4 * 32
    assert summary["step"] == 40 and summary["val_loss"] == evals[-1]["val_loss"]


def test_output_loads_with_auto_classes_and_generates(finished_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = finished_run[0]["output_dir"]
    from pathlib import Path

    names = {p.name for p in Path(out).iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "recipe.yaml", "metrics.jsonl"} <= names
    assert not any(n.endswith(".bin") for n in names)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tokenizer)
    # The final model is the last checkpoint's weights, and its card states the run's length.
    from safetensors.torch import load_file

    from llmkit import rundir

    saved = load_file(str(rundir.latest_checkpoint(out) / "model.safetensors"))
    state = model.state_dict()
    assert saved and all(torch.equal(state[name], value) for name, value in saved.items())
    assert f"steps: {finished_run[1]['step']:,}," in (Path(out) / "README.md").read_text()


def test_validate_prints_the_plan(tmp_path, tokenizer_dir, corpus):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tmp_path, tokenizer_dir, corpus[0]))
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "parameters:" in result.output and "FLOPs per token:" in result.output and "tokens per param:" in result.output
    assert "tokens per step:  4 micro-batch x 1 accum x 32 seq_len x 1 process = 128" in result.output


def test_flops_and_parameter_counts_match_an_independent_count(tokenizer_dir, tmp_path, corpus):
    from llmkit.models import flops_per_token, meta_model, model_config, parameter_counts
    from llmkit.recipes import recipe_from_dict

    recipe = recipe_from_dict(recipe_dict(tmp_path, tokenizer_dir, corpus[0]), stage="pretrain")
    config = model_config(recipe, vocab_size=512)
    counts = parameter_counts(meta_model(config))
    h, i, layers, v = 32, 64, 2, 512
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q,k,v,o + gate,up,down + two norms
    assert counts["total"] == v * h + layers * per_layer + h  # tied embedding + final norm
    assert flops_per_token(config, counts["matmul"], 32) == 6 * counts["total"] + 12 * layers * h * 32


def _bad(tmp_path, tokenizer_dir, corpus, **sections):
    return write_recipe(tmp_path / "bad.yaml", recipe_dict(tmp_path, tokenizer_dir, corpus, **sections))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("seq_len", "data.seq_len (128) is larger than the model's max positions (64)"),
        ("vocab", "vocab_size is 100"),
        ("empty", "empty"),
        ("too_small", "fewer than one optimizer step"),
        ("text_field", "body"),
    ],
)
def test_bad_input_exits_2_and_changes_nothing(tmp_path, tokenizer_dir, corpus, case, expected):
    train = corpus[0]
    sections: dict = {}
    if case == "seq_len":
        sections = {"data": {"train": [str(train)], "seq_len": 128, "cache_dir": str(tmp_path / "cache")}}
    elif case == "vocab":
        sections = {"model": {"type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "max_position_embeddings": 64, "vocab_size": 100}}
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("", encoding="utf-8")
        train = tmp_path / "empty.txt"
    elif case == "too_small":
        (tmp_path / "small.jsonl").write_text(json.dumps({"text": "tiny corpus"}) + "\n", encoding="utf-8")
        train = tmp_path / "small.jsonl"
    elif case == "text_field":
        (tmp_path / "body.jsonl").write_text(json.dumps({"body": "some text " * 50}) + "\n", encoding="utf-8")
        train = tmp_path / "body.jsonl"
    recipe = _bad(tmp_path, tokenizer_dir, train, **sections)
    before = tree_snapshot(tmp_path / "run")
    result = CliRunner().invoke(app, ["pretrain", str(recipe)])
    assert result.exit_code == 2, result.output
    assert expected in result.output, result.output
    assert "Traceback" not in result.output
    assert tree_snapshot(tmp_path / "run") == before == {}


def test_output_dir_holding_another_run_is_refused(tmp_path, tokenizer_dir, corpus, finished_run):
    recipe, _ = finished_run
    other = dict(recipe, train={**recipe["train"], "lr": 5e-3})
    path = write_recipe(tmp_path / "other.yaml", other)
    before = tree_snapshot(recipe["output_dir"])
    result = CliRunner().invoke(app, ["pretrain", str(path)])
    assert result.exit_code == 2, result.output
    assert "holds a different run (train.lr" in result.output and "--overwrite" in result.output
    assert tree_snapshot(recipe["output_dir"]) == before
    # A directory of unrelated files is refused too.
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine", encoding="utf-8")
    path = write_recipe(tmp_path / "stuff.yaml", dict(recipe, output_dir=str(tmp_path / "stuff")))
    result = CliRunner().invoke(app, ["pretrain", str(path)])
    assert result.exit_code == 2 and "not an llmkit run" in result.output


def test_rerunning_a_finished_run_with_more_steps_continues_it(tmp_path, tokenizer_dir, corpus):
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus[0], train={"max_steps": 8})
    run_in_process(recipe)
    longer = dict(recipe, train={**recipe["train"], "max_steps": 12})
    summary = run_in_process(longer)
    assert summary["resumed_from"] == 8 and summary["step"] == 12
    assert [e["step"] for e in read_events(recipe["output_dir"], "train")] == [2, 4, 6, 8, 10, 12]
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["train"]["max_steps"] == 12


def test_rerunning_a_finished_run_keeps_its_summary(tmp_path, tokenizer_dir, corpus):
    # Report 2026-12-06: the rerun wrote summary.json again with train_loss null.
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus[0], train={"max_steps": 4})
    first = run_in_process(recipe)
    last_logged = read_events(recipe["output_dir"], "train")[-1]["loss"]
    assert first["train_loss"] == pytest.approx(last_logged, abs=1e-6)
    again = run_in_process(recipe)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))
    assert again["train_loss"] == saved["train_loss"] == first["train_loss"]
    assert saved["val_loss"] == first["val_loss"] and saved["step"] == 4


def test_nonfinite_loss_stops_naming_the_step(tmp_path, tokenizer_dir, corpus):
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus[0], train={"lr": 1e6, "grad_clip": None, "warmup_steps": 0, "save_every": 2})
    from llmkit.errors import TrainingError

    with pytest.raises(TrainingError, match=r"non-finite loss \(\w+\) at step \d+.*last good checkpoint is .*step-0000000\d"):
        run_in_process(recipe)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_skip_nonfinite_steps_skips_then_stops(tmp_path, tokenizer_dir, corpus):
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus[0], train={"lr": 1e6, "grad_clip": None, "warmup_steps": 0, "skip_nonfinite_steps": 2})
    from llmkit.errors import TrainingError

    with pytest.raises(TrainingError, match="non-finite loss"):
        run_in_process(recipe)
    kinds = [e["event"] for e in read_events(recipe["output_dir"])]
    assert kinds.count("skip") == 2 and kinds[-1] == "nonfinite"


def test_gradient_checkpointing_and_tensorboard_do_not_change_the_loss(tmp_path, tokenizer_dir, corpus):
    base = recipe_dict(tmp_path, tokenizer_dir, corpus[0], train={"max_steps": 4, "log_every": 1})
    plain = run_in_process(dict(base, output_dir=str(tmp_path / "plain")))
    checkpointed = run_in_process(
        dict(base, output_dir=str(tmp_path / "ckpt"), train={**base["train"], "gradient_checkpointing": True, "trackers": ["tensorboard"]})
    )
    assert plain["train_loss"] == pytest.approx(checkpointed["train_loss"], rel=1e-6)
    assert list((tmp_path / "ckpt").rglob("events.out.tfevents*")), "tensorboard wrote no event file"


def test_continued_pretraining_from_a_checkpoint(tmp_path, tokenizer_dir, tiny_model_dir, corpus):
    from safetensors.torch import load_file

    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus[0], model={"path": str(tiny_model_dir)}, train={"max_steps": 4})
    recipe["model"] = {"path": str(tiny_model_dir)}
    result = CliRunner().invoke(app, ["validate", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 0 and "from checkpoint" in result.output, result.output
    run_in_process(recipe)
    before, after = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(tmp_path / "run" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not before[k].equal(after[k]) for k in before)  # it trained from those weights


def test_overwrite_replaces_a_different_run(tmp_path, tokenizer_dir, corpus):
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus[0], train={"max_steps": 4})
    run_in_process(recipe)
    other = dict(recipe, train={**recipe["train"], "lr": 5e-3, "max_steps": 2, "save_every": 2})
    summary = run_in_process(other, overwrite=True)
    assert summary["resumed_from"] is None and summary["step"] == 2
    assert [e["step"] for e in read_events(recipe["output_dir"], "train")] == [2]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000002"]
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["train"]["lr"] == 5e-3


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_matches_the_model_logits_loss_and_gradients(monkeypatch, tied):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmkit.training import loss as lm_loss

    monkeypatch.setattr(lm_loss, "chunk_rows", lambda vocab, device: 7)  # several chunks and a ragged last one
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, tie_word_embeddings=tied, use_cache=False)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 96, (3, 12))
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    labels[2, 9:] = -100  # padding
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    nll, count = lm_loss.plain_sum_nll(model(**inputs).logits, labels)
    (nll / count).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    head = lm_loss.ChunkedHead.attach(model)
    assert head is not None and head.verified(inputs, lambda: torch.autocast("cpu", enabled=False))
    chunked, chunked_count = head.sum_nll(model, inputs, labels, lambda: torch.autocast("cpu", enabled=False))
    (chunked / chunked_count).backward()
    assert chunked_count == int(count)
    torch.testing.assert_close(chunked, nll, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_falls_back_for_soft_capped_logits_and_handles_lora():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    from llmkit.training import loss as lm_loss

    small = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 2, "head_dim": 16}
    assert lm_loss.ChunkedHead.attach(Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=30.0))) is None
    torch.manual_seed(0)
    lora = get_peft_model(LlamaForCausalLM(LlamaConfig(**small)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 64, (2, 10))
    nll, count = lm_loss.plain_sum_nll(lora(input_ids=ids).logits, ids)
    nll.backward()
    expected = {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}
    lora.zero_grad(set_to_none=True)
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    head = lm_loss.ChunkedHead.attach(lora)
    assert head is not None and head.verified({"input_ids": ids}, no_autocast)
    chunked, _ = head.sum_nll(lora, {"input_ids": ids}, ids, no_autocast)
    chunked.backward()
    torch.testing.assert_close(chunked, nll, rtol=1e-5, atol=1e-5)
    for name, p in lora.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
