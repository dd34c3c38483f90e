"""Fine-tuning end to end on a tiny random llama: every task learns, LoRA, resume, outputs, errors, inspect.

pytest tests/test_finetune.py -q
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.recipes import recipe_from_dict
from llmkit.stages.finetune import run as finetune

runner = CliRunner()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8"
    )
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Hand-made task data: classification, instruction (prompt/response and chat), raw text."""
    out = tmp_path_factory.mktemp("ft-data")
    words = {
        "positive": ["great", "lovely", "superb", "fine"],
        "negative": ["awful", "poor", "dreadful", "bad"],
    }
    cls = [
        {"text": f"The {thing} was {words[label][i % 4]} and {words[label][(i + 1) % 4]}.", "label": label}
        for i, (thing, label) in enumerate(
            (t, lab)
            for t in ("film", "meal", "book", "trip")
            for lab in ("positive", "negative")
            for _ in range(3)
        )
    ]
    write_jsonl(out / "cls.jsonl", cls)
    inst = [
        {"prompt": f"Repeat the word {w} twice.", "response": f"{w} {w}"}
        for w in ("cat", "dog", "sun", "tree", "bird", "fish")
    ]
    inst += [
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": str(a + b)},
            ]
        }
        for a, b in ((1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7))
    ]
    write_jsonl(out / "inst.jsonl", inst)
    text = [{"text": "def add(a, b):\n    return a + b\n" * (1 + i % 3)} for i in range(16)]
    write_jsonl(out / "text.jsonl", text)
    return out


def make_recipe(tmp_path: Path, model_dir: Path, task: dict, source, steps: int = 12, **sections) -> dict:
    recipe = {
        "stage": "finetune",
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(model_dir)},
        "task": task,
        "data": {"train": source, "seq_len": 64, "cache_dir": str(tmp_path / "cache"), "max_samples": 32},
        "train": {
            "max_steps": steps,
            "micro_batch_size": 4,
            "lr": 5e-3,
            "schedule": "constant",
            "weight_decay": 0.0,
            "log_every": 1,
            "eval_every": steps,
            "save_every": steps,
        },
    }
    if task["type"] != "text" and "validation" in sections.get("data", {}):  # a task metric on the validation records
        metric = "accuracy" if task["type"] == "classification" else "rouge"
        recipe["train"]["evals"] = [{"metrics": [metric], "data": {"max_samples": 4}, "generation": {"max_new_tokens": 6}}]
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    return recipe


def events(run: Path, kind: str) -> list[dict]:
    return [
        e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind
    ]


def assert_loss_falls(run: Path) -> None:
    losses = [e["loss"] for e in events(run, "train")]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.85 * first, losses


TASKS = {
    "summarization": ({"type": "summarization"}, "builtin:docsum/train", "rougeL"),
    "instruction": ({"type": "instruction"}, "inst.jsonl", "rougeL"),
    "classification": ({"type": "classification"}, "cls.jsonl", "accuracy"),
    "text": ({"type": "text"}, "text.jsonl", None),
}


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_finetunes_and_loss_falls(name, tmp_path, tiny_model_dir, data_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task, train, metric = TASKS[name]
    source = train if train.startswith("builtin:") else str(data_dir / train)
    recipe = recipe_from_dict(
        make_recipe(
            tmp_path, tiny_model_dir, task, source, data={"validation": source, "packing": name != "text"}
        )
    )
    finetune(recipe)
    run = tmp_path / "run"
    assert_loss_falls(run)
    [eval_event] = events(run, "eval")
    assert "val_loss" in eval_event and (metric is None or 0.0 <= eval_event[metric] <= 1.0)
    model = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert model.config.vocab_size >= len(tokenizer)
    if name == "instruction":
        assert tokenizer.chat_template  # the template training used ships with the model
    if name == "classification":
        assert "labels:\n  - negative\n  - positive" in (run / "recipe.yaml").read_text()


def test_lora_trains_only_adapters_and_merged_equals_base_plus_adapter(tmp_path, tiny_model_dir, data_dir):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recipe = recipe_from_dict(
        make_recipe(
            tmp_path,
            tiny_model_dir,
            {"type": "instruction"},
            str(data_dir / "inst.jsonl"),
            lora={"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, "merge": True},
            train={"lr": 2e-2, "max_steps": 16, "evals": []},
        )
    )
    finetune(recipe)
    run = tmp_path / "run"
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    saved = load_file(checkpoint / "model.safetensors")
    assert saved and all("lora_" in key for key in saved)  # only adapter weights were trained (and saved)

    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    ids = torch.tensor([[0, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        expected, got = with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = (
            AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
            .eval()(input_ids=ids)
            .logits
        )
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4)
    # The last checkpoint (adapter weights only) loads as the same merged model, rebuilt from the run's recipe.
    from llmkit.models import load_model

    with torch.no_grad():
        torch.testing.assert_close(load_model(str(checkpoint), device="cpu")[0](input_ids=ids).logits, got, atol=1e-5, rtol=1e-5)
    # The task loss falls: base vs merged model on the same tokenized training examples (LoRA on a
    # random base learns slowly, so compare deterministically rather than noisy batch losses).
    from transformers import AutoTokenizer

    from llmkit.data.packing import padded_collate
    from llmkit.data.sft import load_located_records, tokenize_records

    tokenizer = AutoTokenizer.from_pretrained(run)
    examples, _ = tokenize_records(recipe, load_located_records(recipe.data.train), tokenizer)
    batch = padded_collate(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        base_loss = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(**batch).loss
        tuned_loss = merged(**batch).loss
    assert tuned_loss < base_loss - 0.1, (float(base_loss), float(tuned_loss))
    assert all(
        torch.equal(v, with_adapter.get_base_model().state_dict()[k])
        for k, v in base_state.items()
        if k in with_adapter.get_base_model().state_dict()
    )
    # The adapter directory alone also loads through transformers' peft integration.
    assert AutoModelForCausalLM.from_pretrained(adapter, dtype=torch.float32) is not None


def test_resume_matches_uninterrupted(tmp_path, tiny_model_dir, data_dir):
    from safetensors.torch import load_file

    def run(out: Path, steps: int, packing: bool = True) -> Path:
        raw = make_recipe(
            out,
            tiny_model_dir,
            {"type": "classification"},
            str(data_dir / "cls.jsonl"),
            steps=steps,
            data={"packing": packing},
            train={"save_every": 3, "evals": []},
        )
        finetune(recipe_from_dict(raw))
        return out / "run"

    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6)  # same recipe with a larger budget: resumes from step 3
    assert events(resumed, "train")[3]["step"] == 4 and (resumed / "checkpoints" / "step-00000003").is_dir()
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_resume_whose_training_records_changed_exits_2_naming_the_file(tmp_path, tiny_model_dir, data_dir):
    records = tmp_path / "cls.jsonl"
    records.write_text((data_dir / "cls.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    raw = make_recipe(tmp_path, tiny_model_dir, {"type": "classification"}, str(records), steps=3, train={"evals": []})
    assert run_cli(tmp_path, raw, "finetune").exit_code == 0
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert str(records.resolve()) in state["data_fingerprint"]["files"]
    lines = records.read_text(encoding="utf-8").splitlines(keepends=True)
    records.write_text("".join(lines[: len(lines) // 2]), encoding="utf-8")  # halved between the runs
    cache_before = sorted(p.name for p in (tmp_path / "cache").iterdir())
    raw["train"]["max_steps"] = 6
    result = run_cli(tmp_path, raw, "finetune")
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert str(records.resolve()) in message and "changed since the checkpoint" in message and "--overwrite" in message
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cache_before  # refused before tokenizing
    assert not (tmp_path / "run" / "checkpoints" / "step-00000006").exists()


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming file/line/key, exit code 2, nothing written
# ----------------------------------------------------------------------------------------------


def run_cli(tmp_path: Path, recipe: dict, *args: str):
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return runner.invoke(app, [*args, str(path)])


@pytest.mark.parametrize(
    "case",
    [
        "not_json",
        "missing_field",
        "empty_target",
        "template_field",
        "missing_model",
        "tokenizer_mismatch",
        "qlora_cpu",
        "bad_template",
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(case, tmp_path, tiny_model_dir, tokenizer_dir):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, [{"document": "A text.", "summary": "Short."}] * 4)
    recipe = make_recipe(tmp_path, tiny_model_dir, {"type": "summarization"}, str(data))
    expected = {
        "not_json": f"{data}:2: not valid JSON",
        "missing_field": f"{data}:3: record lacks field 'summary'",
        "empty_target": f"{data}:1: empty target in field 'summary'",
        "template_field": f"{data}:1: record lacks field 'title'",
        "missing_model": "model.path: ",
        "tokenizer_mismatch": "embedding rows",
        "qlora_cpu": "lora.load_in_4bit: QLoRA needs a CUDA GPU",
        "bad_template": "task.prompt_template: placeholder '{document!r}'",
    }[case]
    if case == "not_json":
        write_jsonl(data, [{"document": "a", "summary": "b"}, "{not json"])
    elif case == "missing_field":
        write_jsonl(data, [{"document": "a", "summary": "b"}] * 2 + [{"document": "a", "summry": "b"}])
    elif case == "empty_target":
        write_jsonl(data, [{"document": "a", "summary": ""}])
    elif case == "template_field":
        recipe["task"]["prompt_template"] = "{title}\n{document}\nSummary:"
    elif case == "missing_model":
        recipe["model"]["path"] = str(tmp_path / "no-such-model")
    elif case == "tokenizer_mismatch":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tok.add_tokens([f"<extra_{i}>" for i in range(64)])
        tok.save_pretrained(tmp_path / "big-tokenizer")
        recipe["tokenizer"] = str(tmp_path / "big-tokenizer")
    elif case == "qlora_cpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA present: QLoRA is allowed")
        recipe["lora"] = {"enabled": True, "load_in_4bit": True}
    elif case == "bad_template":
        recipe["task"]["prompt_template"] = "{document!r}"
    result = run_cli(tmp_path, recipe, "finetune")
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_lora_without_peft_names_the_extra(tmp_path, tiny_model_dir, monkeypatch):
    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    data = write_jsonl(tmp_path / "d.jsonl", [{"document": "a", "summary": "b"}])
    recipe = make_recipe(
        tmp_path, tiny_model_dir, {"type": "summarization"}, str(data), lora={"enabled": True}
    )
    result = run_cli(tmp_path, recipe, "finetune")
    assert result.exit_code == 2 and "pip install 'llmkit[lora]'" in result.output


def test_data_inspect_marks_trained_tokens(tmp_path, tiny_model_dir, data_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir, {"type": "classification"}, str(data_dir / "cls.jsonl"))
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = runner.invoke(app, ["data", "inspect", str(path), "-n", "2"])
    assert result.exit_code == 0, result.output
    assert "Classify the text as one of: negative, positive." in result.output
    assert "Label:\n[[positive<|eos|>]]" in result.output and result.output.count("--- ") == 2
    assert "[[trained tokens]]" in result.output


def test_data_prepare_fills_the_cache_that_finetune_reads(tmp_path, tiny_model_dir, data_dir):
    import yaml

    recipe = make_recipe(tmp_path, tiny_model_dir, {"type": "classification"}, str(data_dir / "cls.jsonl"))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    first = runner.invoke(app, ["data", "prepare", str(path)])
    assert first.exit_code == 0, first.output
    assert "tokenized: train: 24 records -> 24 examples" in first.output
    assert len(list((tmp_path / "cache").glob("sft-*/COMPLETE"))) == 1
    again = runner.invoke(app, ["data", "prepare", str(path)])
    assert again.exit_code == 0 and "cached: train: 24 records" in again.output


def test_lora_wrap_and_adapter_load_print_no_future_warning(tmp_path, tiny_model_dir):
    # Report 2026-12-06: transformers' FutureWarning about `is_gradient_checkpointing` (read by peft's
    # PeftModel) on every LoRA run and every `generate` of an adapter.
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmkit.models import apply_lora, load_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    # peft itself still triggers it; once it does not, llmkit.models.quiet_peft_wrap can go.
    assert any(issubclass(w.category, FutureWarning) for w in raw)
    recipe = recipe_from_dict(make_recipe(tmp_path, tiny_model_dir, {"type": "instruction"}, "x.jsonl", lora={"enabled": True, "r": 2}))
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        wrapped = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), recipe)
        wrapped.save_pretrained(tmp_path / "adapter")
        load_model(str(tmp_path / "adapter"), tokenizer=str(tiny_model_dir), device="cpu")
    assert not [str(w.message) for w in ours if issubclass(w.category, FutureWarning)]
