"""End to end: a shortened quickstart produces every artifact, and a second run reuses them.

    pytest tests/test_quickstart.py -q
"""

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.cli import app

# The whole pipeline, minutes on 2 cores: run with `python -m pytest -m slow` (.ci/run does).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart") / "qs"
    result = CliRunner().invoke(app, ["quickstart", str(root), "--fast"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root, result.stdout


def test_every_artifact_loads(quickstart_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, stdout = quickstart_dir
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    assert tokenizer.is_fast and tokenizer.eos_token is not None
    for name in ("pretrain", "finetune"):
        run = root / name
        for file in ("config.json", "model.safetensors", "generation_config.json", "README.md", "recipe.yaml", "metrics.jsonl"):
            assert (run / file).is_file(), (name, file)
        model = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(run)
        ids = tok("The os module", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] > ids["input_ids"].shape[1]
    assert (root / "curves.png").stat().st_size > 10_000
    samples = (root / "samples.md").read_text()
    assert samples.count("**pretrained only:**") == samples.count("**fine-tuned:**") == 3  # base and fine-tuned, as the README says
    assert "quickstart finished" in stdout


def test_metrics_cover_both_models(quickstart_dir):
    root, _ = quickstart_dir
    report = json.loads((root / "eval" / "metrics.json").read_text())
    assert [Path(m["model"]).name for m in report["models"]] == ["pretrain", "finetune"]
    assert report["models"][0]["protocol"]["perplexity"]["stride"] > 0
    assert (root / "eval" / "comparison.md").is_file()
    for row in report["models"]:
        metrics = row["metrics"]
        for key in ("perplexity", "bits_per_byte", "rouge1", "rouge2", "rougeL", "rougeLsum"):
            assert key in metrics and math.isfinite(metrics[key]), key
        assert metrics["perplexity"] > 1
        assert 0 <= metrics["rouge1"] <= 1
    assert (root / "eval" / "predictions.jsonl").is_file()


def test_second_run_reuses_finished_stages(quickstart_dir):
    root, _ = quickstart_dir
    before = {p: p.stat().st_mtime_ns for p in root.rglob("model.safetensors")}
    result = CliRunner().invoke(app, ["quickstart", str(root), "--fast"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("already done") == 4
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("model.safetensors")}


@pytest.mark.slow
def test_the_default_quickstart_fine_tunes_a_better_summarizer(tmp_path, monkeypatch):
    """The full quickstart (the README's first command) is meaningful: fine-tuning beats the base model on ROUGE."""
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # as a user runs it: the quickstart picks its threads
    monkeypatch.setenv("LLMKIT_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    root = tmp_path / "qs"
    try:
        result = CliRunner().invoke(app, ["quickstart", str(root)])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = {Path(m["model"]).name: m for m in json.loads((root / "eval" / "metrics.json").read_text())["models"]}
    base, tuned = rows["pretrain"]["metrics"], rows["finetune"]["metrics"]
    for key in ("rouge1", "rougeL"):
        assert tuned[key] > base[key], (key, base[key], tuned[key])
    records = rows["finetune"]["protocol"]["test_records"]
    assert records["scored"] == 40 and records["available"] > 40
    assert f"fine-tuning took ROUGE-L from {base['rougeL']:.3f}" in result.stdout
