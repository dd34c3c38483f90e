"""Units of the shared layers: weight-decay grouping, and one prompt encoding for training and generation.

    pytest tests/test_training_units.py
"""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.data.sft import tokenize_record
from llmkit.prompts import DEFAULT_CHAT_TEMPLATE, encode_prompts
from llmkit.recipes import recipe_from_dict
from llmkit.stages import generate as generate_stage
from llmkit.training.optim import param_groups


def test_weight_decay_goes_to_matmul_weights_only():
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(False)  # frozen parameters join no group
    groups = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    expected_decay = {
        n for n, p in model.named_parameters()
        if p.ndim == 2 and "embed_tokens" not in n and n != "model.layers.1.mlp.down_proj.weight"
    }
    assert decayed == expected_decay and "lm_head.weight" in decayed
    assert plain == {n for n, p in model.named_parameters() if p.ndim == 1} | {"model.embed_tokens.weight"}
    assert not decayed & plain


def _finetune_recipe(tmp_path, model_dir, task):
    return recipe_from_dict(
        {
            "stage": "finetune", "output_dir": str(tmp_path / "run"), "model": {"path": str(model_dir)},
            "task": task, "data": {"train": [str(tmp_path / "x.jsonl")], "seq_len": 256}, "train": {"max_steps": 1},
        },
        stage="finetune",
    )


@pytest.mark.parametrize("template", ["default", "no-bos"])
def test_generate_chat_feeds_exactly_the_prompt_chat_training_used(tmp_path, tiny_model_dir, monkeypatch, template):
    model_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE if template == "default" else DEFAULT_CHAT_TEMPLATE.replace(
        "{% if bos_token %}{{ bos_token }}{% endif %}", ""
    )
    tokenizer.save_pretrained(model_dir)
    prompt = "What does os.path.join do?"
    record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "It joins paths."}]}
    recipe = _finetune_recipe(tmp_path, model_dir, {"type": "instruction"})
    (example,), _ = tokenize_record(recipe, record, AutoTokenizer.from_pretrained(model_dir))
    trained_prompt = [i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label == -100]

    fed = []
    monkeypatch.setattr(generate_stage, "_stream_one", lambda lm, tok, ids, spec: fed.append(list(ids)) or "")
    result = CliRunner().invoke(app, ["generate", str(model_dir), prompt, "--chat", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert fed == [trained_prompt]
    assert fed[0].count(tokenizer.bos_token_id) == 1  # one BOS, whoever writes it


def test_plain_prompts_encode_the_same_for_training_and_generation(tmp_path, tiny_model_dir, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    recipe = _finetune_recipe(tmp_path, tiny_model_dir, {"type": "summarization"})
    record = {"document": "The os module provides a portable way of using operating system functionality.", "summary": "OS routines."}
    (example,), _ = tokenize_record(recipe, record, tokenizer)
    trained_prompt = [i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label == -100]
    prompt = "Summarize the following text.\n\n" + record["document"] + "\n\nSummary:\n"
    assert encode_prompts(tokenizer, [prompt]) == [trained_prompt]

    fed = []
    monkeypatch.setattr(generate_stage, "_stream_one", lambda lm, tok, ids, spec: fed.append(list(ids)) or "")
    result = CliRunner().invoke(app, ["generate", str(tiny_model_dir), prompt, "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert fed == [trained_prompt]
    assert torch.tensor(trained_prompt).eq(tokenizer.bos_token_id).sum() == 1
