"""`llmkit eval`: the perplexity protocol against an independent computation, outputs, comparisons, errors.

pytest tests/test_eval.py -x -q
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmkit.cli import app

runner = CliRunner()

DOCS = [
    "def add(a, b):\n    return a + b\n" * 12,  # much longer than seq_len
    "The quick brown fox jumps over the lazy dog. " * 9,
    "short",
    "x",
    "Lists are mutable sequences, typically used to store collections of homogeneous items. " * 4,
    "naïve café — 中文 text with bytes beyond ASCII " * 3,
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def run_eval(recipe_path: Path, *extra: str):
    return runner.invoke(app, ["eval", str(recipe_path), *extra])


def independent_perplexity(model_dir: Path, texts: list[str], seq_len: int, stride: int) -> tuple[float, int]:
    """Sum of NLL and token count from plain transformers, one unpadded window per forward pass.

    Written from the protocol in llmkit/metrics/perplexity.py, per token: token i >= 1 belongs to the first window k with
    e_k > i, i.e. k = 0 if i < seq_len else ceil((i + 1 - seq_len) / stride), and is predicted from
    t_{s_k}..t_{i-1} with s_k = max(0, e_k - seq_len).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    nll_sum, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        length = len(ids)
        by_window: dict[int, list[int]] = {}
        for i in range(1, length):
            k = 0 if i < seq_len else math.ceil((i + 1 - seq_len) / stride)
            by_window.setdefault(k, []).append(i)
        for k, positions in by_window.items():
            end = min(seq_len + k * stride, length)
            start = max(0, end - seq_len)
            with torch.no_grad():
                logits = model(torch.tensor([ids[start:end]])).logits[0].double()
            logprobs = torch.log_softmax(logits, dim=-1)
            for i in positions:
                assert start <= i - 1 < end
                nll_sum -= float(logprobs[i - 1 - start, ids[i]])
                count += 1
    return nll_sum, count


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl", [{"text": t} for t in DOCS])


@pytest.fixture(scope="module")
def summaries_file(tmp_path_factory) -> Path:
    records = [
        {"document": "The cat sat on the mat all day long.", "summary": "A cat sat."},
        {"document": "Dogs bark at night when the moon is full.", "summary": "Dogs bark."},
        {"document": "Python lists are mutable sequences.", "summary": "Lists are mutable."},
    ]
    return write_jsonl(tmp_path_factory.mktemp("sum") / "sum.jsonl", records)


def perplexity_recipe(tmp_path: Path, model, docs: Path, **data) -> dict:
    return {
        "stage": "eval",
        "output_dir": str(tmp_path / "out"),
        "model": {"path": model if isinstance(model, list) else str(model)},
        "data": {"test": str(docs), **data},
        "metrics": ["perplexity"],
    }


# ----------------------------------------------------------------------------------------------
# Perplexity protocol
# ----------------------------------------------------------------------------------------------


def test_windows_score_every_token_once_with_enough_context():
    from llmkit.metrics.perplexity import perplexity_windows

    for length in (0, 1, 2, 7, 8, 9, 31, 32, 33, 100):
        for seq_len, stride in ((8, 3), (8, 7), (8, 4), (5, 1)):
            windows = perplexity_windows(length, seq_len, stride)
            scored = [i for _, end, first in windows for i in range(first, end)]
            assert scored == list(range(1, length)), (length, seq_len, stride)
            for start, end, first in windows:
                assert end - start <= seq_len
                # Once the document is long enough, every scored token sees >= seq_len - stride context.
                if end >= seq_len:
                    assert first - start >= min(seq_len - stride, first)


def test_perplexity_matches_independent_computation(tmp_path, tiny_model_dir, docs_file):
    seq_len, stride = 32, 12  # stride < seq_len, and the first document is many windows long
    recipe = write_recipe(
        tmp_path / "r.yaml",
        perplexity_recipe(tmp_path, tiny_model_dir, docs_file, seq_len=seq_len, stride=stride, batch_size=5),
    )
    result = run_eval(recipe)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    nll_sum, count = independent_perplexity(tiny_model_dir, DOCS, seq_len, stride)
    m = metrics["metrics"]
    assert m["tokens"] == count
    assert m["documents"] == len(DOCS)
    assert m["bytes"] == sum(len(t.encode("utf-8")) for t in DOCS)
    assert m["perplexity"] == pytest.approx(math.exp(nll_sum / count), rel=1e-4)
    assert m["nll"] == pytest.approx(nll_sum / count, rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(nll_sum / (math.log(2) * m["bytes"]), rel=1e-4)
    protocol = metrics["protocol"]["perplexity"]
    assert (protocol["seq_len"], protocol["stride"]) == (seq_len, stride)
    assert (tmp_path / "out" / "recipe.yaml").is_file()
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_perplexity_does_not_depend_on_batching(tiny_model_dir):
    from llmkit.metrics.perplexity import perplexity
    from llmkit.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    one = perplexity(model, tokenizer, DOCS, seq_len=24, stride=5, batch_size=1)
    many = perplexity(model, tokenizer, DOCS, seq_len=24, stride=5, batch_size=16)
    assert one.tokens == many.tokens
    assert many.nll_sum == pytest.approx(one.nll_sum, rel=1e-5)


def test_default_window_is_model_positions_and_stride_half(tmp_path, tiny_model_dir, docs_file):
    recipe = write_recipe(tmp_path / "r.yaml", perplexity_recipe(tmp_path, tiny_model_dir, docs_file))
    assert run_eval(recipe).exit_code == 0
    protocol = json.loads((tmp_path / "out" / "metrics.json").read_text())["protocol"]["perplexity"]
    assert (protocol["seq_len"], protocol["stride"]) == (256, 128)  # tiny model: 256 positions


@pytest.mark.slow
def test_two_processes_reduce_sums(tmp_path, tiny_model_dir, docs_file):
    """accelerate launch with 2 CPU processes gives the single-process numbers (sums, not mean of means)."""
    single = write_recipe(
        tmp_path / "one.yaml",
        perplexity_recipe(tmp_path / "a", tiny_model_dir, docs_file, seq_len=32, stride=12),
    )
    assert run_eval(single).exit_code == 0
    double = write_recipe(
        tmp_path / "two.yaml",
        perplexity_recipe(tmp_path / "b", tiny_model_dir, docs_file, seq_len=32, stride=12),
    )
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "llmkit", "eval", str(double)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on 2 processes" in proc.stderr
    a = json.loads((tmp_path / "a" / "out" / "metrics.json").read_text())["metrics"]
    b = json.loads((tmp_path / "b" / "out" / "metrics.json").read_text())["metrics"]
    assert (a["tokens"], a["bytes"], a["documents"]) == (b["tokens"], b["bytes"], b["documents"])
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Generation metrics, task lookup, comparisons
# ----------------------------------------------------------------------------------------------


def test_rouge_and_exact_match_write_predictions(tmp_path, tiny_model_dir, summaries_file):
    recipe = {
        "stage": "eval",
        "output_dir": str(tmp_path / "out"),
        "model": {"path": str(tiny_model_dir)},
        "data": {"test": str(summaries_file)},
        "metrics": ["rouge", "exact_match"],
        "task": {"type": "summarization"},
        "generation": {"max_new_tokens": 6},
        "rouge": {"bootstrap_samples": 50},
    }
    result = run_eval(write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and metrics["examples"] == 3
    assert set(rows[0]) >= {"input", "reference", "prediction", "scores"}
    assert (
        rows[0]["input"].startswith("Summarize the following text.") and rows[0]["reference"] == "A cat sat."
    )
    from llmkit.metrics.rouge import rouge_scores

    expected = rouge_scores([r["prediction"] for r in rows], [r["reference"] for r in rows])
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert metrics[key] == pytest.approx(expected[key])
        assert metrics[f"{key}_low"] <= metrics[key] <= metrics[f"{key}_high"]
        assert rows[0]["scores"][key] >= 0.0
    assert "exact_match" in rows[0]["scores"]


def test_task_is_read_from_the_finetune_run(tmp_path, tiny_model_dir, summaries_file):
    run = tmp_path / "finetune-run"
    shutil.copytree(tiny_model_dir, run)
    write_recipe(run / "recipe.yaml", {
        "stage": "finetune", "output_dir": str(run), "model": {"path": str(tiny_model_dir)},
        "task": {"type": "summarization", "prompt_template": "TL;DR {document}\n"},
        "data": {"train": str(summaries_file)}, "train": {"max_steps": 1},
    })  # fmt: skip
    recipe = {
        "stage": "eval", "output_dir": str(tmp_path / "out"), "model": {"path": str(run)},
        "data": {"test": str(summaries_file)}, "metrics": ["rouge"], "generation": {"max_new_tokens": 4},
    }  # fmt: skip
    result = run_eval(write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
    assert row["input"].startswith("TL;DR The cat sat")
    protocol = json.loads((tmp_path / "out" / "metrics.json").read_text())["protocol"]
    assert protocol["task"]["source"].endswith("recipe.yaml")


def test_several_checkpoints_give_a_comparison(tmp_path, tiny_model_dir, docs_file):
    import torch
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(tiny_model_dir).config)
    model.save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, other / name)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        perplexity_recipe(tmp_path, [str(tiny_model_dir), str(other)], docs_file, seq_len=32),
    )
    result = run_eval(recipe)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    table = json.loads((out / "comparison.json").read_text())
    assert [r["model"] for r in table["models"]] == [str(tiny_model_dir), str(other)]
    best = min(table["models"], key=lambda r: r["perplexity"])["model"]
    assert table["best"]["perplexity"] == best
    assert "| model | perplexity" in (out / "comparison.md").read_text()
    assert "perplexity" in result.stdout and str(other) in result.stdout
    summary = json.loads((out / "metrics.json").read_text())
    assert [m["model"] for m in summary["models"]] == [str(tiny_model_dir), str(other)]


def test_output_dir_of_a_different_eval_is_refused_unless_overwrite(tmp_path, tiny_model_dir, docs_file):
    recipe = write_recipe(
        tmp_path / "r.yaml", perplexity_recipe(tmp_path, tiny_model_dir, docs_file, seq_len=32)
    )
    assert run_eval(recipe).exit_code == 0
    assert run_eval(recipe).exit_code == 0  # the same eval again is fine
    before = (tmp_path / "out" / "metrics.json").read_text()
    result = run_eval(recipe, "--set", "data.stride=8")
    assert result.exit_code == 2
    assert "data.stride" in result.output and "--overwrite" in result.output
    assert (tmp_path / "out" / "metrics.json").read_text() == before
    assert run_eval(recipe, "--set", "data.stride=8", "--overwrite").exit_code == 0


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------


def _fails(tmp_path: Path, recipe: dict, *needles: str, extra: tuple[str, ...] = ()) -> None:
    result = run_eval(write_recipe(tmp_path / "bad.yaml", recipe), *extra)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_missing_model_directory(tmp_path, docs_file):
    _fails(
        tmp_path, perplexity_recipe(tmp_path, tmp_path / "nope", docs_file), "model.path", "does not exist"
    )


def test_model_directory_without_weights(tmp_path, tiny_model_dir, docs_file):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    _fails(tmp_path, perplexity_recipe(tmp_path, broken, docs_file), "model.path", "no model weights")


def test_data_without_the_reference_field(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"document": "a b c", "sumary": "a"}])
    recipe = {
        "stage": "eval", "output_dir": str(tmp_path / "out"), "model": {"path": str(tiny_model_dir)},
        "data": {"test": str(data)}, "metrics": ["rouge"], "task": {"type": "summarization"},
    }  # fmt: skip
    _fails(tmp_path, recipe, "d.jsonl", "summary", "sumary")


def test_unknown_metric_suggests_the_closest(tmp_path, tiny_model_dir, docs_file):
    _fails(
        tmp_path,
        {**perplexity_recipe(tmp_path, tiny_model_dir, docs_file), "metrics": ["rogue"]},
        "metrics",
        "did you mean 'rouge'",
    )


def test_window_larger_than_model_positions(tmp_path, tiny_model_dir, docs_file):
    _fails(
        tmp_path, perplexity_recipe(tmp_path, tiny_model_dir, docs_file, seq_len=512), "data.seq_len", "256"
    )


def test_generation_metric_without_a_task(tmp_path, tiny_model_dir, summaries_file):
    recipe = {
        "stage": "eval", "output_dir": str(tmp_path / "out"), "model": {"path": str(tiny_model_dir)},
        "data": {"test": str(summaries_file)}, "metrics": ["rouge"],
    }  # fmt: skip
    _fails(tmp_path, recipe, "task", "recipe.yaml")


def test_task_metric_helpers():
    from llmkit.metrics.text import accuracy, exact_match

    assert accuracy([" Positive\nextra", "neg"], ["positive", "positive"]) == 0.5
    assert exact_match(["a  b", "c"], ["a b", "C"]) == 0.5


def test_classification_accuracy_uses_the_label_set(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "cls.jsonl", [
        {"text": "great product", "label": "positive"},
        {"text": "broke in a day", "label": "negative"},
    ])  # fmt: skip
    recipe = {
        "stage": "eval", "output_dir": str(tmp_path / "out"), "model": {"path": str(tiny_model_dir)},
        "data": {"test": str(data)}, "metrics": ["accuracy"], "task": {"type": "classification"},
        "generation": {"max_new_tokens": 3},
    }  # fmt: skip
    result = run_eval(write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert "negative, positive" in rows[0]["input"]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert metrics["accuracy"] == sum(r["scores"]["accuracy"] for r in rows) / 2


def test_bleu_needs_sacrebleu_or_is_computed(tmp_path, tiny_model_dir, summaries_file):
    recipe = {
        "stage": "eval", "output_dir": str(tmp_path / "out"), "model": {"path": str(tiny_model_dir)},
        "data": {"test": str(summaries_file)}, "metrics": ["bleu"], "task": {"type": "summarization"},
        "generation": {"max_new_tokens": 4},
    }  # fmt: skip
    try:
        import sacrebleu  # noqa: F401
    except ImportError:
        _fails(tmp_path, recipe, "metrics", "sacrebleu")
        return
    result = run_eval(write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["bleu"] <= 100.0 and "nrefs:1" in metrics["bleu_signature"]


def test_a_training_run_directory_is_never_used_as_output(tmp_path, tiny_model_dir, docs_file):
    run = tmp_path / "out"
    run.mkdir()
    write_recipe(run / "recipe.yaml", {"stage": "pretrain"})
    result = run_eval(
        write_recipe(tmp_path / "r.yaml", perplexity_recipe(tmp_path, tiny_model_dir, docs_file)),
        "--overwrite",
    )
    assert result.exit_code == 2 and "pretrain run" in result.output
    assert sorted(p.name for p in run.iterdir()) == ["recipe.yaml"]


def test_metrics_are_reproducible_across_runs(tmp_path, tiny_model_dir, summaries_file):
    recipe = {
        "stage": "eval", "output_dir": str(tmp_path / "out"), "model": {"path": str(tiny_model_dir)},
        "data": {"test": str(summaries_file), "text_field": "document", "seq_len": 16, "stride": 4},
        "metrics": ["perplexity", "rouge"], "task": {"type": "summarization"},
        "generation": {"max_new_tokens": 4}, "rouge": {"bootstrap_samples": 20},
    }  # fmt: skip
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert run_eval(path).exit_code == 0
    first = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert run_eval(path).exit_code == 0
    second = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert first["metrics"] == second["metrics"] and first["protocol"] == second["protocol"]
    assert "seconds" in first["timing"] and "seconds" not in first["metrics"]
