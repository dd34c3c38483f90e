"""Multiple-choice and cloze scoring (llmkit.metrics.choice) against plain transformers, token by token.

    pytest -q tests/test_choice.py
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmkit.errors import DataError
from llmkit.metrics.choice import (
    ChoiceExample,
    ChoiceScores,
    aggregate,
    choice_metrics,
    fewshot_prefix,
    mean_stderr,
    metrics_by_subject,
    parse_choice_record,
    prediction_rows,
    score_choices,
    score_cloze,
    with_fewshot,
)
from llmkit.metrics.choice_builtin import docsum_choice_examples

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def reference(model, tokenizer, context: str, continuation: str, cut: int = 0) -> tuple[float, bool]:
    """One forward pass of the whole sequence; sum of log_softmax at the continuation's positions."""
    context_ids = tokenizer(context).input_ids[cut:]
    continuation_ids = tokenizer(continuation, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([context_ids + continuation_ids])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    total, greedy = 0.0, True
    for j, token in enumerate(continuation_ids):
        row = logprobs[len(context_ids) + j - 1]
        total += float(row[token])
        greedy = greedy and int(row.argmax()) == token
    return total, greedy


def mixed_examples() -> list[ChoiceExample]:
    """Plain, whitespace-ended, MMLU-described and Winogrande-partial examples with very unequal choices."""
    return [
        ChoiceExample("Question: What does a for loop do?\nAnswer:", ["It repeats.", "x", "It runs the body once for each item of an iterable, in order."], 2),
        ChoiceExample("The with statement", ["wraps a block", "is a loop over the lines of a file that never ends", "z"], 0),
        ChoiceExample("Q: Which keyword defines a function?\nA:\n", ["def", "lambda function expression"], 0),  # ends with "\n"
        parse_choice_record({"question": "Which is a list?", "subject": "python_basics", "choices": ["[1]", "(1,)", "{1}", "1"], "answer": 0}, "mmlu:1"),
        parse_choice_record({"sentence": "The file was closed because _ was done with it.", "option1": "the program", "option2": "the disk", "answer": "1"}, "wino:1"),
        ChoiceExample("Import", ["sys", "the module that defines every class of the standard library at once"], 1),
        ChoiceExample("A generator", ["yields values lazily", "returns", "raises StopIteration at the end of its body", "is", "a"], 0),
    ]  # fmt: skip


def reference_pairs(example: ChoiceExample) -> list[tuple[str, str]]:
    """The (context, continuation) strings the module docstring promises, written out by hand."""
    head = example.description + example.context
    if example.continuation is not None:
        return [(head + c, example.continuation) for c in example.choices]
    if head.endswith("\n"):  # trailing whitespace moves onto the continuation; no extra delimiter
        return [(head.rstrip(), "\n" + c) for c in example.choices]
    return [(head, " " + c) for c in example.choices]


def test_logprobs_acc_and_acc_norm_equal_plain_transformers(lm):
    model, tokenizer = lm
    examples = mixed_examples()
    scores = score_choices(model, tokenizer, examples, batch_size=3)
    expected_acc, expected_norm = [], []
    for example, s in zip(examples, scores, strict=True):
        refs = [reference(model, tokenizer, c, t) for c, t in reference_pairs(example)]
        for (ref_lp, ref_greedy), lp, greedy in zip(refs, s.logprobs, s.is_greedy, strict=True):
            assert abs(lp - ref_lp) < TOLERANCE
            assert greedy == ref_greedy
        lps = [lp for lp, _ in refs]
        lengths = (
            [len(example.continuation.strip())] * len(lps)
            if example.continuation
            else [len(c) for c in example.choices]
        )
        expected_acc.append(float(lps.index(max(lps)) == example.label))
        normed = [lp / n for lp, n in zip(lps, lengths, strict=True)]
        expected_norm.append(float(normed.index(max(normed)) == example.label))
    metrics = choice_metrics(scores, examples)
    assert metrics["acc"] == pytest.approx(sum(expected_acc) / len(examples))
    assert metrics["acc_norm"] == pytest.approx(sum(expected_norm) / len(examples))
    assert metrics["n"] == len(examples) and metrics["truncated"] == 0
    # The MMLU continuation is " A", ...: the letter after "Answer:", not the choice text.
    assert scores[3].continuation_tokens == [
        len(tokenizer(" " + x, add_special_tokens=False).input_ids) for x in "ABCD"
    ]


def test_batching_and_padding_do_not_change_logprobs(lm):
    model, tokenizer = lm
    examples = mixed_examples()
    runs = [
        score_choices(model, tokenizer, examples, batch_size=batch_size, share_context=share)
        for batch_size in (1, 7) for share in (True, False)
    ]  # fmt: skip
    flat = [[lp for s in run for lp in s.logprobs] for run in runs]
    for other in flat[1:]:
        assert max(abs(a - b) for a, b in zip(flat[0], other, strict=True)) < TOLERANCE
    assert [[s.is_greedy for s in run] for run in runs[1:]] == [[s.is_greedy for s in runs[0]]] * 3


def test_joint_pair_encoding_matches_separate_for_byte_level_bpe(lm):
    model, tokenizer = lm
    examples = mixed_examples()[:3]
    separate = score_choices(model, tokenizer, examples)
    joint = score_choices(model, tokenizer, examples, pair_encoding="joint")
    assert [s.continuation_tokens for s in separate] == [s.continuation_tokens for s in joint]
    assert (
        max(
            abs(a - b)
            for s, j in zip(separate, joint, strict=True)
            for a, b in zip(s.logprobs, j.logprobs, strict=True)
        )
        < TOLERANCE
    )


def test_every_layout_parses():
    cases = [
        ({"question": "2+2?", "choices": ["3", "4"], "label": 1}, "2+2?", ["3", "4"], 1),
        ({"context": "Sky", "choices": ["blue", "green"], "answer": "A"}, "Sky", ["blue", "green"], 0),
        ({"query": "Cat says", "choices": ["woof", "meow"], "answer": "meow"}, "Cat says", ["woof", "meow"], 1),
        (
            {"question": "Which is a gas?", "choices": {"text": ["Iron", "Helium", "Wood"], "label": ["A", "B", "C"]}, "answerKey": "B"},
            "Question: Which is a gas?\nAnswer:", ["Iron", "Helium", "Wood"], 1,
        ),
        (
            {"question": "Pick", "choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]}, "answerKey": "4"},
            "Question: Pick\nAnswer:", ["a", "b", "c", "d"], 3,
        ),
        (
            {"question": "Pick", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "2"},
            "Question: Pick\nAnswer:", ["a", "b"], 1,
        ),
        (
            {"activity_label": "Baking", "ctx_a": "She mixes the flour.", "ctx_b": "then SHE",
             "endings": ["bakes it [title] well.", "eats  it."], "label": "1"},
            "Baking: She mixes the flour. Then she", ["bakes it. well.", "eats it."], 1,
        ),
        ({"ctx": "He opens the door.", "endings": ["walks in.", "flies."], "label": 0}, "He opens the door.", ["walks in.", "flies."], 0),
        ({"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}, "Question: Open a jar.\nAnswer:", ["Twist the lid.", "Eat the lid."], 0),
        (
            {"question": " What is 2+2? ", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
            "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", ["A", "B", "C", "D"], 1,
        ),
    ]  # fmt: skip
    for i, (record, context, choices, label) in enumerate(cases):
        example = parse_choice_record(record, f"case:{i}")
        assert (example.context, example.choices, example.label) == (context, choices, label), i
    mmlu = parse_choice_record(cases[-1][0], "mmlu:1")
    assert (
        mmlu.description
        == "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
    )
    assert mmlu.subject == "elementary_mathematics"
    wino = parse_choice_record(
        {
            "sentence": "Sarah was a better cook than Maria because _ practiced.",
            "option1": "Sarah",
            "option2": "Maria",
            "answer": "2",
        },
        "w:1",
    )
    assert (wino.context, wino.choices, wino.label, wino.continuation) == (
        "Sarah was a better cook than Maria because ", ["Sarah", "Maria"], 1, " practiced."
    )  # fmt: skip
    named = parse_choice_record(
        {"prompt": "P", "options": ["x", "y", "z"], "gold": 2},
        "n:1",
        fields={"context": "prompt", "choices": "options", "label": "gold"},
    )
    assert (named.context, named.choices, named.label) == ("P", ["x", "y", "z"], 2)


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"question": "q", "choices": ["a", "b"], "label": 2}, "out of range for 2 choices"),
        ({"question": "q", "choices": ["a", "b"], "answer": "F"}, "out of range"),
        ({"question": "q", "choices": ["only"], "label": 0}, "at least two choices"),
        ({"question": "q", "label": 0}, "no choices field"),
        ({"choices": ["a", "b"], "label": 0}, "no context field"),
        ({"question": "q", "choices": ["a", "b"]}, "no label field"),
        ({"goal": "g", "sol1": "a", "sol2": "b", "label": 5}, "out of range"),
        ({"sentence": "A _ b", "option1": "x", "option2": "y", "answer": "3"}, "out of range"),
        (
            {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"},
            "out of range",
        ),
    ],
)
def test_bad_records_name_the_record_and_its_fields(record, problem):
    with pytest.raises(DataError) as info:
        parse_choice_record(record, "data.jsonl:12")
    message = str(info.value)
    assert message.startswith("data.jsonl:12: ") and problem in message
    assert f"(record fields: {', '.join(record)})" in message
    assert "\n" not in message


def test_standard_errors_are_lm_eval_mean_stderr():
    # Three choices; acc picks the largest log-prob, acc_norm the largest log-prob per character.
    examples = [ChoiceExample("c", ["aaaaaaaaaa", "b", "cc"], label) for label in (0, 0, 0, 1, 2, 1, 0, 0)]
    scores = [ChoiceScores([-5.0, -3.0, -4.0], [False] * 3, [1, 1, 1]) for _ in examples]
    # acc: argmax = 1 ("b"): hits where label == 1 -> 2 of 8. acc_norm: -0.5, -3, -2 -> 0: 5 of 8.
    metrics = choice_metrics(scores, examples)
    n = len(examples)
    for name, hits in (("acc", 2), ("acc_norm", 5)):
        p = hits / n
        assert metrics[name] == pytest.approx(p)
        assert metrics[f"{name}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert mean_stderr([1.0, 2.0, 4.0]) == pytest.approx(
        math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2) / math.sqrt(3)
    )
    # Ties go to the first choice, as numpy.argmax does.
    tie = choice_metrics(
        [ChoiceScores([-1.0, -1.0], [False, False], [1, 1])], [ChoiceExample("c", ["x", "y"], 1)]
    )
    assert tie["acc"] == 0.0


def test_overlong_context_is_cut_from_the_left_and_counted(lm):
    model, tokenizer = lm
    long_context = " ".join(["The interpreter reads the source file and runs each statement."] * 12)
    examples = [
        ChoiceExample(long_context, ["yes", "no, never at all"], 0),
        ChoiceExample("Short", ["a", "b"], 1),
    ]
    window = 40
    scores = score_choices(model, tokenizer, examples, max_length=window, batch_size=2)
    assert [s.truncated for s in scores] == [True, False]
    assert choice_metrics(scores, examples)["truncated"] == 1
    context_ids = tokenizer(long_context).input_ids
    longest = max(len(tokenizer(" " + c, add_special_tokens=False).input_ids) for c in examples[0].choices)
    cut = len(context_ids) + longest - (window + 1)
    assert scores[0].truncated_tokens == cut > 0
    for choice, lp in zip(examples[0].choices, scores[0].logprobs, strict=True):
        assert abs(lp - reference(model, tokenizer, long_context, " " + choice, cut=cut)[0]) < TOLERANCE
    # Without max_length the window is the config's max_position_embeddings (256).
    very_long = " ".join([long_context] * 6)
    assert len(tokenizer(very_long).input_ids) > 256
    assert score_choices(model, tokenizer, [ChoiceExample(very_long, ["a", "b"], 0)])[0].truncated
    with pytest.raises(DataError, match="too long to score"):
        score_choices(model, tokenizer, [ChoiceExample("x", ["a", long_context], 0)], max_length=window)


def test_cloze_acc_and_target_perplexity_equal_plain_transformers(lm):
    model, tokenizer = lm
    # A text whose last word is the model's greedy continuation, so acc is not trivially 0.
    hit = None
    for context in ("The value of", "Return the", "A list is", "The module", "This function", "The class"):
        ids = tokenizer(context).input_ids
        with torch.no_grad():
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        word = tokenizer.decode([token])
        if (
            word.startswith(" ")
            and word[1:].isalpha()
            and tokenizer(word, add_special_tokens=False).input_ids == [token]
        ):
            hit = context + word
            break
    assert hit is not None, "no greedy one-token word found for the test"
    texts = [hit, "The quick brown fox jumps over the lazy dog", "Errors should never pass silently"]
    result = score_cloze(model, tokenizer, texts, batch_size=2)
    refs = []
    for text in texts:
        context, _, word = text.rpartition(" ")
        lp, greedy = reference(model, tokenizer, context, " " + word)
        refs.append((lp, greedy, len(tokenizer(" " + word, add_special_tokens=False).input_ids)))
    assert [r["is_greedy"] for r in result["examples"]] == [g for _, g, _ in refs]
    assert refs[0][1] and result["acc"] == pytest.approx(sum(g for _, g, _ in refs) / len(texts))
    for row, (lp, _, n) in zip(result["examples"], refs, strict=True):
        assert abs(row["logprob"] - lp) < TOLERANCE and row["target_tokens"] == n
    expected = math.exp(-sum(lp for lp, _, _ in refs) / sum(n for _, _, n in refs))
    assert result["target_perplexity"] == pytest.approx(expected, rel=TOLERANCE)
    with pytest.raises(DataError, match="text 0"):
        score_cloze(model, tokenizer, ["oneword"])


def test_fewshot_prefix_is_seeded_and_uses_lm_eval_delimiters():
    pool = [ChoiceExample(f"Q{i}:", [f"a{i}", f"b{i}"], i % 2) for i in range(10)]
    prefix = fewshot_prefix(pool, 3, seed=7)
    assert prefix == fewshot_prefix(pool, 3, seed=7) and prefix != fewshot_prefix(pool, 3, seed=8)
    shots = prefix.split("\n\n")
    assert len(shots) == 4 and shots[-1] == ""
    for shot in shots[:-1]:
        i = int(shot.split(":")[0][1:])
        assert shot == f"Q{i}: {pool[i].choices[pool[i].label]}"
    assert fewshot_prefix(pool, 2, seed=None) == "Q0: a0\n\nQ1: b1\n\n"  # lm-eval's first_n
    assert "Q0:" not in fewshot_prefix(pool, 9, seed=1, exclude_index=0)
    shot = with_fewshot(pool[:2], pool, 1, seed=3, same_split=True)
    assert shot[0].context.endswith("\n\nQ0:") and not shot[0].context.startswith("Q0:")
    with pytest.raises(DataError, match="pool"):
        fewshot_prefix(pool, 11, seed=0)


def test_aggregate_macro_and_micro_and_subjects():
    tasks = {"a": {"acc": 1.0, "acc_stderr": 0.1, "n": 10}, "b": {"acc": 0.0, "acc_stderr": 0.2, "n": 30}}
    macro, micro = aggregate(tasks, "macro"), aggregate(tasks, "micro")
    assert macro["acc"] == pytest.approx(0.5) and micro["acc"] == pytest.approx(0.25)
    assert macro["acc_stderr"] == pytest.approx(math.sqrt(0.1**2 + 0.2**2) / 2)
    assert micro["acc_stderr"] == pytest.approx(math.sqrt((10 * 0.1) ** 2 + (30 * 0.2) ** 2) / 40)
    assert macro["n"] == micro["n"] == 40
    examples = [ChoiceExample("c", ["x", "y"], 0, subject=s) for s in ("math", "math", "math", "law")]
    scores = [ChoiceScores([-1.0, -2.0], [False, False], [1, 1]) for _ in examples]
    by_subject = metrics_by_subject(scores, examples)
    assert list(by_subject) == ["math", "law"] and by_subject["math"]["n"] == 3
    assert aggregate(by_subject)["acc"] == pytest.approx(1.0)


def test_prediction_rows_are_json_and_name_the_picks(lm):
    model, tokenizer = lm
    examples = mixed_examples()
    scores = score_choices(model, tokenizer, examples)
    rows = prediction_rows(scores, examples)
    json.dumps(rows)
    for row, s, e in zip(rows, scores, examples, strict=True):
        assert row["logprobs"] == s.logprobs and row["label"] == e.label
        assert row["pred"] == s.logprobs.index(max(s.logprobs)) and row["correct"] == (row["pred"] == e.label)
        assert row["truncated"] is False and len(row["is_greedy"]) == len(e.choices)


def test_docsum_choice_task_is_seeded_with_distinct_choices():
    first, again, other = (
        docsum_choice_examples("test", seed=0),
        docsum_choice_examples("test", seed=0),
        docsum_choice_examples("test", seed=1),
    )
    assert len(first) > 50
    assert [(e.context, e.choices, e.label) for e in first] == [
        (e.context, e.choices, e.label) for e in again
    ]
    assert [e.choices for e in first] != [e.choices for e in other]
    from llmkit.data.builtin import docsum_records

    summaries = {r["id"]: r["summary"] for s, r in docsum_records() if s == "test"}
    for e in first:
        assert len(e.choices) == 4 and len(set(e.choices)) == 4 and 0 <= e.label < 4
        assert e.choices[e.label] == summaries[e.where.rsplit(":", 1)[1]]
        assert e.context.endswith("\n\nSummary:") and len(e.context) <= 600 + len("\n\nSummary:")
    assert len({e.label for e in first}) == 4  # the right answer's position varies
    assert all(len(set(e.choices)) == 3 for e in docsum_choice_examples("validation", num_choices=3, seed=5))
