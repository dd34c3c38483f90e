"""Data pipeline: packing keeps every token, the cache is reused, document boundaries, streaming.

    pytest tests/test_data.py -q
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from pretrain_helpers import final_weights, recipe_dict, run_in_process, write_corpus, write_recipe
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.recipes import recipe_from_dict


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from llmkit.models import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture()
def recipe(tmp_path, tokenizer_dir):
    corpus = write_corpus(tmp_path, docs=12)
    return recipe_from_dict(recipe_dict(tmp_path, tokenizer_dir, corpus), stage="pretrain")


def _independent_tokens(recipe, tokenizer) -> list[list[int]]:
    """Each document as tokenizer(text) returns it, plus EOS: what packing must keep, in order."""
    from llmkit.data.sources import iter_texts

    return [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in iter_texts(recipe.data.train)]


def test_packing_keeps_every_token_but_the_final_partial_block(recipe, tokenizer):
    from llmkit.data.lm import lm_train_data

    data = lm_train_data(recipe, tokenizer, world_size=1)
    docs = _independent_tokens(recipe, tokenizer)
    flat = [t for d in docs for t in d]
    seq_len = recipe.data.seq_len
    blocks = np.concatenate([data.train[i]["input_ids"] for i in range(len(data.train))])
    stats = data.extra["pack_stats"]
    assert stats["tokens"] == len(flat) and stats["documents"] == len(docs)
    assert stats["blocks"] == len(flat) // seq_len and stats["dropped_tokens"] == len(flat) % seq_len
    assert blocks.tolist() == flat[: len(blocks)]
    assert len(blocks) + stats["dropped_tokens"] == len(flat)


def test_second_prepare_hits_the_cache_and_says_so(tmp_path, tokenizer_dir, capsys):
    corpus = write_corpus(tmp_path, docs=6)
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(tmp_path, tokenizer_dir, corpus))
    runner = CliRunner()
    first = runner.invoke(app, ["data", "prepare", str(path)])
    assert first.exit_code == 0, first.output
    assert "blocks of 32" in first.output and "dropped" in first.output
    cache_dirs = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("lm-")]
    assert len(cache_dirs) == 1
    stamp = (cache_dirs[0] / "train.tokens.bin").stat().st_mtime_ns
    capsys.readouterr()
    second = runner.invoke(app, ["data", "prepare", str(path)])
    assert second.exit_code == 0
    assert "cache hit, skipping tokenization" in second.output + capsys.readouterr().err
    assert (cache_dirs[0] / "train.tokens.bin").stat().st_mtime_ns == stamp
    # seq_len is a view over the cache; the text field or max_samples make a new cache
    third = runner.invoke(app, ["data", "prepare", str(path), "--set", "data.seq_len=16"])
    assert third.exit_code == 0 and len(list((tmp_path / "cache").glob("lm-*"))) == 1
    runner.invoke(app, ["data", "prepare", str(path), "--set", "data.max_samples=3"])
    assert len(list((tmp_path / "cache").glob("lm-*"))) == 2


def test_position_ids_restart_at_each_document(recipe, tokenizer):
    from llmkit.data.lm import lm_train_data
    from llmkit.data.packing import collate_blocks

    recipe.data.doc_masking = "position_ids"
    data = lm_train_data(recipe, tokenizer, world_size=1)
    docs = _independent_tokens(recipe, tokenizer)
    starts = set(np.cumsum([0] + [len(d) for d in docs])[:-1].tolist())
    seq_len = recipe.data.seq_len
    for i in range(len(data.train)):
        positions = data.train[i]["position_ids"]
        for j, p in enumerate(positions.tolist()):
            t = i * seq_len + j
            if j == 0 or t in starts:
                assert p == 0
            else:
                assert p == positions[j - 1] + 1
    batch = collate_blocks("position_ids")([data.train[0], data.train[1]])
    assert batch["attention_mask"].all() and batch["position_ids"].shape == (2, seq_len)
    assert "attention_mask" not in collate_blocks("attention")([data.train[0]])
    assert set(collate_blocks("none")([data.train[0]])) == {"input_ids", "labels"}


def test_attention_stays_within_each_document(tiny_model_dir):
    """With doc_masking: attention, a document packed after another scores as if it stood alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmkit.data.packing import block_positions, collate_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(5, 500, (10,), generator=gen), torch.randint(5, 500, (14,), generator=gen)
    block = torch.cat([a, b]).numpy()
    example = {"input_ids": block, "position_ids": block_positions(np.array([0, 10]), 0, 24)}
    with torch.no_grad():
        # use_cache=False as in training: transformers infers packed documents only without a KV cache
        inputs = {k: v for k, v in collate_blocks("attention")([example]).items() if k != "labels"}
        packed = model(**inputs, use_cache=False).logits
        alone = model(input_ids=b[None], use_cache=False).logits
        leaky = model(input_ids=torch.from_numpy(block)[None], use_cache=False).logits
    torch.testing.assert_close(packed[0, 10:], alone[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(leaky[0, 10:], alone[0], atol=1e-3)


def test_validation_fraction_holds_out_whole_documents(tmp_path, tokenizer_dir, tokenizer):
    from llmkit.data.lm import lm_train_data
    from llmkit.data.splits import held_out

    corpus = write_corpus(tmp_path, docs=30)
    recipe = recipe_from_dict(recipe_dict(tmp_path, tokenizer_dir, corpus, data={"validation_fraction": 0.2}), stage="pretrain")
    data = lm_train_data(recipe, tokenizer, world_size=1)
    docs = _independent_tokens(recipe, tokenizer)
    held = [held_out(i, 0.2) for i in range(len(docs))]
    assert 0 < sum(held) < len(docs)
    val = [t for d, h in zip(docs, held, strict=True) if h for t in d]
    got = np.concatenate([data.validation[i]["input_ids"][data.validation[i].get("labels", data.validation[i]["input_ids"]) != -100] for i in range(len(data.validation))])
    assert got.tolist() == val  # every held-out token, the final partial block padded rather than dropped
    assert data.extra["pack_stats"]["tokens"] == sum(len(d) for d, h in zip(docs, held, strict=True) if not h)


@pytest.mark.parametrize("doc_masking", ["none", "position_ids"])
def test_streaming_yields_the_cached_blocks_and_resumes_from_a_position(recipe, tokenizer, doc_masking):
    from llmkit.data.lm import lm_train_data

    recipe.data.doc_masking = doc_masking
    cached = lm_train_data(recipe, tokenizer, world_size=1).train
    recipe.data.streaming = True
    stream = lm_train_data(recipe, tokenizer, world_size=1).stream
    it = stream(None)
    first = [next(it) for _ in range(len(cached) + 3)]  # runs into the second epoch
    for i in range(len(cached)):
        assert first[i][0]["input_ids"].tolist() == cached[i]["input_ids"].tolist()
        if doc_masking != "none":
            assert first[i][0]["position_ids"].tolist() == cached[i]["position_ids"].tolist()
    assert first[len(cached)][0]["input_ids"].tolist() == cached[0]["input_ids"].tolist()
    assert first[len(cached)][1]["epoch"] == 1
    k = len(cached) // 2
    resumed = stream(first[k][1])
    for i in range(k + 1, k + 6):
        example, position = next(resumed)
        assert example["input_ids"].tolist() == cached[i]["input_ids"].tolist() and position == first[i][1]
    json.dumps(first[k][1])  # positions are stored in JSON checkpoints


def test_streaming_run_resumes_to_the_same_weights(tmp_path, tokenizer_dir):
    corpus = write_corpus(tmp_path, docs=8)
    base = recipe_dict(tmp_path, tokenizer_dir, corpus, data={"streaming": True}, train={"schedule": "constant", "max_steps": 10, "save_every": 5})
    run_in_process(dict(base, output_dir=str(tmp_path / "straight")))
    split = dict(base, output_dir=str(tmp_path / "split"), train={**base["train"], "max_steps": 5})
    run_in_process(split)
    summary = run_in_process(dict(split, train={**base["train"]}))
    assert summary["resumed_from"] == 5
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert all(a[k].equal(b[k]) for k in a)


def test_non_main_processes_wait_for_the_cache_without_collectives(recipe, tokenizer):
    from llmkit.data.lm import prepare_cache

    result = {}
    waiter = threading.Thread(target=lambda: result.update(path=prepare_cache(recipe, tokenizer, main_process=False, poll_s=0.05)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()  # nothing built yet: it waits
    built = prepare_cache(recipe, tokenizer, main_process=True)
    waiter.join(timeout=30)
    assert result["path"] == built and (built / "COMPLETE").is_file()


def test_packed_blocks_pickle_by_file_name_for_loader_workers(recipe, tokenizer):
    import pickle

    from llmkit.data.lm import lm_train_data

    blocks = lm_train_data(recipe, tokenizer, world_size=1).train
    payload = pickle.dumps(blocks)
    assert len(payload) < 10_000 < blocks.tokens.nbytes  # the file name travels, not the tokens
    again = pickle.loads(payload)
    assert len(again) == len(blocks) and again[3]["input_ids"].tolist() == blocks[3]["input_ids"].tolist()


# ------------------------------------------------------------------------------------------------
# `llmkit data inspect` on a pretrain recipe (report 2026-12-06 N11): the packed blocks, not advice to pretrain
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.2])
def test_data_inspect_shows_the_blocks_training_reads(tmp_path, tokenizer_dir, tokenizer, fraction):
    from llmkit.data.lm import lm_train_data
    from llmkit.stages.data import first_blocks

    corpus = write_corpus(tmp_path, docs=30)
    raw = recipe_dict(tmp_path, tokenizer_dir, corpus, data={"validation_fraction": fraction})
    path = write_recipe(tmp_path / "pre.yaml", raw)
    result = CliRunner().invoke(app, ["data", "inspect", str(path), "-n", "3"])
    assert result.exit_code == 0, result.output
    assert "block 2 [32 tokens" in result.stdout and "block 3" not in result.stdout
    # The blocks are those the cache packs for training (built independently by lm.py), in order.
    recipe = recipe_from_dict(raw, stage="pretrain")
    data = lm_train_data(recipe, tokenizer, world_size=1)
    cached = [data.train[i]["input_ids"].tolist() for i in range(3)]
    assert first_blocks(recipe, tokenizer, recipe.data.train, 3) == cached
    eos = tokenizer.decode([tokenizer.eos_token_id])
    ends = sum(block.count(tokenizer.eos_token_id) for block in cached)
    assert result.stdout.count(f"||{eos}||") == ends
    assert not (tmp_path / "run").exists()


def test_data_inspect_on_a_recipe_that_trains_nothing_is_one_line(tmp_path):
    from pretrain_helpers import assert_clean_error

    path = write_recipe(tmp_path / "eval.yaml", {"stage": "eval", "output_dir": str(tmp_path / "run"), "model": {"path": str(tmp_path)}, "data": {"test": "builtin:pydoc/test"}, "metrics": ["perplexity"]})
    result = CliRunner().invoke(app, ["data", "inspect", str(path)])
    assert_clean_error(result, "finetune recipe", "pretrain recipe", "this is an eval recipe")
