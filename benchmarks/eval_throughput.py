"""`llmkit eval` against lm-evaluation-harness's HF backend: same model, same records, same scores, speed and memory.

    python benchmarks/eval_throughput.py                       # 3 alternating repeats, ~10 min on 2 busy cores
    python benchmarks/eval_throughput.py --repeats 5 --mc 200 --cloze 200 --gen 40

Needs lm-eval next to llmkit (its own venv: torch==2.13.0 first, then `pip install -e . lm-eval`).
Three tasks, each written once as JSON lines and read by both sides:

- multiple choice: the first --mc questions of builtin:docsum-choice/test (a stdlib docstring,
  "Summary:", 4 candidate summaries); lm-eval task output_type multiple_choice, acc and acc_norm.
- cloze: the first --cloze texts of builtin:pydoc/test cut to whole words of at most 400 characters;
  lm-eval's lambada_openai definitions (context = text before the last space, target = " " + last word).
- generative: the first --gen problems of builtin:arithmetic/test, 3-shot from the first three of
  builtin:arithmetic/train (first_n on both sides), greedy, until "Question:" or a blank line, at
  most 32 new tokens; lm-eval gsm8k's filters (strict-match, flexible-extract) and exact_match.

The model is a randomly initialised llama (4 layers, hidden 256, a 4,096-token BPE trained here)
saved as a Hugging Face directory; a random model generates junk, so the generative scores are 0 on
both sides, and the check compares every generation and extracted answer instead. Each side runs in
its own subprocess (so peak RSS is its own), the clock covers model loading and scoring but not
imports; sides alternate and the first rotates every repeat; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIDES = ("llmkit", "lm-eval")
TASKS = ("multiple_choice", "cloze", "generative")
STOP = ["Question:", "\n\n"]
MAX_NEW_TOKENS = 32
FEWSHOT = 3
STRICT = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


# ----------------------------------------------------------------------------------------------
# The records and lm-eval's task definitions, written once
# ----------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def prepare(work: Path, args) -> None:
    """Model, data files and lm-eval task YAMLs under `work` (built once, reused)."""
    from eval_bench import build_model

    from llmkit.data.builtin import shorten
    from llmkit.data.sources import iter_located_records, iter_texts

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model" / "config.json").is_file():
        build_model(work / "model", 4096, 256, 4, positions=1024)
    mc = [r for _, r in iter_located_records(["builtin:docsum-choice/test"], max_samples=args.mc)]
    _write_jsonl(work / "mc.jsonl", [{"context": r["context"], "choices": r["choices"], "label": r["label"]} for r in mc])
    texts = [shorten(" ".join(t.split()), 400) for t in iter_texts(["builtin:pydoc/test"])]
    _write_jsonl(work / "cloze.jsonl", [{"text": t} for t in texts if t.count(" ") >= 5][: args.cloze])
    gen = [r for _, r in iter_located_records(["builtin:arithmetic/test"], max_samples=args.gen)]
    _write_jsonl(work / "gen.jsonl", [{"question": r["question"], "answer": r["answer"]} for r in gen])
    shots = [r for _, r in iter_located_records(["builtin:arithmetic/train"], max_samples=FEWSHOT)]
    _write_jsonl(work / "gen_train.jsonl", [{"question": r["question"], "answer": r["answer"]} for r in shots])
    tasks = work / "tasks"
    tasks.mkdir(exist_ok=True)

    def data(name: str, extra: str = "") -> str:
        files = f"test: {work / name}" + (f", train: {work / extra}" if extra else "")
        return f"dataset_path: json\ndataset_kwargs:\n  data_files: {{{files}}}\ntest_split: test\n"

    (tasks / "bench_mc.yaml").write_text(
        "task: bench_mc\n" + data("mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (tasks / "bench_cloze.yaml").write_text(  # lm-eval's lambada_openai definitions
        "task: bench_cloze\n" + data("cloze.jsonl") + "output_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n  - metric: perplexity\n'
    )
    (tasks / "bench_gen.yaml").write_text(  # lm-eval gsm8k's prompt, filters and metric
        "task: bench_gen\n" + data("gen.jsonl", "gen_train.jsonl") + "training_split: train\nfewshot_split: train\n"
        "output_type: generate_until\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{answer}}"\n'
        f"num_fewshot: {FEWSHOT}\nfewshot_config:\n  sampler: first_n\n"
        f"generation_kwargs:\n  until: {json.dumps(STOP)}\n  do_sample: false\n  max_gen_toks: {MAX_NEW_TOKENS}\n"
        f"metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        f"    ignore_case: true\n    ignore_punctuation: false\n    regexes_to_ignore: {json.dumps(IGNORE)}\n"
        "filter_list:\n"
        f"  - name: strict-match\n    filter:\n      - function: regex\n        regex_pattern: {json.dumps(STRICT)}\n      - function: take_first\n"
        f"  - name: flexible-extract\n    filter:\n      - function: regex\n        group_select: -1\n        regex_pattern: {json.dumps(FLEXIBLE)}\n"
        "      - function: take_first\n"
    )


# ----------------------------------------------------------------------------------------------
# One side, one task, in its own process
# ----------------------------------------------------------------------------------------------


def llmkit_worker(work: Path, task: str, batch_size: int) -> dict:
    """Score one task with `llmkit eval` (stages.evaluate.run): seconds, scores, per-question answers."""
    from llmkit.recipes import recipe_from_dict
    from llmkit.stages import evaluate

    recipe = {"stage": "eval", "output_dir": str(work / f"out-llmkit-{task}"), "model": {"path": str(work / "model")}, "metrics": [task]}
    if task == "multiple_choice":
        recipe["data"] = {"test": str(work / "mc.jsonl")}
        recipe["choice"] = {"batch_size": batch_size}
    elif task == "cloze":
        recipe["data"] = {"test": str(work / "cloze.jsonl")}
        recipe["choice"] = {"batch_size": batch_size}
    else:
        recipe["data"] = {"test": str(work / "gen.jsonl"), "batch_size": batch_size}
        recipe["answer"] = {"num_fewshot": FEWSHOT, "fewshot_split": str(work / "gen_train.jsonl"), "fewshot_seed": None}
        recipe["generation"] = {"max_new_tokens": MAX_NEW_TOKENS, "stop": STOP}
    parsed = recipe_from_dict(recipe)
    start = time.perf_counter()
    result = evaluate.run(parsed, overwrite=True)
    seconds = time.perf_counter() - start
    m = result["metrics"]
    rows = [json.loads(line) for line in (parsed.output_dir / "predictions.jsonl").read_text().splitlines()]
    if task == "multiple_choice":
        scores, answers = {"acc": m["acc"], "acc_norm": m["acc_norm"]}, [r["pred"] for r in rows]
    elif task == "cloze":
        scores, answers = {"acc": m["acc"], "perplexity": m["example_perplexity"]}, [round(r["logprob"], 4) for r in rows]
    else:
        scores = {"strict-match": m["exact_match/strict-match"], "flexible-extract": m["exact_match/flexible-extract"]}
        answers = [[r["generation"], r["answers"]["strict-match"], r["answers"]["flexible-extract"]] for r in rows]
    return {"seconds": seconds, "questions": len(rows), "scores": scores, "answers": answers}


def lm_eval_worker(work: Path, task: str, batch_size: int) -> dict:
    """Score one task with lm-eval's simple_evaluate on its HF backend: seconds, scores, per-question answers."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    name = {"multiple_choice": "bench_mc", "cloze": "bench_cloze", "generative": "bench_gen"}[task]
    manager = TaskManager(include_path=str(work / "tasks"))
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={work / 'model'},dtype=float32", tasks=[name], task_manager=manager,
        batch_size=batch_size, device="cpu", log_samples=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    res = out["results"][name]
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    if task == "multiple_choice":
        scores = {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"]}
        answers = [max(range(len(s["resps"])), key=lambda i: (s["resps"][i][0][0], -i)) for s in samples]
    elif task == "cloze":
        scores = {"acc": res["acc,none"], "perplexity": res["perplexity,none"]}
        answers = [round(s["resps"][0][0][0], 4) for s in samples]
    else:
        scores = {"strict-match": res["exact_match,strict-match"], "flexible-extract": res["exact_match,flexible-extract"]}
        by_id: dict[int, list] = {}
        for s in out["samples"][name]:
            entry = by_id.setdefault(s["doc_id"], [s["resps"][0][0], None, None])
            entry[1 if s["filter"] == "strict-match" else 2] = s["filtered_resps"][0]
        answers = [by_id[i] for i in sorted(by_id)]
    questions = len({s["doc_id"] for s in samples})  # a generative task logs one sample per filter
    return {"seconds": seconds, "questions": questions, "scores": scores, "answers": answers}


def worker(side: str, work: Path, task: str, batch_size: int) -> None:
    """Run one side on one task and print its JSON result with the peak RSS."""
    result = (llmkit_worker if side == "llmkit" else lm_eval_worker)(work, task, batch_size)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def run_side(side: str, work: Path, task: str, batch_size: int) -> dict:
    """One subprocess; its RESULT line."""
    cmd = [sys.executable, str(HERE), "--worker", side, "--task", task, "--work", str(work), "--batch-size", str(batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{side} {task} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mc", type=int, default=80)
    parser.add_argument("--cloze", type=int, default=80)
    parser.add_argument("--gen", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--work", type=Path, default=HERE.parent / "_work" / "eval_throughput")
    parser.add_argument("--worker", choices=SIDES)
    parser.add_argument("--task", choices=TASKS)
    parser.add_argument("--tasks", default=",".join(TASKS))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.work, args.task, args.batch_size)
        return
    prepare(args.work, args)
    tasks = args.tasks.split(",")
    runs: dict[tuple[str, str], list[dict]] = {(t, s): [] for t in tasks for s in SIDES}
    for repeat in range(args.repeats):
        for n, task in enumerate(tasks):
            order = SIDES if (repeat + n) % 2 == 0 else SIDES[::-1]
            for side in order:
                result = run_side(side, args.work, task, args.batch_size)
                runs[task, side].append(result)
                print(f"repeat {repeat + 1} {task} {side}: {result['seconds']:.1f} s, peak {result['peak_rss_mb']:.0f} MB, {result['scores']}", file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load[0]:.1f} at the end; "
          f"{args.repeats} alternating repeats, medians; batch size {args.batch_size}\n")  # fmt: skip
    print("| task | side | questions | questions/s | median s | peak RSS MB | scores | same answers as lm-eval |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    for task in tasks:
        reference = runs[task, "lm-eval"][0]
        for side in SIDES:
            results = runs[task, side]
            median_s = statistics.median(r["seconds"] for r in results)
            rss = statistics.median(r["peak_rss_mb"] for r in results)
            scores = ", ".join(f"{k} {v:.4f}" for k, v in results[0]["scores"].items())
            same = "-" if side == "lm-eval" else ("yes" if results[0]["answers"] == reference["answers"] else "NO")
            print(f"| {task} | {side} | {results[0]['questions']} | {results[0]['questions'] / median_s:.2f} | {median_s:.1f} | {rss:.0f} | {scores} | {same} |")
        for key, value in runs[task, "llmkit"][0]["scores"].items():
            other = reference["scores"][key]
            if abs(value - other) > 1e-6 * max(1.0, abs(other)):
                print(f"score differs: {task} {key}: llmkit {value} vs lm-eval {other}", file=sys.stderr)


if __name__ == "__main__":
    main()
