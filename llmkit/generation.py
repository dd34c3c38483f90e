"""Batched text generation, shared by `llmkit eval`, fine-tuning's task metric and `llmkit generate`.

    llmkit generate runs/quickstart/finetune "Summarize the following text." --max-new-tokens 32

`generate_texts` / `generate_ids`: prompts are left-padded
into batches (sorted by length so little padding is wasted), decoded with the KV cache by
`model.generate`, and cut at EOS and at the first stop string; only the continuation comes back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from llmkit.errors import RecipeError
from llmkit.models import check_new_tokens, max_positions
from llmkit.prompts import encode_prompts, stop_token_ids
from llmkit.recipes import GenerationSpec

# What 0 (or 1) means for an option, named in its error message.
OPTION_MEANINGS = {"temperature": "0 = greedy", "top_k": "0 = all", "repetition_penalty": "1 = none"}
# pydantic's constraint error types -> how `llmkit generate` states the bound.
BOUND_WORDING = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than_equal": "<= {le}", "less_than": "< {lt}"}


def option_spec(
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    repetition_penalty: float,
    stop: Sequence[str],
    seed: int,
) -> GenerationSpec:
    """The GenerationSpec of `llmkit generate`'s command-line options; RecipeError naming the first bad one.

    Every option goes through the same pydantic field as a recipe's `generation` section, so a bound
    declared there is checked here too; only the message is worded for the command line.
    """
    from pydantic import ValidationError

    options = {"temperature": temperature, "top_p": top_p, "repetition_penalty": repetition_penalty}
    for name, value in options.items():
        if not math.isfinite(value):  # nan compares false with every bound: it would slip through them all
            raise RecipeError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if temperature < 0:
        raise RecipeError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise RecipeError(f"--top-p must be in (0, 1], got {top_p}")
    try:
        return GenerationSpec(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,  # 0 means greedy; the field itself must be > 0
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            stop=list(stop),
            seed=seed,
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0])
        wording = BOUND_WORDING.get(error["type"])
        bound = wording.format(**error.get("ctx", {})) if wording else error["msg"].lower()
        meaning = f" ({OPTION_MEANINGS[name]})" if name in OPTION_MEANINGS else ""
        raise RecipeError(f"--{name.replace('_', '-')} must be {bound}{meaning}, got {error['input']}") from None


def fit_prompt(ids: Sequence[int], max_new_tokens: int, limit: int | None) -> list[int]:
    """The end of a prompt, as much of it as fits before `max_new_tokens` in `limit` positions."""
    ids = list(ids)
    if limit is not None and len(ids) + max_new_tokens > limit:
        # Keep the end of an over-long prompt: it holds the cue ("Summary:") the model answers.
        ids = ids[len(ids) + max_new_tokens - limit :]
    return ids

# ----------------------------------------------------------------------------------------------
# Batched generation
# ----------------------------------------------------------------------------------------------


def generation_config(spec: GenerationSpec, tokenizer, num_return_sequences: int = 1):
    """A transformers GenerationConfig built only from `spec`, so a checkpoint's own defaults never leak in."""
    from transformers import GenerationConfig

    settings: dict[str, Any] = {
        "max_new_tokens": spec.max_new_tokens,
        "do_sample": spec.do_sample,
        "num_beams": spec.num_beams,
        "repetition_penalty": spec.repetition_penalty,
        "num_return_sequences": num_return_sequences,
        # EOS and the chat template's end-of-turn token(s): a chat model ends its reply with the latter.
        "eos_token_id": _eos_setting(tokenizer),
        "pad_token_id": tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "use_cache": True,
    }
    if spec.do_sample:
        settings.update(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k)
    else:
        # Explicit neutral values: otherwise transformers warns that sampling knobs are ignored.
        settings.update(temperature=1.0, top_p=1.0, top_k=50)
    if spec.num_beams > 1:
        settings["early_stopping"] = True
    return GenerationConfig(**settings)


def _eos_setting(tokenizer) -> int | list[int] | None:
    """generation_config.eos_token_id for a tokenizer: one id, or a list when a chat template ends turns with another token."""
    ids = stop_token_ids(tokenizer)
    return (ids[0] if len(ids) == 1 else ids) if ids else None


def stop_criteria(tokenizer, stop: Sequence[str], prompt_width: int):
    """StoppingCriteriaList ending a row once its continuation (never the prompt) contains a stop string.

    transformers' own `stop_strings` also matches a stop string that straddles the end of the
    prompt (prompt "f(a):" + generated ":" stops on "::"), so it could end a generation that
    does not contain the stop string at all.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    stops = [s for s in stop if s]
    # A stop string of n characters lies within the last n + 8 tokens (byte-level pieces may be partial characters).
    tail = max((len(s) for s in stops), default=0) + 8

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids[:, prompt_width:]
            window = new[:, -tail:].tolist()
            texts = tokenizer.batch_decode(window, skip_special_tokens=True)
            return torch.tensor(
                [any(s in t for s in stops) for t in texts], dtype=torch.bool, device=input_ids.device
            )

    return StoppingCriteriaList([StopOnStrings()]) if stops else None


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string."""
    end = len(text)
    for s in stop:
        if s:
            found = text.find(s)
            if found != -1:
                end = min(end, found)
    return text[:end]


def generate_ids(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    spec: GenerationSpec,
    batch_size: int = 8,
    num_return_sequences: int = 1,
    on_batch: Callable[[int], None] | None = None,
    key: str = "generation.max_new_tokens",
) -> list[list[str]]:
    """Continuations of pre-tokenized prompts: `num_return_sequences` texts per prompt, in prompt order.

    on_batch(n) is called after each batch of n prompts (a progress bar); `key` names the setting of
    `spec.max_new_tokens` in the error when it leaves no room for a prompt.
    """
    import torch

    if not prompt_ids:
        return []
    check_new_tokens(spec.max_new_tokens, model.config, key, "the model")
    config = generation_config(spec, tokenizer, num_return_sequences)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    limit = max_positions(model.config)
    device = next(model.parameters()).device
    # Longest first: similar lengths share a batch (little padding) and memory peaks at once.
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    results: list[list[str]] = [[] for _ in prompt_ids]
    generator_seed = spec.seed
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = []
        for i in chunk:
            ids = fit_prompt(prompt_ids[i], spec.max_new_tokens, limit)
            if not ids:
                ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id]
            rows.append(ids)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ids in enumerate(rows):
            # Left padding: every prompt ends at the same column, so new tokens line up.
            input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, width - len(ids) :] = 1
        if spec.do_sample:
            torch.manual_seed(generator_seed)
            generator_seed += 1
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                stopping_criteria=stop_criteria(tokenizer, spec.stop, width),
            )
        new_tokens = output[:, width:].tolist()
        for k, ids in enumerate(new_tokens):
            results[chunk[k // num_return_sequences]].append(decode_continuation(tokenizer, ids, spec.stop))
        if on_batch is not None:
            on_batch(len(chunk))
    return results


def decode_continuation(tokenizer, ids: list[int], stop: Sequence[str]) -> str:
    """The continuation's text up to its first EOS or end-of-turn token, then cut at the first stop string."""
    ends = set(stop_token_ids(tokenizer))
    for j, t in enumerate(ids):
        if t in ends:
            ids = ids[:j]
            break
    return cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)


def generate_texts(
    model, tokenizer, prompts: list[str], spec: GenerationSpec, batch_size: int = 8
) -> list[str]:
    """Continuations of `prompts` (batched, left-padded, KV cache, cut at EOS and stop strings), in order."""
    return [
        texts[0]
        for texts in generate_ids(model, tokenizer, encode_prompts(tokenizer, prompts), spec, batch_size)
    ]


# ----------------------------------------------------------------------------------------------
# `llmkit generate`
# ----------------------------------------------------------------------------------------------


