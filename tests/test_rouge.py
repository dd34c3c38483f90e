"""ROUGE: identical to rouge_score with the stemmer, non-Latin scripts kept, the evaluate module offline.

pytest tests/test_rouge.py -x -q
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from rouge_score import rouge_scorer

from llmkit.metrics.rouge import MODULE_PATH, lcs_length, per_example_scores, rouge_scores

TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
WORDS = (
    "the a cat cats sat sitting on mat mats running runs ran dog dogs quickly quick brown fox jumps "
    "jumped over lazy 2024 x generalization generalize organizing organized happily happiness it's U.S."
).split()


def random_text(rnd: random.Random, multiline: bool) -> str:
    out = []
    for _ in range(rnd.randint(0, 30)):
        word = rnd.choice(WORDS)
        word = word.upper() if rnd.random() < 0.1 else word
        out.append(word + rnd.choice([",", ".", "", "", " -", "\n" if multiline else ""]))
    return " ".join(out)


def reference_scores(predictions, references):
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=True)
    return [
        {k: v.fmeasure for k, v in scorer.score(r, p).items()}
        for p, r in zip(predictions, references, strict=False)
    ]


def test_identical_to_rouge_score_on_random_text():
    rnd = random.Random(0)
    predictions = [random_text(rnd, i % 3 == 0) for i in range(600)]
    references = [random_text(rnd, i % 4 == 0) for i in range(600)]
    predictions += ["", "the cat", "\n\n", "Cats running.\nDogs ran."]
    references += ["the cat", "", "a\n", "The cat runs.\n\nA dog is running."]
    assert per_example_scores(predictions, references) == reference_scores(predictions, references)
    mean = rouge_scores(predictions, references)
    expected = reference_scores(predictions, references)
    for key in TYPES:
        assert mean[key] == pytest.approx(sum(s[key] for s in expected) / len(expected), rel=1e-12)


def test_accented_latin_text_is_scored_like_rouge_score():
    predictions = ["Le café est très bon à Paris", "naïve résumé façade"]
    references = ["Un café très bon, à Paris", "naive resume facade"]
    assert per_example_scores(predictions, references) == reference_scores(predictions, references)


@pytest.mark.parametrize(
    "text",
    [
        "这是一个测试句子。",
        "これは日本語の文です",
        "이것은 한국어 문장입니다",
        "Это русское предложение",
        "นี่คือประโยคภาษาไทย",
    ],
)
def test_identical_non_latin_strings_score_one(text):
    assert reference_scores([text], [text])[0]["rouge1"] == 0.0  # what rouge_score does
    scores = rouge_scores([text], [text])
    assert all(scores[k] == 1.0 for k in TYPES), scores


def test_non_latin_partial_overlap_and_mixed_scripts():
    scores = rouge_scores(["我喜欢猫"], ["我喜欢狗"])
    assert scores["rouge1"] == pytest.approx(0.75)  # 3 of 4 characters match
    assert scores["rouge2"] == pytest.approx(2 / 3)
    mixed = rouge_scores(["running 模型 test"], ["runs 模型 tests"])
    assert mixed["rouge1"] == 1.0  # stemming still applies to the English words


def test_rouge_lsum_uses_one_sentence_per_line():
    one_line = rouge_scores(["b a"], ["a b"])
    two_lines = rouge_scores(["b\na"], ["a b"])
    assert one_line["rougeL"] == 0.5 and one_line["rougeLsum"] == 0.5
    assert two_lines["rougeLsum"] == 1.0  # union LCS over the two sentences


def test_multiple_references_keep_the_best():
    scores = per_example_scores(["the cat sat"], [["a dog ran", "the cat sat"]])
    assert scores[0]["rouge1"] == 1.0


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    rnd = random.Random(1)
    predictions = [random_text(rnd, False) for _ in range(50)]
    references = [random_text(rnd, False) for _ in range(50)]
    a = rouge_scores(predictions, references, bootstrap_samples=200, seed=7)
    b = rouge_scores(predictions, references, bootstrap_samples=200, seed=7)
    c = rouge_scores(predictions, references, bootstrap_samples=200, seed=8)
    assert a == b and a != c
    for key in TYPES:
        assert a[f"{key}_low"] <= a[key] <= a[f"{key}_high"]


def test_bit_parallel_lcs_equals_dynamic_programming():
    rnd = random.Random(2)
    for _ in range(300):
        a = [rnd.choice("abcde") for _ in range(rnd.randint(0, 70))]
        b = [rnd.choice("abcde") for _ in range(rnd.randint(0, 70))]
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                table[i][j] = (
                    table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
                )
        assert lcs_length(a, b) == table[-1][-1]


def test_evaluate_module_loads_offline_without_network(tmp_path):
    """evaluate.load(<path>) works with HF_HUB_OFFLINE=1 and every socket connection refused."""
    script = f"""
import socket
def refuse(*args, **kwargs):
    raise OSError("network disabled in this test")
socket.socket.connect = refuse
socket.create_connection = refuse
import evaluate
metric = evaluate.load({MODULE_PATH!r})
print(metric.compute(predictions=["the cat sat", "中文"], references=["a cat sat", "中文"]))
print(metric.compute(predictions=["x y"], references=[["x y", "z"]], use_aggregator=False))
"""
    env = {
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin",
    }  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    aggregated = eval(lines[-2])  # noqa: S307 - our own printed dict
    expected = rouge_scores(["the cat sat", "中文"], ["a cat sat", "中文"])
    assert aggregated == pytest.approx(expected)
    assert eval(lines[-1])["rouge1"] == [1.0]  # noqa: S307
