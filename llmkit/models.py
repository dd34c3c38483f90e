"""The one place that loads tokenizers and models, checks them against a recipe, sizes them and saves them.

    llmkit validate pretrain/tiny     # prints parameters, FLOPs per token and tokens per parameter

- tokenizers: `load_tokenizer` (a directory or hub id; a pad token always, EOS when training needs it);
- configs: `model_config` (model.type + overrides, or model.path), `checkpoint_config`, `max_positions`;
- checks: `check_model_dir` (is this a Hugging Face model directory?), `check_vocab`, `local_model_path`;
- models: `build_model` for training (from config or checkpoint, float32 master weights, QLoRA),
  `apply_lora`, and `load_model` for inference (a model or LoRA adapter directory, or an intermediate
  checkpoint `RUN/checkpoints/step-N`, rebuilt from the run's recipe: `training_checkpoint`);
- sizes: `parameter_counts`, `flops_per_token`, `model_summary_lines`;
- saving: `save_hf_model`, `save_lora`, `write_model_card`.

FLOPs per token follow the PaLM / nanoGPT convention: 6 * N for the weight matmuls (forward 2N,
backward 4N) plus 12 * n_layers * hidden_size * seq_len for attention scores and values, where N
counts every parameter that takes part in a matmul (the output projection included, the input
embedding lookup and position embeddings excluded).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from llmkit.data.sources import hub_host_resolves, source_names
from llmkit.data.tokens import token_id_bound
from llmkit.errors import ModelError, RecipeError, did_you_mean
from llmkit.prompts import ensure_chat_template, stop_token_ids
from llmkit.recipes import bundled_command_writing, check_model_overrides, load_recipe, recipe_to_yaml
from llmkit.rundir import latest_checkpoint, run_dir_of, training_checkpoint, write_text_atomic

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
        # Never run code shipped with a tokenizer or model (auto_map): no prompt, a refusal instead.
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else str(name_or_path), trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError, ValueError, EnvironmentError, ...
        if asks_for_remote_code(exc):
            raise ModelError(f"{key}: {name_or_path}: {REMOTE_CODE}") from None
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


def check_new_tokens(max_new_tokens: int, config, key: str, where: str) -> None:
    """RecipeError when `max_new_tokens` leaves no room for a prompt in the model's positions.

    A model with learned position embeddings (gpt2) fails with an IndexError past its last
    position; rotary models (llama) run on with a warning, forever for a huge value. A prompt that
    is too long is cut to its end instead (generation.py `fit_prompt`): its last tokens hold the cue the model answers.
    """
    limit = max_positions(config)
    if limit is not None and max_new_tokens >= limit:
        raise RecipeError(
            f"{key} ({max_new_tokens:,}) leaves no room for a prompt in the {limit:,} positions of {where}; "
            f"set it to at most {limit - 1:,}"
        )


def model_config(recipe, vocab_size: int | None = None, special_ids: dict[str, int] | None = None):
    """The transformers config a recipe describes (no weights): from model.type + overrides, or model.path."""
    from transformers import AutoConfig

    spec = recipe.model
    check_model_overrides(spec)
    overrides = dict(spec.config_overrides)
    _check_override_values(overrides)
    if spec.type is not None:
        _check_head_split(spec.type, overrides)
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        for key, value in (special_ids or {}).items():
            overrides.setdefault(key, value)
        try:
            config = AutoConfig.for_model(spec.type, **overrides)
        except Exception as exc:  # ValueError, TypeError, and huggingface_hub's StrictDataclass*Error (an Exception)
            raise RecipeError(_config_problem(exc)) from None
    else:
        config = checkpoint_config(spec.path)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise RecipeError(f"model.{key}: unknown key for the {config.model_type} config of {spec.path}")
            try:
                setattr(config, key, value)
            except Exception as exc:  # the config's own field validation
                raise RecipeError(_config_problem(exc)) from None
    check_causal(config, "model.type" if spec.type is not None else "model.path", spec.path, recipe_sets_config=True)
    _check_config(recipe, config)
    return config


# model.* keys that size a model: a positive integer each (null keeps the config's default where it
# has one). transformers accepts 0 and -1 here and builds an empty model or divides by zero.
SIZE_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings",
    "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "n_ctx", "d_model", "num_layers", "num_heads", "ffn_dim",
})


def _check_override_values(overrides: dict[str, Any]) -> None:
    """RecipeError naming model.<key> for a size that is not a positive integer, or a rate that is not a probability."""
    for key, value in overrides.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"model.{key}: must be a finite number, got {value}")
        countable = key in SIZE_KEYS or key.startswith(("num_", "n_")) or key.endswith(("_size", "_dim", "_layers", "_heads"))
        if key in SIZE_KEYS and value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RecipeError(f"model.{key}: must be a positive integer, got {value!r}")
        if countable and isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise RecipeError(f"model.{key}: must not be negative, got {value}")
        if ("dropout" in key or key.endswith("_pdrop")) and isinstance(value, (int, float)) and not 0 <= value < 1:
            raise RecipeError(f"model.{key}: a dropout probability must be in [0, 1), got {value}")


def _check_head_split(model_type: str, overrides: dict[str, Any]) -> None:
    """hidden_size / attention heads / key-value heads must divide, checked before transformers builds the config."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise RecipeError(f"model.type: {model_type!r} is not a transformers model type{did_you_mean(model_type, list(CONFIG_MAPPING.keys()))}")
    cls = CONFIG_MAPPING[model_type]
    aliases = getattr(cls, "attribute_map", None) or {}

    def value(name: str) -> tuple[Any, str]:
        stored = aliases.get(name, name)
        for key in (name, stored):
            if key in overrides:
                return overrides[key], key
        return getattr(cls, stored, None), stored

    (hidden, hidden_key), (heads, heads_key) = value("hidden_size"), value("num_attention_heads")
    (kv, kv_key), (head_dim, _) = value("num_key_value_heads"), value("head_dim")
    ints = [v for v in (hidden, heads, kv) if v is not None]
    if not all(isinstance(v, int) and v > 0 for v in ints):
        return  # a default that is not a plain count (a list per layer, ...): the config class checks it
    if hidden and heads and head_dim is None and hidden % heads:
        raise RecipeError(f"model.{hidden_key} ({hidden}) must be divisible by model.{heads_key} ({heads})")
    if heads and kv and heads % kv:
        raise RecipeError(f"model.{heads_key} ({heads}) must be divisible by model.{kv_key} ({kv})")


def _config_problem(exc: BaseException) -> str:
    """One line for a config transformers refused, naming model.<field> when its validation says which."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    field = re.match(r"Validation error for field '([^']+)'", lines[0])
    cause = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    cause = re.sub(r"^\w+Error: ", "", cause)
    return f"model.{field.group(1)}: {cause}" if field else f"model: {cause}"


# These configs declare is_decoder, but their causal-LM class always masks causally.
ALWAYS_CAUSAL = frozenset({"gpt_neox", "gpt_neox_japanese", "trocr"})


def is_bidirectional(config) -> bool:
    """True for an encoder config (bert, roberta, electra, ...): its *ForCausalLM / *LMHeadModel class attends
    to later tokens too unless is_decoder is set, so next-token training and scoring would see the answer."""
    return (
        getattr(config, "is_decoder", None) is False
        and not getattr(config, "is_encoder_decoder", False)
        and getattr(config, "model_type", None) not in ALWAYS_CAUSAL
    )


def check_causal(config, where: str, path: str | None = None, recipe_sets_config: bool = False) -> None:
    """ModelError naming `where` when the config describes a bidirectional encoder instead of a causal LM.

    Setting is_decoder=True behind the user's back would turn bert into a different model than the
    one asked for, so llmkit refuses; a recipe that means it sets model.is_decoder: true itself.
    """
    if not is_bidirectional(config):
        return
    what = f"model.type: {config.model_type}" if path is None else f"{where}: {path} holds a {config.model_type} model, which"
    raise ModelError(
        f"{what} is an encoder (bidirectional attention), not a causal language model; "
        "choose a decoder such as llama, gpt2, qwen2"
        + (" (or set model.is_decoder: true to give it a causal mask)" if recipe_sets_config else "")
    )


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
        writer = bundled_command_writing(path)  # runs/tokenizer-tiny: `llmkit tokenizer train tokenizer/tiny` writes it
        fix = f"run `{writer}` first" if writer else "run the stage that writes it first (llmkit tokenizer train / pretrain / finetune)"
        raise ModelError(
            f"{key}: {path} does not exist{'' if looks_local else ' locally and the Hugging Face Hub is not reachable'}; "
            f"{fix} or fix the path"
        )
    return None


def _hub_reachable() -> bool:
    """False when hub downloads are switched off or the Hub's host does not resolve (a fast, local check)."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    return hub_host_resolves()


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


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


def special_token_ids(tokenizer) -> dict[str, int]:
    """bos/eos/pad token ids of a tokenizer as config keys."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}


# ----------------------------------------------------------------------------------------------
# Checkpoint directories and configs
# ----------------------------------------------------------------------------------------------

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


REMOTE_CODE = (
    "it asks to run Python code shipped with it (auto_map), which llmkit never does; "
    "use a model or tokenizer of a type transformers itself knows"
)


def asks_for_remote_code(exc: BaseException) -> bool:
    """True for transformers' refusal (trust_remote_code=False) of a directory or repo that ships its own code."""
    return "contains custom code which must be executed" in str(exc) or "references custom code" in str(exc)


def where_failed(path: str, exc: BaseException) -> str:
    """Why a model or config could not be loaded, saying so when the path is no local directory."""
    if asks_for_remote_code(exc):
        return f"{path}: {REMOTE_CODE}"
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not Path(path).expanduser().exists():
        return f"{path}: no such directory, and no Hub model of that name could be loaded ({reason})"
    return f"cannot load from {path} ({reason})"


def _checkpoint_recipe(path: str, where: str):
    """The training recipe of an intermediate checkpoint's run, checked to be loadable from it."""
    run = training_checkpoint(path)
    if not (Path(path) / "model.safetensors").is_file():
        raise ModelError(
            f"{where}: {path}: this checkpoint holds no model.safetensors (FSDP and DeepSpeed checkpoints keep their "
            "own layout); load the run's final model instead"
        )
    try:
        recipe = load_recipe(run / "recipe.yaml", run_recipe=True)
    except RecipeError as exc:
        raise ModelError(f"{where}: {path}: the run's recipe.yaml does not load ({exc})") from None
    if recipe.stage not in ("pretrain", "finetune"):
        raise ModelError(f"{where}: {path}: {run / 'recipe.yaml'} is a {recipe.stage} recipe, not a training run")
    return recipe


def _checkpoint_tokenizer(recipe, where: str):
    """The tokenizer a training run used: `tokenizer`, else (fine-tuning) the one saved with model.path."""
    name = recipe.tokenizer or recipe.model.path
    tokenizer = load_tokenizer(name, f"{where} (the run's tokenizer)", require_eos=False)
    task = getattr(recipe, "task", None)
    if task is not None and task.type == "instruction":
        ensure_chat_template(tokenizer)  # as fine-tuning did (llmkit/stages/finetune.py)
    return tokenizer


def _load_training_checkpoint(path: str, where: str):
    """(model, tokenizer) of an intermediate checkpoint: the run's model rebuilt from its recipe, its weights loaded."""
    import torch
    from safetensors.torch import load_file

    recipe = _checkpoint_recipe(path, where)
    tokenizer = _checkpoint_tokenizer(recipe, where)
    model = build_model(recipe, tokenizer)
    lora = getattr(recipe, "lora", None)
    if lora is not None and lora.enabled:
        model = apply_lora(model, recipe)
    # The checkpoint holds the parameters training changed, under the names of the model training built.
    weights = load_file(str(Path(path) / "model.safetensors"))
    params = dict(model.named_parameters())
    unexpected = [name for name in weights if name not in params]
    if unexpected:
        raise ModelError(
            f"{where}: {path}: the checkpoint's weights do not match the model of {run_dir_of(path) / 'recipe.yaml'} "
            f"(unexpected {unexpected[:3]}); was the recipe changed after the checkpoint was written?"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].dtype))
    if lora is not None and lora.enabled:
        model = model.merge_and_unload()
    return model, tokenizer


def check_model_dir(
    path: str, where: str = "model.path", tokenizer: str | None = None, tokenizer_key: str | None = "tokenizer",
    needs_tokenizer: bool = True,
) -> None:
    """ModelError naming `where` when a checkpoint directory is missing, or lacks config, weights or tokenizer.

    tokenizer:       the tokenizer the caller loads instead of the model's own (a recipe's `tokenizer:`).
    tokenizer_key:   the recipe key that could name one, suggested when the model has none; None when the
                     caller has no such key (`llmkit generate`).
    needs_tokenizer: False when only config and weights are read.
    """
    local = local_model_path(path, where)
    if local is None:
        return  # a hub id: from_pretrained reports what is wrong with it
    if training_checkpoint(local) is not None:
        _checkpoint_recipe(path, where)  # an intermediate checkpoint: rebuilt from its run's recipe
        return
    if not local.is_dir():
        raise ModelError(f"{where}: {path}: is a file; give the checkpoint directory that holds config.json")
    names = {p.name for p in local.iterdir()}
    if "adapter_config.json" in names and "config.json" not in names:
        return  # a LoRA adapter directory: peft loads the base model it names
    if "config.json" not in names:
        hint = ""
        if "checkpoints" in names:
            newest = latest_checkpoint(local)
            hint = " (it holds checkpoints/; the final model is written when training finishes" + (
                f"; its newest checkpoint {newest} loads now)" if newest else ")"
            )
        raise ModelError(f"{where}: {path}: no config.json, so this is not a Hugging Face model directory{hint}")
    if not names.intersection(WEIGHT_FILES):
        raise ModelError(f"{where}: {path}: no model weights (model.safetensors or pytorch_model.bin)")
    tok_dir = Path(tokenizer).expanduser() if tokenizer else local
    if not needs_tokenizer or not tok_dir.is_dir() or {p.name for p in tok_dir.iterdir()}.intersection(TOKENIZER_FILES):
        return
    if tokenizer:
        fix = f"point {tokenizer_key or 'tokenizer'} at the directory a tokenizer was saved to"
    elif tokenizer_key:
        fix = f"set `{tokenizer_key}:` to the tokenizer directory the model was trained with"
    else:
        trained_with = _recipe_tokenizer(local)
        fix = (
            f"copy the tokenizer files of {trained_with} (the tokenizer its recipe.yaml names) into it" if trained_with
            else "copy the tokenizer files of the tokenizer it was trained with (the output_dir of `llmkit tokenizer train`) into it"
        )
    key = tokenizer_key if tokenizer else where
    raise ModelError(f"{key}: {tok_dir}: no tokenizer files (tokenizer.json, tokenizer_config.json); {fix}")


def _recipe_tokenizer(run_dir: Path) -> str | None:
    """The `tokenizer:` of the recipe.yaml a run directory holds, None when there is none."""
    try:
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    name = saved.get("tokenizer") if isinstance(saved, dict) else None
    return name if isinstance(name, str) else None


def checkpoint_config(path: str, where: str = "model.path"):
    """The transformers config of a checkpoint (of the base model, for a LoRA adapter directory)."""
    from transformers import AutoConfig

    check_model_dir(path, where, needs_tokenizer=False)
    local = Path(path).expanduser()
    if training_checkpoint(local) is not None:
        recipe = _checkpoint_recipe(path, where)
        return training_config(recipe, _checkpoint_tokenizer(recipe, where))
    if (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
        adapter = json.loads((local / "adapter_config.json").read_text(encoding="utf-8"))
        path = adapter.get("base_model_name_or_path") or path
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{where}: {where_failed(path, exc)}") from None


ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def weight_errors() -> tuple[type[BaseException], ...]:
    """What from_pretrained raises for weights it cannot read.

    A pickle that torch.load(weights_only=True) refuses (its payload never runs), safetensors'
    header errors, torch's zip-archive errors for a truncated .bin, a pickle of something other
    than a state dict (TypeError), and size mismatches with config.json (RuntimeError).
    """
    import pickle

    from safetensors import SafetensorError

    return (pickle.UnpicklingError, SafetensorError, EOFError, RuntimeError, TypeError)


def weights_error(path: str, where: str, exc: BaseException) -> ModelError:
    """A one-line ModelError naming the weights file of `path` that could not be loaded, and why."""
    import pickle

    from safetensors import SafetensorError

    local = Path(path).expanduser()
    present = [local / name for name in WEIGHT_FILES + ADAPTER_WEIGHT_FILES if (local / name).is_file()]
    suffix = ".bin" if isinstance(exc, (pickle.UnpicklingError, EOFError)) else ".safetensors" if isinstance(exc, SafetensorError) else ""
    target = next((f for f in present if f.name.endswith(suffix)), present[0] if present else local)
    lines = str(exc).splitlines() or [""]
    # torch's refusal starts with a paragraph about weights_only; the line naming the object says more.
    reason = (next((line for line in lines if "GLOBAL" in line), lines[0]).strip()[:160]) or type(exc).__name__
    if isinstance(exc, pickle.UnpicklingError):
        return ModelError(
            f"{where}: {target}: refused to load: it holds Python objects other than tensors ({reason}); "
            "it may be tampered with. Re-save the model as model.safetensors"
        )
    if isinstance(exc, RuntimeError) and "mismatch" in str(exc):
        return ModelError(
            f"{where}: {target}: the weights do not fit {local / 'config.json'} (tensor sizes differ); "
            "was config.json edited or copied from another model?"
        )
    return ModelError(
        f"{where}: {target} is truncated or corrupt ({type(exc).__name__}: {reason}); "
        "re-save, re-download or re-train the model"
    )


def check_loading_info(info: dict, path: str, where: str) -> None:
    """ModelError when from_pretrained left some of the model's weights at random values (absent from the files)."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelError(
            f"{where}: {path}: its weights lack {len(missing)} of the model's tensors (e.g. {', '.join(missing[:3])}), "
            "so they would be random; the weights file is not this model's, or is incomplete"
        )


def vocab_size_of(config) -> int | None:
    """The embedding rows a config declares (multimodal configs keep them in text_config)."""
    return getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)


def check_vocab(tokenizer, embedding_rows: int | None, where: str) -> None:
    """ModelError when the tokenizer has ids the model's embedding matrix cannot hold."""
    needed = token_id_bound(tokenizer)
    if embedding_rows is not None and needed > embedding_rows:
        raise ModelError(
            f"{where}: the tokenizer's ids go up to {needed - 1:,} but the model has {embedding_rows:,} embedding rows "
            f"(vocab_size is {embedding_rows}); use the tokenizer the model was trained with, or resize the model"
        )


def default_device() -> str:
    """cuda when a GPU is visible, else mps on Apple silicon, else cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# ----------------------------------------------------------------------------------------------
# Models for training (from a recipe) and for inference (from a directory)
# ----------------------------------------------------------------------------------------------

LORA_HINT = "pip install 'llmkit[lora]'"


def check_lora_available(recipe) -> None:
    """RecipeError when LoRA is asked without peft, or QLoRA without CUDA and bitsandbytes."""
    lora = getattr(recipe, "lora", None)
    if lora is None:
        return
    if not lora.enabled:
        if lora.load_in_4bit or lora.merge:
            raise RecipeError("lora.load_in_4bit / lora.merge need lora.enabled: true")
        return
    try:
        import peft  # noqa: F401
    except ImportError:
        raise RecipeError(f"lora.enabled: LoRA needs the peft package; install it with {LORA_HINT}") from None
    if lora.load_in_4bit:
        import torch

        if not torch.cuda.is_available():
            raise RecipeError("lora.load_in_4bit: QLoRA needs a CUDA GPU; set lora.load_in_4bit=false to train LoRA in full precision")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RecipeError("lora.load_in_4bit: QLoRA needs bitsandbytes; pip install bitsandbytes") from None


def training_config(recipe, tokenizer):
    """The checked config of the model a pretrain or finetune recipe trains, fitted to its tokenizer."""
    if recipe.model.type is not None:
        # The largest id, not len(tokenizer): a tokenizer with sparse ids needs rows up to its largest one.
        config = model_config(recipe, padded_vocab_size(token_id_bound(tokenizer)), special_token_ids(tokenizer))
        check_vocab(tokenizer, vocab_size_of(config), "model.vocab_size")
    else:
        config = model_config(recipe)
        check_vocab(tokenizer, vocab_size_of(config), f"model.path {recipe.model.path}")
    return config


def quiet_progress_bars() -> None:
    """No "Loading weights" / "Writing model shards" bars from transformers: llmkit's own lines say what happens.

    A tiny model loads in milliseconds, and every bar is a dozen lines in a log file.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def build_model(recipe, tokenizer):
    """The causal LM a recipe trains: fresh from config (seeded by train.seed) or loaded from model.path.

    Weights are model.dtype (float32 master weights by default: transformers 5 would otherwise load a
    bf16 checkpoint as bf16); QLoRA recipes load the base model in 4-bit.
    """
    import torch
    from transformers import AutoModelForCausalLM

    quiet_progress_bars()
    spec = recipe.model
    config = training_config(recipe, tokenizer)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, spec.dtype)}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    lora = getattr(recipe, "lora", None)
    if lora is not None and lora.enabled and lora.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
        )
    unreadable_weights = weight_errors() if spec.type is None else ()  # from_config reads no file
    try:
        if spec.type is not None:
            torch.manual_seed(recipe.train.seed)
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False, **kwargs)
        local = local_model_path(spec.path)
        name = str(local.resolve()) if local is not None else spec.path
        model, info = AutoModelForCausalLM.from_pretrained(
            name, config=config, trust_remote_code=False, output_loading_info=True, **kwargs
        )
        check_loading_info(info, spec.path, "model.path")
    except unreadable_weights as exc:
        raise weights_error(spec.path, "model.path", exc) from None
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(f"model: cannot build it from {spec.path or spec.type} ({str(exc).splitlines()[0][:200]})") from None
    check_vocab(tokenizer, model.get_input_embeddings().num_embeddings, f"model.path {spec.path}")
    return model


@contextmanager
def quiet_peft_wrap():
    """Wrap a model in peft without transformers' FutureWarning about a deprecated property peft reads.

    peft 0.21 `PeftModel.__init__` (peft_model.py) reads `model.is_gradient_checkpointing`, which
    transformers 5 deprecates ("`is_gradient_checkpointing` is deprecated and will be removed in v6")
    in favour of `is_activation_checkpointing`: every LoRA run and every adapter load printed it,
    and the user can do nothing about it. Only that one message is silenced, only here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_lora(model, recipe):
    """Wrap the model with peft LoRA adapters (initialised from train.seed); only adapter weights keep requires_grad."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    spec = recipe.lora
    if spec.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules, task_type="CAUSAL_LM"
    )
    # lora_A is drawn at random: seed it here, as build_model seeds a fresh model, so a recipe gives
    # the same adapters every time (fit's set_seed comes later, for dropout).
    torch.manual_seed(recipe.train.seed)
    try:
        with quiet_peft_wrap():
            return get_peft_model(model, config)
    except ValueError as exc:
        raise RecipeError(f"lora.target_modules: {str(exc).splitlines()[0]}") from None


def load_model(
    path: str,
    tokenizer: str | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = "sdpa",
    device: str | None = None,
    where: str = "model.path",
):
    """(model, tokenizer) of a checkpoint directory (or LoRA adapter directory), in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    check_model_dir(path, where, tokenizer)
    if training_checkpoint(path) is None:
        check_causal(checkpoint_config(path, where), where, path)  # before any weights are read
    hf_logging.disable_progress_bar()  # a progress bar per checkpoint drowns the report
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    is_adapter = (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file()
    try:
        if training_checkpoint(path) is not None:
            model, run_tokenizer = _load_training_checkpoint(path, where)
            model.to(device or default_device(), getattr(torch, dtype)).eval()
            if tokenizer is None:
                return model, run_tokenizer
            return model, load_tokenizer(tokenizer, "tokenizer", require_eos=False)
        if is_adapter:
            from peft import AutoPeftModelForCausalLM

            with quiet_peft_wrap():
                model = AutoPeftModelForCausalLM.from_pretrained(path, trust_remote_code=False, **kwargs).merge_and_unload()
        else:
            model, info = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, output_loading_info=True, **kwargs)
            check_loading_info(info, path, where)
    except weight_errors() as exc:
        raise weights_error(path, where, exc) from None
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{where}: {where_failed(path, exc)}") from None
    model.to(device or default_device()).eval()
    tok = load_tokenizer(tokenizer or path, "tokenizer" if tokenizer else where, require_eos=False)
    return model, tok



# ----------------------------------------------------------------------------------------------
# Sizes and FLOPs
# ----------------------------------------------------------------------------------------------


def meta_model(config):
    """The model on the meta device: shapes only, no memory, for counting parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def parameter_counts(model) -> dict[str, int]:
    """total / embedding (input lookup + position tables) / non_embedding / matmul (those in 6N) / trainable parameters.

    non_embedding is Kaplan et al.'s N: every parameter but the lookup tables and the output (unembedding)
    matrix, whether or not it is tied to the input embedding. The scaling-law tools fit any of the three.
    """
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
    non_embedding = total - lookup - (out.weight.numel() if out is not None and not tied else 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "embedding": lookup, "non_embedding": non_embedding, "matmul": matmul, "trainable": trainable}


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
    if "non_embedding" in counts:
        lines.append(
            f"N conventions:    total {counts['total']:,}, non-embedding {counts['non_embedding']:,}, matmul {counts['matmul']:,}"
        )
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


def write_model_card(output_dir: Path, recipe, summary: dict[str, Any], counts: dict[str, int]) -> None:
    """README.md model card: what was trained, on what, for how long, and how to load it."""
    val = summary.get("val_loss")
    ppl = f", perplexity {summary['val_ppl']:.2f}" if summary.get("val_ppl") is not None else ""
    results = f"- validation loss {val:.4f}{ppl}\n" if val is not None else ""
    card = f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [llmkit, {recipe.stage}]
---

# {Path(output_dir).name}

A {summary.get('model_type', 'causal')} language model ({counts['total']:,} parameters) trained with
`llmkit {recipe.stage}`.

- training data: {source_names(recipe.data.train)}
- validation data: {source_names(getattr(recipe.data, 'validation', None))}
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
    write_text_atomic(Path(output_dir) / "README.md", card)


def export_generation_config(model, tokenizer):
    """The GenerationConfig saved with an exported model: it stops at EOS and at the chat template's end-of-turn.

    A chat model ends each reply with its template's end-of-turn token ('<|im_end|>', '<|eot_id|>'),
    which is often not the tokenizer's EOS; without it in eos_token_id, `model.generate` and servers
    that read generation_config.json run on past the reply.
    """
    from transformers import GenerationConfig

    gen = GenerationConfig.from_model_config(model.config)
    stops = stop_token_ids(tokenizer)
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = (stops[0] if len(stops) == 1 else stops) if stops else None
    gen.pad_token_id = tokenizer.pad_token_id
    gen.use_cache = True  # training turns the model's cache off; generation from the export wants it
    return gen


def save_hf_model(model, tokenizer, output_dir: Path, weights: bool = True) -> None:
    """Final model in Hugging Face format (safetensors), tokenizer and generation config at output_dir."""
    quiet_progress_bars()
    output_dir = Path(output_dir)
    if weights:
        model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    export_generation_config(model, tokenizer).save_pretrained(output_dir)


def save_lora(model, tokenizer, output_dir: Path, merge: bool) -> None:
    """The adapter in peft format and, with `merge`, the merged full model; each with the export generation config.

    Without merge the adapter files sit at the top of output_dir (AutoModelForCausalLM and
    PeftModel both load them when peft is installed). With merge the merged model takes the top, so
    plain transformers loads it, and the adapter goes to output_dir/adapter. Merging happens in
    place, so this must be the last use of `model`.
    """
    quiet_progress_bars()
    output_dir = Path(output_dir)
    adapter_dir = output_dir / "adapter" if merge else output_dir
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    gen = export_generation_config(model.get_base_model(), tokenizer)
    gen.save_pretrained(adapter_dir)
    if merge:
        merged = model.merge_and_unload()
        merged.config.use_cache = True  # the loop turned the cache off for training only
        merged.generation_config = gen
        merged.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        gen.save_pretrained(output_dir)


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
