"""Reliability of resume, models, recipes and library errors: each test reproduces a reported defect.

    pytest tests/test_reliability_models.py -q            # the 2-process resume is marked slow

Resume: with dropout (attention and hidden), gradient accumulation, streaming, LoRA and 2 processes,
an interrupted-then-resumed run ends bit-identical to an uninterrupted one. Models: LoRA adapters
come from train.seed, encoders are refused, config values transformers rejects and weights it cannot
read give one line, chat templates that fail give one line, remote code never runs. Recipes:
duplicate keys, non-finite numbers, single labels and short betas are refused with one line.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pretrain_helpers import (
    TINY_MODEL,
    final_weights,
    recipe_dict,
    run_in_process,
    subprocess_env,
    write_corpus,
    write_recipe,
)
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.training import loop

runner = CliRunner()
STEPS = 12
STOP_AT = 6


class _Stop(Exception):
    """Stands in for the process dying right after a checkpoint was written."""


def _one_error_line(result, *needles: str) -> str:
    """Exit code 2, one `error:` line holding every needle, no traceback; returns the line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _stopping_after(monkeypatch, step: int) -> None:
    """Make the loop raise _Stop right after it has saved the checkpoint of `step` (like SIGKILL then)."""
    real = loop._save

    def save_then_stop(run):
        path = real(run)
        if run.state.step == step:
            raise _Stop
        return path

    monkeypatch.setattr(loop, "_save", save_then_stop)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("reliability-corpus"), docs=24)


# ----------------------------------------------------------------------------------------------
# Defect 2: exact resume with dropout, accumulation, streaming (pretraining)
# ----------------------------------------------------------------------------------------------

GPT2 = {"type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "tie_word_embeddings": True}
RESUME_CASES = {
    "attention_dropout": ({**TINY_MODEL, "attention_dropout": 0.1}, {}, {}),
    "hidden_dropout": ({**GPT2, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}, {}, {}),
    "grad_accum": ({**TINY_MODEL, "attention_dropout": 0.1}, {}, {"grad_accum_steps": 2}),
    "streaming": ({**TINY_MODEL, "attention_dropout": 0.1}, {"streaming": True}, {}),
}


def _pretrain_recipe(tmp: Path, tokenizer_dir: Path, corpus: Path, name: str, case: str) -> dict:
    model, data, train = RESUME_CASES[case]
    recipe = recipe_dict(tmp, tokenizer_dir, corpus, data=data, train={"max_steps": STEPS, "save_every": 3, "eval_every": 1000, **train})
    recipe["model"] = dict(model)
    recipe["output_dir"] = str(tmp / name)
    recipe["data"]["cache_dir"] = str(tmp.parent / "reliability-cache")
    return recipe


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_interrupted_then_resumed_pretraining_is_bit_identical(case, tmp_path, tokenizer_dir, corpus, monkeypatch):
    reference = _pretrain_recipe(tmp_path, tokenizer_dir, corpus, "reference", case)
    run_in_process(reference)
    interrupted = _pretrain_recipe(tmp_path, tokenizer_dir, corpus, "interrupted", case)
    with monkeypatch.context() as patch:
        _stopping_after(patch, STOP_AT)
        with pytest.raises(_Stop):
            run_in_process(interrupted)
    assert not (Path(interrupted["output_dir"]) / "model.safetensors").exists()
    if case == "attention_dropout":
        # This resumed run measures the peak FLOP/s itself (an empty LLMKIT_PEAK_FLOPS means "probe"): the
        # probe must not consume the RNG streams the checkpoint restored, nor may the new DataLoader iterator.
        monkeypatch.setenv("LLMKIT_PEAK_FLOPS", "")
    summary = run_in_process(interrupted)
    assert summary["resumed_from"] == STOP_AT
    assert _same(final_weights(interrupted["output_dir"]), final_weights(reference["output_dir"]))
    if case == "attention_dropout":
        # ... and dropout really draws from the RNG here: without it the weights differ.
        plain = _pretrain_recipe(tmp_path, tokenizer_dir, corpus, "no-dropout", case)
        plain["model"]["attention_dropout"] = 0.0
        run_in_process(plain)
        assert not _same(final_weights(plain["output_dir"]), final_weights(reference["output_dir"]))


def _launch(recipe_path: Path) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "llmkit", "pretrain", str(recipe_path),
    ]


@pytest.mark.slow
def test_two_process_resume_with_dropout_is_bit_identical(tmp_path, tokenizer_dir, corpus):
    """accelerate launch --multi_gpu --num_processes 2 (gloo on CPU): SIGTERM, rerun, same weights as uninterrupted."""
    reference = _pretrain_recipe(tmp_path, tokenizer_dir, corpus, "two-reference", "attention_dropout")
    reference["train"].update(max_steps=20, save_every=5)
    result = subprocess.run(_launch(write_recipe(tmp_path / "ref.yaml", reference)), env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    interrupted = dict(reference, output_dir=str(tmp_path / "two-interrupted"))
    path = write_recipe(tmp_path / "int.yaml", interrupted)
    trace = tmp_path / "trace"
    trace.mkdir()
    proc = subprocess.Popen(_launch(path), env=subprocess_env(LLMKIT_TRACE_SAMPLES=str(trace)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = trace / "samples-rank0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if samples.is_file() and len(samples.read_text().splitlines()) >= 7:
            proc.send_signal(signal.SIGTERM)  # the launcher forwards it to both workers
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=300)
    out = Path(interrupted["output_dir"])
    assert not (out / "model.safetensors").exists(), "finished before the signal: " + err[-2000:]
    assert list((out / "checkpoints").glob("step-*")), err[-3000:]
    result = subprocess.run(_launch(path), env=subprocess_env(LLMKIT_PEAK_FLOPS=""), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout + result.stderr
    assert _same(final_weights(out), final_weights(reference["output_dir"]))


# ----------------------------------------------------------------------------------------------
# Defects 2 and 3: LoRA adapters from train.seed, and exact LoRA resume with lora.dropout 0.05
# ----------------------------------------------------------------------------------------------


def _lora_recipe(tmp: Path, model_dir: Path, name: str, seed: int = 3) -> dict:
    return {
        "stage": "finetune",
        "output_dir": str(tmp / name),
        "model": {"path": str(model_dir)},
        "task": {"type": "summarization"},
        "data": {"train": "builtin:docsum/train", "seq_len": 64, "max_samples": 32, "cache_dir": str(tmp / "cache")},
        "train": {"max_steps": 8, "micro_batch_size": 4, "lr": 5e-3, "save_every": 2, "eval_every": 1000, "log_every": 1,
                  "seed": seed, "mixed_precision": "no"},
        "lora": {"enabled": True, "r": 4, "alpha": 8},  # lora.dropout: its default, 0.05
    }


def _finetune(recipe: dict) -> dict:
    import torch
    from accelerate.state import AcceleratorState

    from llmkit.recipes import recipe_from_dict
    from llmkit.stages.finetune import run as finetune

    os.environ.setdefault("LLMKIT_PEAK_FLOPS", "1e11")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return finetune(recipe_from_dict(json.loads(json.dumps(recipe)), stage="finetune"))
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)


def _adapters(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "adapter_model.safetensors"))


def test_lora_adapters_are_initialised_from_train_seed(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from llmkit.models import apply_lora
    from llmkit.recipes import recipe_from_dict

    def adapter_init(seed: int, noise: int) -> dict:
        torch.manual_seed(noise)  # whatever the global RNG holds before must not matter
        torch.rand(noise + 1)
        model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), recipe_from_dict(_lora_recipe(tmp_path, tiny_model_dir, "x", seed)))
        return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_A" in k}

    first, again, other = adapter_init(3, 11), adapter_init(3, 99), adapter_init(4, 11)
    assert first and _same(first, again)
    assert all(not first[k].equal(other[k]) for k in first)


def test_interrupted_then_resumed_lora_finetune_is_bit_identical(tiny_model_dir, tmp_path, monkeypatch):
    _finetune(_lora_recipe(tmp_path, tiny_model_dir, "reference"))
    interrupted = _lora_recipe(tmp_path, tiny_model_dir, "interrupted")
    with monkeypatch.context() as patch:
        _stopping_after(patch, 4)
        with pytest.raises(_Stop):
            _finetune(interrupted)
    summary = _finetune(interrupted)
    assert summary["resumed_from"] == 4
    # Equal only if both runs drew the same adapters from train.seed and the same dropout masks after resume.
    reference = _adapters(tmp_path / "reference")
    assert reference and _same(_adapters(tmp_path / "interrupted"), reference)


# ----------------------------------------------------------------------------------------------
# Defect 4: encoders (bidirectional attention) are not causal language models
# ----------------------------------------------------------------------------------------------

ENCODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra"])
def test_encoder_model_types_are_refused_by_validate_and_pretrain(model_type, tmp_path, tokenizer_dir, corpus):
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus)
    recipe["model"] = {"type": model_type, **ENCODER}
    path = write_recipe(tmp_path / "encoder.yaml", recipe)
    message = (
        f"model.type: {model_type} is an encoder (bidirectional attention), not a causal language model; "
        "choose a decoder such as llama, gpt2, qwen2"
    )
    for command in (["validate"], ["pretrain"], ["data", "prepare"]):
        _one_error_line(runner.invoke(app, [*command, str(path)]), message)
    assert not Path(recipe["output_dir"]).exists()
    assert not Path(recipe["data"]["cache_dir"]).exists()  # refused before the corpus is tokenized


def _is_causal(model, vocab: int) -> bool:
    """Logits at positions before i do not change when token i changes."""
    import torch

    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % vocab
    with torch.no_grad():
        return torch.allclose(model(input_ids=ids).logits[0, :10], model(input_ids=changed).logits[0, :10])


def test_an_encoder_the_recipe_makes_a_decoder_is_accepted_and_causal(tmp_path, tokenizer_dir, corpus):
    """The documented way out: model.is_decoder: true gives bert a causal mask (and the check measures it)."""
    from transformers import AutoModelForCausalLM

    from llmkit.models import model_config
    from llmkit.recipes import recipe_from_dict

    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus)
    recipe["model"] = {"type": "bert", **ENCODER}
    encoder = model_config(recipe_from_dict(dict(recipe, model={**recipe["model"], "is_decoder": True})), 128)
    assert _is_causal(AutoModelForCausalLM.from_config(encoder).eval(), 128)
    # what the refusal protects against: the same config without is_decoder sees later tokens
    encoder.is_decoder = False
    assert not _is_causal(AutoModelForCausalLM.from_config(encoder).eval(), 128)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny BertLMHeadModel (is_decoder False) saved with the session tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertLMHeadModel

    out = tmp_path_factory.mktemp("bert-model")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    BertLMHeadModel(BertConfig(vocab_size=len(tokenizer), **ENCODER)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_eval_and_generate_refuse_an_encoder_checkpoint(bert_dir, tmp_path, corpus):
    _one_error_line(runner.invoke(app, ["generate", str(bert_dir), "hi"]), f"MODEL: {bert_dir} holds a bert model", "is an encoder")
    recipe = {"stage": "eval", "output_dir": str(tmp_path / "eval"), "model": {"path": str(bert_dir)},
              "data": {"test": [str(corpus)], "seq_len": 32, "max_samples": 2}, "metrics": ["perplexity"]}
    result = runner.invoke(app, ["eval", str(write_recipe(tmp_path / "eval.yaml", recipe))])
    _one_error_line(result, f"model.path: {bert_dir} holds a bert model", "not a causal language model")
    assert not (tmp_path / "eval" / "metrics.json").exists()


# ----------------------------------------------------------------------------------------------
# Defects 11, 19, 22: values transformers or torch would reject, and validation gaps
# ----------------------------------------------------------------------------------------------

BAD_VALUES = {
    "hidden_not_divisible": (["model.hidden_size=65"], "model.hidden_size (65) must be divisible by model.num_attention_heads (2)"),
    "zero_heads": (["model.num_attention_heads=0"], "model.num_attention_heads: must be a positive integer, got 0"),
    "negative_layers": (["model.num_hidden_layers=-1"], "model.num_hidden_layers: must be a positive integer, got -1"),
    "zero_layers": (["model.num_hidden_layers=0"], "model.num_hidden_layers: must be a positive integer, got 0"),
    "negative_size": (["model.intermediate_size=-5"], "model.intermediate_size: must be a positive integer, got -5"),
    "kv_heads": (["model.num_key_value_heads=3"], "model.num_attention_heads (2) must be divisible by model.num_key_value_heads (3)"),
    "not_a_number": (["model.hidden_size=wide"], "model.hidden_size: must be a positive integer, got 'wide'"),
    # transformers' own checks, after llmkit's: its class validator, and its field validator
    "class_validator": (["model.head_dim=16", "model.hidden_size=65"], "model: The hidden size (65) is not a multiple"),
    "field_validator": (["model.initializer_range=5.0"], "model.initializer_range: Value must be greater or equal to 0.0"),
    "dropout_range": (["model.attention_dropout=1.5"], "model.attention_dropout: a dropout probability must be in [0, 1), got 1.5"),
    "nan_config": (["model.rms_norm_eps=.nan"], "model.rms_norm_eps: must be a finite number, got nan"),
    "lr_inf": (["train.lr=.inf"], "train.lr: Input should be a finite number (got inf)"),
    "lr_nan": (["train.lr=.nan"], "train.lr: Input should be a finite number (got nan)"),
    "clip_inf": (["train.grad_clip=.inf"], "train.grad_clip: Input should be a finite number"),
    "betas_one": (["train.betas=[0.9]"], "train.betas: needs 2 values, got 1"),
    "betas_three": (["train.betas=[0.9, 0.95, 0.99]"], "train.betas: needs 2 values, got 3"),
    "betas_range": (["train.betas=[0.9, 1.0]"], "train.betas.1: Input should be less than 1"),
}


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory, tokenizer_dir, corpus) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("bad-values")
    recipe = recipe_dict(tmp, tokenizer_dir, corpus)
    return write_recipe(tmp / "pre.yaml", recipe), recipe


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_model_and_train_values_are_one_line_naming_the_key(case, tiny_recipe):
    path, recipe = tiny_recipe
    sets, message = BAD_VALUES[case]
    _one_error_line(runner.invoke(app, ["validate", str(path), *[a for s in sets for a in ("--set", s)]]), message)


@pytest.mark.parametrize("setting", ["model.num_hidden_layers=-1", "train.lr=.inf", "model.num_attention_heads=0"])
def test_pretrain_refuses_the_reported_values_before_writing(setting, tiny_recipe):
    path, recipe = tiny_recipe
    _one_error_line(runner.invoke(app, ["pretrain", str(path), "--set", setting]), setting.split("=")[0])
    assert not Path(recipe["output_dir"]).exists()


def test_size_overrides_of_a_checkpoint_are_checked_too(tmp_path, tiny_model_dir):
    recipe = _lora_recipe(tmp_path, tiny_model_dir, "ft")
    recipe["model"]["num_hidden_layers"] = -1
    result = runner.invoke(app, ["validate", str(write_recipe(tmp_path / "ft.yaml", recipe))])
    _one_error_line(result, "model.num_hidden_layers: must be a positive integer, got -1")


@pytest.mark.parametrize("labels, message", [
    (["positive"], "task.labels: classification needs at least 2 labels, got 1 (positive)"),
    (["positive", "positive"], "task.labels: 'positive' is listed twice"),
    (["positive", " "], "task.labels: a label is empty"),
])
def test_classification_labels_need_two_distinct_words(labels, message, tmp_path, tiny_model_dir):
    recipe = _lora_recipe(tmp_path, tiny_model_dir, "cls")
    recipe["task"] = {"type": "classification", "labels": labels}
    _one_error_line(runner.invoke(app, ["validate", str(write_recipe(tmp_path / "cls.yaml", recipe))]), message)


def test_generate_on_a_model_without_tokenizer_says_what_to_do(tmp_path, tiny_model_dir, tokenizer_dir, corpus):
    model = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dir, model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    line = _one_error_line(runner.invoke(app, ["generate", str(model), "hi"]), f"MODEL: {model}: no tokenizer files", "copy the tokenizer files")
    assert "`tokenizer:`" not in line  # generate has no such option
    # eval can name a tokenizer instead, and then the directory is fine (it used to be refused anyway)
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n")
    recipe = {"stage": "eval", "output_dir": str(tmp_path / "eval"), "model": {"path": str(model)}, "tokenizer": str(tokenizer_dir),
              "data": {"test": [str(short)], "seq_len": 32}, "metrics": ["perplexity"]}
    result = runner.invoke(app, ["eval", str(write_recipe(tmp_path / "eval.yaml", recipe))])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())


# ----------------------------------------------------------------------------------------------
# Defect 16: duplicate keys in a recipe
# ----------------------------------------------------------------------------------------------


def test_duplicate_keys_are_refused_with_both_lines(tiny_recipe, tmp_path):
    path, _ = tiny_recipe
    text = path.read_text()
    doubled = tmp_path / "dup.yaml"
    doubled.write_text(text + "train:\n  lr: 1.0e-3\n")
    first = 1 + next(i for i, line in enumerate(text.splitlines()) if line.startswith("train:"))
    last = len(text.splitlines()) + 1
    _one_error_line(runner.invoke(app, ["validate", str(doubled)]), f"{doubled}:{last}: train: duplicate key (first at line {first})")
    nested = tmp_path / "nested.yaml"
    nested.write_text(text.replace("  lr: 0.01\n", "  lr: 0.01\n  lr: 0.02\n"))
    _one_error_line(runner.invoke(app, ["validate", str(nested)]), "train.lr: duplicate key (first at line")
    result = runner.invoke(app, ["validate", str(path), "--set", "train={lr: 1.0e-3, lr: 2.0e-3}"])
    _one_error_line(result, "train.lr: duplicate key")


def test_a_merge_key_may_still_be_overridden():
    from llmkit.recipes import load_yaml

    assert load_yaml("base: &b {lr: 1, seed: 2}\ntrain:\n  <<: *b\n  lr: 3\n")["train"] == {"lr": 3, "seed": 2}


# ----------------------------------------------------------------------------------------------
# Defect 12: weights that cannot be loaded (generate, finetune, eval)
# ----------------------------------------------------------------------------------------------


class _Payload:
    """A pickle that would run a command when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, tiny_model_dir) -> dict:
    """Copies of the tiny model: truncated safetensors; a .bin holding a code pickle; a .bin holding no weights."""
    import torch

    root = tmp_path_factory.mktemp("broken-models")
    models = {}
    for kind in ("truncated", "pickle", "no_weights"):
        models[kind] = shutil.copytree(tiny_model_dir, root / kind)
    weights = models["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 1000])
    for kind in ("pickle", "no_weights"):
        (models[kind] / "model.safetensors").unlink()
    with open(models["pickle"] / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload(root / "PWNED")}, f)
    torch.save({"step": 1}, models["no_weights"] / "pytorch_model.bin")  # weights_only accepts it; it holds no tensor
    return {"root": root, **models}


WEIGHT_MESSAGES = {
    "truncated": "model.safetensors is truncated or corrupt (SafetensorError",
    "pickle": "pytorch_model.bin: refused to load: it holds Python objects other than tensors",
    "no_weights": "its weights lack",
}


def _stage_command(stage: str, model: Path, tmp: Path) -> list[str]:
    if stage == "generate":
        return ["generate", str(model), "hi", "--max-new-tokens", "2"]
    if stage == "finetune":
        recipe = _lora_recipe(tmp, model, "ft")
        recipe["lora"] = {"enabled": False}
    else:
        recipe = {"stage": "eval", "output_dir": str(tmp / "eval"), "model": {"path": str(model)},
                  "data": {"test": "builtin:docsum/test", "text_field": "document", "seq_len": 32, "max_samples": 2},
                  "metrics": ["perplexity"]}
    return [stage, str(write_recipe(tmp / f"{stage}.yaml", recipe))]


@pytest.mark.parametrize("stage", ["generate", "finetune", "eval"])
@pytest.mark.parametrize("kind", list(WEIGHT_MESSAGES))
def test_weights_that_cannot_be_loaded_are_one_line_naming_the_file(kind, stage, broken_models, tmp_path):
    model = broken_models[kind]
    line = _one_error_line(runner.invoke(app, _stage_command(stage, model, tmp_path)), WEIGHT_MESSAGES[kind])
    assert str(model) in line
    assert not (broken_models["root"] / "PWNED").exists()  # the payload never ran
    assert not (tmp_path / "ft" / "model.safetensors").exists() and not (tmp_path / "eval" / "metrics.json").exists()


def test_a_truncated_lora_adapter_is_one_line(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, task_type="CAUSAL_LM")).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _one_error_line(runner.invoke(app, ["generate", str(adapter), "hi"]), f"{weights} is truncated or corrupt")


# ----------------------------------------------------------------------------------------------
# Defect 13: chat templates that fail (generate --chat, instruction fine-tuning, tokenizer training)
# ----------------------------------------------------------------------------------------------

TEMPLATES = {
    "unknown_filter": ("{% for m in messages %}{{ m['content'] | nosuchfilter }}{% endfor %}", "TemplateAssertionError"),
    "sandbox": ("{{ cycler.__init__.__globals__ }}", "SecurityError"),
    "raises": ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
}


def _with_template(tiny_model_dir: Path, tmp: Path, template: str) -> Path:
    model = shutil.copytree(tiny_model_dir, tmp / "templated")
    (model / "chat_template.jinja").write_text(template, encoding="utf-8")
    return model


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_generate_chat_with_a_failing_template_names_the_file(case, tiny_model_dir, tmp_path):
    template, error = TEMPLATES[case]
    model = _with_template(tiny_model_dir, tmp_path, template)
    result = runner.invoke(app, ["generate", str(model), "hi", "--chat"])
    _one_error_line(result, f"{model / 'chat_template.jinja'}: the chat template fails", error)


def test_instruction_finetune_with_a_failing_template_names_the_file(tiny_model_dir, tmp_path):
    model = _with_template(tiny_model_dir, tmp_path, TEMPLATES["unknown_filter"][0])
    data = tmp_path / "inst.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": w}) + "\n" for w in ("cat", "dog", "sun", "sky")))
    recipe = _lora_recipe(tmp_path, model, "inst")
    recipe.update(task={"type": "instruction"}, lora={"enabled": False})
    recipe["data"].update(train=[str(data)], max_samples=None)
    result = runner.invoke(app, ["finetune", str(write_recipe(tmp_path / "inst.yaml", recipe))])
    _one_error_line(result, f"{model / 'chat_template.jinja'}: the chat template fails", "nosuchfilter")
    assert not (tmp_path / "inst").exists()


def test_tokenizer_training_refuses_a_template_that_parses_but_fails(tmp_path, corpus):
    recipe = {"stage": "tokenizer", "output_dir": str(tmp_path / "tok"), "data": {"train": [str(corpus)]},
              "tokenizer": {"type": "bpe", "vocab_size": 400, "chat_template": TEMPLATES["unknown_filter"][0]}}
    result = runner.invoke(app, ["tokenizer", "train", str(write_recipe(tmp_path / "tok.yaml", recipe))])
    _one_error_line(result, "tokenizer.chat_template: the template fails", "nosuchfilter")
    assert not (tmp_path / "tok").exists()


# ----------------------------------------------------------------------------------------------
# Defect 14: checkpoint files of the wrong shape
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer_dir, corpus) -> tuple[Path, dict]:
    """A 4-step run with a checkpoint at step 4; rerunning it with max_steps 8 resumes from there."""
    tmp = tmp_path_factory.mktemp("shapes")
    recipe = recipe_dict(tmp, tokenizer_dir, corpus, train={"max_steps": 4, "save_every": 4, "eval_every": 1000})
    recipe["data"]["cache_dir"] = str(tmp.parent / "reliability-cache")
    run_in_process(recipe)
    return Path(recipe["output_dir"]), recipe


def _rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


CORRUPTIONS = {
    "scheduler_array": ("scheduler.json", lambda p: p.write_text("[1, 2, 3]"), "corrupt (expected an object, got an array)"),
    "scheduler_step": ("scheduler.json", lambda p: _rewrite_json(p, lambda d: {**d, "last_epoch": 3}), "'last_epoch' is 3, the checkpoint is of step 4"),
    "scheduler_lrs": ("scheduler.json", lambda p: _rewrite_json(p, lambda d: {**d, "base_lrs": "fast"}), "expected an array at base_lrs, got a string"),
    "state_type": ("trainer_state.json", lambda p: p.write_text('{"step": "ten", "tokens": 0}'), "'step' must be a non-negative integer, got 'ten'"),
    "state_step": ("trainer_state.json", lambda p: _rewrite_json(p, lambda d: {**d, "step": 3}), "'step' is 3 in the checkpoint of step 4"),
    "state_list": ("trainer_state.json", lambda p: p.write_text("[4]"), "corrupt (expected an object, got an array)"),
    "state_position": ("trainer_state.json", lambda p: _rewrite_json(p, lambda d: {**d, "stream_position": "end"}), "'stream_position' must be null"),
    "rng_short": ("rng-rank0.json", lambda p: _rewrite_json(p, lambda d: {**d, "python": [3, [1, 2, 3], None]}), "expected 625 values at python[1], got 3"),
    "rng_keys": ("rng-rank0.json", lambda p: p.write_text('{"python": []}'), "corrupt (no key 'numpy')"),
    "optimizer_other": ("optimizer.pt", None, "does not match this model's optimizer"),
    "truncated_json": ("scheduler.json", lambda p: p.write_text(p.read_text()[:20]), "corrupt or truncated (JSONDecodeError)"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_checkpoint_file_of_the_wrong_shape_is_corrupt_naming_the_file(case, finished_run, tmp_path):
    import torch

    run, recipe = finished_run
    copy = shutil.copytree(run, tmp_path / "run")
    name, corrupt, message = CORRUPTIONS[case]
    target = copy / "checkpoints" / "step-00000004" / name
    if corrupt is None:
        torch.save({"state": {}, "param_groups": []}, target)
    else:
        corrupt(target)
    before = (copy / "model.safetensors").read_bytes()
    resume = dict(recipe, output_dir=str(copy), train={**recipe["train"], "max_steps": 8})
    result = runner.invoke(app, ["pretrain", str(write_recipe(tmp_path / "resume.yaml", resume))], env={"LLMKIT_PEAK_FLOPS": "1e11"})
    _one_error_line(result, f"{target}: corrupt", message)
    assert (copy / "model.safetensors").read_bytes() == before


# ----------------------------------------------------------------------------------------------
# Defect 15: code shipped with a model or tokenizer never runs, and nobody is asked
# ----------------------------------------------------------------------------------------------

EVIL_CODE = """import pathlib
pathlib.Path({marker!r}).touch()
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


class EvilConfig(LlamaConfig):
    model_type = "evil-llama"


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.fixture(scope="module")
def remote_code(tmp_path_factory, tiny_model_dir) -> dict:
    """A model directory and a tokenizer directory whose auto_map points at evil_code.py."""
    root = tmp_path_factory.mktemp("remote-code")
    marker = root / "PWNED-remote-code"
    model = shutil.copytree(tiny_model_dir, root / "model")
    tokenizer = shutil.copytree(tiny_model_dir, root / "tokenizer")
    for directory in (model, tokenizer):
        (directory / "evil_code.py").write_text(EVIL_CODE.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evil-llama", auto_map={"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilModel"})
    (model / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    tok_config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil_code.EvilTokenizer", None]})
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return {"model": model, "tokenizer": tokenizer, "marker": marker}


def test_remote_code_is_refused_without_a_prompt(remote_code, tmp_path, tokenizer_dir, corpus):
    """Every stage that loads a model or tokenizer; stdin answers "y" to a prompt that must never come."""
    pretrain = recipe_dict(tmp_path, remote_code["tokenizer"], corpus)
    evaluate = {"stage": "eval", "output_dir": str(tmp_path / "eval"), "model": {"path": str(remote_code["model"])},
                "data": {"test": [str(corpus)], "seq_len": 32, "max_samples": 2}, "metrics": ["perplexity"]}
    commands = {
        "generate": ["generate", str(remote_code["model"]), "hi"],
        "pretrain": ["pretrain", str(write_recipe(tmp_path / "pre.yaml", pretrain))],
        "finetune": _stage_command("finetune", remote_code["model"], tmp_path),
        "eval": ["eval", str(write_recipe(tmp_path / "eval.yaml", evaluate))],
    }
    for stage, command in commands.items():
        result = runner.invoke(app, command, input="y\ny\ny\n")
        _one_error_line(result, "asks to run Python code shipped with it (auto_map), which llmkit never does")
        assert "[y/N]" not in result.output, stage
        assert not remote_code["marker"].exists(), f"{stage} ran the directory's code"
