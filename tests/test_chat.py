"""Chat fine-tuning that matches serving: every assistant turn trained, tools, end-of-turn stops, generate prompts.

    pytest tests/test_chat.py

The independent side is plain transformers: `apply_chat_template(..., return_assistant_tokens_mask=True)`
on a template with {% generation %} blocks gives the assistant tokens, and the exported folder is
loaded with `AutoModelForCausalLM.from_pretrained` and run with its own generation_config.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from pretrain_helpers import assert_clean_error
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.data.packing import IGNORE_INDEX
from llmkit.data.sft import tokenize_record
from llmkit.prompts import (
    DEFAULT_CHAT_TEMPLATE,
    chat_segments,
    chatml_template,
    run_prompt,
    stop_token_ids,
    turn_end,
)
from llmkit.recipes import recipe_from_dict

runner = CliRunner()

# ChatML with {% generation %} around each reply and its end-of-turn token: transformers' own
# assistant mask for this template is the independent answer for the trained tokens.
MASKED_CHATML = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|im_start|>system\\nTools:\\n' }}{% for t in tools %}{{ t | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %}"
    "{{ '<tool_call>' }}{{ c['function'] | tojson }}{{ '</tool_call>' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ m['content'] }}{{ '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "20, since 5 times 4 is 20."},
]

TOOL_CALL = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "It is sunny and 21 C in Paris."},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """The session tokenizer plus <|im_start|>/<|im_end|> special tokens and MASKED_CHATML."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("chat-tokenizer")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = MASKED_CHATML
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chat_tokenizer(chat_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_tokenizer_dir)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, chat_tokenizer_dir) -> Path:
    """A random 2-layer llama (hidden 64) with the chat tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("chat-model")
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=576, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def chat_recipe(tmp_path: Path, model_dir: Path, train, task: dict | None = None, steps: int = 4, **sections) -> dict:
    recipe = {
        "stage": "finetune",
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(model_dir)},
        "task": {"type": "instruction", **(task or {})},
        "data": {"train": str(train), "seq_len": 128, "cache_dir": str(tmp_path / "cache")},
        "train": {
            "max_steps": steps, "micro_batch_size": 8, "lr": 3e-3, "schedule": "constant", "warmup_steps": 0,
            "weight_decay": 0.0, "log_every": 1, "eval_every": steps, "save_every": steps,
        },
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def unit_recipe(task: dict | None = None, seq_len: int = 512):
    return recipe_from_dict(
        {"stage": "finetune", "output_dir": "x", "model": {"path": "m"}, "task": {"type": "instruction", **(task or {})},
         "data": {"train": "t.jsonl", "seq_len": seq_len}, "train": {"max_steps": 1}}
    )


def trained_positions(example: dict) -> list[int]:
    return [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]


# ----------------------------------------------------------------------------------------------
# Masks: exactly the assistant tokens transformers marks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("messages", "tools"), [(MULTI_TURN, None), (TOOL_CALL, TOOLS)], ids=["multi-turn", "tool-call"])
def test_every_assistant_turn_is_trained_exactly_as_transformers_marks_it(chat_tokenizer, messages, tools):
    record = {"messages": messages, **({"tools": tools} if tools else {})}
    r = unit_recipe()
    [example], cut = tokenize_record(r, record, chat_tokenizer)
    hf = chat_tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert cut == 0
    # The whole conversation, token for token, minus what follows the last reply (nothing to learn there).
    assert example["input_ids"] == hf["input_ids"][: len(example["input_ids"])]
    assert hf["input_ids"][len(example["input_ids"]) :] == chat_tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert trained_positions(example) == [i for i, m in enumerate(hf["assistant_masks"]) if m]
    assert example["labels"][-1] == chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    replies = chat_tokenizer.decode([example["input_ids"][i] for i in trained_positions(example)])
    assert replies.count("<|im_end|>") == sum(m["role"] == "assistant" for m in messages)


def test_last_assistant_turn_trains_only_the_last_reply(chat_tokenizer):
    r = unit_recipe({"train_on": "last_assistant_turn"})
    [example], _ = tokenize_record(r, {"messages": MULTI_TURN}, chat_tokenizer)
    hf = chat_tokenizer.apply_chat_template(MULTI_TURN, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    mask = hf["assistant_masks"]
    last_start = max(i for i in range(1, len(mask)) if mask[i] and not mask[i - 1])
    assert trained_positions(example) == [i for i in range(last_start, len(mask)) if mask[i]]
    # Its prompt is exactly the prompt a server builds for that turn.
    prompt = chat_tokenizer.apply_chat_template(MULTI_TURN[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert example["input_ids"][:last_start] == prompt["input_ids"]


def test_a_long_conversation_keeps_whole_turns(chat_tokenizer):
    r = unit_recipe()
    [full], _ = tokenize_record(r, {"messages": MULTI_TURN}, chat_tokenizer)
    positions = trained_positions(full)
    first_end = next(p for p, q in zip(positions, positions[1:] + [None], strict=True) if q != p + 1) + 1
    short = unit_recipe(seq_len=first_end + 3)
    [example], cut = tokenize_record(short, {"messages": MULTI_TURN}, chat_tokenizer)
    assert example["input_ids"] == full["input_ids"][:first_end] and cut == len(full["input_ids"]) - first_end


def test_end_of_turn_tokens_of_the_bundled_templates(chat_tokenizer, tokenizer_dir):
    from transformers import AutoTokenizer

    assert turn_end(chat_tokenizer).tokens == ("<|im_end|>",)
    assert stop_token_ids(chat_tokenizer) == [chat_tokenizer.eos_token_id, chat_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    plain = AutoTokenizer.from_pretrained(tokenizer_dir)
    plain.chat_template = DEFAULT_CHAT_TEMPLATE  # llmkit's fallback: EOS ends each reply
    assert turn_end(plain).tokens == (plain.eos_token,) and stop_token_ids(plain) == [plain.eos_token_id]
    chatml = AutoTokenizer.from_pretrained(chat_tokenizer.name_or_path)
    chatml.chat_template = chatml_template(bos=True)  # `chat_template: default` of tokenizer recipes
    assert turn_end(chatml).tokens == ("<|im_end|>",)
    # Both render tools and tool calls, so tool records train on them.
    for tok in (plain, chatml):
        text = tok.apply_chat_template(TOOL_CALL, tools=TOOLS, tokenize=False)
        assert '"name": "get_weather"' in text and "Weather of a city" in text and "sunny, 21 C" in text
    # A template that ends turns with plain text only: EOS is appended to each reply so the model stops.
    bare = AutoTokenizer.from_pretrained(tokenizer_dir)
    bare.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    assert turn_end(bare) is None
    pieces = chat_segments(bare, MULTI_TURN)
    assert [t for t, trained in pieces if trained] == ["5\n" + bare.eos_token, "20, since 5 times 4 is 20.\n" + bare.eos_token]


# ----------------------------------------------------------------------------------------------
# data inspect shows what training trains
# ----------------------------------------------------------------------------------------------


def test_inspect_shows_exactly_the_spans_training_masks(tmp_path, chat_model_dir):
    from transformers import AutoTokenizer

    from llmkit.recipes import load_recipe
    from llmkit.stages.data import prepare

    records = [{"messages": MULTI_TURN}, {"messages": TOOL_CALL, "tools": TOOLS}]
    train = write_jsonl(tmp_path / "chats.jsonl", records)
    path = write_recipe(tmp_path / "r.yaml", chat_recipe(tmp_path, chat_model_dir, train, data={"seq_len": 256}))
    result = runner.invoke(app, ["data", "inspect", str(path), "-n", "2"])
    assert result.exit_code == 0, result.output
    body = result.stdout.split("\n", 1)[1]  # after the legend line
    shown = re.findall(r"\[\[(.*?)\]\]", body, flags=re.S)
    assert "every assistant reply trained" in result.stdout and "'<|im_end|>'" in result.stdout
    # What the training loop reads: the tokenized examples of the cache.
    examples = prepare(load_recipe(path)).train
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    spans = []
    for example in examples:
        positions = trained_positions(example)
        runs = [[positions[0]]]
        for p in positions[1:]:
            (runs[-1].append(p) if p == runs[-1][-1] + 1 else runs.append([p]))
        spans += [tok.decode([example["input_ids"][p] for p in run]) for run in runs]
    assert shown == spans
    # ... which are the replies with their end-of-turn token, written here independently.
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert spans == ["5<|im_end|>", "20, since 5 times 4 is 20.<|im_end|>", call + "<|im_end|>", "It is sunny and 21 C in Paris.<|im_end|>"]


# ----------------------------------------------------------------------------------------------
# The exported model stops at the end of the turn; generate prompts like training
# ----------------------------------------------------------------------------------------------


SHORT_REPLIES = [
    {"messages": [{"role": "user", "content": f"Tell me about {w}."}, {"role": "assistant", "content": "OK."}]}
    for w in ("cats", "dogs", "trees", "rivers", "stars", "boats", "bread", "music")
] + [
    {"messages": [
        {"role": "user", "content": f"Name {w}."}, {"role": "assistant", "content": "OK."},
        {"role": "user", "content": "Again."}, {"role": "assistant", "content": "OK."},
    ]}
    for w in ("a colour", "a fruit", "a city", "a tool")
]


@pytest.mark.slow
def test_exported_chat_model_stops_at_the_end_of_turn_and_generate_prompts_through_the_template(
    tmp_path, chat_model_dir, monkeypatch
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.stages import generate as generate_stage

    train = write_jsonl(tmp_path / "chats.jsonl", SHORT_REPLIES)
    # The reproduction: an instruction recipe with a summary prompt template, trained on chat records.
    task = {"prompt_template": "Write a one-line summary of this documentation:\n{document}", "target_field": "summary"}
    path = write_recipe(tmp_path / "r.yaml", chat_recipe(tmp_path, chat_model_dir, train, task, steps=40))
    result = runner.invoke(app, ["finetune", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"

    # Plain transformers: the exported folder, its generation_config, the template's prompt.
    tok = AutoTokenizer.from_pretrained(run)
    model = AutoModelForCausalLM.from_pretrained(run)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert set(model.generation_config.eos_token_id) == {tok.eos_token_id, im_end}
    assert model.generation_config.use_cache is True
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me about lamps."}], add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = torch.tensor([prompt["input_ids"]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24)
    new = out[0, ids.shape[1] :].tolist()
    assert new[-1] == im_end and len(new) < 24, tok.decode(new)
    assert tok.decode(new, skip_special_tokens=True) == "OK."

    # llmkit generate reads the run's prompt: the chat template, not the summary template.
    assert run_prompt(run).kind == "chat"
    seen = []
    real = generate_stage.generate_ids

    def spy(lm, tokenizer, prompt_ids, spec, **kwargs):
        seen.extend(prompt_ids)
        return real(lm, tokenizer, prompt_ids, spec, **kwargs)

    monkeypatch.setattr(generate_stage, "generate_ids", spy)
    result = runner.invoke(app, ["generate", str(run), "Tell me about lamps.", "--temperature", "0", "--no-stream"])
    assert result.exit_code == 0, result.output
    assert seen == [prompt["input_ids"]]
    assert result.stdout.strip() == "OK."
    assert "chat template" in result.stderr and "summary" not in result.stderr
    # An intermediate checkpoint is prompted the same way (its run's recipe).
    assert run_prompt(run / "checkpoints" / "step-00000040").kind == "chat"


@pytest.mark.slow
def test_lora_exports_carry_the_end_of_turn_in_generation_config(tmp_path, chat_model_dir):
    from transformers import AutoTokenizer, GenerationConfig

    train = write_jsonl(tmp_path / "chats.jsonl", SHORT_REPLIES)
    recipe = chat_recipe(tmp_path, chat_model_dir, train, steps=2, lora={"enabled": True, "r": 4, "merge": True})
    result = runner.invoke(app, ["finetune", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    want = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    for folder in (tmp_path / "run", tmp_path / "run" / "adapter"):
        assert set(GenerationConfig.from_pretrained(folder).eos_token_id) == want, folder


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------


NO_REPLY_TEMPLATE = (  # renders earlier replies as a placeholder: not prefix-stable
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['role'] == 'assistant' and not loop.last %}(earlier reply){% else %}{{ m['content'] }}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
NO_TOOLS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.mark.parametrize(
    ("records", "template", "task", "fragments"),
    [
        ([{"messages": [{"role": "user", "content": "hi"}]}], None, {}, ["chats.jsonl:1", "no assistant turn"]),
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}]}],
            None, {}, ["chats.jsonl:1", "messages[1].tool_calls[0]", '"function"'],
        ),
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "tools": [{"description": "x"}]}],
            None, {}, ["chats.jsonl:1", "tools[0]"],
        ),
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "tools": TOOLS}],
            NO_TOOLS_TEMPLATE, {}, ["chats.jsonl:1", "does not render them"],
        ),
        ([{"messages": MULTI_TURN}], NO_REPLY_TEMPLATE, {}, ["chats.jsonl:1", "not prefix-stable", "messages[2]", "last_assistant_turn"]),
        (
            [{"messages": MULTI_TURN}, {"document": "d", "summary": "s"}],
            None, {"prompt_template": "Doc: {document}", "target_field": "summary"}, ["chats.jsonl:2", "one prompt format"],
        ),
        ([{"messages": MULTI_TURN}], None, {"type": "summarization", "record_format": "chat"}, ["task.record_format", "instruction"]),
    ],
    ids=["no-assistant", "tool-call-shape", "tool-shape", "template-without-tools", "not-prefix-stable", "mixed-formats", "record-format-key"],
)
def test_bad_chat_input_is_one_line_and_exit_2(tmp_path, chat_model_dir, records, template, task, fragments):
    from transformers import AutoTokenizer

    model_dir = chat_model_dir
    if template is not None:
        model_dir = tmp_path / "model"
        shutil.copytree(chat_model_dir, model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.chat_template = template
        tok.save_pretrained(model_dir)
    train = write_jsonl(tmp_path / "chats.jsonl", records)
    path = write_recipe(tmp_path / "r.yaml", chat_recipe(tmp_path, model_dir, train, task))
    for command in (["data", "inspect", str(path)], ["finetune", str(path)]):
        assert_clean_error(runner.invoke(app, command), *fragments)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# The prompt a run was trained with, read one way; the built-in chat corpus
# ----------------------------------------------------------------------------------------------


def write_run(path: Path, task: dict) -> Path:
    from llmkit.recipes import recipe_to_yaml

    path.mkdir(parents=True)
    recipe = recipe_from_dict(
        {"stage": "finetune", "output_dir": str(path), "model": {"path": "m"}, "task": task,
         "data": {"train": "t.jsonl"}, "train": {"max_steps": 1}}
    )
    (path / "recipe.yaml").write_text(recipe_to_yaml(recipe), encoding="utf-8")
    return path


def test_run_prompt_reads_how_each_run_was_trained(tmp_path, chat_tokenizer, tiny_model_dir):
    system = "Answer in one line."
    chat = run_prompt(write_run(tmp_path / "chat", {"type": "instruction", "record_format": "chat", "system_prompt": system}))
    expected = chat_tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert chat.kind == "chat" and chat.prompt_ids(chat_tokenizer, "hi") == expected
    summary = run_prompt(write_run(tmp_path / "sum", {"type": "summarization"}))
    assert summary.kind == "template" and "Summarize the following text" in summary.describe()
    ids = summary.prompt_ids(chat_tokenizer, "A doc.")
    assert chat_tokenizer.decode(ids, skip_special_tokens=True) == "Summarize the following text.\n\nA doc.\n\nSummary:\n"
    assert run_prompt(write_run(tmp_path / "text", {"type": "text"})).kind == "raw"
    raw = run_prompt(tiny_model_dir)  # a plain model directory: no recipe.yaml
    assert raw.kind == "raw" and "no recipe.yaml" in raw.reason
    assert raw.prompt_ids(chat_tokenizer, "hi") == chat_tokenizer("hi")["input_ids"]


def test_system_prompt_opens_every_conversation_without_one(chat_tokenizer):
    r = unit_recipe({"system_prompt": "Be kind."})
    [opened], _ = tokenize_record(r, {"messages": MULTI_TURN[1:]}, chat_tokenizer)
    [own], _ = tokenize_record(r, {"messages": MULTI_TURN}, chat_tokenizer)
    assert "<|im_start|>system\nBe kind.<|im_end|>" in chat_tokenizer.decode(opened["input_ids"])
    assert "Be kind." not in chat_tokenizer.decode(own["input_ids"]) and "Be brief." in chat_tokenizer.decode(own["input_ids"])


def test_builtin_docchat_is_valid_chat_data_with_tool_calls(chat_tokenizer):
    from llmkit.data.sources import iter_located_records

    records = list(iter_located_records(["builtin:docchat/validation"], max_samples=12))
    r = unit_recipe(seq_len=1024)
    with_tools = 0
    for where, record in records:
        [example], _ = tokenize_record(r, record, chat_tokenizer, where)
        text = chat_tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
        assert text.count("<|im_end|>") == 2, (where, text)  # two assistant replies trained
        if "tools" in record:
            with_tools += 1
            assert '"name": "lookup_docs"' in text
    assert 0 < with_tools < len(records)
