"""The evaluator registry, train.evals = `llmkit eval`, bits per byte without BOS, generative tasks, prompts, suites.

    pytest tests/test_evals.py -q
"""

from __future__ import annotations

import json
import math
import re
import string
import typing
from pathlib import Path

import pytest
import torch
import yaml
from pretrain_helpers import TINY_MODEL, read_events, recipe_dict, run_in_process, write_corpus
from test_eval_choice import RECORDS, eval_recipe, run_eval, write_jsonl
from test_eval_choice import other_model_dir as other_model_dir  # noqa: F401  (fixture)
from test_finetune import data_dir as data_dir  # noqa: F401  (fixture)
from test_finetune import make_recipe

from llmkit.errors import RecipeError
from llmkit.recipes import MetricName, load_recipe, recipe_from_dict

# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------


def test_registry_and_recipe_schema_name_the_same_metrics():
    from llmkit.evals.base import Evaluator
    from llmkit.evals.registry import EVALUATORS

    assert set(EVALUATORS) == set(typing.get_args(MetricName))
    for name, cls in EVALUATORS.items():
        assert issubclass(cls, Evaluator) and name in cls.metrics


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.choice_eval={source: q.jsonl}", "train.choice_eval was replaced by train.evals"),
        ("task_eval.samples=4", "task_eval was replaced by train.evals"),
    ],
)
def test_old_training_eval_keys_name_their_replacement(override, fragment):
    recipe = "pretrain/tiny" if "choice_eval" in override else "finetune/tiny-summarization"
    with pytest.raises(RecipeError, match=re.escape(fragment)):
        load_recipe(recipe, [override])


# ------------------------------------------------------------------------------------------------
# A checkpoint scored during training and by `llmkit eval` gets the same numbers
# ------------------------------------------------------------------------------------------------


def test_multiple_choice_in_training_equals_llmkit_eval(tmp_path, tokenizer_dir):
    from llmkit.metrics.choice_builtin import docsum_choice_examples

    corpus = write_corpus(tmp_path, docs=16)
    validation = write_corpus(tmp_path, docs=4, name="val.jsonl", offset=16)
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"context": e.context[-200:], "choices": e.choices, "label": e.label} for e in docsum_choice_examples("validation", limit=8)
    ])  # fmt: skip
    task = {"name": "choice", "metrics": ["multiple_choice"], "data": {"test": str(questions)}}
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus, validation, model={**TINY_MODEL, "max_position_embeddings": 256},
                         train={"max_steps": 4, "eval_every": 4, "lr": 1e-2, "evals": [task]})  # fmt: skip
    run_in_process(recipe)
    [event] = read_events(tmp_path / "run", "eval")  # at the last step: the weights the final model holds
    path = eval_recipe(tmp_path, str(tmp_path / "run"), str(questions))
    result = run_eval(path)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert event["choice_acc"] == metrics["acc"] and event["choice_acc_norm"] == metrics["acc_norm"]
    assert event["choice_acc_stderr"] == pytest.approx(metrics["acc_stderr"], abs=1e-12)


def test_rouge_and_accuracy_in_fine_tuning_equal_llmkit_eval(tmp_path, tiny_model_dir, data_dir):  # noqa: F811
    source = str(data_dir / "cls.jsonl")
    raw = make_recipe(tmp_path, tiny_model_dir, {"type": "classification"}, source, steps=6, data={"validation": source})
    raw["train"]["evals"] = [{"metrics": ["rouge", "accuracy"], "data": {"max_samples": 6}, "generation": {"max_new_tokens": 5}}]
    from llmkit.stages.finetune import run as finetune

    finetune(recipe_from_dict(raw))
    [event] = [e for e in read_events(tmp_path / "run", "eval")]
    records = [json.loads(line) for line in Path(source).read_text().splitlines()][:6]
    test = write_jsonl(tmp_path / "val.jsonl", records)
    path = eval_recipe(tmp_path, str(tmp_path / "run"), str(test), metrics=["rouge", "accuracy"], generation={"max_new_tokens": 5})
    result = run_eval(path)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "accuracy"):
        assert event[key] == pytest.approx(saved["metrics"][key], abs=1e-12), key
    assert saved["protocol"]["task"]["source"].endswith("recipe.yaml")


# ------------------------------------------------------------------------------------------------
# Bits per byte with a tokenizer that adds no BOS (GPT-2 / Qwen style)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_bos_model_dir(tmp_path_factory, tokenizer_dir):
    """The session tokenizer without its BOS post-processor (GPT-2 style: bos = eos = <|endoftext|>), and a tiny llama."""
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("no-bos")
    raw = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    raw.post_processor = None
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|eos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    tokenizer.save_pretrained(out)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def test_bits_per_byte_scores_the_first_token_of_a_no_bos_tokenizer(tmp_path, no_bos_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["def add(a, b): return a + b", "The quick brown fox jumps over the lazy dog.", "x = [i * i for i in range(10)]"]
    test = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    path = eval_recipe(tmp_path, str(no_bos_model_dir), str(test), metrics=["perplexity"], data={"test": str(test), "seq_len": 128})
    result = run_eval(path)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # Independent: lm-eval's rolling loglikelihood, the first token predicted from the prefix (EOS) token.
    tokenizer = AutoTokenizer.from_pretrained(no_bos_model_dir)
    model = AutoModelForCausalLM.from_pretrained(no_bos_model_dir, dtype=torch.float32).eval()
    nll, tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text).input_ids
        assert ids[0] != tokenizer.bos_token_id  # the tokenizer really adds no BOS
        full = torch.tensor([[tokenizer.eos_token_id, *ids]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(full).logits[0].double(), dim=-1)
        nll -= sum(float(logprobs[j - 1, full[0, j]]) for j in range(1, full.shape[1]))
        tokens += len(ids)
    nbytes = sum(len(t.encode()) for t in texts)
    assert saved["metrics"]["tokens"] == tokens and saved["metrics"]["bytes"] == nbytes
    assert saved["metrics"]["bits_per_byte"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-5)
    assert saved["protocol"]["perplexity"]["prefix_token"] == tokenizer.eos_token_id


# ------------------------------------------------------------------------------------------------
# Answer extraction and matching: lm-eval's filter semantics
# ------------------------------------------------------------------------------------------------

STRICT = r"#### (\-?[0-9\.\,]+)"
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


def lm_eval_regex(text: str, pattern: str, group_select: int = 0, fallback: str = "[invalid]") -> str:
    """lm-eval's RegexFilter, written from its definition: findall, pick, first non-empty group, strip."""
    found = re.findall(pattern, text)
    if not found:
        return fallback
    match = found[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


def lm_eval_exact_match(prediction: str, reference: str, ignore: list[str], ignore_case: bool, ignore_punctuation: bool) -> float:
    for pattern in ignore:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


GENERATIONS = [
    ("Tom has 3 + 4 = 7 apples.\n#### 7", "3 + 4 = 7\n#### 7", "7", "7"),
    ("So the answer is $1,234.", "... #### 1234", "[invalid]", "$1,234."),
    ("#### -12.5 and later #### 3", "#### -12.5", "-12.5", "3"),
    ("no number here", "#### 5", "[invalid]", "[invalid]"),
    ("It costs 18 dollars, 2 more than 16.", "#### 18", "[invalid]", "16."),
]


@pytest.mark.parametrize(("generation", "reference", "strict", "flexible"), GENERATIONS)
def test_extraction_and_exact_match_follow_lm_eval(generation, reference, strict, flexible):
    from llmkit.metrics.answers import exact_match, extract, numeric_match

    assert extract(generation, "regex", regex=STRICT) == strict == lm_eval_regex(generation, STRICT)
    assert extract(generation, "last_number") == flexible == lm_eval_regex(generation, r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)
    for answer in (strict, flexible):
        assert exact_match(answer, reference, IGNORE, True, False) == lm_eval_exact_match(answer, reference, IGNORE, True, False)
    assert exact_match("7", "3 + 4 = 7\n#### 7", IGNORE, True, False) == 1.0
    assert numeric_match("$1,234.00", "#### 1234", IGNORE) == 1.0 and numeric_match("12", "#### 13", IGNORE) == 0.0
    assert extract("The answer is (B), not C", "choice_letter") == "B"
    assert extract("  Paris\nbecause ...", "first_line") == "Paris"


def test_lm_eval_filters_agree_when_installed():
    """Where lm-evaluation-harness is installed: its RegexFilter and exact_match give llmkit's answers and scores."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    from llmkit.metrics.answers import exact_match, extract

    responses = [[g] for g, _, _, _ in GENERATIONS]
    strict = [r[0] for r in RegexFilter(regex_pattern=STRICT).apply(responses, None)]
    flexible = [r[0] for r in RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1).apply(responses, None)]
    assert strict == [extract(g, "regex", regex=STRICT) for g, _, _, _ in GENERATIONS]
    assert flexible == [extract(g, "last_number") for g, _, _, _ in GENERATIONS]
    references = [r for _, r, _, _ in GENERATIONS]
    want = exact_match_hf_evaluate(strict, references, regexes_to_ignore=IGNORE, ignore_case=True)["exact_match"]
    assert want == pytest.approx(sum(exact_match(a, r, IGNORE, True) for a, r in zip(strict, references, strict=True)) / len(references))


# ------------------------------------------------------------------------------------------------
# Generative tasks end to end
# ------------------------------------------------------------------------------------------------


def test_generative_task_scores_equal_an_independent_generation(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.data.sources import iter_located_records

    records = [r for _, r in iter_located_records(["builtin:arithmetic/test"], max_samples=4)]
    test = write_jsonl(tmp_path / "gsm.jsonl", records)
    path = eval_recipe(tmp_path, str(tiny_model_dir), str(test), metrics=["generative"],
                       answer={"num_fewshot": 2, "fewshot_seed": None}, generation={"max_new_tokens": 12, "stop": ["Question:"]})  # fmt: skip
    result = run_eval(path)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    hits = {"strict-match": [], "flexible-extract": []}
    for i, (row, record) in enumerate(zip(rows, records, strict=True)):
        shots = [r for j, r in enumerate(records) if j != i][:2]  # first_n, the question left out
        prompt = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots) + f"Question: {record['question']}\nAnswer:"
        assert row["input"] == prompt
        ids = torch.tensor([tokenizer(prompt).input_ids])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("Question:")[0]
        assert row["generation"] == text
        for name, answer in (("strict-match", lm_eval_regex(text, STRICT)), ("flexible-extract", lm_eval_regex(text, r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1))):
            assert row["answers"][name] == answer
            hits[name].append(lm_eval_exact_match(answer, record["answer"], IGNORE, True, False))
    for name, values in hits.items():
        assert saved["metrics"][f"exact_match/{name}"] == sum(values) / len(values)
    assert saved["protocol"]["prompt"]["num_fewshot"] == 2 and saved["protocol"]["prompt"]["chat_template"] is False


def test_generative_prompt_as_chat_turns_is_recorded_and_rendered(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from llmkit.data.sources import iter_located_records
    from llmkit.prompts import ensure_chat_template, render_chat

    records = [r for _, r in iter_located_records(["builtin:arithmetic/test"], max_samples=3)]
    test = write_jsonl(tmp_path / "gsm.jsonl", records)
    prompt = {"chat_template": True, "fewshot_as": "turns", "system_prompt": "Solve it."}
    path = eval_recipe(tmp_path, str(tiny_model_dir), str(test), metrics=["generative"], prompt=prompt,
                       answer={"num_fewshot": 1, "fewshot_seed": None}, generation={"max_new_tokens": 4})  # fmt: skip
    result = run_eval(path)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["protocol"]["prompt"]["chat_template"] is True and saved["protocol"]["prompt"]["fewshot_as"] == "turns"
    assert saved["protocol"]["prompt"]["system_prompt"] == "Solve it."
    row = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ensure_chat_template(tokenizer)
    shot = records[1]
    messages = [{"role": "system", "content": "Solve it."},
                {"role": "user", "content": f"Question: {shot['question']}\nAnswer:"}, {"role": "assistant", "content": shot["answer"]},
                {"role": "user", "content": f"Question: {records[0]['question']}\nAnswer:"}]  # fmt: skip
    assert row["input"] == render_chat(tokenizer, messages)


# ------------------------------------------------------------------------------------------------
# A suite: several tasks, one score per checkpoint
# ------------------------------------------------------------------------------------------------


def test_suite_gives_macro_and_centered_accuracy_for_every_checkpoint(tmp_path, tiny_model_dir, other_model_dir):
    mc = write_jsonl(tmp_path / "mc.jsonl", RECORDS[:3])
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": "What is 2 + 2?", "answer": "#### 4"}, {"question": "What is 3 + 3?", "answer": "#### 6"},
    ])  # fmt: skip
    recipe = {
        "stage": "eval", "output_dir": str(tmp_path / "out"), "model": {"path": [str(tiny_model_dir), str(other_model_dir)]},
        "suite": [
            {"name": "mc", "metrics": ["multiple_choice"], "data": {"test": str(mc)}},
            {"name": "math", "metrics": ["generative"], "data": {"test": str(gsm)}, "generation": {"max_new_tokens": 4}},
            {"name": "ppl", "metrics": ["perplexity"], "data": {"test": str(mc), "text_field": "question"}},
        ],
    }  # fmt: skip
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = run_eval(path)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    table = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [row["model"] for row in table["models"]] == [str(tiny_model_dir), str(other_model_dir)]
    for model in saved["models"]:
        tasks = model["tasks"]
        acc, em = tasks["mc"]["metrics"]["acc"], tasks["math"]["metrics"]["exact_match/strict-match"]
        chance = (1 / 3 + 1 / 2 + 1 / 3) / 3  # mean 1/choices of the three questions
        assert model["metrics"]["suite_score"] == pytest.approx((acc + em) / 2)
        assert model["metrics"]["suite_centered"] == pytest.approx(((acc - chance) / (1 - chance) + em) / 2)
        assert model["metrics"]["ppl/perplexity"] == tasks["ppl"]["metrics"]["perplexity"]
        assert tasks["math"]["protocol"]["prompt"]["chat_template"] is False
    assert "suite_score" in table["metrics"] and "plain text, 0-shot" in (tmp_path / "out" / "comparison.md").read_text()


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any model loads
# ------------------------------------------------------------------------------------------------


def test_fewshot_larger_than_the_pool_names_key_and_file(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "two.jsonl", RECORDS[:2])
    result = run_eval(eval_recipe(tmp_path, str(tiny_model_dir), str(data), choice={"num_fewshot": 5}))
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "choice.num_fewshot (5) is larger than the 1 example left in the few-shot pool of" in err and "two.jsonl" in err, err
    assert "choice.fewshot_split" in err and "\n" not in err


def test_choice_window_beyond_the_model_positions_is_refused(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "mc.jsonl", RECORDS[:2])
    result = run_eval(eval_recipe(tmp_path, str(tiny_model_dir), str(data), choice={"max_length": 100000}))
    assert result.exit_code == 2, result.output
    assert "choice.max_length (100000) is larger than the 256 positions" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_generative_record_without_the_field_names_record_and_key(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1 + 1?", "answer": "#### 2"}, {"q": "2 + 2?", "answer": "#### 4"}])
    result = run_eval(eval_recipe(tmp_path, str(tiny_model_dir), str(data), metrics=["generative"]))
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "gsm.jsonl:2" in err and "'question'" in err and "answer.prompt_template" in err and "\n" not in err, err


def test_a_run_written_before_train_evals_still_loads_and_resumes(tmp_path):
    """A run's recipe.yaml from an older llmkit holds task_eval and train.choice_eval: eval, generate and resume still read it."""
    from llmkit import rundir
    from llmkit.recipes import recipe_to_yaml

    recipe = load_recipe("finetune/tiny-summarization", [f"output_dir={tmp_path / 'run'}"])
    old = yaml.safe_load(recipe_to_yaml(recipe))
    old["task_eval"] = {"samples": 32, "max_new_tokens": 64}
    old["train"]["choice_eval"] = None
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(old), encoding="utf-8")
    with pytest.raises(RecipeError, match="task_eval was replaced by train.evals"):
        load_recipe(tmp_path / "run" / "recipe.yaml")
    assert load_recipe(tmp_path / "run" / "recipe.yaml", run_recipe=True).task.type == "summarization"
    assert rundir.claim(recipe, overwrite=False).state == "same"


def test_generative_scores_equal_lm_eval_when_it_is_installed(tmp_path, tiny_model_dir):
    """Where lm-evaluation-harness is installed: its gsm8k-style generate_until task and llmkit give the same generations and scores."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from llmkit.data.sources import iter_located_records

    test = write_jsonl(tmp_path / "test.jsonl", [r for _, r in iter_located_records(["builtin:arithmetic/test"], max_samples=3)])
    train = write_jsonl(tmp_path / "train.jsonl", [r for _, r in iter_located_records(["builtin:arithmetic/train"], max_samples=2)])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "arith.yaml").write_text(
        f"task: arith\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {test}, train: {train}}}\n"
        "test_split: test\ntraining_split: train\nfewshot_split: train\noutput_type: generate_until\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{answer}}"\n'
        "num_fewshot: 2\nfewshot_config:\n  sampler: first_n\n"
        'generation_kwargs:\n  until: ["Question:", "\\n\\n"]\n  do_sample: false\n  max_gen_toks: 10\n'
        f"metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n    ignore_case: true\n"
        f"    ignore_punctuation: false\n    regexes_to_ignore: {json.dumps(IGNORE)}\n"
        f"filter_list:\n  - name: strict-match\n    filter:\n      - function: regex\n        regex_pattern: {json.dumps(STRICT)}\n"
        "      - function: take_first\n  - name: flexible-extract\n    filter:\n      - function: regex\n        group_select: -1\n"
        '        regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"\n      - function: take_first\n'
    )  # fmt: skip
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_model_dir},dtype=float32", tasks=["arith"],
                                  task_manager=TaskManager(include_path=str(tasks)), batch_size=2, device="cpu", log_samples=True)  # fmt: skip
    path = eval_recipe(tmp_path, str(tiny_model_dir), str(test), metrics=["generative"],
                       answer={"num_fewshot": 2, "fewshot_split": str(train), "fewshot_seed": None},
                       generation={"max_new_tokens": 10, "stop": ["Question:", "\n\n"]})  # fmt: skip
    result = run_eval(path)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    for sample in out["samples"]["arith"]:
        row = rows[sample["doc_id"]]
        assert row["generation"] == sample["resps"][0][0]
        assert row["answers"][sample["filter"]] == sample["filtered_resps"][0]
    for name in ("strict-match", "flexible-extract"):
        assert saved["metrics"][f"exact_match/{name}"] == out["results"]["arith"][f"exact_match,{name}"]
