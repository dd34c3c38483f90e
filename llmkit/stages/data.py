"""`llmkit data prepare` and `llmkit data inspect`: tokenize ahead of training, and look at what will be trained.

    llmkit data prepare pretrain/tiny                 # fills the tokenization cache (multi-GPU runs then only read it)
    llmkit data prepare finetune/tiny-summarization
    llmkit data inspect finetune/lora-instruction -n 2    # trained tokens [[in brackets]] (green in a terminal)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llmkit import models, prompts
from llmkit.data import sft
from llmkit.data.lm import lm_train_data, open_cache, prepare_cache
from llmkit.data.packing import IGNORE_INDEX, PackedBlocks
from llmkit.errors import RecipeError
from llmkit.recipes import FinetuneRecipe, PretrainRecipe
from llmkit.stages import finetune


def prepare(recipe) -> Path | sft.SFTData:
    """`llmkit data prepare RECIPE`: build the tokenization cache of a pretrain or finetune recipe now."""
    if isinstance(recipe, FinetuneRecipe):
        return _prepare_finetune(recipe)
    if not isinstance(recipe, PretrainRecipe):
        raise RecipeError(f"llmkit data prepare: needs a pretrain or finetune recipe, got a {recipe.stage} recipe")
    if recipe.data.streaming:
        raise RecipeError("data.streaming is true: streamed corpora are tokenized during training; nothing to prepare")
    tokenizer = models.load_tokenizer(recipe.tokenizer)
    models.training_config(recipe, tokenizer)  # a model the recipe cannot build fails before the corpus is tokenized
    if recipe.data.is_mixture:
        # One cache entry per source; building the mixture also prints each source's blocks and planned share.
        mixture = lm_train_data(recipe, tokenizer)
        print(f"data: {mixture.description}")
        for path in mixture.extra["cache"]:
            print(f"cache: {path}")
        return Path(mixture.extra["cache"][0])
    path = prepare_cache(recipe, tokenizer)
    tokens, docs = open_cache(path, "train")
    print(PackedBlocks(tokens, docs, recipe.data.seq_len, positions=False).stats().line("train"))
    val_tokens, val_docs = open_cache(path, "validation")
    if len(val_tokens):
        print(PackedBlocks(val_tokens, val_docs, recipe.data.seq_len, positions=False, keep_partial=True).stats().line("validation"))
    print(f"cache: {path}")
    return path


def _prepare_finetune(recipe: FinetuneRecipe) -> sft.SFTData:
    """Check and tokenize a fine-tuning recipe's records into the cache."""
    finetune.check(recipe)
    tokenizer = finetune.load_tokenizer(recipe)
    models.training_config(recipe, tokenizer)
    train, validation = sft.checked_records(recipe)
    examples = sft.tokenize_splits(recipe, tokenizer, train, validation)
    print(("cached: " if examples.cached else "tokenized: ") + examples.train_stats.line("train"))
    if examples.validation:
        print(examples.validation_stats.line("validation"))
    return examples


def _use_colour() -> bool:
    """Colour only on a terminal that wants it."""
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


def inspect(recipe: FinetuneRecipe, num_examples: int = 3) -> None:
    """`llmkit data inspect RECIPE`: print formatted examples with trained and masked tokens told apart."""
    finetune.check(recipe)
    tokenizer = finetune.load_tokenizer(recipe)
    records = sft.load_located_records(
        recipe.data.train, max(num_examples, recipe.data.max_samples or 0) or None, recipe.data.encoding_errors
    )
    sft.check_records(recipe, records)
    if recipe.task.type == "classification":
        sft.resolve_task(recipe, records if recipe.task.labels else sft.split_records(recipe)[0], [])
    elif recipe.task.type == "instruction":
        sft.resolve_task(recipe, records, [])
    colour = _use_colour()
    legend = (
        "\x1b[1;32mtrained (in the loss)\x1b[0m  \x1b[2mmasked (label -100)\x1b[0m"
        if colour
        else "[[trained tokens]] in double brackets; everything else is masked (label -100)"
    )
    print(f"{recipe.task.type} task, seq_len {recipe.data.seq_len}; {legend}")
    if recipe.task.type == "instruction":
        print(prompts.describe_chat_training(recipe.task, tokenizer))
    for where, record in records[:num_examples]:
        examples, cut = sft.tokenize_record(recipe, record, tokenizer, where)
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
