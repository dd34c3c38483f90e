"""`llmkit eval` with metrics [multiple_choice] / [cloze], and a multiple-choice task in pretraining's train.evals.

    pytest tests/test_eval_choice.py -q

Numbers are checked against plain transformers (test_choice.reference: one unpadded forward pass per
(context, choice)), records are checked before any model is loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from pretrain_helpers import TINY_MODEL, read_events, recipe_dict, run_in_process, write_corpus
from test_choice import reference
from typer.testing import CliRunner

from llmkit.cli import app

runner = CliRunner()
WINDOW = 256  # the tiny model's max_position_embeddings (tests/conftest.py)

RECORDS = [
    {"question": "Which keyword defines a function in Python?", "choices": ["def", "lambda expression", "class"], "label": 0},
    {"question": "A list literal is written with", "choices": ["square brackets", "braces"], "label": "A"},
    {"question": "The value of len('abc') is", "choices": ["two", "three", "a very long wrong answer indeed"], "label": 1},
    # Longer than the 256-token window: cut from the left and counted, not refused.
    {"question": "Read this. " + "The interpreter reads the source and runs it. " * 60 + "So it", "choices": ["runs", "sleeps"], "label": 0},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def eval_recipe(tmp_path: Path, model_path, test, **extra) -> Path:
    recipe = {
        "stage": "eval",
        "output_dir": str(tmp_path / "out"),
        "model": {"path": model_path},
        "data": {"test": test},
        "metrics": ["multiple_choice"],
        **extra,
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_eval(path: Path, *extra: str):
    return runner.invoke(app, ["eval", str(path), *extra])


def independent(model_dir: Path, records: list[dict]) -> dict:
    """acc, acc_norm and the truncated count written from lm-eval's definitions, one pass per (context, choice)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hits, hits_norm, truncated, logprobs = [], [], 0, []
    for record in records:
        choices = record["choices"]
        label = record["label"] if isinstance(record["label"], int) else ord(record["label"]) - ord("A")
        context = record["question"]
        context_len = len(tokenizer(context).input_ids)
        longest = max(len(tokenizer(" " + c, add_special_tokens=False).input_ids) for c in choices)
        # The model reads (context + continuation)[-(window + 1):][:-1], cut once for the longest choice.
        cut = max(0, context_len + longest - (WINDOW + 1))
        truncated += cut > 0
        scores = [reference(model, tokenizer, context, " " + c, cut)[0] for c in choices]
        logprobs.append(scores)
        pick = max(range(len(scores)), key=lambda i: (scores[i], -i))
        pick_norm = max(range(len(scores)), key=lambda i: (scores[i] / len(choices[i]), -i))
        hits.append(pick == label)
        hits_norm.append(pick_norm == label)
    return {
        "acc": sum(hits) / len(hits),
        "acc_norm": sum(hits_norm) / len(hits_norm),
        "truncated": truncated,
        "logprobs": logprobs,
    }


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its weights perturbed: a second checkpoint to compare."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("other-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_multiple_choice_metrics_and_predictions_equal_an_independent_computation(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "mc.jsonl", RECORDS)
    result = run_eval(eval_recipe(tmp_path, str(tiny_model_dir), str(data), choice={"batch_size": 3}))
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    want = independent(tiny_model_dir, RECORDS)
    metrics = saved["metrics"]
    assert metrics["acc"] == pytest.approx(want["acc"]) and metrics["acc_norm"] == pytest.approx(want["acc_norm"])
    assert (metrics["examples"], metrics["truncated"]) == (4, want["truncated"]) and want["truncated"] == 1
    p = want["acc"]
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 3))
    protocol = saved["protocol"]["multiple_choice"]
    assert protocol["target_delimiter"] == " " and protocol["num_fewshot"] == 0
    assert protocol["pair_encoding"] == "separate" and protocol["dtype"] == "float32" and protocol["window_tokens"] == WINDOW
    assert "characters" in protocol["normalization"]["acc_norm"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [0, 0, 1, 0]
    assert [r["truncated"] for r in rows] == [False, False, False, True]
    assert rows[0]["where"].endswith("mc.jsonl:1")
    for row, scores in zip(rows, want["logprobs"], strict=True):
        assert row["logprobs"] == pytest.approx(scores, abs=1e-4)
        assert row["correct"] == (row["pred"] == row["label"]) and row["correct_norm"] == (row["pred_norm"] == row["label"])


def test_two_checkpoints_give_a_comparison_with_acc(tmp_path, tiny_model_dir, other_model_dir):
    path = eval_recipe(tmp_path, [str(tiny_model_dir), str(other_model_dir)], "builtin:docsum-choice/test",
                       data={"test": "builtin:docsum-choice/test", "max_samples": 12})  # fmt: skip
    result = run_eval(path)
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert {"acc", "acc_norm"} <= set(table["metrics"]) and "acc" not in table["lower_is_better"]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for row, model in zip(table["models"], saved["models"], strict=True):
        assert row["acc"] == model["metrics"]["acc"] and model["metrics"]["examples"] == 12
    accs = [row["acc"] for row in table["models"]]
    if accs[0] != accs[1]:
        assert table["best"]["acc"] == table["models"][accs.index(max(accs))]["model"]
    assert "acc_norm" in (tmp_path / "out" / "comparison.md").read_text()


def test_several_tasks_are_macro_averaged(tmp_path, tiny_model_dir):
    a = write_jsonl(tmp_path / "a.jsonl", RECORDS[:3])
    b = write_jsonl(tmp_path / "b.jsonl", RECORDS[:1])
    result = run_eval(eval_recipe(tmp_path, str(tiny_model_dir), [str(a), str(b)]))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    tasks = metrics["tasks"]
    assert set(tasks) == {str(a), str(b)} and metrics["examples"] == 4
    assert metrics["acc"] == pytest.approx((tasks[str(a)]["acc"] + tasks[str(b)]["acc"]) / 2)
    assert metrics["average"].startswith("macro over 2 tasks")


@pytest.mark.parametrize(
    "record, fragment",
    [
        ({"question": "Q?", "choices": ["a", "b"], "label": 2}, "out of range for 2 choices"),
        ({"question": "Q?", "choices": ["a"], "label": 0}, "needs at least two choices"),
        ({"prompt": "Q?", "options": ["a", "b"], "label": 0}, "record fields: prompt, options, label"),
    ],
    ids=["label-out-of-range", "one-choice", "missing-field"],
)
def test_bad_records_exit_2_before_any_model_loads(tmp_path, tiny_model_dir, monkeypatch, record, fragment):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the records were checked")

    monkeypatch.setattr("llmkit.stages.evaluate.load_model", refuse)
    monkeypatch.setattr("llmkit.models.load_model", refuse)
    data = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], record])
    result = run_eval(eval_recipe(tmp_path, str(tiny_model_dir), str(data)))
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "\n" not in err and "bad.jsonl:2" in err and fragment in err, err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_cloze_acc_is_the_greedy_last_word(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["The quick brown fox jumps over the lazy dog", "def add(a, b): return a + b", "x x x x x x x x"]
    data = write_jsonl(tmp_path / "lambada.jsonl", [{"text": t} for t in texts])
    result = run_eval(eval_recipe(tmp_path, str(tiny_model_dir), str(data), metrics=["cloze"]))
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = [(t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1]) for t in texts]  # lm-eval lambada's split
    scored = [reference(model, tokenizer, context, target) for context, target in pairs]
    assert saved["metrics"]["acc"] == pytest.approx(sum(g for _, g in scored) / 3)
    targets = sum(len(tokenizer(target, add_special_tokens=False).input_ids) for _, target in pairs)
    assert saved["metrics"]["target_perplexity"] == pytest.approx(math.exp(-sum(lp for lp, _ in scored) / targets), rel=1e-5)
    assert "cloze" in saved["protocol"]


def test_pretraining_logs_choice_acc_at_every_eval(tmp_path, tokenizer_dir):
    from llmkit.metrics.choice_builtin import docsum_choice_examples

    corpus = write_corpus(tmp_path, docs=16)
    validation = write_corpus(tmp_path, docs=4, name="val.jsonl", offset=16)
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"context": e.context[-200:], "choices": e.choices, "label": e.label} for e in docsum_choice_examples("validation", limit=6)
    ])  # fmt: skip
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus, validation,
                         model={**TINY_MODEL, "max_position_embeddings": 256},
                         train={"max_steps": 6, "eval_every": 3, "evals": [{"name": "choice", "metrics": ["multiple_choice"], "data": {"test": str(questions), "max_samples": 5}}]})  # fmt: skip
    run_in_process(recipe)
    evals = read_events(tmp_path / "run", "eval")
    assert [e["step"] for e in evals] == [3, 6]
    for event in evals:
        assert 0.0 <= event["choice_acc"] <= 1.0 and 0.0 <= event["choice_acc_norm"] <= 1.0
        assert event["choice_acc"] * 5 == pytest.approx(round(event["choice_acc"] * 5))  # a share of 5 questions


def test_pretraining_refuses_a_bad_choice_eval_record_before_training(tmp_path, tokenizer_dir, monkeypatch):
    from llmkit.errors import DataError

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before train.evals' records were checked")

    monkeypatch.setattr("llmkit.models.build_model", refuse)
    corpus = write_corpus(tmp_path, docs=8)
    bad = write_jsonl(tmp_path / "q.jsonl", [{"context": "Q?", "choices": ["a", "b"], "label": 5}])
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus, train={"evals": [{"metrics": ["multiple_choice"], "data": {"test": str(bad)}}]})
    with pytest.raises(DataError, match="q.jsonl:1.*out of range"):
        run_in_process(recipe)


def test_lm_eval_encoding_scores_the_context_without_bos(tmp_path, tiny_model_dir):
    """choice.pair_encoding=joint + add_bos=false: the ids lm-eval's HFLM scores (no BOS, encoded together, split)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "mc.jsonl", RECORDS[:3])
    path = eval_recipe(tmp_path, str(tiny_model_dir), str(data), choice={"pair_encoding": "joint", "add_bos": False})
    result = run_eval(path)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for row, record in zip(rows, RECORDS[:3], strict=True):
        context = record["question"]
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        assert context_ids[0] != tokenizer.bos_token_id
        want = []
        for choice in record["choices"]:
            whole = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            want.append(sum(float(logprobs[j - 1, whole[j]]) for j in range(len(context_ids), len(whole))))
        assert row["logprobs"] == pytest.approx(want, abs=1e-4)
    protocol = json.loads((tmp_path / "out" / "metrics.json").read_text())["protocol"]["multiple_choice"]
    assert protocol["add_bos"] is False and protocol["pair_encoding"] == "joint"


def test_log_likelihoods_equal_lm_eval_hflm_when_it_is_installed(tiny_model_dir):
    """Where lm-evaluation-harness is installed: its HFLM.loglikelihood and llmkit's defaults score the same."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.metrics.choice import score_choices
    from llmkit.metrics.choice_builtin import docsum_choice_examples

    examples = [e for e in docsum_choice_examples("test", limit=12) if len(e.context) < 300][:4]  # no truncation
    harness = HFLM(pretrained=str(tiny_model_dir), dtype="float32", batch_size=4, device="cpu")
    requests = [
        Instance("loglikelihood", doc={}, arguments=(e.context, " " + c), idx=j) for e in examples for j, c in enumerate(e.choices)
    ]
    theirs = [logprob for logprob, _ in harness.loglikelihood(requests)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ours = [lp for s in score_choices(model, AutoTokenizer.from_pretrained(tiny_model_dir), examples) for lp in s.logprobs]
    assert ours == pytest.approx(theirs, abs=1e-3)


def test_plot_draws_choice_accuracy_when_logged(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from llmkit.stages import plot

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    events = [
        {"event": "train", "step": 1, "tokens": 64, "loss": 5.0, "lr": 1e-3},
        {"event": "eval", "step": 1, "tokens": 64, "val_loss": 5.1, "choice_acc": 0.25, "choice_acc_norm": 0.3},
        {"event": "train", "step": 2, "tokens": 128, "loss": 4.0, "lr": 1e-3},
        {"event": "eval", "step": 2, "tokens": 128, "val_loss": 4.2, "choice_acc": 0.5, "choice_acc_norm": 0.4},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    drawn, original = {}, plt.subplots

    def spy(*args, **kwargs):  # keep the axes the plot draws on
        fig, axes = original(*args, **kwargs)
        drawn["axes"] = axes
        return fig, axes

    monkeypatch.setattr(plt, "subplots", spy)
    plot.run([run_dir], tmp_path / "curves.png")
    assert len(drawn["axes"]) == 4
    lines = {line.get_label(): list(line.get_ydata()) for line in drawn["axes"][3].get_lines()}
    assert lines == {"run choice_acc": [0.25, 0.5], "run choice_acc_norm": [0.3, 0.4]}
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_two_processes_score_equal_shares_that_gather_to_the_single_process_scores(tiny_model_dir, monkeypatch):
    """Each rank scores i % 2 == rank (padded to equal length); gathered in order, they are the one-process scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit import dist
    from llmkit.metrics import choice_tasks
    from llmkit.metrics.choice_builtin import docsum_choice_examples

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = docsum_choice_examples("test", limit=5)
    alone = choice_tasks.score_choices_shared(model, tokenizer, examples)
    shares, scored_rows = {}, []
    real_score = choice_tasks.score_choices

    def counting_score(model, tokenizer, batch, **kwargs):
        scored_rows.append(len(batch))
        return real_score(model, tokenizer, batch, **kwargs)

    monkeypatch.setattr(choice_tasks, "score_choices", counting_score)
    for rank in (0, 1):
        monkeypatch.setattr(dist, "world", lambda rank=rank: (2, rank))
        monkeypatch.setattr(dist, "gather_lists", lambda items, rank=rank: shares.setdefault(rank, items))
        choice_tasks.score_choices_shared(model, tokenizer, examples)
    assert scored_rows == [3, 3]  # 3 + 2 questions, the short share padded: the same forward passes on both ranks
    gathered = sorted(shares[0] + shares[1], key=lambda r: r[0])
    assert [i for i, *_ in gathered] == list(range(5))
    for (_, logprobs, *_), single in zip(gathered, alone, strict=True):
        assert logprobs == pytest.approx(single.logprobs, abs=1e-5)
