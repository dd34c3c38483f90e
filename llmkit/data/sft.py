"""Fine-tuning data: task records -> token ids with loss masks -> batches.

    llmkit data inspect finetune/tiny-summarization

Records become (prompt, target) text through llmkit/prompts.py (`format_record`), the same module
evaluation and `llmkit generate` prompt with, so an eval or generation prompt is token for token
the prompt the model was trained on.

Tokenization (`tokenize_record`). Each record becomes prompt tokens (label -100) + target tokens +
EOS (trained); the target text itself stays EOS-free, so it is exactly the reference an evaluation
compares generations against. Instruction records go through the chat template: the trained reply
ends with the template's end-of-turn token instead of EOS, and a conversation trains every
assistant reply (`task.train_on`; the spans come from llmkit/prompts.py `chat_segments`). Long prompts are shortened (the longest field of the template);
targets never are. Records that cannot fit are counted in `TokenizeStats`, never dropped silently.
Tokenized splits are kept in the tokenization cache (llmkit/data/cache.py).

Batches (`build_train_data`). Length-grouped padded micro-batches, or packed rows with position ids
restarting per example (llmkit/data/packing.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from llmkit.data.batches import TrainData, grouped_batch_order, shuffled_batch_order
from llmkit.data.cache import build_once, cache_root, entry_name, tokenizer_fingerprint
from llmkit.data.packing import IGNORE_INDEX, pack_examples, packed_collate, padded_collate
from llmkit.data.sources import decoding_settings, file_states, fingerprint, iter_located_records
from llmkit.data.splits import held_out_indices
from llmkit.errors import DataError, ModelError
from llmkit.prompts import (
    INSTRUCTION_TEMPLATE,
    TRAIN_ON_ALL,
    PromptTooLong,
    chat_segments,
    check_record,
    conversation,
    encode_pieces,
    format_record,
    is_chat_record,
    label_set,
    prompt_token_ids,
    task_defaults,
)
from llmkit.recipes import FinetuneRecipe


def require_eos(tokenizer, where: str = "tokenizer") -> int:
    """The EOS token id appended after every target; ModelError when the tokenizer has none."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ModelError(
            f"{where}: the tokenizer has no eos_token; fine-tuning appends EOS after every target so generation stops"
        )
    return int(eos)


CACHE_LAYOUT = 4
"""Bump when the tokenized-example format changes, so old caches are not reused (2: the shared cache;
3: chat replies end with the template's end-of-turn token, every assistant turn trained; 4: checksums in meta.json)."""


def load_located_records(sources, max_samples: int | None = None, encoding_errors: str = "strict") -> list[tuple[str, dict]]:
    """(where, record) pairs from data sources; `where` is file:line for local files, for error messages."""
    return list(iter_located_records(sources, max_samples=max_samples, encoding_errors=encoding_errors))


def split_records(recipe: FinetuneRecipe) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """Train and validation records: data.validation, or a held-out data.validation_fraction of train (llmkit/data/splits.py)."""
    data = recipe.data
    train = load_located_records(data.train, data.max_samples, data.encoding_errors)
    if data.validation:
        return train, load_located_records(data.validation, data.max_samples, data.encoding_errors)
    if data.validation_fraction <= 0:
        return train, []
    held = held_out_indices(len(train), data.validation_fraction, recipe.train.seed)
    if len(held) >= len(train):
        raise DataError(
            f"data.validation_fraction ({data.validation_fraction}) leaves no training records out of {len(train)}"
        )
    return [r for i, r in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def check_records(recipe: FinetuneRecipe, records: Sequence[tuple[str, dict]]) -> None:
    """DataError naming file:line for the first record that lacks a field or has an empty target."""
    for where, record in records:
        check_record(recipe.task, record, where)


def checked_records(recipe: FinetuneRecipe) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """Train and validation records, each checked against the task, with task.labels filled in."""
    train, validation = split_records(recipe)
    check_records(recipe, train)
    check_records(recipe, validation)
    resolve_task(recipe, train, validation)
    return train, validation


def resolve_task(
    recipe: FinetuneRecipe, train: Sequence[tuple[str, dict]], validation: Sequence[tuple[str, dict]]
) -> None:
    """Fill in what the training data decides, so recipe.yaml records it (and resume compares it).

    Classification: task.labels, the label set. Instruction: task.record_format, chat or template,
    which is how `llmkit generate` and `llmkit eval` later prompt the model (llmkit/prompts.py
    `run_prompt`); a run trains one format, so a mix of chat and template records is refused
    unless the template is the prompt itself ({prompt}: a one-turn chat either way).
    """
    task = recipe.task
    if task.type == "instruction" and task.record_format != "template":
        chats = [where for where, record in [*train, *validation] if task.messages_field in record]
        others = [where for where, record in [*train, *validation] if task.messages_field not in record]
        # A prompt/response record is a one-turn chat when its template is the prompt itself; with
        # another template it is prompted differently from a chat record, and generate could not follow both.
        if others and (chats or task.record_format == "chat") and task_defaults(task).prompt_template != INSTRUCTION_TEMPLATE:
            first_chat = f"{chats[0]} is a chat record" if chats else "task.record_format is chat"
            raise DataError(
                f"{others[0]}: this record has no '{task.messages_field}' but {first_chat}; a run trains one prompt format, "
                "so convert the records to one format, or drop task.prompt_template"
            )
        task.record_format = "chat" if chats or task.record_format == "chat" else "template"
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


@dataclass
class TokenizeStats:
    """What tokenization did to the records: nothing is dropped without being counted here."""

    records: int = 0
    examples: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    did_not_fit: int = 0
    did_not_fit_where: list[str] = dataclasses.field(default_factory=list)
    tokens: int = 0
    trained_tokens: int = 0

    def line(self, split: str) -> str:
        """One line for the log."""
        text = (
            f"{split}: {self.records:,} records -> {self.examples:,} examples, {self.tokens:,} tokens "
            f"({self.trained_tokens:,} trained)"
        )
        if self.truncated:
            text += f"; {self.truncated:,} prompts truncated or conversations cut ({self.truncated_tokens:,} tokens cut)"
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
    if is_chat_record(task, record) and task.train_on == TRAIN_ON_ALL:
        example, cut = _chat_example(task, record, tokenizer, seq_len, where)
        if example is not None:
            return [example], cut
        # Not even the first reply fits: the last reply with its context shortened, as in last_assistant_turn.
    probe = format_record(task, record, tokenizer, where=where)
    if probe.completion is not None:
        target_ids = list(tokenizer(probe.completion, add_special_tokens=False, verbose=False)["input_ids"])
    else:
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


def _chat_example(task, record: dict, tokenizer, seq_len: int, where: str) -> tuple[dict | None, int]:
    """Every assistant reply of a conversation trained (llmkit/prompts.py `chat_segments`), cut to seq_len.

    A conversation longer than seq_len keeps its turns up to the last reply that fits whole (the
    tokens cut are returned); (None, 0) when not even the first reply fits.
    """
    messages, tools = conversation(task, record)
    pieces = chat_segments(tokenizer, messages, tools, task.train_on, where)
    ids, trained = encode_pieces(tokenizer, pieces)
    if task.max_target_tokens is not None:
        longest, run = 0, 0
        for flag in trained:
            run = run + 1 if flag else 0
            longest = max(longest, run)
        if longest - 1 > task.max_target_tokens:
            raise DataError(
                f"{where}: an assistant reply is {longest - 1} tokens, more than task.max_target_tokens "
                f"({task.max_target_tokens}); raise it or shorten the record"
            )
    cut = 0
    if len(ids) > seq_len:
        ends = [k + 1 for k in range(min(len(ids), seq_len)) if trained[k] and (k + 1 == len(ids) or not trained[k + 1])]
        if not ends:
            return None, 0
        cut = len(ids) - ends[-1]
        ids, trained = ids[: ends[-1]], trained[: ends[-1]]
    labels = list(ids) if task.train_on_prompt else [t if flag else IGNORE_INDEX for t, flag in zip(ids, trained, strict=True)]
    labels[0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}, cut


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


@dataclass
class SFTData:
    """Tokenized train/validation examples with their tokenization stats."""

    train: list[dict]
    validation: list[dict]
    train_stats: TokenizeStats
    validation_stats: TokenizeStats
    cached: bool = False


def cache_key(recipe: FinetuneRecipe, tokenizer) -> str:
    """The cache entry name of a recipe's tokenized splits: data, task, seq_len, split rule and tokenizer."""
    data = recipe.data
    return entry_name("sft", {
        "layout": CACHE_LAYOUT,
        "sources": fingerprint([*data.train, *(data.validation or [])], **decoding_settings(data.encoding_errors)),
        "task": recipe.task.model_dump(mode="json"),
        "seq_len": data.seq_len,
        "max_samples": data.max_samples,
        "validation_fraction": data.validation_fraction,
        "has_validation": bool(data.validation),
        "seed": recipe.train.seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    })


def tokenize_splits(recipe: FinetuneRecipe, tokenizer, train, validation) -> SFTData:
    """Tokenize both splits, through the tokenization cache (keyed by data, task and tokenizer)."""

    def build(tmp) -> dict:
        train_ex, train_stats = tokenize_records(recipe, train, tokenizer)
        val_ex, val_stats = tokenize_records(recipe, validation, tokenizer)
        if not train_ex:
            raise DataError(
                f"data.train: none of the {train_stats.records:,} records fits in data.seq_len ({recipe.data.seq_len}); raise data.seq_len"
            )
        (tmp / "examples.json").write_text(json.dumps({"train": train_ex, "validation": val_ex}), encoding="utf-8")
        return {"train_stats": asdict(train_stats), "validation_stats": asdict(val_stats)}

    entry, meta, hit = build_once(cache_root(recipe.data), cache_key(recipe, tokenizer), build)
    examples = json.loads((entry / "examples.json").read_text(encoding="utf-8"))
    return SFTData(
        examples["train"],
        examples["validation"],
        TokenizeStats(**meta["train_stats"]),
        TokenizeStats(**meta["validation_stats"]),
        cached=hit,
    )


def training_files(recipe: FinetuneRecipe) -> dict[str, Any]:
    """TrainData.fingerprint of a fine-tune: each training file's size and mtime (a checkpoint records it)."""
    return {"files": file_states(recipe.data.train)}


def build_train_data(recipe: FinetuneRecipe, sft: SFTData, tokenizer, packing: bool):
    """The `TrainData` for fit: packed rows or length-grouped examples, with the matching collate."""
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
        fingerprint=training_files(recipe),
    )
