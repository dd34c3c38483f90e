"""Preference optimization on a tiny random llama: losses against an independent computation, learning,
cached reference log-probs, resume, bad input, `data inspect`, the `preference` metric.

pytest tests/test_preference.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from pretrain_helpers import assert_clean_error
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.recipes import TaskSpec, recipe_from_dict
from llmkit.stages.finetune import run as finetune

runner = CliRunner()

WORDS = ["cat", "dog", "sun", "tree", "bird", "fish", "moon", "star", "rock", "lake", "road", "leaf", "rain", "snow", "wind", "fire"]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def style_pairs(words: list[str]) -> list[dict]:
    """Pairs whose preference is a style the model can learn and carry to unseen words: a calm sentence over shouting."""
    return [
        {"prompt": f"Tell me about the {w}.\n", "chosen": f"The {w} is here.", "rejected": f"{w.upper()} {w.upper()} !!!"}
        for w in words
    ]


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> Path:
    """Training pairs (12 words), held-out pairs (4 other words), and chat-format pairs."""
    out = tmp_path_factory.mktemp("pref-data")
    write_jsonl(out / "train.jsonl", style_pairs(WORDS[:12]))
    write_jsonl(out / "heldout.jsonl", style_pairs(WORDS[12:]))
    chat = [
        {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}], "chosen": str(a + b), "rejected": str(a + b + 1)}
        for a, b in ((1, 2), (2, 3), (3, 4), (4, 5))
    ]
    write_jsonl(out / "chat.jsonl", chat)
    return out


def pref_recipe(tmp_path: Path, model_dir: Path, data: Path, steps: int = 6, task: dict | None = None, **sections) -> dict:
    recipe = {
        "stage": "finetune",
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(model_dir)},
        "task": {"type": "preference", **(task or {})},
        "data": {
            "train": str(data / "train.jsonl"),
            "validation": str(data / "heldout.jsonl"),
            "seq_len": 64,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {
            "max_steps": steps, "micro_batch_size": 4, "lr": 5e-3, "schedule": "constant", "weight_decay": 0.0,
            "log_every": 1, "eval_every": steps, "save_every": steps,
        },
    }  # fmt: skip
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    return recipe


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


# ----------------------------------------------------------------------------------------------
# A short DPO run learns the preference and it carries to held-out pairs
# ----------------------------------------------------------------------------------------------


def test_dpo_run_raises_heldout_accuracy_and_margin(tmp_path, tiny_model_dir, pref_data):
    summary = finetune(recipe_from_dict(pref_recipe(tmp_path, tiny_model_dir, pref_data, steps=8, train={"eval_every": 4})))
    run = tmp_path / "run"
    train, evals = events(run, "train"), events(run, "eval")
    assert {"loss", "reward_chosen", "reward_rejected", "reward_margin", "pref_accuracy"} <= set(train[0])
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as the reference: margin 0
    assert train[-1]["loss"] < train[0]["loss"]
    final = evals[-1]
    assert final["val_pairs"] == 4 and final["val_ppl"] is None
    assert final["val_pref_accuracy"] == 1.0 and final["val_reward_margin"] > 0.1, final
    assert summary["val_loss"] == final["val_loss"] < math.log(2)

    # llmkit/metrics/preference.py scores the same held-out pairs the same way, against the starting model.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.data.preference import tokenize_pair
    from llmkit.metrics.preference import score_preferences

    tokenizer = AutoTokenizer.from_pretrained(run)
    pairs = [tokenize_pair(TaskSpec(type="preference"), r, tokenizer, 64) for r in style_pairs(WORDS[12:])]
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = score_preferences(AutoModelForCausalLM.from_pretrained(run), pairs, tokenizer.pad_token_id, reference=start)
    assert score_preferences(start, pairs, tokenizer.pad_token_id, reference=start)["preference_accuracy"] == 0.0
    assert tuned["preference_accuracy"] == final["val_pref_accuracy"] and tuned["pairs"] == 4
    assert 0.1 * tuned["preference_margin"] == pytest.approx(final["val_reward_margin"], abs=1e-4)  # reward = beta * log-ratio

    # `llmkit eval` with metrics [preference] gives the same numbers, against the reference and without one.
    from llmkit.stages.evaluate import run as evaluate

    test = write_jsonl(tmp_path / "heldout.jsonl", style_pairs(WORDS[12:]))
    eval_recipe = {"stage": "eval", "model": {"path": str(run)}, "data": {"test": str(test), "seq_len": 64}, "metrics": ["preference"]}
    against = evaluate(recipe_from_dict({**eval_recipe, "output_dir": str(tmp_path / "ev-ref"), "preference": {"reference": str(tiny_model_dir)}}))
    scored = json.loads((tmp_path / "ev-ref" / "metrics.json").read_text())["metrics"]
    assert against and scored["preference_accuracy"] == tuned["preference_accuracy"] and scored["pairs"] == 4
    assert scored["preference_margin"] == pytest.approx(tuned["preference_margin"], abs=1e-5)
    both = {**eval_recipe, "model": {"path": [str(tiny_model_dir), str(run)]}, "output_dir": str(tmp_path / "ev-free")}
    evaluate(recipe_from_dict(both))  # a base model (no preference task of its own) reads the pairs plainly
    results = json.loads((tmp_path / "ev-free" / "metrics.json").read_text())["models"]
    assert results[0]["metrics"]["pairs"] == 4 and results[0]["protocol"]["preference"]["task_source"] == "plain {prompt} pairs"
    free = results[1]["metrics"]
    model = AutoModelForCausalLM.from_pretrained(run)
    expected = [
        _sequence_logp(model, p["prompt"] + p["chosen"], len(p["prompt"])) - _sequence_logp(model, p["prompt"] + p["rejected"], len(p["prompt"]))
        for p in pairs
    ]
    assert free["preference_margin"] == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    assert free["preference_accuracy"] == sum(m > 0 for m in expected) / len(expected)


# ----------------------------------------------------------------------------------------------
# Each loss equals an independent computation from a plain transformers forward pass
# ----------------------------------------------------------------------------------------------


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sequence_logp(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, one unpadded sequence at a time."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logps = torch.log_softmax(logits, dim=-1)
    return sum(float(logps[t - 1, ids[t]]) for t in range(start, len(ids)))


@pytest.mark.parametrize(
    "task",
    [
        {"loss": "dpo", "beta": 0.5, "label_smoothing": 0.1},
        {"loss": "ipo", "beta": 0.3},
        {"loss": "simpo", "beta": 2.0, "simpo_gamma": 0.4, "label_smoothing": 0.05},
        {"loss": "orpo", "orpo_lambda": 0.2},
    ],
    ids=lambda t: t["loss"],
)
def test_each_loss_equals_an_independent_computation(task, tiny_model_dir):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from llmkit.data.preference import pair_collate, tokenize_pair
    from llmkit.training.preference import PreferenceObjective

    spec = TaskSpec(type="preference", **task)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():  # a policy that differs from its reference
        generator = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    records = style_pairs(WORDS[:3]) + [{"prompt": "Longer prompt here.\n", "chosen": "Short.", "rejected": "A much longer rejected reply."}]
    pairs = [tokenize_pair(spec, r, tokenizer, 64) for r in records]
    batch = pair_collate(tokenizer.pad_token_id)(pairs)
    loss_sum, stats = PreferenceObjective(None, policy, spec, reference_model=reference)(batch)

    eos, beta = tokenizer.eos_token_id, spec.preference_beta
    expected, margins = [], []
    for record in records:
        prompt = tokenizer(record["prompt"])["input_ids"]  # with BOS, as every llmkit prompt
        logp, n = {}, {}
        for name in ("chosen", "rejected"):
            completion = tokenizer(record[name], add_special_tokens=False)["input_ids"] + [eos]
            ids = prompt + completion
            logp[name] = (_sequence_logp(policy, ids, len(prompt)), _sequence_logp(reference, ids, len(prompt)))
            n[name] = len(completion)
        (pc, rc), (pr, rr) = logp["chosen"], logp["rejected"]
        if spec.loss == "dpo":
            m = beta * ((pc - rc) - (pr - rr))
            eps = spec.label_smoothing
            loss, margin = -(1 - eps) * _logsigmoid(m) - eps * _logsigmoid(-m), m
        elif spec.loss == "ipo":
            h = (pc - rc) / n["chosen"] - (pr - rr) / n["rejected"]
            loss, margin = (h - 1 / (2 * beta)) ** 2, beta * h
        elif spec.loss == "simpo":
            m = beta * pc / n["chosen"] - beta * pr / n["rejected"]
            eps = spec.label_smoothing
            loss = -(1 - eps) * _logsigmoid(m - spec.simpo_gamma) - eps * _logsigmoid(-(m - spec.simpo_gamma))
            margin = m
        else:
            ac, ar = pc / n["chosen"], pr / n["rejected"]
            odds_c, odds_r = ac - math.log(1 - math.exp(ac)), ar - math.log(1 - math.exp(ar))
            loss, margin = -ac - spec.orpo_lambda * _logsigmoid(odds_c - odds_r), ac - ar
        expected.append(loss)
        margins.append(margin)
    assert float(loss_sum.detach()) == pytest.approx(sum(expected), rel=1e-4, abs=1e-5)
    assert float(stats[2]) == pytest.approx(sum(margins), rel=1e-4, abs=1e-5)
    assert float(stats[3]) == sum(1 for m in margins if m > 0)


# ----------------------------------------------------------------------------------------------
# Cached reference log-probs: equal to a live reference, one model in memory, exact resume
# ----------------------------------------------------------------------------------------------


def test_cached_reference_equals_live_and_lands_in_the_cache(tmp_path, tiny_model_dir, pref_data, capsys):
    cached = pref_recipe(tmp_path / "c", tiny_model_dir, pref_data, steps=2, train={"eval_every": 1})
    live = pref_recipe(tmp_path / "l", tiny_model_dir, pref_data, steps=2, task={"reference": "live"}, train={"eval_every": 1})
    # `data prepare` tokenizes the pairs and scores them with the starting model; the run then only reads them.
    (tmp_path / "cached.yaml").write_text(yaml.safe_dump(cached), encoding="utf-8")
    prepared = runner.invoke(app, ["data", "prepare", str(tmp_path / "cached.yaml")])
    assert prepared.exit_code == 0 and "reference log-probs cached (computed now)" in prepared.stdout, prepared.output
    capsys.readouterr()
    finetune(recipe_from_dict(cached))
    assert "reference log-probs cached (hit)" in capsys.readouterr().out
    finetune(recipe_from_dict(live))
    a, b = events(tmp_path / "c" / "run", "eval"), events(tmp_path / "l" / "run", "eval")
    for x, y in zip(a, b, strict=True):  # same reference log-probs, computed in a batch of another shape
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-5)
        assert x["val_reward_margin"] == pytest.approx(y["val_reward_margin"], abs=1e-5)
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / "c" / "cache").iterdir())
    assert entries == ["pref", "prefref"]
    scores = json.loads(next((tmp_path / "c" / "cache").glob("prefref-*/reference.json")).read_text())
    assert len(scores["train"]) == 12 and len(scores["validation"]) == 4


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_is_bit_identical_with_the_cached_reference(lora, tmp_path, tiny_model_dir, pref_data):
    from safetensors.torch import load_file

    def run(out: Path, steps: int) -> Path:
        sections = {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1}} if lora else {}
        raw = pref_recipe(out, tiny_model_dir, pref_data, steps=steps, train={"save_every": 2, "eval_every": 2}, **sections)
        raw["data"]["cache_dir"] = str(tmp_path / "cache")  # shared: the resumed run reads the reference log-probs back
        finetune(recipe_from_dict(raw))
        return out / "run"

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4)
    assert [e["step"] for e in events(resumed, "train")] == [1, 2, 3, 4]
    def numbers(run: Path) -> list[dict]:  # what training computed, without wall-clock measurements
        return [{k: v for k, v in e.items() if k not in ("time", "tokens_per_s", "mfu")} for e in events(run, "train")[2:]]

    assert numbers(straight) == numbers(resumed)
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = load_file(straight / name), load_file(resumed / name)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the record or key and the fix, exit 2, nothing written
# ----------------------------------------------------------------------------------------------

GOOD = {"prompt": "Say something.\n", "chosen": "Hello there.", "rejected": "Go away."}
BAD_RECORDS = {
    "missing_chosen": ({"prompt": "p", "chosn": "a", "rejected": "b"}, ":2: record lacks field 'chosen'", "did you mean 'chosn'"),
    "missing_rejected": ({"prompt": "p", "chosen": "a"}, ":2: record lacks field 'rejected'", "the record has: prompt, chosen"),
    "identical": ({"prompt": "p", "chosen": "Same.", "rejected": "Same. "}, ":2: chosen and rejected are identical", "remove the record"),
    "empty_completion": ({"prompt": "p", "chosen": "a", "rejected": "  "}, ":2: empty completion in field 'rejected'", "fill the field"),
    "long_prompt": ({"prompt": "word " * 80, "chosen": "a", "rejected": "b"}, ":2: the prompt is", "raise data.seq_len"),
    "chat_ends_with_reply": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
        ":2: the last message of 'messages' is the assistant's", "'chosen' and 'rejected'",
    ),
}
BAD_KEYS = {
    "beta_zero": ({"task": {"beta": 0}}, "task.beta", "greater than 0"),
    "beta_negative": ({"task": {"beta": -0.1}}, "task.beta", "greater than 0"),
    "no_reference": ({"task": {"reference": "none"}}, "task.reference: none, but task.loss dpo", "reference-free loss"),
    "live_reference_free": ({"task": {"loss": "simpo", "reference": "live"}}, "task.reference", "reference-free"),
    "packing": ({"data": {"packing": True}}, "data.packing", "set data.packing: false"),
    "orpo_beta": ({"task": {"loss": "orpo", "beta": 0.1}}, "task.beta: orpo has no beta", "task.orpo_lambda"),
    "smoothing_ipo": ({"task": {"loss": "ipo", "label_smoothing": 0.1}}, "task.label_smoothing applies to dpo and simpo", "ipo"),
    "gamma_dpo": ({"task": {"simpo_gamma": 1.0}}, "task.simpo_gamma applies to task.loss: simpo", "dpo"),
}


@pytest.mark.parametrize("case", [*BAD_RECORDS, *BAD_KEYS])
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    recipe = pref_recipe(tmp_path, tiny_model_dir, data)
    write_jsonl(data / "heldout.jsonl", [GOOD, {**GOOD, "chosen": "Hi."}])
    if case in BAD_RECORDS:
        record, *fragments = BAD_RECORDS[case]
        write_jsonl(data / "train.jsonl", [GOOD, record, GOOD])
        fragments[0] = f"{data / 'train.jsonl'}{fragments[0]}"
    else:
        write_jsonl(data / "train.jsonl", [GOOD] * 4)
        override, *fragments = BAD_KEYS[case]
        for section, values in override.items():
            recipe[section].update(values)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = runner.invoke(app, ["finetune", str(tmp_path / "recipe.yaml")])
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_preference_keys_on_another_task_are_refused_and_resolved_recipes_load_again():
    with pytest.raises(ValueError, match="task.beta applies to task.type: preference only"):
        TaskSpec(type="summarization", beta=0.1)
    spec = TaskSpec(type="preference", loss="simpo")
    # recipe.yaml of a run spells out every default; it must validate again (generate and eval read it).
    assert TaskSpec(**spec.model_dump()) == spec and spec.preference_beta == 2.0
    assert TaskSpec(**TaskSpec(type="summarization").model_dump()).type == "summarization"


def test_data_inspect_shows_the_chosen_and_rejected_masks(tmp_path, tiny_model_dir, pref_data):
    recipe = pref_recipe(tmp_path, tiny_model_dir, pref_data)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "recipe.yaml"), "-n", "1"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "preference task (dpo)" in out and f"{pref_data / 'train.jsonl'}:1" in out
    assert "[[The cat is here.<|eos|>]]" in out and "[[CAT CAT !!!<|eos|>]]" in out
    assert out.count("Tell me about the cat.") == 2 and "[[Tell" not in out  # the prompt is shown, masked, in both rows


def test_chat_pairs_render_through_the_chat_template(tmp_path, tiny_model_dir, pref_data):
    from transformers import AutoTokenizer

    from llmkit.data.preference import tokenize_pair
    from llmkit.prompts import ensure_chat_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ensure_chat_template(tokenizer)
    record = json.loads((pref_data / "chat.jsonl").read_text().splitlines()[0])
    pair = tokenize_pair(TaskSpec(type="preference"), record, tokenizer, 64)
    prompt = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(pair["prompt"]) == prompt
    for name in ("chosen", "rejected"):
        # The completion is the assistant turn exactly as the template writes it after the prompt, through its end.
        whole = tokenizer.apply_chat_template([*record["messages"], {"role": "assistant", "content": record[name]}], tokenize=False)
        turn = tokenizer.decode(pair[name])
        assert whole.startswith(prompt + turn) and turn.startswith(record[name]) and turn != record[name]


def test_a_chat_preference_run_is_prompted_through_the_chat_template(tmp_path, tiny_model_dir, pref_data):
    from llmkit.prompts import run_prompt

    recipe = pref_recipe(tmp_path, tiny_model_dir, pref_data, steps=1, task={"loss": "simpo"})
    recipe["data"].update(train=str(pref_data / "chat.jsonl"), validation=None)
    finetune(recipe_from_dict(recipe))
    assert run_prompt(tmp_path / "run").kind == "chat"
    mixed = tmp_path / "mixed.jsonl"
    write_jsonl(mixed, [*style_pairs(WORDS[:2]), json.loads((pref_data / "chat.jsonl").read_text().splitlines()[0])])
    recipe["data"]["train"] = str(mixed)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert_clean_error(runner.invoke(app, ["finetune", str(tmp_path / "recipe.yaml"), "--overwrite"]),
                       f"{mixed}:1: this record has no 'messages'", "one format")
