"""Data preparation that scales: bounded tokenizer batches, long documents split without changing a token,
tokenization shared by the processes of a launch, verified cache entries, sparse-id tokenizers.

    pytest -q tests/test_data_scale.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SPECIAL_TOKENS
from tests.pretrain_helpers import write_corpus, write_recipe
from tests.test_reliability_disk import cli


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), docs=24)


def _texts() -> list[str]:
    import pydoc_data.topics

    topics = [text for _, text in sorted(pydoc_data.topics.topics.items())]
    long = "\n\n".join(topics[:12])  # ~60 KB: split many times at piece_chars=2000
    odd = ("字符串" * 900) + " tail words\n" + ("x" * 5000) + "  two  spaces\tand\ttabs \n\n\nend " * 40
    return [long, topics[61], odd, "short", long[:12_000] + " <|eos|> and more"]


def _train(kind: str):
    """A small fast tokenizer of each family llmkit trains or users bring, with its usual post-processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = _texts()
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        single = "<|bos|> $A"
    elif kind == "bytelevel-prefix-space":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        single = "$A <|eos|>"
    elif kind == "metaspace-unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS.values()), unk_token="<|unk|>", show_progress=False)
        single = "<|bos|> $A <|eos|>"
    else:  # wordpiece, BERT-style
        tok = Tokenizer(models.WordPiece(unk_token="<|unk|>"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False)
        single = "<|bos|> $A <|eos|>"
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, tok.token_to_id(t)) for t in ("<|bos|>", "<|eos|>")]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def _indented_json() -> str:
    """~40 KB of indented JSON with string values: no line starts with a word character, no space precedes one."""
    import json

    policies = {f"Policy{i}": {"Effect": "Allow", "Action": [f"sts:Set{i}", "iam:Get"], "Resource": [f"arn:aws:iam::*:role/r_{i}"]}
                for i in range(260)}
    return json.dumps(policies, indent=1)


@pytest.mark.parametrize("kind", ["bytelevel", "bytelevel-prefix-space", "metaspace-unigram", "wordpiece"])
def test_indented_json_is_cut_at_line_ends_token_for_token(kind):
    from llmkit.data.tokens import DocumentEncoder

    tokenizer = _train(kind)
    text = _indented_json()
    encoder = DocumentEncoder(tokenizer, batch_chars=5000, piece_chars=2000)
    pieces = encoder.split(text)
    # Before line-end cuts, such a document had no verified cut and was tokenized whole (a 6 MB one
    # set the peak memory of a 0.5 GB corpus); now every piece is at most piece_chars.
    assert encoder.unsplittable == 0
    assert len(pieces) >= 15 and max(map(len, pieces)) <= 2000
    joined = [i for _, ids, _ in encoder.pieces([(0, text)]) for i in ids]
    whole = tokenizer(text)["input_ids"]
    assert joined == (whole if whole[-1] == tokenizer.eos_token_id else whole + [tokenizer.eos_token_id])


@pytest.mark.parametrize("kind", ["bytelevel", "bytelevel-prefix-space", "metaspace-unigram", "wordpiece"])
def test_split_documents_tokenize_token_for_token_like_whole_ones(kind):
    from llmkit.data.tokens import DocumentEncoder

    tokenizer = _train(kind)
    texts = _texts()
    encoder = DocumentEncoder(tokenizer, batch_chars=5000, piece_chars=2000)
    calls: list[int] = []
    ids_of = encoder._ids
    encoder._ids = lambda batch, special: calls.append(sum(map(len, batch))) or ids_of(batch, special)
    docs: list[list[int]] = []
    pieces = 0
    for _, ids, first in encoder.pieces((None, t) for t in texts):
        if first:
            docs.append([])
        docs[-1].extend(ids)
        pieces += 1
    # The reference, written here: tokenizer(text) on the whole document, EOS appended unless already last.
    expected = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        expected.append(ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id])
    assert docs == expected
    assert pieces > 30  # the long documents really were split
    # Tokenizer calls hold at most batch_chars characters, or one piece longer than that: the 5,000-character
    # run of "x" has no cut, so the piece holding it (up to the next verified cut) is longer than piece_chars.
    longest_piece = max(len(p) for t in texts for p in encoder.split(t))
    assert 5000 < longest_piece < 8000
    assert max(calls) <= max(5000, longest_piece)


def test_a_tokenizer_that_adds_nothing_around_text_still_splits():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmkit.data.tokens import DocumentEncoder

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_texts(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")
    encoder = DocumentEncoder(tokenizer, batch_chars=4000, piece_chars=1500)
    text = _texts()[0]
    joined = [i for _, ids, _ in encoder.pieces([(0, text)]) for i in ids]
    assert joined == tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]


# ----------------------------------------------------------------------------------------------
# Cache entries
# ----------------------------------------------------------------------------------------------


def _recipe(tmp_path: Path, tokenizer_dir: Path, corpus: Path, **data):
    from llmkit.recipes import recipe_from_dict

    return recipe_from_dict({
        "stage": "pretrain", "output_dir": str(tmp_path / "run"), "tokenizer": str(tokenizer_dir),
        "model": {"type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64},
        "data": {"train": [str(corpus)], "seq_len": 32, "cache_dir": str(tmp_path / "cache"), **data},
        "train": {"max_steps": 2, "micro_batch_size": 2},
    }, stage="pretrain")  # fmt: skip


@pytest.fixture()
def big_corpus(tmp_path) -> Path:
    """About 1 MB of JSONL: pydoc topics, some joined into long records, so several chunks are dealt out."""
    texts = _texts()
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(3):
            for text in texts:
                f.write(json.dumps({"text": text + f" copy {i}"}) + "\n")
    return path


def _entry_bytes(entry: Path) -> dict[str, bytes]:
    return {name: (entry / name).read_bytes() for name in ("train.tokens.bin", "train.docs.bin", "validation.tokens.bin", "validation.docs.bin")}


def test_two_processes_build_the_same_entry_as_one(tmp_path, tokenizer_dir, tokenizer, big_corpus, monkeypatch):
    from llmkit.data import lm
    from llmkit.data.cache import build_shared

    monkeypatch.setattr(lm, "CHUNK_CHARS", 60_000)  # several chunks for each worker
    one = lm.prepare_cache(_recipe(tmp_path / "one", tokenizer_dir, big_corpus, validation_fraction=0.1), tokenizer)

    recipe = _recipe(tmp_path / "two", tokenizer_dir, big_corpus, validation_fraction=0.1)
    root, key = Path(recipe.data.cache_dir), lm.cache_key(recipe, tokenizer)
    result: dict = {}

    def helper():
        try:
            result["helper"] = build_shared(root, [(key, lm.LMBuild(recipe, tokenizer))], worker=1, workers=2, poll_s=0.02)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=helper)
    thread.start()
    (entry, meta, hit), = build_shared(root, [(key, lm.LMBuild(recipe, tokenizer))], worker=0, workers=2, poll_s=0.02)
    thread.join(timeout=60)
    assert "error" not in result and not hit and meta["processes"] == 2
    assert result["helper"][0][0] == entry
    assert _entry_bytes(entry) == _entry_bytes(one)
    assert sorted(p.name for p in root.iterdir()) == [entry.name]  # no parts, claims or temporaries left


def test_same_size_wrong_content_is_caught_by_the_checksum_and_rebuilt(tmp_path, tokenizer_dir, tokenizer, corpus, capsys):
    from llmkit.data.lm import prepare_cache

    recipe = _recipe(tmp_path, tokenizer_dir, corpus)
    entry = prepare_cache(recipe, tokenizer)
    tokens = entry / "train.tokens.bin"
    good = tokens.read_bytes()
    damaged = bytearray(good)
    damaged[100:2000] = bytes(1900)
    tokens.write_bytes(bytes(damaged))
    capsys.readouterr()
    assert prepare_cache(recipe, tokenizer) == entry
    err = capsys.readouterr().err
    assert "is incomplete or damaged; rebuilding it" in err and "cache hit" not in err
    assert tokens.read_bytes() == good
    assert "checksums" in json.loads((entry / "meta.json").read_text())


def test_a_corpus_too_small_for_one_step_exits_2_and_leaves_no_cache_entry(tmp_path, tokenizer_dir):
    train = tmp_path / "one.txt"
    train.write_text("a single short line that was given by mistake\n", encoding="utf-8")
    recipe = _recipe(tmp_path, tokenizer_dir, train).model_dump(mode="json", exclude_defaults=True)
    recipe["train"]["micro_batch_size"] = 64
    result = cli("pretrain", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.exit_code == 2 and "fewer than one optimizer step needs" in result.output
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.iterdir()], list(cache.iterdir())


def test_a_mixture_source_too_small_under_repeat_error_leaves_no_cache_entry(tmp_path, tokenizer_dir, corpus):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"tiny record number {i} " * 8}) + "\n" for i in range(6)), encoding="utf-8")
    recipe = _recipe(tmp_path, tokenizer_dir, corpus).model_dump(mode="json", exclude_defaults=True)
    recipe["data"]["train"] = [{"path": str(corpus), "weight": 0.5}, {"path": str(small), "weight": 0.5}]
    recipe["data"]["mixture_repeat"] = "error"
    recipe["train"]["max_steps"] = 200
    result = cli("pretrain", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.exit_code == 2 and "data.mixture_repeat" in result.output, result.output
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.iterdir()], list(cache.iterdir())


def test_a_tokenizer_with_sparse_ids_caches_as_uint32_and_sizes_the_model_by_its_largest_id(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llmkit import models as llmkit_models
    from llmkit.data.lm import open_cache, prepare_cache

    words = sorted(set(" ".join(_texts()[:2]).split()))[:997]
    vocab = {"<|unk|>": 0, "<|eos|>": 1, "<|pad|>": 2, **{w: 70 * (i + 1) for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>", unk_token="<|unk|>")
    assert len(tokenizer) == 1000 and max(vocab.values()) == 69_790
    tokenizer.save_pretrained(tmp_path / "tok")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(words[i : i + 50])}) + "\n" for i in range(0, 900, 50)), encoding="utf-8")
    recipe = _recipe(tmp_path, tmp_path / "tok", corpus)
    entry = prepare_cache(recipe, tokenizer)
    tokens, _ = open_cache(entry, "train")
    assert tokens.dtype == np.uint32 and int(tokens.max()) == max(vocab[w] for w in words[:900])
    config = llmkit_models.training_config(recipe, tokenizer)
    assert config.vocab_size >= 69_791


@pytest.mark.slow
def test_two_launched_processes_tokenize_in_parallel_into_the_single_process_entry(tmp_path, tokenizer_dir, big_corpus):
    """torchrun --nproc_per_node 2 (gloo process group, as a CPU launch has): one entry, the same bytes as 1 process."""
    script = tmp_path / "prepare.py"
    script.write_text(
        "import json, sys, torch.distributed as td\n"
        "from llmkit.data import lm\nfrom llmkit.models import load_tokenizer\nfrom llmkit.recipes import recipe_from_dict\n"
        "td.init_process_group('gloo')\n"
        "lm.CHUNK_CHARS = 60_000\n"
        "recipe = recipe_from_dict(json.loads(sys.argv[1]), stage='pretrain')\n"
        "entry = lm.prepare_cache(recipe, load_tokenizer(recipe.tokenizer))\n"
        "td.barrier()\nprint('ENTRY', td.get_rank(), entry, flush=True)\n", encoding="utf-8")
    results = {}
    for procs in (1, 2):
        recipe = _recipe(tmp_path / f"p{procs}", tokenizer_dir, big_corpus, validation_fraction=0.1).model_dump(mode="json")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(29500 + procs * 7),
             str(script), json.dumps(recipe)], capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        entries = {line.split()[2] for line in run.stdout.splitlines() if line.startswith("ENTRY")}
        assert len(entries) == 1
        results[procs] = Path(entries.pop())
        if procs == 2:
            assert "with 2 processes" in run.stderr and json.loads((results[2] / "meta.json").read_text())["processes"] == 2
    assert _entry_bytes(results[2]) == _entry_bytes(results[1])
    assert sorted(p.name for p in results[2].parent.iterdir()) == [results[2].name]


def test_another_machines_claim_makes_this_one_wait_and_a_stale_claim_is_taken_over(tmp_path, tokenizer_dir, tokenizer, corpus):
    import time

    from llmkit.data import lm
    from llmkit.data.cache import CLAIM_STALE_S, entry_name

    recipe = _recipe(tmp_path, tokenizer_dir, corpus)
    root, key = Path(recipe.data.cache_dir), lm.cache_key(recipe, tokenizer)
    root.mkdir(parents=True)
    claim = root / f".{entry_name('claim', [key])}.claim"
    claim.write_text(json.dumps({"node": "another-machine", "launcher": 1, "pid": 1, "workers": 8, "dirs": {}}), encoding="utf-8")
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(entry=lm.prepare_cache(recipe, tokenizer, poll_s=0.02)))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive() and not (root / key).exists()  # the other machine is tokenizing: wait, do not duplicate it
    old = time.time() - CLAIM_STALE_S - 5  # ... until its heartbeat stops (that machine died)
    os.utime(claim, (old, old))
    waiter.join(timeout=60)
    assert result["entry"] == root / key and (root / key / "COMPLETE").is_file() and not claim.exists()


def test_a_build_that_finds_an_intact_entry_published_keeps_it(tmp_path, tokenizer_dir, tokenizer, corpus):
    from llmkit.data import lm
    from llmkit.data.cache import _publish
    from llmkit.data.lm import open_cache

    recipe = _recipe(tmp_path, tokenizer_dir, corpus)
    entry = lm.prepare_cache(recipe, tokenizer)
    mapped, _ = open_cache(entry, "train")  # a training run on another machine reads it
    inode = (entry / "train.tokens.bin").stat().st_ino
    late = tmp_path / "cache" / ".late-build"  # that machine's own, later build of the same entry
    late.mkdir()
    lm.LMBuild(recipe, tokenizer).shard(late, 0, 1)
    _publish(late, entry, {"late": True})
    assert (entry / "train.tokens.bin").stat().st_ino == inode and "late" not in json.loads((entry / "meta.json").read_text())
    assert not late.exists() and int(mapped[-1]) == tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------------
# Resume on changed data (N1), absurd budgets (N9)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["cached", "streamed-mixture"])
def test_a_resume_whose_training_file_changed_exits_2_naming_it(tmp_path, tokenizer_dir, layout):
    from tests.pretrain_helpers import recipe_dict

    a = write_corpus(tmp_path, docs=24, name="a.jsonl")
    b = write_corpus(tmp_path, docs=24, name="b.jsonl", offset=24)
    recipe = recipe_dict(tmp_path, tokenizer_dir, a, train={"max_steps": 4, "save_every": 2, "eval_every": 100})
    changed = a
    if layout == "streamed-mixture":
        recipe["data"].update(train=[{"path": str(a), "weight": 0.7}, {"path": str(b), "weight": 0.3}], streaming=True)
        changed = b
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert cli("pretrain", str(path)).exit_code == 0
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert str(changed.resolve()) in state["data_fingerprint"]["files"]
    # The same data: raising the budget of the finished run trains on from its checkpoint.
    assert cli("pretrain", str(path), "--set", "train.max_steps=6").exit_code == 0
    lines = changed.read_text(encoding="utf-8").splitlines(keepends=True)
    changed.write_text("".join(lines[: len(lines) // 2]), encoding="utf-8")  # halved between the runs
    cache = tmp_path / "cache"
    before = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    result = cli("pretrain", str(path), "--set", "train.max_steps=8")
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert str(changed.resolve()) in message and "changed since the checkpoint" in message
    assert "restore the data" in message and "--overwrite" in message
    assert (sorted(p.name for p in cache.iterdir()) if cache.exists() else []) == before  # nothing tokenized for it
    assert not (tmp_path / "run" / "checkpoints" / "step-00000008").exists()


def test_an_absurd_token_budget_is_refused_and_counts_are_exact(tmp_path, tokenizer_dir, corpus):
    from llmkit.recipes import recipe_from_dict
    from tests.pretrain_helpers import recipe_dict

    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus)
    recipe["train"].pop("max_steps")
    recipe["train"]["max_tokens"] = "1.23456789012345e14"
    assert recipe_from_dict(recipe, stage="pretrain").train.max_tokens == 123456789012345  # exact: not through a float
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = cli("validate", str(path), "--set", "train.max_tokens=1e30")
    assert result.exit_code == 2
    assert "train.max_tokens (1e+30)" in result.output and "more than any run" in result.output


def test_a_budget_of_many_epochs_is_stated_with_a_warning(tmp_path, tokenizer_dir, tokenizer, corpus, capsys):
    from llmkit.data.lm import lm_train_data

    blocks = len(lm_train_data(_recipe(tmp_path, tokenizer_dir, corpus), tokenizer, world_size=1).train)
    err = capsys.readouterr().err
    assert "epochs of the corpus" in err and "warning" not in err
    recipe = _recipe(tmp_path, tokenizer_dir, corpus).model_copy(update={"train": _recipe(tmp_path, tokenizer_dir, corpus).train.model_copy(update={"max_steps": 5000})})
    lm_train_data(recipe, tokenizer, world_size=1)
    err = capsys.readouterr().err
    expected = 5000 * 2 / blocks  # 5,000 steps of micro_batch_size 2
    assert f"warning: the run's 5,000 steps read 10,000 blocks, {expected:,.2f} epochs of the corpus ({blocks:,} blocks)" in err
    assert "add data or lower train.max_steps" in err
