"""Fine-tuning: task records -> tokenized examples with loss masks -> the shared training loop.

    llmkit finetune finetune/tiny-summarization --set train.max_steps=50
    llmkit data inspect finetune/lora-instruction

Fine-tuning differs from pretraining only in how batches are built and how the model is loaded;
the loop, checkpoints, resume, signals and logging are `llmkit.train.fit`.

1. Records come from `llmkit.sources` with their file:line, and are checked against the task
   (llmkit.tasks) before any model is loaded.
2. Each record becomes prompt tokens (label -100) + target tokens + EOS (trained). The prompt is
   tokenized on its own, exactly as a generation prompt is at inference, so what the model learns
   to continue is what it will be given. Long prompts are shortened (the longest field of the
   template); targets never are. Examples that cannot fit are reported, never dropped silently.
3. Batches are length-grouped (similar lengths share a padded micro-batch), or packed: several
   examples per row with position ids restarting per example and no attention mask, from which
   transformers builds a block-diagonal causal mask so examples do not attend to each other. That
   isolation is checked numerically on the model before training; without it, llmkit falls back
   to length grouping.
4. LoRA / QLoRA through peft: only adapters train; the final save writes the adapter in peft
   format, and with lora.merge a merged full model.
5. Every eval_every steps the loop logs validation loss, plus the task metric from generations
   on a validation sample (ROUGE for summarization and instruction, accuracy for classification).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import DataError, ModelError, RecipeError
from llmkit.modeling import local_model_path
from llmkit.recipes import FinetuneRecipe, GenerationSpec
from llmkit.tasks import (
    PromptTooLong,
    check_record,
    ensure_chat_template,
    format_record,
    label_set,
    prompt_token_ids,
    require_eos,
    task_defaults,
    template_fields,
)

IGNORE_INDEX = -100
CACHE_LAYOUT = 1
"""Bump when the tokenized-example format changes, so old caches are not reused."""

LORA_HINT = "pip install 'llmkit[lora]'"


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


def load_located_records(sources, max_samples: int | None = None) -> list[tuple[str, dict]]:
    """(where, record) pairs from data sources; `where` is file:line for local files, for error messages."""
    from llmkit.sources import iter_located_records

    return list(iter_located_records(sources, max_samples=max_samples))


def split_records(recipe: FinetuneRecipe) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """Train and validation records: data.validation, or a seeded data.validation_fraction of train."""
    import numpy as np

    data = recipe.data
    train = load_located_records(data.train, data.max_samples)
    if data.validation:
        return train, load_located_records(data.validation, data.max_samples)
    if data.validation_fraction <= 0:
        return train, []
    held = max(1, round(len(train) * data.validation_fraction))
    if held >= len(train):
        raise DataError(
            f"data.validation_fraction ({data.validation_fraction}) leaves no training records out of {len(train)}"
        )
    held_out = set(np.random.default_rng(recipe.train.seed).permutation(len(train))[:held].tolist())
    kept = [r for i, r in enumerate(train) if i not in held_out]
    return kept, [train[i] for i in sorted(held_out)]


def check_records(recipe: FinetuneRecipe, records: Sequence[tuple[str, dict]]) -> None:
    """DataError naming file:line for the first record that lacks a field or has an empty target."""
    for where, record in records:
        check_record(recipe.task, record, where)


def resolve_task(
    recipe: FinetuneRecipe, train: Sequence[tuple[str, dict]], validation: Sequence[tuple[str, dict]]
) -> None:
    """Fill task.labels from the training data (classification), so recipe.yaml records the label set."""
    if recipe.task.type != "classification":
        return
    labels = label_set(recipe.task, (r for _, r in train))
    target = task_defaults(recipe.task).target_field
    for where, record in [*train, *validation]:
        value = str(record[target]).strip()
        if value not in labels:
            raise DataError(
                f"{where}: label {value!r} is not in the label set ({', '.join(labels)}); "
                "add it to task.labels or fix the record"
            )
    recipe.task.labels = labels


# ----------------------------------------------------------------------------------------------
# Tokenization and loss masks
# ----------------------------------------------------------------------------------------------


@dataclass
class TokenizeStats:
    """What tokenization did to the records: nothing is dropped without being counted here."""

    records: int = 0
    examples: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    did_not_fit: int = 0
    did_not_fit_where: list[str] = field(default_factory=list)
    tokens: int = 0
    trained_tokens: int = 0

    def line(self, split: str) -> str:
        """One line for the log."""
        text = (
            f"{split}: {self.records:,} records -> {self.examples:,} examples, {self.tokens:,} tokens "
            f"({self.trained_tokens:,} trained)"
        )
        if self.truncated:
            text += f"; {self.truncated:,} prompts truncated ({self.truncated_tokens:,} tokens cut)"
        if self.did_not_fit:
            text += (
                f"; {self.did_not_fit:,} records did not fit in data.seq_len and were skipped "
                f"(first: {', '.join(self.did_not_fit_where[:3])})"
            )
        return text


def tokenize_record(
    recipe: FinetuneRecipe, record: dict, tokenizer, where: str = "record"
) -> tuple[list[dict], int]:
    """Tokenize one record into training examples and the number of prompt tokens truncation cut.

    Returns ([], 0) when the target alone does not fit in data.seq_len. Every example's labels are
    -100 on prompt tokens (unless task.train_on_prompt) and on its first token, so in a packed row
    no example is trained to predict the first token of the next one.
    """
    task, seq_len = task_defaults(recipe.task), recipe.data.seq_len
    eos = require_eos(tokenizer)
    if task.type == "text":
        ids = prompt_token_ids(tokenizer, str(record[task.target_field])) + [eos]
        # Windows overlap by one token: each window's first token is context only, so every
        # token after the document's first is trained exactly once and nothing is cut.
        examples, start = [], 0
        while True:
            window = ids[start : start + seq_len]
            examples.append({"input_ids": window, "labels": [IGNORE_INDEX] + window[1:]})
            if start + seq_len >= len(ids):
                return examples, 0
            start += seq_len - 1
    probe = format_record(task, record, tokenizer, where=where)
    target_ids = list(tokenizer(probe.target, add_special_tokens=False, verbose=False)["input_ids"]) + [eos]
    if task.max_target_tokens is not None and len(target_ids) - 1 > task.max_target_tokens:
        raise DataError(
            f"{where}: the target is {len(target_ids) - 1} tokens, more than task.max_target_tokens "
            f"({task.max_target_tokens}); raise it or shorten the record"
        )
    budget = seq_len - len(target_ids)
    if budget < 1:
        return [], 0
    try:
        formatted = format_record(task, record, tokenizer, max_prompt_tokens=budget, where=where)
    except PromptTooLong:
        return [], 0
    prompt_ids = prompt_token_ids(tokenizer, formatted.prompt)
    input_ids = prompt_ids + target_ids
    prompt_labels = list(prompt_ids) if task.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    labels = prompt_labels + target_ids
    labels[0] = IGNORE_INDEX
    return [{"input_ids": input_ids, "labels": labels}], formatted.truncated_tokens


def tokenize_records(
    recipe: FinetuneRecipe, records: Sequence[tuple[str, dict]], tokenizer
) -> tuple[list[dict], TokenizeStats]:
    """Tokenize (where, record) pairs; the stats count truncated prompts and records that did not fit."""
    stats = TokenizeStats(records=len(records))
    examples: list[dict] = []
    for where, record in records:
        produced, cut = tokenize_record(recipe, record, tokenizer, where)
        if not produced:
            stats.did_not_fit += 1
            stats.did_not_fit_where.append(where)
            continue
        if cut:
            stats.truncated += 1
            stats.truncated_tokens += cut
        for example in produced:
            stats.tokens += len(example["input_ids"])
            stats.trained_tokens += sum(1 for x in example["labels"] if x != IGNORE_INDEX)
        examples.extend(produced)
    stats.examples = len(examples)
    return examples, stats


# ----------------------------------------------------------------------------------------------
# Batches: length grouping and packing
# ----------------------------------------------------------------------------------------------


def grouped_batch_order(lengths: Sequence[int], megabatch_factor: int = 32):
    """A BatchOrder that groups similar lengths: shuffle, sort within mega-batches, shuffle the micro-batches.

    Pure in (seed, epoch, micro_batch_size), as resume requires. Every example appears exactly
    once per epoch (the last micro-batch may be smaller).
    """
    import numpy as np

    lengths = list(lengths)

    def order(seed: int, epoch: int, micro_batch_size: int) -> list[list[int]]:
        rng = np.random.default_rng([seed, epoch])
        perm = rng.permutation(len(lengths)).tolist()
        mega = micro_batch_size * megabatch_factor
        batches: list[list[int]] = []
        for start in range(0, len(perm), mega):
            chunk = sorted(perm[start : start + mega], key=lambda i: -lengths[i])
            batches += [chunk[k : k + micro_batch_size] for k in range(0, len(chunk), micro_batch_size)]
        return [batches[i] for i in rng.permutation(len(batches)).tolist()]

    return order


def pack_examples(examples: Sequence[dict], seq_len: int) -> list[dict]:
    """Pack examples into rows of at most seq_len tokens (first-fit decreasing); position ids restart per example.

    Deterministic, and every example lands in exactly one row.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
    packed = []
    for members in rows:
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for i in members:
            ids = examples[i]["input_ids"]
            row["input_ids"] += ids
            row["labels"] += examples[i]["labels"]
            row["position_ids"] += list(range(len(ids)))
        packed.append(row)
    return packed


def padded_collate(pad_id: int):
    """Collate that pads to the longest example of the micro-batch (right padding, labels -100)."""
    return _collate(pad_id, packed=False)


def packed_collate(pad_id: int):
    """Collate for packed rows: position ids instead of an attention mask, so examples stay isolated.

    With no attention mask, transformers reads the restarts of position_ids as sequence boundaries
    and builds a block-diagonal causal mask (masking_utils.find_packed_sequence_indices). A row's
    padding tail gets its own positions 0..k, so it is a separate (untrained) sequence too.
    """
    return _collate(pad_id, packed=True)


def _collate(pad_id: int, packed: bool):
    import torch

    def collate(rows: list[dict]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        extra = torch.zeros((len(rows), width), dtype=torch.long)  # position ids, or the attention mask
        for row, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[row, :n] = torch.tensor(r["input_ids"])
            labels[row, :n] = torch.tensor(r["labels"])
            if packed:
                extra[row, :n] = torch.tensor(r["position_ids"])
                extra[row, n:] = torch.arange(width - n)
            else:
                extra[row, :n] = 1
        return {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}

    return collate


def enable_packing(model) -> bool:
    """Prepare `model` for packed rows and check numerically that packed examples do not attend to each other.

    transformers derives the block-diagonal mask from position ids only when no KV cache is built,
    and a training forward builds one by default (config.use_cache), which silently turns packing
    into cross-example attention. So the cache is switched off for training (generation passes
    use_cache explicitly and is unaffected). Returns False, leaving the model as it was, when the
    model still mixes packed examples (e.g. no mask support from position ids).
    """
    import torch

    previous = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (1, 5), generator=gen)
    b = torch.randint(0, vocab, (1, 7), generator=gen)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=b).logits
            packed = model(
                input_ids=torch.cat([a, b], dim=1),
                position_ids=torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0),
            ).logits[:, 5:]
        isolated = bool(torch.allclose(alone.float(), packed.float(), atol=1e-4, rtol=1e-3))
    except (TypeError, ValueError, RuntimeError):  # a model that rejects position_ids cannot pack
        isolated = False
    finally:
        model.train(was_training)
    if not isolated:
        model.config.use_cache = previous
    return isolated


# ----------------------------------------------------------------------------------------------
# Tokenizer, model, LoRA
# ----------------------------------------------------------------------------------------------


def check_model_path(recipe: FinetuneRecipe) -> None:
    """ModelError when model.path is a missing local path or a directory without a model."""
    local = local_model_path(recipe.model.path)
    if local is None:
        return
    if not local.is_dir() or not (local / "config.json").is_file():
        hint = (
            " (the run has checkpoints but no final model yet; let it finish)"
            if (local / "checkpoints").is_dir()
            else ""
        )
        raise ModelError(f"model.path: {local} is not a Hugging Face model directory (no config.json){hint}")


def load_tokenizer(recipe: FinetuneRecipe):
    """The tokenizer named by `tokenizer`, else the one saved with model.path; EOS and a pad token guaranteed."""
    from llmkit.modeling import load_tokenizer as load

    key = "tokenizer" if recipe.tokenizer else "model.path"
    tokenizer = load(recipe.tokenizer or recipe.model.path, key)
    if recipe.task.type == "instruction":
        ensure_chat_template(tokenizer)
    return tokenizer


def check_vocab(recipe: FinetuneRecipe, tokenizer, embedding_rows: int) -> None:
    """ModelError when the tokenizer has ids the model's embedding matrix lacks."""
    if len(tokenizer) > embedding_rows:
        raise ModelError(
            f"model.path: the tokenizer ({recipe.tokenizer or recipe.model.path}) has {len(tokenizer):,} tokens but the model "
            f"has {embedding_rows:,} embedding rows; use the tokenizer the model was trained with"
        )


def check_lora_available(recipe: FinetuneRecipe) -> None:
    """RecipeError when LoRA is asked without peft, or QLoRA without CUDA and bitsandbytes."""
    if not recipe.lora.enabled:
        if recipe.lora.load_in_4bit or recipe.lora.merge:
            raise RecipeError("lora.load_in_4bit / lora.merge need lora.enabled: true")
        return
    try:
        import peft  # noqa: F401
    except ImportError:
        raise RecipeError(f"lora.enabled: LoRA needs the peft package; install it with {LORA_HINT}") from None
    if recipe.lora.load_in_4bit:
        import torch

        if not torch.cuda.is_available():
            raise RecipeError(
                "lora.load_in_4bit: QLoRA needs a CUDA GPU; set lora.load_in_4bit=false to train LoRA in full precision"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RecipeError(
                "lora.load_in_4bit: QLoRA needs bitsandbytes; pip install bitsandbytes"
            ) from None


def load_config(recipe: FinetuneRecipe, tokenizer=None):
    """The model config from model.path with model.* overrides, checked against data.seq_len and the tokenizer."""
    from llmkit.modeling import model_config

    config = model_config(recipe)  # the same checks as pretraining: overrides, heads, seq_len vs positions
    local = local_model_path(recipe.model.path)
    name = str(local.resolve()) if local is not None else recipe.model.path
    vocab = getattr(config, "vocab_size", None) or getattr(
        getattr(config, "text_config", None), "vocab_size", None
    )
    if tokenizer is not None and vocab is not None:
        check_vocab(recipe, tokenizer, vocab)
    return config, name


def load_model(recipe: FinetuneRecipe, tokenizer):
    """The base model from model.path (float32 master weights unless model.dtype says otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    config, name = load_config(recipe, tokenizer)
    kwargs: dict[str, Any] = {"config": config, "dtype": getattr(torch, recipe.model.dtype)}
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    if recipe.lora.enabled and recipe.lora.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model.path: cannot load a causal LM from {recipe.model.path} ({str(exc).splitlines()[0]})"
        ) from None
    check_vocab(recipe, tokenizer, model.get_input_embeddings().num_embeddings)
    return model


def apply_lora(model, recipe: FinetuneRecipe):
    """Wrap the model with peft LoRA adapters; only adapter weights keep requires_grad."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    spec = recipe.lora
    if spec.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.train.gradient_checkpointing
        )
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise RecipeError(f"lora.target_modules: {str(exc).splitlines()[0]}") from None


def lora_saver(recipe: FinetuneRecipe):
    """A fit `save_final` that writes the adapter (peft format) and, with lora.merge, a merged full model.

    Without merge the adapter files sit at the top of output_dir (AutoModelForCausalLM and
    PeftModel both load them when peft is installed). With merge the merged model takes the top, so
    plain transformers loads it, and the adapter goes to output_dir/adapter. fit calls this on a
    staging directory and moves the files into place, and it is the last use of the model, so
    merging in place is safe.
    """

    def save_final(model, tokenizer, output_dir) -> None:
        output_dir = Path(output_dir)
        adapter_dir = output_dir / "adapter" if recipe.lora.merge else output_dir
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        if recipe.lora.merge:
            merged = model.merge_and_unload()
            merged.config.use_cache = True  # the loop turned the cache off for training only
            merged.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
            if getattr(merged, "generation_config", None) is not None:
                merged.generation_config.save_pretrained(output_dir)

    return save_final


# ----------------------------------------------------------------------------------------------
# Task metric during training
# ----------------------------------------------------------------------------------------------


def task_metric(recipe: FinetuneRecipe, tokenizer, validation: Sequence[tuple[str, dict]]):
    """An `extra_eval(model, step)` that generates on a validation sample and scores it, or None.

    ROUGE for summarization and instruction, accuracy for classification; text has no task metric.
    """
    samples = recipe.task_eval.samples
    kind = recipe.task.type
    if samples == 0 or not validation or kind == "text":
        return None
    spec = GenerationSpec(max_new_tokens=recipe.task_eval.max_new_tokens)
    budget = max(recipe.data.seq_len - spec.max_new_tokens, recipe.data.seq_len // 2)
    prompts, references = [], []
    for where, record in validation[:samples]:
        formatted = format_record(recipe.task, record, tokenizer, max_prompt_tokens=budget, where=where)
        prompts.append(formatted.prompt)
        references.append(formatted.target)

    def extra_eval(model, step: int) -> dict[str, float]:
        from llmkit.generation import generate_texts

        predictions = generate_texts(model, tokenizer, prompts, spec, batch_size=min(8, len(prompts)))
        if kind == "classification":
            from llmkit.evaluation import accuracy  # the same scoring as `llmkit eval`

            return {"accuracy": accuracy(predictions, references)}
        from llmkit.metrics.rouge import rouge_scores

        scores = rouge_scores(predictions, references)
        return {k: float(v) for k, v in scores.items() if k.startswith("rouge")}

    return extra_eval


# ----------------------------------------------------------------------------------------------
# Data for the loop (with a tokenization cache)
# ----------------------------------------------------------------------------------------------


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    probe = json.dumps(tokenizer("a b")["input_ids"])  # catches BOS/EOS post-processing changes
    payload = "\n".join([vocab, specials, probe, str(getattr(tokenizer, "chat_template", ""))])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _cache_root(recipe: FinetuneRecipe) -> Path:
    return Path(recipe.data.cache_dir or Path.home() / ".cache" / "llmkit" / "data").expanduser()


def _cache_key(recipe: FinetuneRecipe, tokenizer) -> str:
    from llmkit.sources import fingerprint

    data = recipe.data
    return fingerprint(
        [*data.train, *(data.validation or [])],
        layout=CACHE_LAYOUT,
        kind="sft",
        task=recipe.task.model_dump(mode="json"),
        seq_len=data.seq_len,
        max_samples=data.max_samples,
        validation_fraction=data.validation_fraction,
        has_validation=bool(data.validation),
        seed=recipe.train.seed,
        tokenizer=_tokenizer_fingerprint(tokenizer),
    )


@dataclass
class SFTData:
    """Tokenized train/validation examples with their tokenization stats."""

    train: list[dict]
    validation: list[dict]
    train_stats: TokenizeStats
    validation_stats: TokenizeStats
    cached: bool = False


def tokenize_splits(recipe: FinetuneRecipe, tokenizer, train, validation) -> SFTData:
    """Tokenize both splits, reading and writing the cache at data.cache_dir keyed by data, task and tokenizer."""
    cache = _cache_root(recipe) / f"sft-{_cache_key(recipe, tokenizer)}.json"
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text(encoding="utf-8"))
            return SFTData(
                saved["train"],
                saved["validation"],
                TokenizeStats(**saved["train_stats"]),
                TokenizeStats(**saved["validation_stats"]),
                cached=True,
            )
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable cache is rebuilt below
    train_ex, train_stats = tokenize_records(recipe, train, tokenizer)
    val_ex, val_stats = tokenize_records(recipe, validation, tokenizer)
    if not train_ex:
        raise DataError(
            f"data.train: none of the {train_stats.records:,} records fits in data.seq_len ({recipe.data.seq_len}); raise data.seq_len"
        )
    payload = {
        "train": train_ex,
        "validation": val_ex,
        "train_stats": train_stats.__dict__,
        "validation_stats": val_stats.__dict__,
    }
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        tmp.replace(cache)
    except OSError as exc:
        print(f"note: tokenization cache not written ({exc.__class__.__name__}: {exc})", file=sys.stderr)
    return SFTData(train_ex, val_ex, train_stats, val_stats)


def build_train_data(recipe: FinetuneRecipe, sft: SFTData, tokenizer, packing: bool):
    """The `TrainData` for fit: packed rows or length-grouped examples, with the matching collate."""
    from llmkit.train import TrainData, shuffled_batch_order

    pad_id = tokenizer.pad_token_id
    if packing:
        rows = pack_examples(sft.train, recipe.data.seq_len)
        collate = packed_collate(pad_id)
        order = (
            grouped_batch_order([len(r["input_ids"]) for r in rows])
            if recipe.data.group_by_length
            else shuffled_batch_order(len(rows))
        )
        train = rows
        layout = f"{len(rows):,} packed rows of <= {recipe.data.seq_len} tokens"
    else:
        train = sft.train
        collate = padded_collate(pad_id)
        order = (
            grouped_batch_order([len(e["input_ids"]) for e in train])
            if recipe.data.group_by_length
            else shuffled_batch_order(len(train))
        )
        layout = "length-grouped batches" if recipe.data.group_by_length else "shuffled batches"
    description = f"{sft.train_stats.line('train')}; {layout}"
    if sft.validation:
        description += f" | {sft.validation_stats.line('validation')}"
    return TrainData(
        train=train,
        collate_fn=collate,
        batch_order=order,
        validation=sft.validation or None,
        eval_collate_fn=padded_collate(pad_id),
        description=description,
        extra={"train_stats": sft.train_stats.__dict__, "validation_stats": sft.validation_stats.__dict__},
    )


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def _validate_recipe(recipe: FinetuneRecipe) -> None:
    """Checks that need no model or data: templates, LoRA availability, model path."""
    task = task_defaults(recipe.task)
    if task.prompt_template is not None:
        template_fields(task.prompt_template)
        if "{labels}" in task.prompt_template and task.type != "classification":
            raise RecipeError("task.prompt_template: {labels} is only filled for the classification task")
    check_lora_available(recipe)
    check_model_path(recipe)


def _prepare_data(recipe: FinetuneRecipe, tokenizer) -> tuple[SFTData, list[tuple[str, dict]]]:
    train, validation = split_records(recipe)
    check_records(recipe, train)
    check_records(recipe, validation)
    resolve_task(recipe, train, validation)
    return tokenize_splits(recipe, tokenizer, train, validation), validation


def finetune(recipe: FinetuneRecipe, overwrite: bool = False) -> dict[str, Any]:
    """`llmkit finetune RECIPE`: validate, load records and tokenizer, tokenize, load the model, then `fit`."""
    from llmkit import checkpoints
    from llmkit.train import fit

    # 1. Everything that can fail cheaply fails before any model weights are read.
    _validate_recipe(recipe)
    tokenizer = load_tokenizer(recipe)
    train, validation = split_records(recipe)
    check_records(recipe, train)
    check_records(recipe, validation)
    resolve_task(recipe, train, validation)  # labels are part of the recipe resume compares against
    load_config(recipe, tokenizer)
    checkpoints.check_run_dir(recipe, overwrite=overwrite)

    # 2. Tokenize (cached) and report what did not fit.
    sft = tokenize_splits(recipe, tokenizer, train, validation)
    print(sft.train_stats.line("train"))
    if validation:
        print(sft.validation_stats.line("validation"))

    # 3. Model (+ adapters), and the batch layout the model supports.
    model = load_model(recipe, tokenizer)
    packing = recipe.data.packing
    if packing and not enable_packing(model):
        print(
            f"note: {type(model).__name__} does not isolate packed examples through position ids "
            f"(attn_implementation={recipe.model.attn_implementation}); using length-grouped batches instead",
            file=sys.stderr,
        )
        packing = False
    if recipe.lora.enabled:
        model = apply_lora(model, recipe)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    data = build_train_data(recipe, sft, tokenizer, packing)

    # 4. The shared loop: checkpoints, resume, signals, eval (+ task metric), final save.
    return fit(
        recipe,
        model,
        tokenizer,
        data,
        extra_eval=task_metric(recipe, tokenizer, validation),
        save_final=lora_saver(recipe) if recipe.lora.enabled else None,
        overwrite=overwrite,
    )


def prepare(recipe: FinetuneRecipe) -> SFTData:
    """`llmkit data prepare` for a finetune recipe: check and tokenize the records into the cache."""
    _validate_recipe(recipe)
    tokenizer = load_tokenizer(recipe)
    load_config(recipe, tokenizer)
    sft, _ = _prepare_data(recipe, tokenizer)
    print(("cached: " if sft.cached else "tokenized: ") + sft.train_stats.line("train"))
    if sft.validation:
        print(sft.validation_stats.line("validation"))
    return sft


def _use_colour() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def render_mask(tokenizer, example: dict, colour: bool) -> str:
    """The example's text with trained tokens marked: green in a terminal, [[...]] otherwise; masked tokens dim."""
    out: list[str] = []
    ids, labels = example["input_ids"], example["labels"]
    start = 0
    while start < len(ids):
        trained = labels[start] != IGNORE_INDEX
        end = start
        while end < len(ids) and (labels[end] != IGNORE_INDEX) == trained:
            end += 1
        text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        if colour:
            out.append(f"\x1b[1;32m{text}\x1b[0m" if trained else f"\x1b[2m{text}\x1b[0m")
        else:
            out.append(f"[[{text}]]" if trained else text)
        start = end
    return "".join(out)


def inspect_command(recipe: FinetuneRecipe, num_examples: int = 3) -> None:
    """`llmkit data inspect RECIPE`: print formatted examples with trained and masked tokens told apart."""
    _validate_recipe(recipe)
    tokenizer = load_tokenizer(recipe)
    records = load_located_records(recipe.data.train, max(num_examples, recipe.data.max_samples or 0) or None)
    check_records(recipe, records)
    if recipe.task.type == "classification":
        resolve_task(recipe, records if recipe.task.labels else split_records(recipe)[0], [])
    colour = _use_colour()
    legend = (
        "\x1b[1;32mtrained (in the loss)\x1b[0m  \x1b[2mmasked (label -100)\x1b[0m"
        if colour
        else "[[trained tokens]] in double brackets; everything else is masked (label -100)"
    )
    print(f"{recipe.task.type} task, seq_len {recipe.data.seq_len}; {legend}")
    for where, record in records[:num_examples]:
        examples, cut = tokenize_record(recipe, record, tokenizer, where)
        print(f"\n--- {where}")
        if not examples:
            print(
                "(does not fit in data.seq_len: the target alone is too long; it would be skipped and counted)"
            )
            continue
        for example in examples:
            trained = sum(1 for x in example["labels"] if x != IGNORE_INDEX)
            note = f", prompt truncated by {cut} tokens" if cut else ""
            print(f"[{len(example['input_ids'])} tokens, {trained} trained{note}]")
            print(render_mask(tokenizer, example, colour))
