"""Preference data: {prompt | messages, chosen, rejected} records -> token-id pairs -> padded pair batches.

    llmkit data inspect finetune/lora-dpo
    llmkit finetune finetune/lora-dpo

Records. A pair is a prompt and two completions of it, the preferred one (`chosen`) and the other
(`rejected`). The prompt is text, `task.prompt_template` filled from the record's fields (default
"{prompt}"), or a conversation in `task.messages_field` (default "messages", a list of {role,
content} ending before the reply) rendered through the tokenizer's chat template with a generation
prompt, exactly as instruction fine-tuning renders its prompts (llmkit/prompts.py). `chosen` and
`rejected` are strings, or a list of messages whose last one is the assistant's reply.

Tokens. prompt ids (encoded as every llmkit prompt is), then the completion's ids. A text
completion is followed by EOS; a reply to a conversation is what the chat template writes for it
as the assistant's turn, through its end-of-turn token (as chat fine-tuning trains replies,
llmkit/prompts.py `reply_text`), so the preferred reply is also the one that stops where the
template ends a turn. The loss reads the completion tokens only, end included. A prompt with no room for a completion in data.seq_len is bad input; a pair whose
longer completion does not fit next to its prompt is skipped and counted, never cut silently.

Batches. A micro-batch of B pairs is 2B padded rows: the B chosen sequences, then the B rejected
ones, pair i in rows i and B + i, so the halves of two pairs never share a row (no packing).

Reference log-probs (task.reference: cached). Before training, the starting model scores every
training and validation pair once; the summed completion log-probs are kept in the tokenization
cache next to the pairs, keyed by the pairs' entry and the reference model's fingerprint, so that
training holds one model instead of two.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmkit import prompts
from llmkit.data import sft
from llmkit.data.batches import TrainData, grouped_batch_order, shuffled_batch_order
from llmkit.data.cache import build_once, cache_root, entry_name, tokenizer_fingerprint
from llmkit.data.packing import IGNORE_INDEX
from llmkit.data.sources import decoding_settings, fingerprint
from llmkit.errors import DataError, did_you_mean
from llmkit.recipes import FinetuneRecipe, TaskSpec

CACHE_LAYOUT = 2
"""Bump when the tokenized-pair format changes, so old cache entries are not reused."""

COMPLETIONS = ("chosen", "rejected")

Pair = dict[str, Any]
"""One tokenized pair: {"prompt": ids, "chosen": ids + [eos], "rejected": ids + [eos]} (+ "ref": [chosen, rejected])."""

ScorePairs = Callable[[Sequence[Pair]], list[tuple[float, float]]]
"""`score(pairs) -> [(chosen log-prob, rejected log-prob), ...]`: summed completion log-probs under a model."""


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


def _completion_text(value: Any, where: str, name: str) -> str:
    """A completion as text: a string, or the content of the last message of a list ending with the assistant's."""
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict) or value[-1].get("role") != "assistant" or "content" not in value[-1]:
            raise DataError(f"{where}: '{name}' as a list must end with the assistant's message {{role: assistant, content}}")
        value = value[-1]["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: '{name}' must be a string (the completion), got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: empty completion in field '{name}'; remove the record or fill the field")
    return value


def _check_messages(messages: Any, where: str, name: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{name}' must be a non-empty list of {{role, content}} messages (the conversation before the reply)")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: {name}[{i}] must be a mapping with 'role' and 'content'")
    if messages[-1]["role"] == "assistant":
        raise DataError(
            f"{where}: the last message of '{name}' is the assistant's; a preference prompt ends before the reply, "
            "which goes in 'chosen' and 'rejected'"
        )
    return [{"role": m["role"], "content": str(m["content"])} for m in messages]


def check_pair_record(task: TaskSpec, record: Any, where: str) -> tuple[str | list[dict], str, str]:
    """(prompt text or chat messages, chosen text, rejected text) of a record; DataError naming `where` otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with prompt (or {task.messages_field}), chosen and rejected, got {type(record).__name__}")
    chat = task.messages_field in record
    needed = [*COMPLETIONS] if chat else [*prompts.template_fields(task.prompt_template or "{prompt}"), *COMPLETIONS]
    for name in needed:
        if name not in record:
            role = "a completion of the pair" if name in COMPLETIONS else "a prompt_template placeholder"
            fix = did_you_mean(name, record.keys()) or f"; the record has: {', '.join(map(str, record)) or 'no fields'}"
            raise DataError(f"{where}: record lacks field '{name}' ({role} of the preference task){fix}")
    chosen, rejected = (_completion_text(record[name], where, name) for name in COMPLETIONS)
    if chosen.strip() == rejected.strip():
        raise DataError(f"{where}: chosen and rejected are identical, so the pair prefers nothing; remove the record or fix one of them")
    if chat:
        return _check_messages(record[task.messages_field], where, task.messages_field), chosen, rejected
    values = {name: str(record[name]) for name in prompts.template_fields(task.prompt_template or "{prompt}")}
    return (task.prompt_template or "{prompt}").format(**values), chosen, rejected


def prompt_ids(prompt: str | list[dict], tokenizer) -> list[int]:
    """Token ids of a pair's prompt: text as every llmkit prompt is encoded, a conversation through the chat template."""
    if isinstance(prompt, list):
        return prompts.chat_prompt_ids(tokenizer, prompt)
    return prompts.prompt_token_ids(tokenizer, prompt)


def completion_ids(prompt: str | list[dict], text: str, tokenizer, eos: int, where: str = "record") -> list[int]:
    """Token ids of a completion: text + EOS, or a reply to a conversation as the template renders the turn, end included."""
    if isinstance(prompt, list):
        reply = prompts.reply_text(tokenizer, [*prompt, {"role": "assistant", "content": text}], None, len(prompt), where)
        return list(tokenizer(reply.text, add_special_tokens=False, verbose=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) + [eos]


def tokenize_pair(task: TaskSpec, record: dict, tokenizer, seq_len: int, where: str = "record") -> Pair | None:
    """The tokenized pair of one record, or None when its longer completion does not fit next to the prompt.

    A prompt that leaves no room for a completion token and EOS within seq_len is a DataError.
    """
    prompt, chosen, rejected = check_pair_record(task, record, where)
    eos = sft.require_eos(tokenizer)
    ids = prompt_ids(prompt, tokenizer)
    if len(ids) + 2 > seq_len:
        raise DataError(
            f"{where}: the prompt is {len(ids)} tokens, leaving no room for a completion in data.seq_len ({seq_len}); "
            "raise data.seq_len or shorten the prompt"
        )
    pair = {"prompt": ids, "chosen": completion_ids(prompt, chosen, tokenizer, eos, where),
            "rejected": completion_ids(prompt, rejected, tokenizer, eos, where)}
    if len(ids) + max(len(pair["chosen"]), len(pair["rejected"])) > seq_len:
        return None
    return pair


@dataclass
class PairStats:
    """What tokenization did to the records: every pair that did not fit is counted here."""

    records: int = 0
    pairs: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    did_not_fit: int = 0
    did_not_fit_where: list[str] = field(default_factory=list)

    def line(self, split: str) -> str:
        """One line for the log."""
        text = f"{split}: {self.records:,} records -> {self.pairs:,} pairs, {self.tokens:,} tokens ({self.trained_tokens:,} completion tokens)"
        if self.did_not_fit:
            text += (
                f"; {self.did_not_fit:,} pairs did not fit in data.seq_len and were skipped "
                f"(first: {', '.join(self.did_not_fit_where[:3])})"
            )
        return text


def tokenize_pairs(recipe: FinetuneRecipe, records: Sequence[tuple[str, dict]], tokenizer) -> tuple[list[Pair], PairStats]:
    """Tokenize (where, record) pairs; the stats count pairs that did not fit in data.seq_len."""
    task = prompts.task_defaults(recipe.task)
    stats, pairs = PairStats(records=len(records)), []
    for where, record in records:
        pair = tokenize_pair(task, record, tokenizer, recipe.data.seq_len, where)
        if pair is None:
            stats.did_not_fit += 1
            stats.did_not_fit_where.append(where)
            continue
        pairs.append(pair)
        stats.tokens += 2 * len(pair["prompt"]) + len(pair["chosen"]) + len(pair["rejected"])
        stats.trained_tokens += len(pair["chosen"]) + len(pair["rejected"])
    stats.pairs = len(pairs)
    return pairs, stats


def check_records(recipe: FinetuneRecipe, records: Sequence[tuple[str, dict]]) -> None:
    """DataError naming file:line for the first record that is not a usable preference pair."""
    task = prompts.task_defaults(recipe.task)
    for where, record in records:
        check_pair_record(task, record, where)


def resolve_record_format(recipe: FinetuneRecipe, records: Sequence[tuple[str, dict]]) -> None:
    """Set task.record_format (chat: conversations, template: prompt text), which is how `generate` prompts the run.

    A run trains one prompt format: a mix of chat and prompt records is a DataError naming the first odd one.
    """
    task = recipe.task
    chats = [where for where, record in records if task.messages_field in record]
    others = [where for where, record in records if task.messages_field not in record]
    if chats and others:
        raise DataError(
            f"{others[0]}: this record has no '{task.messages_field}' but {chats[0]} is a chat record; a run trains one "
            "prompt format, so convert the records to one format"
        )
    task.record_format = "chat" if chats else "template"


# ----------------------------------------------------------------------------------------------
# The cache: tokenized pairs, then the reference model's log-probs of them
# ----------------------------------------------------------------------------------------------


@dataclass
class PairData:
    """Tokenized train/validation pairs with their stats, and where they are cached."""

    train: list[Pair]
    validation: list[Pair]
    train_stats: PairStats
    validation_stats: PairStats
    entry: str
    cached: bool = False
    reference: str | None = None  # "cached: hit" / "cached: built" when the pairs carry "ref"


def cache_key(recipe: FinetuneRecipe, tokenizer) -> str:
    """The cache entry of a recipe's tokenized pairs: data, prompt format, seq_len, split rule and tokenizer (not the loss)."""
    data, task = recipe.data, prompts.task_defaults(recipe.task)
    return entry_name("pref", {
        "layout": CACHE_LAYOUT,
        "sources": fingerprint([*data.train, *(data.validation or [])], **decoding_settings(data.encoding_errors)),
        "prompt": [task.prompt_template, task.messages_field],
        "seq_len": data.seq_len,
        "max_samples": data.max_samples,
        "validation_fraction": data.validation_fraction,
        "has_validation": bool(data.validation),
        "seed": recipe.train.seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    })  # fmt: skip


def tokenize_splits(recipe: FinetuneRecipe, tokenizer, train, validation) -> PairData:
    """Tokenize both splits through the tokenization cache; DataError when no training pair fits."""

    def build(tmp: Path) -> dict:
        train_pairs, train_stats = tokenize_pairs(recipe, train, tokenizer)
        val_pairs, val_stats = tokenize_pairs(recipe, validation, tokenizer)
        if not train_pairs:
            raise DataError(
                f"data.train: none of the {train_stats.records:,} pairs fits in data.seq_len ({recipe.data.seq_len}); raise data.seq_len"
            )
        (tmp / "pairs.json").write_text(json.dumps({"train": train_pairs, "validation": val_pairs}), encoding="utf-8")
        return {"train_stats": asdict(train_stats), "validation_stats": asdict(val_stats)}

    name = cache_key(recipe, tokenizer)
    entry, meta, hit = build_once(cache_root(recipe.data), name, build)
    pairs = json.loads((entry / "pairs.json").read_text(encoding="utf-8"))
    return PairData(
        pairs["train"], pairs["validation"], PairStats(**meta["train_stats"]), PairStats(**meta["validation_stats"]), name, cached=hit
    )


def model_fingerprint(recipe: FinetuneRecipe) -> str:
    """A hash of the starting model: its files (name, size, mtime) when model.path is a directory, else the id; and model.*."""
    path = Path(str(recipe.model.path)).expanduser()
    parts: list[Any] = [recipe.model.model_dump(mode="json")]
    if path.is_dir():
        for item in sorted(path.iterdir()):
            if item.is_file():
                stat = item.stat()
                parts.append([item.name, stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def attach_reference(recipe: FinetuneRecipe, data: PairData, score: ScorePairs, precision: str) -> PairData:
    """Give every pair its reference log-probs ("ref": [chosen, rejected]), computed once by `score` and cached.

    The entry is keyed by the tokenized pairs' entry, the starting model's fingerprint and the
    precision the scores were computed in; `score` runs only on a miss.
    """

    def build(tmp: Path) -> dict:
        scores = {"train": score(data.train), "validation": score(data.validation)}
        (tmp / "reference.json").write_text(json.dumps(scores), encoding="utf-8")
        return {"pairs": data.entry, "train": len(data.train), "validation": len(data.validation)}

    name = entry_name("prefref", {"pairs": data.entry, "model": model_fingerprint(recipe), "precision": precision})
    entry, _, hit = build_once(cache_root(recipe.data), name, build)
    scores = json.loads((entry / "reference.json").read_text(encoding="utf-8"))
    for split in ("train", "validation"):
        pairs, values = getattr(data, split), scores[split]
        if len(values) != len(pairs):
            raise DataError(f"the reference log-probs in {entry} do not match the tokenized pairs; delete the entry and run again")
        for pair, value in zip(pairs, values, strict=True):
            pair["ref"] = [float(value[0]), float(value[1])]
    data.reference = f"cached ({'hit' if hit else 'computed now'}): {entry}"
    return data


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def pair_lengths(pair: Pair) -> int:
    """Tokens of the pair's longer row (prompt + its longer completion)."""
    return len(pair["prompt"]) + max(len(pair["chosen"]), len(pair["rejected"]))


def pair_collate(pad_id: int) -> Callable[[list[Pair]], dict[str, Any]]:
    """Collate B pairs into 2B right-padded rows: chosen rows 0..B-1, rejected rows B..2B-1; labels only on completions.

    Adds "ref_logps" [B, 2] (chosen, rejected) when the pairs carry cached reference log-probs.
    """
    import torch

    def collate(pairs: list[Pair]) -> dict[str, Any]:
        rows = [(p["prompt"], p[name]) for name in COMPLETIONS for p in pairs]
        width = max(len(prompt) + len(completion) for prompt, completion in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (prompt, completion) in enumerate(rows):
            n, k = len(prompt) + len(completion), len(prompt)
            ids[row, :n] = torch.tensor(prompt + completion)
            labels[row, k:n] = torch.tensor(completion)
            mask[row, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if all("ref" in p for p in pairs):
            batch["ref_logps"] = torch.tensor([p["ref"] for p in pairs], dtype=torch.float32)
        return batch

    return collate


def build_train_data(recipe: FinetuneRecipe, data: PairData, tokenizer, objective) -> TrainData:
    """The `TrainData` for fit: pairs (micro_batch_size pairs = 2 x micro_batch_size rows) and the preference objective."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sft.require_eos(tokenizer)
    order = (
        grouped_batch_order([pair_lengths(p) for p in data.train])
        if recipe.data.group_by_length
        else shuffled_batch_order(len(data.train))
    )
    layout = "length-grouped pair batches" if recipe.data.group_by_length else "shuffled pair batches"
    description = f"{data.train_stats.line('train')}; {layout}"
    if data.validation:
        description += f" | {data.validation_stats.line('validation')}"
    if data.reference:
        description += f" | reference log-probs {data.reference}"
    return TrainData(
        train=data.train,
        collate_fn=pair_collate(pad_id),
        batch_order=order,
        validation=data.validation or None,
        description=description,
        extra={"train_stats": asdict(data.train_stats), "validation_stats": asdict(data.validation_stats)},
        objective=objective,
        fingerprint=sft.training_files(recipe),
    )
