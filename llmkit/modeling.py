"""Models from a recipe: any transformers causal-LM type from config, or a checkpoint; sizes and FLOPs.

    llmkit validate pretrain/tiny     # prints parameters, FLOPs per token and tokens per parameter

FLOPs per token follow the PaLM / nanoGPT convention: 6 * N for the weight matmuls (forward 2N,
backward 4N) plus 12 * n_layers * hidden_size * seq_len for attention scores and values, where N
counts every parameter that takes part in a matmul (the output projection included, the input
embedding lookup and position embeddings excluded).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llmkit.errors import ModelError, RecipeError

VOCAB_MULTIPLE = 64


def padded_vocab_size(tokenizer_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The embedding rows for a tokenizer: its size rounded up to a multiple of 64 (faster matmuls)."""
    return int(math.ceil(tokenizer_size / multiple) * multiple)


def load_tokenizer(name_or_path: str | Path, key: str = "tokenizer", require_eos: bool = True):
    """AutoTokenizer with a pad token (EOS when it defines none); ModelError naming `key` when it cannot be read.

    Training needs EOS (it separates packed documents and ends fine-tuning targets); generation does not.
    """
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if path.exists() and not path.is_dir():
        raise ModelError(f"{key}: {name_or_path} is a file; give the directory a tokenizer was saved to")
    if not path.exists():
        local_model_path(str(name_or_path), key)  # fail at once for a missing run dir, not after Hub retries
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else str(name_or_path))
    except Exception as exc:  # transformers raises OSError, ValueError, EnvironmentError, ...
        where = "not a local directory, and not loadable from the Hub" if not path.exists() else "cannot be loaded"
        raise ModelError(
            f"{key}: {name_or_path}: {where} ({exc.__class__.__name__}: {str(exc).splitlines()[0][:140]}); "
            "train one with `llmkit tokenizer train` and point tokenizer at its output_dir"
        ) from None
    if require_eos and tokenizer.eos_token_id is None:
        raise ModelError(
            f"{key}: {name_or_path}: the tokenizer has no eos_token; training needs it to end documents and targets"
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        # Padding positions carry label -100 and no attention, so any id works; EOS is always there.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def max_positions(config) -> int | None:
    """The longest sequence a model's config allows, or None when it does not say."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_config(recipe, vocab_size: int | None = None, special_ids: dict[str, int] | None = None):
    """The transformers config a recipe describes (no weights): from model.type + overrides, or model.path."""
    from transformers import AutoConfig

    from llmkit.recipes import check_model_overrides

    spec = recipe.model
    check_model_overrides(spec)
    overrides = dict(spec.config_overrides)
    if spec.type is not None:
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        for key, value in (special_ids or {}).items():
            overrides.setdefault(key, value)
        try:
            config = AutoConfig.for_model(spec.type, **overrides)
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"model: {str(exc).splitlines()[0]}") from None
    else:
        config = _checkpoint_config(spec.path)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise RecipeError(f"model.{key}: unknown key for the {config.model_type} config of {spec.path}")
            setattr(config, key, value)
    _check_config(recipe, config)
    return config


def local_model_path(path: str, key: str = "model.path") -> Path | None:
    """The local directory `path` names, None for a hub id; ModelError for a local path that does not exist.

    A missing "runs/pretrain-tiny" reads like a hub id "owner/name", so when the Hub cannot be
    reached (HF_HUB_OFFLINE, or no DNS) it is reported at once as a missing directory instead of
    after half a minute of download retries. A hub id already in the local Hub cache still loads offline.
    """
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    first = Path(path).parts[0] if Path(path).parts else path
    looks_local = path.startswith((".", "/", "~")) or Path(first).is_dir() or path.count("/") > 1
    if looks_local or not (_hub_reachable() or _in_hub_cache(path)):
        raise ModelError(
            f"{key}: {path} does not exist{'' if looks_local else ' locally and the Hugging Face Hub is not reachable'}; "
            "run the stage that writes it first (llmkit tokenizer train / pretrain / finetune) or fix the path"
        )
    return None


def _hub_reachable() -> bool:
    """False when hub downloads are switched off or the Hub's host does not resolve (a fast, local check)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _checkpoint_config(path: str):
    from transformers import AutoConfig

    local_model_path(path)
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise ModelError(f"model.path {path}: has no config.json; give a directory written by save_pretrained")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelError(f"model.path {path}: cannot read its config ({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]})") from None


def _check_config(recipe, config) -> None:
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if heads and hidden and getattr(config, "head_dim", None) is None and hidden % heads:
        raise RecipeError(f"model.hidden_size ({hidden}) must be divisible by model.num_attention_heads ({heads})")
    kv = getattr(config, "num_key_value_heads", None)
    if heads and kv and heads % kv:
        raise RecipeError(f"model.num_attention_heads ({heads}) must be divisible by model.num_key_value_heads ({kv})")
    limit = max_positions(config)
    seq_len = recipe.data.seq_len
    if limit is not None and seq_len > limit:
        raise RecipeError(
            f"data.seq_len ({seq_len}) is larger than the model's max positions ({limit}); "
            f"lower data.seq_len or raise model.max_position_embeddings"
        )


def check_vocab(tokenizer, config, where: str) -> None:
    """ModelError when the tokenizer has ids the model's embedding cannot hold."""
    if len(tokenizer) > config.vocab_size:
        raise ModelError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}; "
            "use the tokenizer the model was trained with, or resize the model"
        )


def special_token_ids(tokenizer) -> dict[str, int]:
    """bos/eos/pad token ids of a tokenizer as config keys."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def build_model(recipe, tokenizer):
    """A float32 causal LM for training: fresh from config (seeded) or loaded from model.path."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = recipe.model
    dtype = getattr(torch, spec.dtype)
    config = model_config(recipe, padded_vocab_size(len(tokenizer)), special_token_ids(tokenizer))
    check_vocab(tokenizer, config, f"model.path {spec.path}" if spec.path else "model.vocab_size")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        if spec.type is not None:
            torch.manual_seed(recipe.train.seed)
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(spec.path, config=config, **kwargs)
    except (ValueError, ImportError) as exc:
        raise ModelError(f"model: cannot build it ({str(exc).splitlines()[0][:200]})") from None
    return model


# ----------------------------------------------------------------------------------------------
# Sizes and FLOPs
# ----------------------------------------------------------------------------------------------


def meta_model(config):
    """The model on the meta device: shapes only, no memory, for counting parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parameter_counts(model) -> dict[str, int]:
    """total / embedding (input lookup + position tables) / matmul parameters (those in 6N)."""
    import torch

    total = sum(p.numel() for p in model.parameters())
    lookup = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            lookup += module.weight.numel()
    out = model.get_output_embeddings()
    tied = out is not None and model.get_input_embeddings() is not None and out.weight is model.get_input_embeddings().weight
    # A tied output projection shares its weight with the lookup table but still costs a matmul.
    matmul = total - lookup + (out.weight.numel() if tied else 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "embedding": lookup, "matmul": matmul, "trainable": trainable}


def flops_per_token(config, matmul_params: int, seq_len: int) -> int:
    """Training FLOPs per token: 6 * matmul params + 12 * layers * hidden * seq_len (attention)."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    return int(6 * matmul_params + 12 * layers * hidden * seq_len)


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def model_summary_lines(config, counts: dict[str, int], recipe, world_size: int = 1, max_steps: int | None = None) -> list[str]:
    """Parameters, tokens per step, steps, FLOPs and tokens per parameter, as aligned lines."""
    train = recipe.train
    seq_len = recipe.data.seq_len
    tokens_per_step = train.micro_batch_size * train.grad_accum_steps * seq_len * world_size
    steps = max_steps or train.max_steps or math.ceil(train.max_tokens / tokens_per_step)
    total_tokens = tokens_per_step * steps
    fpt = flops_per_token(config, counts["matmul"], seq_len)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", "?")
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", "?")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", "?")
    budget = "" if train.max_steps else f" (from max_tokens {train.max_tokens:,})"
    upper = " at most" if recipe.stage == "finetune" else ""
    lines = [
        f"model:            {config.model_type}, {layers} layers, hidden {hidden}, {heads} heads, vocab {config.vocab_size}",
        f"parameters:       {_human(counts['total'])} ({counts['total']:,}; embedding tables {_human(counts['embedding'])}, in matmuls {_human(counts['matmul'])})",
    ]
    if counts.get("trainable") is not None and counts["trainable"] != counts["total"]:
        lines.append(f"trainable:        {_human(counts['trainable'])}")
    lines += [
        f"tokens per step:  {train.micro_batch_size} micro-batch x {train.grad_accum_steps} accum x {seq_len} seq_len x {world_size} process{'es' if world_size > 1 else ''} ={upper} {tokens_per_step:,}",
        f"steps:            {steps:,}{budget}",
        f"total tokens:    {upper} {total_tokens:,}",
        f"FLOPs per token:  {_human(fpt)} (6N + 12*layers*hidden*seq_len)",
        f"total FLOPs:      {fpt * total_tokens:.3g}",
        f"tokens per param: {total_tokens / max(counts['total'], 1):.2f} (Chinchilla-optimal is about 20)",
    ]
    return lines


def _plan_vocab(recipe) -> tuple[int | None, dict, str]:
    """Vocab size and special ids from the recipe's tokenizer when it is already there (it may not be yet)."""
    name = getattr(recipe, "tokenizer", None)
    if name is None:
        return None, {}, ""
    if not Path(name).expanduser().is_dir():
        # validate never touches the network: a hub tokenizer is only read when training starts
        return None, {}, f"tokenizer {name} is not a local directory (yet): vocab size taken from the config"
    try:
        tokenizer = load_tokenizer(name)
    except ModelError:
        return None, {}, f"tokenizer {name} not found yet: vocab size taken from the config"
    return padded_vocab_size(len(tokenizer)), special_token_ids(tokenizer), f"tokenizer {name}: {len(tokenizer)} tokens, padded to a multiple of {VOCAB_MULTIPLE}"


def plan_lines(recipe) -> list[str]:
    """The plan `llmkit validate` prints for a pretrain or finetune recipe; builds no weights, reads no data."""
    from llmkit.recipes import FinetuneRecipe

    if isinstance(recipe, FinetuneRecipe) or recipe.model.type is None:
        vocab, note = None, ""
        config = model_config(recipe)
        source = f"from checkpoint {recipe.model.path}"
    else:
        vocab, special, note = _plan_vocab(recipe)
        config = model_config(recipe, vocab, special)
        source = "from config (random init)"
    model = meta_model(config)
    counts = parameter_counts(model)
    lora = getattr(recipe, "lora", None)
    if lora is not None and lora.enabled:
        counts.pop("trainable", None)
    lines = [f"stage:            {recipe.stage} ({config.model_type} {source})"]
    lines += model_summary_lines(config, counts, recipe)
    if note:
        lines.append(f"vocab:            {note}")
    lines.append(f"output_dir:       {recipe.output_dir}")
    return lines


def write_model_card(output_dir: Path, recipe, summary: dict[str, Any], counts: dict[str, int]) -> None:
    """README.md model card: what was trained, on what, for how long, and how to load it."""
    from llmkit.recipes import recipe_to_yaml

    def sources(items) -> str:
        return ", ".join(s if isinstance(s, str) else f"hub:{s.hub}" for s in (items or [])) or "none"

    val = summary.get("val_loss")
    results = f"- validation loss {val:.4f}, perplexity {summary['val_ppl']:.2f}\n" if val is not None else ""
    card = f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [llmkit, {recipe.stage}]
---

# {Path(output_dir).name}

A {summary.get('model_type', 'causal')} language model ({counts['total']:,} parameters) trained with
`llmkit {recipe.stage}`.

- training data: {sources(recipe.data.train)}
- validation data: {sources(getattr(recipe.data, 'validation', None))}
- steps: {summary['step']:,}, tokens: {summary['tokens']:,}, sequence length {recipe.data.seq_len}
{results}
## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{output_dir}")
model = AutoModelForCausalLM.from_pretrained("{output_dir}")
```

## Recipe

```yaml
{recipe_to_yaml(recipe).rstrip()}
```
"""
    tmp = Path(output_dir) / "README.md.tmp"
    tmp.write_text(card, encoding="utf-8")
    tmp.replace(Path(output_dir) / "README.md")


def save_hf_model(model, tokenizer, output_dir: Path, weights: bool = True) -> None:
    """Final model in Hugging Face format (safetensors), tokenizer and generation config at output_dir."""
    from transformers import GenerationConfig

    output_dir = Path(output_dir)
    if weights:
        model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    gen = GenerationConfig.from_model_config(model.config)
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(output_dir)


def read_checkpoint_config(path: Path) -> dict:
    """config.json of a checkpoint directory as a dict (for tools that must not import transformers)."""
    return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
