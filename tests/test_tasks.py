"""Task formatters, loss masks, length grouping and packing on hand-made records (no training).

pytest tests/test_tasks.py -q
"""

from __future__ import annotations

import json

import pytest

from llmkit.data.batches import grouped_batch_order
from llmkit.data.packing import IGNORE_INDEX, pack_examples, packed_collate, padded_collate
from llmkit.data.sft import tokenize_record, tokenize_records
from llmkit.errors import DataError, RecipeError
from llmkit.models import enable_packing
from llmkit.prompts import (
    DEFAULT_CHAT_TEMPLATE,
    format_example,
    format_record,
    label_set,
    prompt_token_ids,
    task_defaults,
    template_fields,
)
from llmkit.recipes import TaskSpec, recipe_from_dict
from llmkit.stages.data import render_mask


def recipe(task: dict, seq_len: int = 64, **data):
    return recipe_from_dict(
        {
            "stage": "finetune",
            "output_dir": "unused",
            "model": {"path": "unused"},
            "task": task,
            "data": {"train": "unused.jsonl", "seq_len": seq_len, **data},
            "train": {"max_steps": 1},
        }
    )


def ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


# ----------------------------------------------------------------------------------------------
# Formatters
# ----------------------------------------------------------------------------------------------


def test_task_defaults_fill_template_and_target():
    summ = task_defaults(TaskSpec(type="summarization"))
    assert template_fields(summ.prompt_template) == ["document"] and summ.target_field == "summary"
    assert task_defaults(TaskSpec(type="classification")).target_field == "label"
    assert task_defaults(TaskSpec(type="instruction")).target_field == "response"
    assert task_defaults(TaskSpec(type="text", text_field="body")).target_field == "body"
    custom = task_defaults(
        TaskSpec(type="summarization", prompt_template="{article}\nTL;DR:", target_field="highlights")
    )
    assert custom.prompt_template == "{article}\nTL;DR:" and custom.target_field == "highlights"


def test_format_example_summarization_and_classification(tokenizer):
    prompt, target = format_example(
        TaskSpec(type="summarization"), {"document": "Cats sleep.", "summary": "Sleep."}, tokenizer
    )
    assert "Cats sleep." in prompt and prompt.endswith("Summary:\n") and target == "Sleep."
    task = TaskSpec(type="classification", labels=["neg", "pos"])
    prompt, target = format_example(task, {"text": "great", "label": " pos "}, tokenizer)
    assert "one of: neg, pos" in prompt and "great" in prompt and target == "pos"


def test_instruction_uses_chat_template_and_installs_default(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert not tok.chat_template
    prompt, target = format_example(TaskSpec(type="instruction"), {"prompt": "Say hi", "response": "hi"}, tok)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert prompt == "<|user|>\nSay hi\n<|assistant|>\n" and target == "hi"  # BOS comes from encoding
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"},
        ]
    }
    prompt, target = format_example(TaskSpec(type="instruction"), chat, tok)
    assert prompt == "<|system|>\nBe brief.\n<|user|>\nQ\n<|assistant|>\n" and target == "A"
    assert prompt_token_ids(tok, prompt).count(tok.bos_token_id) == 1


def test_long_document_is_truncated_never_the_target(tokenizer):
    record = {"document": "word " * 400, "summary": "A short summary."}
    full = format_record(TaskSpec(type="summarization"), record, tokenizer)
    cut = format_record(TaskSpec(type="summarization"), record, tokenizer, max_prompt_tokens=40)
    assert cut.truncated_tokens > 0 and cut.target == full.target
    assert len(prompt_token_ids(tokenizer, cut.prompt)) <= 40
    assert cut.prompt.endswith("Summary:\n") and cut.prompt.startswith("Summarize")


def test_label_set_from_data_and_from_recipe():
    records = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, {"text": "c", "label": "pos"}]
    assert label_set(TaskSpec(type="classification"), records) == ["neg", "pos"]
    assert label_set(TaskSpec(type="classification", labels=["x", "y"]), records) == ["x", "y"]
    with pytest.raises(DataError, match="at least 2 distinct labels"):
        label_set(TaskSpec(type="classification"), records[:1])


def test_bad_records_and_templates_name_the_problem(tokenizer):
    with pytest.raises(
        DataError, match=r"data.jsonl:3: record lacks field 'document'.*did you mean 'documnet'"
    ):
        format_record(
            TaskSpec(type="summarization"), {"documnet": "x", "summary": "y"}, tokenizer, where="data.jsonl:3"
        )
    with pytest.raises(DataError, match="empty target in field 'summary'"):
        format_record(TaskSpec(type="summarization"), {"document": "x", "summary": "  "}, tokenizer)
    with pytest.raises(DataError, match="has no assistant turn to train on"):
        format_record(
            TaskSpec(type="instruction"), {"messages": [{"role": "user", "content": "hi"}]}, tokenizer
        )
    with pytest.raises(RecipeError, match="plain field name"):
        template_fields("{doc.title}")
    with pytest.raises(RecipeError, match="literal braces"):
        template_fields("{document")


# ----------------------------------------------------------------------------------------------
# Loss masks: exact on hand-made examples
# ----------------------------------------------------------------------------------------------


def test_mask_prompt_minus_100_target_and_eos_trained(tokenizer):
    r = recipe({"type": "summarization", "prompt_template": "Doc: {document}\nSum:"})
    [example], cut = tokenize_record(r, {"document": "The cat sat.", "summary": "Cat sits."}, tokenizer)
    prompt_ids = ids(tokenizer, "Doc: The cat sat.\nSum:", special=True)
    target_ids = ids(tokenizer, "Cat sits.") + [tokenizer.eos_token_id]
    assert cut == 0
    assert example["input_ids"] == prompt_ids + target_ids
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + target_ids
    assert example["labels"][-1] == tokenizer.eos_token_id


def test_train_on_prompt_trains_everything_but_the_first_token(tokenizer):
    r = recipe({"type": "summarization", "prompt_template": "Doc: {document}\nSum:", "train_on_prompt": True})
    [example], _ = tokenize_record(r, {"document": "The cat sat.", "summary": "Cat sits."}, tokenizer)
    assert example["labels"] == [IGNORE_INDEX] + example["input_ids"][1:]


def test_chat_mask_trains_only_the_final_reply(tokenizer):
    r = recipe({"type": "instruction"})
    record = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    }
    [example], _ = tokenize_record(r, record, tokenizer)
    trained = [t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab != IGNORE_INDEX]
    assert trained == ids(tokenizer, "Hello there") + [tokenizer.eos_token_id]
    assert example["input_ids"].count(tokenizer.bos_token_id) == 1


def test_text_task_windows_train_every_token_once(tokenizer):
    r = recipe({"type": "text"}, seq_len=16)
    text = "def f(x):\n    return x + 1\n" * 6
    examples, _ = tokenize_record(r, {"text": text}, tokenizer)
    full = ids(tokenizer, text, special=True) + [tokenizer.eos_token_id]
    assert len(examples) > 1 and all(len(e["input_ids"]) <= 16 for e in examples)
    trained = [t for e in examples for t, lab in zip(e["input_ids"], e["labels"], strict=True) if lab != IGNORE_INDEX]
    assert trained == full[1:]


def test_records_that_do_not_fit_are_counted_not_silently_dropped(tokenizer):
    r = recipe({"type": "summarization"}, seq_len=48)
    records = [
        ("a.jsonl:1", {"document": "short text " * 30, "summary": "ok"}),
        ("a.jsonl:2", {"document": "x", "summary": "a very long target " * 10}),
    ]
    examples, stats = tokenize_records(r, records, tokenizer)
    assert len(examples) == 1 and stats.truncated == 1 and stats.truncated_tokens > 0
    assert stats.did_not_fit == 1 and stats.did_not_fit_where == ["a.jsonl:2"]
    assert "1 records did not fit" in stats.line("train") and "a.jsonl:2" in stats.line("train")


def test_max_target_tokens_is_an_error(tokenizer):
    r = recipe({"type": "summarization", "max_target_tokens": 2})
    with pytest.raises(DataError, match="f.jsonl:9: the target is .* task.max_target_tokens"):
        tokenize_record(r, {"document": "x", "summary": "a much longer target"}, tokenizer, "f.jsonl:9")


def test_render_mask_marks_trained_tokens(tokenizer):
    r = recipe({"type": "summarization", "prompt_template": "Doc: {document}\nSum:"})
    [example], _ = tokenize_record(r, {"document": "The cat sat.", "summary": "Cat sits."}, tokenizer)
    assert render_mask(tokenizer, example, colour=False).endswith("Sum:[[Cat sits.<|eos|>]]")
    assert "\x1b[1;32mCat sits.<|eos|>\x1b[0m" in render_mask(tokenizer, example, colour=True)


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def test_grouped_batch_order_is_a_deterministic_partition_with_less_padding():
    import numpy as np

    lengths = np.random.default_rng(0).integers(5, 200, size=500).tolist()
    order = grouped_batch_order(lengths)
    batches = order(7, 0, 8)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert batches == order(7, 0, 8) and batches != order(7, 1, 8)

    def padded(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    perm = np.random.default_rng(0).permutation(500).tolist()
    shuffled = [perm[i : i + 8] for i in range(0, 500, 8)]
    assert padded(batches) < 0.7 * padded(shuffled)


def test_packing_keeps_every_example_and_restarts_positions():
    examples = [
        {"input_ids": list(range(n)), "labels": [IGNORE_INDEX] + list(range(1, n))}
        for n in (9, 3, 7, 5, 10, 2)
    ]
    rows = pack_examples(examples, seq_len=12)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    # first-fit decreasing: 10 -> row 0, 9 -> row 1, 7 -> row 2, 5 -> row 2, 3 -> row 1, 2 -> row 0
    assert [len(r["input_ids"]) for r in rows] == [12, 12, 12]
    assert rows[2]["position_ids"] == list(range(7)) + list(range(5))
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(
            row["labels"][s] == IGNORE_INDEX for s in starts
        )  # no example predicts the next one's start
    batch = packed_collate(pad_id=0)(rows[:2])
    assert "attention_mask" not in batch and batch["input_ids"].shape == batch["position_ids"].shape


def test_padded_collate_masks_padding():
    batch = padded_collate(pad_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [-100]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_packed_rows_do_not_attend_across_examples(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    assert enable_packing(model) and model.config.use_cache is False
    a = {"input_ids": [3, 40, 41, 42], "labels": [-100, 40, 41, 42]}
    b = {"input_ids": [3, 50, 51], "labels": [-100, 50, 51]}
    [row] = pack_examples([a, b], seq_len=16)
    batch = packed_collate(pad_id=2)([row])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone_b = model(input_ids=torch.tensor([b["input_ids"]])).logits[0]
    torch.testing.assert_close(packed[4:7], alone_b, atol=1e-5, rtol=1e-4)


def test_classification_label_outside_the_set_names_the_line(tmp_path, tokenizer):
    from llmkit.data.sft import resolve_task

    r = recipe({"type": "classification", "labels": ["neg", "pos"]})
    with pytest.raises(DataError, match="v.jsonl:2: label 'meh' is not in the label set"):
        resolve_task(
            r, [("t.jsonl:1", {"text": "a", "label": "pos"})], [("v.jsonl:2", {"text": "b", "label": "meh"})]
        )
    r = recipe({"type": "classification"})
    resolve_task(r, [("t:1", {"text": "a", "label": "pos"}), ("t:2", {"text": "b", "label": "neg"})], [])
    assert r.task.labels == ["neg", "pos"]
    json.dumps(r.model_dump(mode="json"))  # the label set is part of the resolved recipe
