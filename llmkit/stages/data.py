"""`llmkit data prepare` and `llmkit data inspect`: tokenize ahead of training, and look at what will be trained.

    llmkit data prepare pretrain/tiny                 # fills the tokenization cache (multi-GPU runs then only read it)
    llmkit data prepare finetune/tiny-summarization
    llmkit data inspect finetune/lora-instruction -n 2    # trained tokens [[in brackets]] (green in a terminal)
    llmkit data inspect pretrain/tiny -n 2                # the first packed blocks, document ends marked
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llmkit import models, prompts
from llmkit.data import preference, sft, sources
from llmkit.data.lm import DocumentEncoder, check_lm_data, lm_train_data, open_cache, prepare_cache
from llmkit.data.mixture import mixture_of
from llmkit.data.packing import IGNORE_INDEX, PackedBlocks
from llmkit.data.splits import held_out
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
    if recipe.task.type == "preference":
        return _prepare_pairs(recipe, tokenizer)
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


def inspect(recipe, num_examples: int = 3) -> None:
    """`llmkit data inspect RECIPE`: a fine-tune's examples with their loss masks, or a pretrain recipe's packed blocks."""
    if isinstance(recipe, PretrainRecipe):
        return inspect_blocks(recipe, num_examples)
    if not isinstance(recipe, FinetuneRecipe):
        raise RecipeError(
            f"llmkit data inspect: shows the training examples of a finetune recipe (with their loss masks) or the packed "
            f"blocks of a pretrain recipe; this is {'an' if recipe.stage[0] in 'aeiou' else 'a'} {recipe.stage} recipe"
        )
    finetune.check(recipe)
    tokenizer = finetune.load_tokenizer(recipe)
    if recipe.task.type == "preference":
        return inspect_pairs(recipe, tokenizer, num_examples)
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
            what = "conversation cut after the last reply that fits" if prompts.is_chat_record(recipe.task, record) else "prompt truncated"
            note = f", {what} ({cut} tokens)" if cut else ""
            print(f"[{len(example['input_ids'])} tokens, {trained} trained{note}]")
            print(render_mask(tokenizer, example, colour))


def first_blocks(recipe: PretrainRecipe, tokenizer, train, num_blocks: int) -> list[list[int]]:
    """The first `num_blocks` blocks of data.seq_len tokens that the cache would pack from `train`.

    Documents are read in order, each ending with EOS, with the documents that data.validation_fraction
    holds out skipped, exactly as llmkit/data/lm.py `_build` writes the cache; only as many are
    tokenized as the blocks need, so a large corpus is not read to the end.
    """
    data = recipe.data
    held = data.validation_fraction if not data.validation else 0.0
    encoder = DocumentEncoder(tokenizer)
    wanted = num_blocks * data.seq_len
    tokens: list[int] = []
    texts = sources.iter_texts(train, text_field=data.text_field, max_samples=data.max_samples, encoding_errors=data.encoding_errors)
    for index, text in enumerate(texts):
        if held and held_out(index, held):
            continue
        tokens.extend(encoder.encode([text])[0])
        if len(tokens) >= wanted:
            break
    full = len(tokens) // data.seq_len  # a final partial block is dropped in training too
    return [tokens[i * data.seq_len : (i + 1) * data.seq_len] for i in range(min(full, num_blocks))]


def render_block(tokenizer, ids: list[int], colour: bool) -> str:
    """A block's text with each document end (EOS) marked: bold in a terminal, ||EOS|| otherwise."""
    out: list[str] = []
    start = 0
    for end, token in enumerate(ids):
        if token == tokenizer.eos_token_id:
            out.append(tokenizer.decode(ids[start:end], skip_special_tokens=False))
            eos = tokenizer.decode([token], skip_special_tokens=False)
            out.append(f"\x1b[1;33m{eos}\x1b[0m\n" if colour else f"||{eos}||\n")
            start = end + 1
    out.append(tokenizer.decode(ids[start:], skip_special_tokens=False))
    return "".join(out)


def inspect_blocks(recipe: PretrainRecipe, num_blocks: int = 3) -> None:
    """`llmkit data inspect PRETRAIN-RECIPE`: print the first packed training blocks, document ends marked."""
    check_lm_data(recipe)
    tokenizer = models.load_tokenizer(recipe.tokenizer)
    data = recipe.data
    if data.is_mixture:
        mixture = mixture_of(data)
        parts = list(zip(mixture.labels, mixture.sources, strict=True))
    else:
        parts = [(None, data.train)]
    colour = _use_colour()
    attention = {
        "none": "attention crosses document ends (data.doc_masking: none)",
        "position_ids": "positions restart after each document end (data.doc_masking: position_ids)",
        "attention": "each document attends only to itself (data.doc_masking: attention)",
    }[data.doc_masking]
    print(f"pretraining blocks of data.seq_len {data.seq_len} tokens; documents end at EOS, marked "
          + ("in yellow" if colour else "||like this||") + f"; {attention}; every token is trained")
    for label, train in parts:
        blocks = first_blocks(recipe, tokenizer, train, num_blocks)
        name = f"source {label!r}" if label is not None else "data.train"
        if not blocks:
            print(f"\n--- {name}: fewer than {data.seq_len} tokens before the end of the corpus; no full block")
        for i, block in enumerate(blocks):
            ends = sum(1 for t in block if t == tokenizer.eos_token_id)
            print(f"\n--- {name}, block {i} [{len(block)} tokens, {ends} document end{'s' if ends != 1 else ''}]")
            print(render_block(tokenizer, block, colour))


def _prepare_pairs(recipe: FinetuneRecipe, tokenizer) -> preference.PairData:
    """Tokenize a preference recipe's pairs into the cache, and score them with the starting model when the reference is cached."""
    train, validation = finetune.preference_records(recipe)
    pairs = preference.tokenize_splits(recipe, tokenizer, train, validation)
    print(("cached: " if pairs.cached else "tokenized: ") + pairs.train_stats.line("train"))
    if pairs.validation:
        print(pairs.validation_stats.line("validation"))
    if recipe.task.uses_reference and recipe.task.reference == "cached":
        finetune.score_reference(recipe, models.build_model(recipe, tokenizer), tokenizer, pairs)
        print(f"reference log-probs {pairs.reference}")
    return pairs


def inspect_pairs(recipe: FinetuneRecipe, tokenizer, num_examples: int = 3) -> None:
    """`data inspect` of a preference recipe: each pair's chosen and rejected rows, completion tokens marked as trained."""
    records = sft.load_located_records(recipe.data.train, num_examples, recipe.data.encoding_errors)
    preference.check_records(recipe, records)
    colour = _use_colour()
    legend = (
        "\x1b[1;32mscored completion (in the loss)\x1b[0m  \x1b[2mprompt (masked, label -100)\x1b[0m"
        if colour
        else "[[scored completion tokens]] in double brackets; the prompt is masked (label -100)"
    )
    task = recipe.task
    print(f"preference task ({task.loss}), seq_len {recipe.data.seq_len}; {legend}")
    task = prompts.task_defaults(task)
    for where, record in records[:num_examples]:
        pair = preference.tokenize_pair(task, record, tokenizer, recipe.data.seq_len, where)
        print(f"\n--- {where}")
        if pair is None:
            print("(does not fit in data.seq_len: prompt + the longer completion is too long; it would be skipped and counted)")
            continue
        for name in preference.COMPLETIONS:
            example = {"input_ids": pair["prompt"] + pair[name], "labels": [IGNORE_INDEX] * len(pair["prompt"]) + pair[name]}
            print(f"[{name}: {len(example['input_ids'])} tokens, {len(pair[name])} scored]")
            print(render_mask(tokenizer, example, colour))
