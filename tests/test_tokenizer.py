"""Tokenizer training: round-trip, AutoTokenizer loading, special tokens, padding, reports, CLI errors.

    pytest tests/test_tokenizer.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.recipes import load_recipe, recipe_from_dict
from llmkit.stages.tokenizer import MIXED_SCRIPT
from llmkit.stages.tokenizer import run as train_tokenizer

ROUND_TRIP = [
    MIXED_SCRIPT,
    "",
    " leading space",
    "   three leading, trailing   ",
    "tabs\t\tand\r\nwindows newlines\n\n\n",
    "中文没有空格的句子。日本語とカタカナ、한국어",
    "emoji 🧑🏽‍💻🏳️‍🌈 and symbols ∑∫≠ and RTL עברית العربية",
    "unseen rare chars: \U0001F9EC \u2603 \x00 \x7f",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Small train / validation JSONL files from Python's pydoc topics (about 465 KB)."""
    import pydoc_data.topics

    root = tmp_path_factory.mktemp("corpus")
    texts = [text for _, text in sorted(pydoc_data.topics.topics.items())]
    paths = {"train": root / "train.jsonl", "validation": root / "validation.jsonl"}
    for name, part in (("train", texts[:-6]), ("validation", texts[-6:])):
        with paths[name].open("w", encoding="utf-8") as handle:
            for text in part:
                handle.write(json.dumps({"text": text}) + "\n")
    return paths


def make_recipe(corpus: dict[str, Path], output_dir: Path, **tokenizer) -> dict:
    """A raw tokenizer recipe mapping on the small corpus."""
    spec = {"type": "bpe", "vocab_size": 600, "normalization": "none"} | tokenizer
    return {
        "stage": "tokenizer",
        "output_dir": str(output_dir),
        "data": {"train": [str(corpus["train"])], "validation": [str(corpus["validation"])], "heldout_docs": 4},
        "tokenizer": spec,
    }


@pytest.fixture(scope="module")
def bpe_dir(corpus, tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with a chat template, extra tokens and vocab padded to 64."""
    out = tmp_path_factory.mktemp("bpe") / "tok"
    raw = make_recipe(
        corpus,
        out,
        vocab_size=650,
        chat_template="default",
        pad_vocab_to_multiple_of=64,
        model_max_length=333,
        special_tokens={"extra": ["<|sep|>"]},
    )
    train_tokenizer(recipe_from_dict(raw))
    return out


def test_bpe_round_trips_any_text_exactly(bpe_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bpe_dir)
    for text in ROUND_TRIP:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    report = json.loads((bpe_dir / "report.json").read_text())
    assert report["mixed_script"]["exact"] and report["heldout"]["roundtrip_exact"] == 1.0


def test_autotokenizer_loads_fast_and_matches_raw_tokenizers(bpe_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(bpe_dir)
    raw = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    assert hf.is_fast
    for text in ROUND_TRIP + ["def f(x):\n    return x  # <|eos|> inside text"]:
        assert hf(text)["input_ids"] == raw.encode(text).ids
    batch = hf(ROUND_TRIP[:3], padding=True)
    assert batch["input_ids"][1][-1] == hf.pad_token_id


def test_special_tokens_ids_padding_and_config(bpe_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bpe_dir)
    report = json.loads((bpe_dir / "report.json").read_text())
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
    )
    assert [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id] == [0, 1, 2, 3]
    assert report["special_tokens"]["<|sep|>"] == tokenizer.convert_tokens_to_ids("<|sep|>")
    assert len(tokenizer) % 64 == 0 and len(tokenizer) == report["vocab_size"] >= 650
    assert report["padding_tokens"] == len(tokenizer) - report["vocab_size_trained"]
    assert tokenizer.model_max_length == 333
    # add_bos: BOS first, nothing appended
    ids = tokenizer("hello world")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[1:] == tokenizer("hello world", add_special_tokens=False)["input_ids"]
    # special tokens in text are single tokens
    assert tokenizer("a<|eos|>b", add_special_tokens=False)["input_ids"].count(tokenizer.eos_token_id) == 1
    assert (bpe_dir / "recipe.yaml").is_file()


def test_default_chat_template(bpe_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bpe_dir)
    messages = [{"role": "user", "content": "Hi 🙂"}, {"role": "assistant", "content": "Hello."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|bos|><|im_start|>user\nHi 🙂<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids.count(tokenizer.bos_token_id) == 1 and tokenizer.convert_tokens_to_ids("<|im_start|>") in ids


def test_report_numbers_equal_an_independent_count(bpe_dir, corpus):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bpe_dir)
    report = json.loads((bpe_dir / "report.json").read_text())
    docs = [json.loads(line)["text"] for line in corpus["validation"].read_text().splitlines()][:4]  # heldout_docs
    tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    held = report["heldout"]
    assert (held["docs"], held["bytes"], held["tokens"]) == (4, n_bytes, tokens)
    assert held["tokens_per_byte"] == pytest.approx(tokens / n_bytes, rel=1e-4)
    assert held["tokens_per_word"] == pytest.approx(tokens / sum(len(d.split()) for d in docs), rel=1e-3)
    train_docs = corpus["train"].read_text().splitlines()
    assert report["train_docs"] == len(train_docs)
    assert report["train_bytes"] == sum(len(json.loads(line)["text"].encode()) for line in train_docs)


def test_heldout_from_train_without_validation(corpus, tmp_path):
    raw = make_recipe(corpus, tmp_path / "tok", vocab_size=400)
    raw["data"]["validation"] = None
    raw["data"]["heldout_docs"] = 2
    report = train_tokenizer(recipe_from_dict(raw))
    total = len(corpus["train"].read_text().splitlines())
    assert report["heldout"]["docs"] == 2 and report["train_docs"] == total - 2
    assert "held out" in report["heldout"]["source"]


@pytest.mark.parametrize("kind", ["unigram", "wordpiece"])
def test_unigram_and_wordpiece_train_and_load(kind, corpus, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = make_recipe(corpus, tmp_path / kind, type=kind, vocab_size=700, lowercase=kind == "wordpiece")
    raw["data"]["train"] = [str(corpus["validation"])]  # 6 documents: keeps unigram's EM quick
    report = train_tokenizer(recipe_from_dict(raw))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / kind)
    raw_tok = Tokenizer.from_file(str(tmp_path / kind / "tokenizer.json"))
    assert tokenizer.is_fast and tokenizer.unk_token == "<|unk|>" and tokenizer.pad_token_id is not None
    assert tokenizer("The for statement")["input_ids"] == raw_tok.encode("The for statement").ids
    if kind == "unigram":
        # byte fallback: characters never seen in training still round-trip
        for text in ROUND_TRIP:
            assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
        assert report["mixed_script"]["exact"] and report["heldout"]["unk_tokens"] == 0
    else:
        # lossy by design (spacing, case); the report says so
        assert not report["mixed_script"]["exact"] and report["heldout"]["roundtrip_exact"] < 1.0
        assert tokenizer.decode(tokenizer("The for statement", add_special_tokens=False)["input_ids"]) == "the for statement"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_cli_trains_reuses_and_refuses_a_different_run(corpus, tmp_path):
    runner = CliRunner()
    out = tmp_path / "tok"
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(corpus, out, vocab_size=400))
    result = runner.invoke(app, ["tokenizer", "train", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "tokens per byte" in result.output
    for name in ("tokenizer.json", "tokenizer_config.json", "report.json", "recipe.yaml"):
        assert (out / name).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    before = (out / "tokenizer.json").read_bytes()

    again = runner.invoke(app, ["tokenizer", "train", str(recipe)])
    assert again.exit_code == 0 and "already trained" in again.output

    changed = runner.invoke(app, ["tokenizer", "train", str(recipe), "--set", "tokenizer.vocab_size=420"])
    assert changed.exit_code == 2 and "--overwrite" in changed.output
    assert (out / "tokenizer.json").read_bytes() == before

    forced = runner.invoke(app, ["tokenizer", "train", str(recipe), "--set", "tokenizer.vocab_size=420", "--overwrite"])
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "report.json").read_text())["vocab_size_target"] == 420


def test_cli_bad_corpus_exits_2_and_leaves_no_output(corpus, tmp_path):
    runner = CliRunner()
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    (tmp_path / "fields.jsonl").write_text('{"body": "some text"}\n', encoding="utf-8")
    cases = {
        "empty.jsonl": "the corpus is empty",
        "fields.jsonl": "fields.jsonl:1",
        "missing.jsonl": "no such file",
    }
    for name, expected in cases.items():
        raw = make_recipe(corpus, tmp_path / "out", vocab_size=400)
        raw["data"]["train"] = [str(tmp_path / name)]
        result = runner.invoke(app, ["tokenizer", "train", str(write_recipe(tmp_path / "r.yaml", raw))])
        assert result.exit_code == 2, (name, result.output)
        assert expected in result.output and "Traceback" not in result.output
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_bad_settings_name_the_key(corpus, tmp_path):
    runner = CliRunner()
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(corpus, tmp_path / "out"))
    cases = [
        (["tokenizer.vocab_size=100"], "tokenizer.vocab_size (100) is too small"),
        (["tokenizer.type=wordpiece", "tokenizer.special_tokens.unk=null"], "tokenizer.special_tokens.unk"),
        (["tokenizer.chat_template='{% for m in messages %}'"], "tokenizer.chat_template"),
        (["tokenizer.type=sentencepiece"], "choose one of bpe, unigram, wordpiece"),
    ]
    for overrides, expected in cases:
        args = ["tokenizer", "train", str(recipe)] + [x for o in overrides for x in ("--set", o)]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and expected in result.output, (overrides, result.output)
        assert not (tmp_path / "out").exists()


def test_bundled_tokenizer_recipes_validate():
    from llmkit.recipes import bundled_dir

    names = sorted(p.stem for p in (bundled_dir() / "tokenizer").glob("*.yaml"))
    assert {"tiny", "bpe-32k", "unigram", "wordpiece"} <= set(names)
    for name in names:
        text = (bundled_dir() / "tokenizer" / f"{name}.yaml").read_text()
        assert text.startswith("# ") and "llmkit tokenizer train" in text.splitlines()[1]
        assert load_recipe(f"tokenizer/{name}").stage == "tokenizer"


def test_bundled_tiny_recipe_trains_a_tokenizer_for_pretraining(tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tiny"
    result = CliRunner().invoke(
        app, ["tokenizer", "train", "tokenizer/tiny", "--set", f"output_dir={out}", "--set", "data.max_samples=60"]
    )
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer.model_max_length == 2048 and len(tokenizer) % 64 == 0
    assert tokenizer.decode(tokenizer(MIXED_SCRIPT, add_special_tokens=False)["input_ids"]) == MIXED_SCRIPT
