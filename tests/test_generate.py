"""Generation: batched left-padded decoding equals one-at-a-time, EOS and stop strings, `llmkit generate`.

pytest tests/test_generate.py -x -q
"""

from __future__ import annotations

import shutil

import pytest
from pretrain_helpers import assert_clean_error
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.generation import decode_continuation, generate_texts
from llmkit.models import load_model
from llmkit.recipes import GenerationSpec

runner = CliRunner()
PROMPTS = [
    "def add(a, b):",
    "The",
    "Summarize the following text.\n\nLists are mutable.\n\nSummary:\n",
    "x = 1",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def test_batched_left_padded_greedy_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    spec = GenerationSpec(max_new_tokens=10)
    batched = generate_texts(model, tokenizer, PROMPTS, spec, batch_size=4)
    single = [generate_texts(model, tokenizer, [p], spec, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


def test_stops_at_eos(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    spec = GenerationSpec(max_new_tokens=8)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    first = model.generate(
        input_ids=__import__("torch").tensor([ids]),
        max_new_tokens=1,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )[0, -1].item()
    # Make the token the model produces first the EOS token: generation must end before it.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(first)
    assert generate_texts(model, tokenizer, [PROMPTS[0]], spec) == [""]


def test_stop_strings_cut_the_continuation(tiny):
    model, tokenizer = tiny
    full = generate_texts(model, tokenizer, PROMPTS, GenerationSpec(max_new_tokens=12))
    target = next(t for t in full if len(t.strip()) >= 3)
    index = full.index(target)
    stop = target[1:3]
    cut = generate_texts(model, tokenizer, PROMPTS, GenerationSpec(max_new_tokens=12, stop=[stop]))
    assert cut[index] == target[: target.find(stop)]
    assert all(stop not in t for t in cut)


def test_sampling_is_seeded_and_beam_search_runs(tiny):
    model, tokenizer = tiny
    sample = GenerationSpec(max_new_tokens=8, do_sample=True, temperature=1.0, seed=3)
    assert generate_texts(model, tokenizer, PROMPTS, sample) == generate_texts(
        model, tokenizer, PROMPTS, sample
    )
    beams = generate_texts(
        model, tokenizer, PROMPTS, GenerationSpec(max_new_tokens=8, num_beams=3), batch_size=2
    )
    assert len(beams) == len(PROMPTS)


def test_cli_greedy_matches_the_library_streaming_or_not(tiny_model_dir, tiny):
    model, tokenizer = tiny
    expected = generate_texts(model, tokenizer, ["The"], GenerationSpec(max_new_tokens=6))[0]
    for flag in ("--stream", "--no-stream"):
        result = runner.invoke(
            app, ["generate", str(tiny_model_dir), "The", "--temperature", "0", "--max-new-tokens", "6", flag]
        )
        assert result.exit_code == 0, result.output
        assert result.stdout.rstrip("\n") == expected


def test_cli_reads_prompts_from_stdin_and_file(tmp_path, tiny_model_dir):
    # One prompt per line only when asked: by default the whole text is one (multi-line) prompt.
    result = runner.invoke(
        app, ["generate", str(tiny_model_dir), "--max-new-tokens", "3", "-n", "2", "--one-per-line"], input="one\n\ntwo\n"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("### prompt") == 4 and "### prompt 2, sample 2" in result.stdout
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    result = runner.invoke(
        app,
        [
            "generate",
            str(tiny_model_dir),
            "--file",
            str(prompts),
            "--temperature",
            "0",
            "--max-new-tokens",
            "3",
            "--no-stream",
            "--one-per-line",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("### prompt") == 3


def test_cli_chat_mode(tmp_path, tiny_model_dir):
    result = runner.invoke(app, ["generate", str(tiny_model_dir), "hi", "--chat"])
    assert result.exit_code == 2 and "chat template" in result.output
    chat_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, chat_dir)
    from transformers import AutoTokenizer

    from llmkit.prompts import DEFAULT_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(chat_dir)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.save_pretrained(chat_dir)
    result = runner.invoke(
        app, ["generate", str(chat_dir), "hi", "--chat", "--temperature", "0", "--max-new-tokens", "3"]
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["{missing}", "hi"], "does not exist"),
        (["{model}", "hi", "-n", "2", "--temperature", "0"], "--temperature"),
        (["{model}", "--file", "{missing}"], "no such file"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path, tiny_model_dir, args, needle):
    argv = [a.format(missing=tmp_path / "nope", model=tiny_model_dir) for a in args]
    result = runner.invoke(app, ["generate", *argv])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------
# Report 2026-12-06 N5, N6, N8: every option checked before the model loads, files read as text,
# lengths held to the model's positions.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--top-k", "-1"], "--top-k must be >= 0 (0 = all), got -1"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
        (["--repetition-penalty", "-2"], "--repetition-penalty must be > 0"),
        (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
        (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
        (["--top-p", "nan"], "--top-p must be a finite number"),
        (["--repetition-penalty", "inf"], "--repetition-penalty must be a finite number"),
        (["--temperature", "-1"], "--temperature must be >= 0 (0 = greedy)"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    ],
)
def test_every_sampling_option_is_checked_before_loading(tmp_path, args, line):
    # The model directory does not exist: an option error must come first, before anything is loaded.
    result = runner.invoke(app, ["generate", str(tmp_path / "no-model"), "hi", *args])
    assert_clean_error(result, line)


def test_file_that_is_not_text_or_is_a_directory_is_one_line(tmp_path, tiny_model_dir):
    binary = tmp_path / "prompts.jsonl"
    binary.write_bytes(b'{"prompt": "ok"}\n\xff\xfe\x00')
    result = runner.invoke(app, ["generate", str(tiny_model_dir), "--file", str(binary)])
    assert_clean_error(result, f"--file {binary}: not UTF-8 text (byte 17, line 2: ff)")
    result = runner.invoke(app, ["generate", str(tiny_model_dir), "--file", str(tmp_path)])
    assert_clean_error(result, f"--file {tmp_path}: is a directory")


def test_binary_stdin_is_one_line(tiny_model_dir):
    result = runner.invoke(app, ["generate", str(tiny_model_dir), "--max-new-tokens", "2"], input=b"ab\x80cd")
    assert_clean_error(result, "stdin: not UTF-8 text (byte 2, line 1: 80)")


@pytest.fixture(scope="module")
def gpt2_32_positions(tmp_path_factory, tokenizer_dir):
    """A 2-layer gpt2 with 32 learned positions: one position past them is an IndexError in torch."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2-32")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_new_tokens_beyond_the_positions_are_refused(gpt2_32_positions, stream):
    result = runner.invoke(app, ["generate", str(gpt2_32_positions), "hi", "--max-new-tokens", "32", stream])
    assert_clean_error(result, "--max-new-tokens (32)", "32 positions", "at most 31")


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_a_long_prompt_is_cut_to_its_end_with_a_note(gpt2_32_positions, stream):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2_32_positions)
    prompt = "word " * 100
    assert len(tokenizer(prompt)["input_ids"]) > 32
    result = runner.invoke(
        app, ["generate", str(gpt2_32_positions), prompt, "--max-new-tokens", "8", "--temperature", "0", stream]
    )
    assert result.exit_code == 0, result.output
    assert "only its last 24 fit before --max-new-tokens 8 in the model's 32 positions" in result.stderr
    # The continuation equals generating from the prompt's last 24 tokens.
    model, tok = load_model(str(gpt2_32_positions), device="cpu")
    ids = tok(prompt)["input_ids"][-24:]
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, 24, dtype=torch.long),
                             max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert result.stdout.rstrip("\n") == decode_continuation(tok, out[0, 24:].tolist(), [])


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}{{ messages[0]['content'] }}", "did not finish rendering"),
        ("{% for m in messages %}{{ m['content'] * 10000000 }}{% endfor %}", "characters for a conversation"),
    ],
    ids=["endless-loop", "huge-output"],
)
def test_a_runaway_chat_template_is_one_line_naming_the_file(tmp_path, tiny_model_dir, monkeypatch, template, needle):
    from llmkit import prompts

    monkeypatch.setattr(prompts, "RENDER_SECONDS", 0.5)  # real templates render in milliseconds
    model = tmp_path / "jt"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(template, encoding="utf-8")
    result = runner.invoke(app, ["generate", str(model), "hi", "--chat", "--max-new-tokens", "2"])
    assert_clean_error(result, needle, "chat_template.jinja")
