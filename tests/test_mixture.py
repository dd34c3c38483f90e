"""Weighted data mixtures: the seeded sampler, realised shares, per-source reports and validation, exact resume.

    pytest tests/test_mixture.py -q
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from pretrain_helpers import final_weights, read_events, recipe_dict, run_in_process

from llmkit.data.mixture import MixtureOrder, Schedule, largest_remainder
from llmkit.errors import DataError, RecipeError
from llmkit.recipes import recipe_from_dict

WEIGHTS = {"prose": 0.75, "code": 0.25}
SHARE_TOLERANCE = 0.03
"""Realised share of a source over a run of a few hundred blocks: within this of its weight."""


# ----------------------------------------------------------------------------------------------
# The sampler, on its own
# ----------------------------------------------------------------------------------------------


def test_every_mixture_epoch_holds_each_source_at_its_share():
    sizes, shares = [120, 40, 90], [0.5, 0.2, 0.3]
    order = MixtureOrder(sizes, shares)
    assert order.counts == largest_remainder(shares, 250) == [125, 50, 75]
    seen_of_small: list[int] = []
    for epoch in range(3):
        blocks = order.epoch_blocks(seed=7, epoch=epoch)
        per_source = Counter(order.source_of(blocks).tolist())
        assert [per_source[k] for k in range(3)] == [125, 50, 75]
        seen_of_small += [b for b in blocks.tolist() if 120 <= b < 160]
    # The 40-block source is drawn 50 times an epoch: every block once before any block twice.
    counts = Counter(seen_of_small)
    assert len(seen_of_small) == 150 and set(counts.values()) <= {3, 4} and len(counts) == 40


def test_the_order_is_a_pure_function_of_seed_and_epoch():
    a, b = MixtureOrder([30, 50], [0.4, 0.6]), MixtureOrder([30, 50], [0.4, 0.6])
    assert a(3, 5, 4) == b(3, 5, 4) and a(3, 5, 4) != a(3, 6, 4) and a(3, 5, 4) != a(4, 5, 4)
    assert all(len(batch) == 4 for batch in a(3, 0, 4)) and len(a(3, 0, 4)) == 80 // 4


def test_the_streamed_schedule_serves_each_source_its_share_of_every_chunk():
    schedule = Schedule([0.7, 0.2, 0.1], seed=1, chunk=50)
    picks = [schedule.source(t) for t in range(175)]
    for start in (0, 50, 100):
        assert Counter(picks[start : start + 50]) == Counter({0: 35, 1: 10, 2: 5})
    assert schedule.served(175) == [picks.count(k) for k in range(3)]
    assert picks == [Schedule([0.7, 0.2, 0.1], seed=1, chunk=50).source(t) for t in range(175)]


def test_recipe_weights_all_or_none_and_labels_unique():
    base = {"stage": "pretrain", "output_dir": "x", "tokenizer": "t", "model": {"type": "llama"}, "train": {"max_steps": 1}}
    with pytest.raises(RecipeError, match=r"data.train.1: has no weight while other sources have one"):
        recipe_from_dict({**base, "data": {"train": [{"path": "a.txt", "weight": 0.5}, "b.txt"]}})
    with pytest.raises(RecipeError, match=r"data.train.0.wieght: unknown key; did you mean 'weight'\?"):
        recipe_from_dict({**base, "data": {"train": [{"path": "a.txt", "wieght": 0.5}]}})
    plain = recipe_from_dict({**base, "data": {"train": ["a.txt", "b.txt"]}})
    assert plain.data.train == ["a.txt", "b.txt"] and not plain.data.is_mixture
    from llmkit.data.mixture import mixture_of

    twice = recipe_from_dict({**base, "data": {"train": [{"path": "x/a.txt", "weight": 1, "label": "a"}, {"path": "y/a.txt", "weight": 1, "label": "a"}]}})
    with pytest.raises(RecipeError, match=r"data.train.1.label: 'a' is already the label of data.train.0"):
        mixture_of(twice.data)
    derived = recipe_from_dict({**base, "data": {"train": [{"path": "x/a.txt", "weight": 3}, {"path": "y/a.txt", "weight": 1},
                                                           {"hub": "org/web", "weight": 1}]}})
    mix = mixture_of(derived.data)
    assert mix.labels == ["a", "a-2", "web"] and mix.shares == [0.6, 0.2, 0.2]


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def _paragraphs(path, first_topic: int, topics: int):
    """A jsonl file whose documents are the paragraphs of a few pydoc topics (many short documents)."""
    import pydoc_data.topics

    texts = [text for _, text in sorted(pydoc_data.topics.topics.items())][first_topic : first_topic + topics]
    paragraphs = [p for text in texts for p in text.split("\n\n") if p.strip()]
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixture-corpora")
    return _paragraphs(d / "prose.jsonl", 0, 2), _paragraphs(d / "code.jsonl", 30, 2)


def _recipe(tmp_path, tokenizer_dir, corpora, name, data=None, **train):
    prose, code = corpora
    recipe = recipe_dict(tmp_path, tokenizer_dir, prose, train={"max_steps": 60, "save_every": 30, "eval_every": 30, **train})
    recipe["data"].update({
        "train": [{"path": str(prose), "weight": 3, "label": "prose"}, {"path": str(code), "weight": 1}],  # "code" by default
        "validation_fraction": 0.2,
        **(data or {}),
    })
    recipe["output_dir"] = str(tmp_path / name)
    return recipe


def _trace(tmp_path, recipe, name):
    trace = tmp_path / f"trace-{name}"
    trace.mkdir()
    os.environ["LLMKIT_TRACE_SAMPLES"] = str(trace)
    try:
        summary = run_in_process(recipe)
    finally:
        del os.environ["LLMKIT_TRACE_SAMPLES"]
    return summary, [json.loads(line)["ids"] for line in (trace / "samples-rank0.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, tokenizer_dir, corpora):
    tmp = tmp_path_factory.mktemp("mixture-run")
    recipe = _recipe(tmp, tokenizer_dir, corpora, "run")
    summary, trace = _trace(tmp, recipe, "run")
    return tmp, recipe, summary, trace


def test_realised_shares_match_the_weights_and_the_run_reports_them(mixed_run, tokenizer_dir):
    from llmkit.data.lm import lm_train_data
    from llmkit.models import load_tokenizer

    tmp, recipe, summary, trace = mixed_run
    data = lm_train_data(recipe_from_dict(json.loads(json.dumps(recipe)), stage="pretrain"), load_tokenizer(tokenizer_dir), world_size=1)
    prose_blocks = data.train.offsets[1]
    blocks = [i for step in trace for i in step]
    assert len(blocks) == 60 * 4  # a few hundred blocks: 60 steps x 4
    counts = {"prose": sum(i < prose_blocks for i in blocks), "code": sum(i >= prose_blocks for i in blocks)}
    assert len(data.train) > 120 and len(blocks) > len(data.train)  # the run goes past one mixture epoch
    for label, weight in WEIGHTS.items():
        assert abs(counts[label] / len(blocks) - weight) <= SHARE_TOLERANCE, counts
    # The run's report (a "mixture" event and summary.json) says exactly what the trace saw.
    (event,) = read_events(recipe["output_dir"], "mixture")
    for label, row in event["sources"].items():
        assert row["blocks"] == counts[label] and row["tokens"] == counts[label] * 32
        assert row["share"] == pytest.approx(counts[label] / len(blocks), abs=1e-6) and row["weight"] == WEIGHTS[label]
        assert row["epochs"] == pytest.approx(counts[label] / len(data.train.parts[0 if label == "prose" else 1]), abs=1e-4)
    assert summary["mixture"] == event["sources"]


def test_each_source_has_its_own_validation_loss(mixed_run):
    _, recipe, summary, _ = mixed_run
    evals = read_events(recipe["output_dir"], "eval")
    assert [e["step"] for e in evals] == [30, 60]
    for event in evals:
        parts = [event["val_loss/prose"], event["val_loss/code"]]
        assert min(parts) <= event["val_loss"] <= max(parts)  # val_loss is over both sources' tokens
    assert evals[-1]["val_loss/prose"] < evals[0]["val_loss/prose"]


def test_the_plan_and_the_realised_report_are_printed(tmp_path, tokenizer_dir, corpora, capsys):
    run_in_process(_recipe(tmp_path, tokenizer_dir, corpora, "printed", max_steps=8))
    out = capsys.readouterr()
    assert "mixture:          prose: " in out.err and "of the tokens the run plans (weight 75.0%" in out.err
    assert "of the tokens the run trained (weight 25.0%" in out.out
    line = next(line for line in (out.out + out.err).splitlines() if line.startswith("step 8: val_loss "))
    assert "val_loss/prose " in line and "val_loss/code " in line


def test_a_source_too_small_for_its_share_is_refused_or_repeated(tmp_path, tokenizer_dir, corpora, capsys):
    recipe = _recipe(tmp_path, tokenizer_dir, corpora, "refused", data={"mixture_repeat": "error"}, max_steps=200)
    with pytest.raises(DataError, match=r"data.train.0 \(prose\): \d+ blocks, but its 75.0% share of the run draws \d+ of them"):
        run_in_process(recipe)
    assert not (tmp_path / "refused").exists()
    run_in_process(_recipe(tmp_path, tokenizer_dir, corpora, "repeated", max_steps=200, save_every=1000, eval_every=1000))
    assert "warning: data.train.0 (prose): " in capsys.readouterr().err


def test_resume_with_a_mixture_is_bit_identical(tmp_path, tokenizer_dir, corpora):
    straight = _recipe(tmp_path, tokenizer_dir, corpora, "straight", schedule="constant", max_steps=40, eval_every=1000)
    _, reference = _trace(tmp_path, straight, "straight")
    split = _recipe(tmp_path, tokenizer_dir, corpora, "split", schedule="constant", max_steps=25, save_every=25, eval_every=1000)
    _, first = _trace(tmp_path, split, "split-1")
    split["train"]["max_steps"] = 40
    summary, second = _trace(tmp_path, split, "split-2")
    assert summary["resumed_from"] == 25 and first + second == reference  # every block once, in the same order
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_streamed_mixture_resumes_bit_identical_and_reports_shares(tmp_path, tokenizer_dir, corpora):
    prose, code = corpora
    data = {"streaming": True, "validation_fraction": 0.0, "train": [
        {"path": str(prose), "weight": 3, "label": "prose", "validation": [str(code)]}, {"path": str(code), "weight": 1}]}
    straight = _recipe(tmp_path, tokenizer_dir, corpora, "s-straight", data=data, schedule="constant", max_steps=30, eval_every=1000)
    run_in_process(straight)
    split = _recipe(tmp_path, tokenizer_dir, corpora, "s-split", data=data, schedule="constant", max_steps=15, save_every=15, eval_every=1000)
    run_in_process(split)
    split["train"]["max_steps"] = 30
    summary = run_in_process(split)
    assert summary["resumed_from"] == 15
    a, b = final_weights(tmp_path / "s-straight"), final_weights(tmp_path / "s-split")
    assert all(a[k].equal(b[k]) for k in a)
    served = Schedule([0.75, 0.25], seed=7).served(30 * 4)
    assert [summary["mixture"][label]["blocks"] for label in ("prose", "code")] == served
    assert abs(served[0] / sum(served) - 0.75) <= SHARE_TOLERANCE
    (last,) = read_events(tmp_path / "s-split", "eval")[-1:]
    assert "val_loss/prose" in last and "val_loss/code" not in last  # only prose has its own validation
