"""Helpers shared by the pretraining-engine tests: a tiny corpus, tiny recipes, runs in and out of process.

    pytest tests/test_pretrain.py tests/test_resume.py tests/test_data.py tests/test_distributed.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

# A llama small enough that a step takes milliseconds on one CPU thread.
TINY_MODEL = {
    "type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}


def write_corpus(directory: Path, docs: int = 24, name: str = "corpus.jsonl", offset: int = 0) -> Path:
    """A jsonl file of `docs` pydoc topics (records {"text"}), in a stable order."""
    import pydoc_data.topics

    texts = [text for _, text in sorted(pydoc_data.topics.topics.items())][offset : offset + docs]
    path = Path(directory) / name
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def recipe_dict(tmp: Path, tokenizer_dir: Path, corpus_path, validation_path=None, **sections) -> dict:
    """A tiny pretrain recipe mapping; `sections` (model=..., data=..., train=...) update its parts."""
    recipe = {
        "stage": "pretrain",
        "output_dir": str(tmp / "run"),
        "tokenizer": str(tokenizer_dir),
        "model": dict(TINY_MODEL),
        "data": {"train": [str(corpus_path)], "seq_len": 32, "cache_dir": str(tmp / "cache")},
        "train": {
            "max_steps": 12,
            "micro_batch_size": 4,
            "grad_accum_steps": 1,
            "lr": 1e-2,
            "warmup_steps": 2,
            "save_every": 4,
            "eval_every": 6,
            "log_every": 2,
            "seed": 7,
            "mixed_precision": "no",
        },
    }
    if validation_path is not None:
        recipe["data"]["validation"] = [str(validation_path)]
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key].update(value)
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    """Write a recipe mapping as YAML."""
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_in_process(recipe: dict, overwrite: bool = False) -> dict:
    """Validate and pretrain in this process; resets accelerate's singleton state afterwards."""
    import torch
    from accelerate.state import AcceleratorState

    from llmkit.recipes import recipe_from_dict
    from llmkit.stages.pretrain import run as pretrain

    os.environ.setdefault("LLMKIT_PEAK_FLOPS", "1e11")  # skip the matmul benchmark: tests check correctness
    # One thread: on a shared 2-core machine, OpenMP kernels with 2 threads mostly wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain(recipe_from_dict(json.loads(json.dumps(recipe)), stage="pretrain"), overwrite=overwrite)
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)


def subprocess_env(**extra: str) -> dict:
    """Environment for llmkit subprocesses: offline, one thread each, no tokenizer thread pool."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        LLMKIT_PEAK_FLOPS="1e11",  # skip the matmul benchmark: these runs only check correctness
    )
    env.update(extra)
    return env


def llmkit_cmd(*args: str) -> list[str]:
    """argv running the llmkit CLI with this interpreter."""
    return [sys.executable, "-m", "llmkit", *args]


def run_cli(*args: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """Run the llmkit CLI to completion, capturing its output."""
    return subprocess.run(llmkit_cmd(*args), env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout)


def read_events(output_dir: Path, kind: str | None = None) -> list[dict]:
    """metrics.jsonl events, optionally only those of one kind."""
    path = Path(output_dir) / "metrics.jsonl"
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [e for e in events if kind is None or e["event"] == kind]


def final_weights(output_dir: Path) -> dict:
    """The final model.safetensors of a run as {name: tensor}."""
    from safetensors.torch import load_file

    return load_file(str(Path(output_dir) / "model.safetensors"))


def tree_snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """{relative file: (size, mtime_ns)} of everything under path, to prove nothing changed."""
    path = Path(path)
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()}


def assert_clean_error(result, *fragments: str) -> str:
    """Exit 2, exactly one line on stderr ("error: ...") naming every fragment, no traceback; returns the line."""
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err
