"""Recipe schema, YAML loading, ``--set`` overrides and bundled-recipe lookup.

Every recipe field is declared once here, typed, with its default and a one-line description.
Unknown keys are errors with a "did you mean" suggestion; so are wrong types and missing keys.

    llmkit validate pretrain/tiny --set train.lr=1e-3
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmkit.errors import RecipeError, did_you_mean

STAGES = ("tokenizer", "pretrain", "finetune", "eval")


RESUMABLE = {"resumable": True}
"""Marks a field that may change between an interrupted run and its resumption: it changes the
budget or the bookkeeping, not what a given step computes (see `resumable_keys`)."""


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------
# Data sources
# --------------------------------------------------------------------------------------------


class HubSource(Section):
    """A dataset on the Hugging Face Hub (needs the network unless it is already cached)."""

    hub: str = Field(description="Hub dataset id, e.g. 'wikitext' or 'owner/name'.")
    name: str | None = Field(None, description="Dataset configuration name, e.g. 'wikitext-103-raw-v1'.")
    split: str = Field("train", description="Split to read.")
    streaming: bool = Field(True, description="Stream the dataset instead of downloading it whole.")
    max_samples: int | None = Field(None, ge=1, description="Read at most this many records.")
    revision: str | None = Field(None, description="Dataset revision (branch, tag or commit).")


Source = Union[str, HubSource]
"""A local file, glob or directory; 'builtin:NAME[/SPLIT]'; 'hub:ID'; or a HubSource mapping."""


def _as_list(value: Any) -> Any:
    """Let a single source be written without list brackets."""
    return [value] if isinstance(value, (str, dict, HubSource)) else value


SourceList = Annotated[list[Source], Field(min_length=1)]


# --------------------------------------------------------------------------------------------
# Tokenizer training
# --------------------------------------------------------------------------------------------


class SpecialTokens(Section):
    """The special tokens a trained tokenizer defines; set one to null to leave it out."""

    bos: str | None = Field("<|bos|>", description="Beginning-of-sequence token.")
    eos: str | None = Field("<|eos|>", description="End-of-sequence token, also the document separator.")
    pad: str | None = Field("<|pad|>", description="Padding token.")
    unk: str | None = Field("<|unk|>", description="Unknown token (unused by byte-level BPE, kept for tools).")
    extra: list[str] = Field(default_factory=list, description="Further special tokens, e.g. chat markers.")


class TokenizerSpec(Section):
    """How to train the tokenizer."""

    type: Literal["bpe", "unigram", "wordpiece"] = Field(description="Tokenizer model to train.")
    vocab_size: int = Field(ge=32, le=1_048_576, description="Target vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Minimum count for a merge / token to be kept.")
    special_tokens: SpecialTokens = Field(default_factory=SpecialTokens, description="Special tokens.")
    add_bos: bool = Field(True, description="Prepend the BOS token when encoding text.")
    lowercase: bool = Field(False, description="Lowercase text before tokenizing.")
    normalization: Literal["none", "nfc", "nfkc"] = Field(
        "none", description="Unicode normalization (none keeps byte-level BPE round-trips exact)."
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template; 'default' installs llmkit's built-in template."
    )
    pad_vocab_to_multiple_of: int = Field(
        1, ge=1, description="Add unused tokens so the vocabulary size is a multiple of this (64 helps GPUs)."
    )
    model_max_length: int = Field(2048, ge=1, description="Maximum sequence length recorded in the tokenizer.")


class TokenizerData(Section):
    """Corpus for tokenizer training."""

    train: SourceList = Field(description="Sources to train on.")
    validation: list[Source] | None = Field(None, description="Held-out sources for the report.")
    text_field: str = Field("text", description="Field holding the text in .jsonl/.json/.csv/.parquet sources.")
    max_samples: int | None = Field(None, ge=1, description="Train on at most this many documents.")
    heldout_docs: int = Field(
        200, ge=0, description="Documents held out from train for the report when no validation is given."
    )

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _as_list(value)


class TokenizerRecipe(Section):
    """`llmkit tokenizer train`: train a tokenizer on a corpus."""

    stage: Literal["tokenizer"] = Field(description="Recipe kind.")
    output_dir: Path = Field(description="Where the tokenizer files and report are written.")
    data: TokenizerData
    tokenizer: TokenizerSpec


# --------------------------------------------------------------------------------------------
# Model, data and training sections shared by pretrain / finetune / eval
# --------------------------------------------------------------------------------------------


class ModelSpec(BaseModel):
    """The model: a transformers model_type built from config, or a checkpoint path.

    Any other key is passed to the transformers config under its own name (hidden_size,
    num_hidden_layers, ...) and checked against that config class by `check_model_overrides`.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())

    type: str | None = Field(None, description="transformers model_type to build from config (llama, gpt2, qwen2, ...).")
    path: str | None = Field(None, description="Checkpoint directory or hub id to start from.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = Field(
        "sdpa", description="Attention kernel."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the loaded weights (float32 master weights for training)."
    )

    @property
    def config_overrides(self) -> dict[str, Any]:
        """The extra keys meant for the transformers config."""
        return dict(self.model_extra or {})


class LMData(Section):
    """Language-modelling data: raw text packed into seq_len blocks."""

    train: SourceList = Field(description="Training sources.")
    validation: list[Source] | None = Field(None, description="Validation sources.")
    validation_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Hold out this fraction of train documents when no validation is given."
    )
    text_field: str = Field("text", description="Field holding the text in structured sources.")
    seq_len: int = Field(512, ge=8, description="Tokens per training sequence.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many documents.")
    streaming: bool = Field(False, description="Tokenize on the fly instead of caching; for corpora larger than disk/RAM.")
    doc_masking: Literal["none", "position_ids", "attention"] = Field(
        "none",
        description="Packed-document boundaries: none, restart position ids per document, or also block cross-document attention.",
    )
    cache_dir: Path | None = Field(
        None, description="Tokenization cache (default: $LLMKIT_CACHE_DIR, else ~/.cache/llmkit/data).", json_schema_extra=RESUMABLE
    )

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _as_list(value)


class TrainConfig(Section):
    """Optimisation, schedule, budget, checkpointing and logging."""

    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run (or give max_tokens).", json_schema_extra=RESUMABLE)
    max_tokens: int | None = Field(None, ge=1, description="Training budget in tokens; sets max_steps.", json_schema_extra=RESUMABLE)
    micro_batch_size: int = Field(8, ge=1, description="Sequences per device per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr: float = Field(0.0, ge=0, description="Learning rate at the end of a cosine/linear schedule.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not applied to norms, biases, embeddings).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null disables.")
    seed: int = Field(1234, description="Seed for model init, data order and dropout.")
    save_every: int = Field(500, ge=1, description="Save a resumable checkpoint every this many steps.", json_schema_extra=RESUMABLE)
    eval_every: int = Field(500, ge=1, description="Run validation every this many steps.", json_schema_extra=RESUMABLE)
    eval_batches: int | None = Field(None, ge=1, description="Cap validation at this many batches.", json_schema_extra=RESUMABLE)
    log_every: int = Field(10, ge=1, description="Log training metrics every this many steps.", json_schema_extra=RESUMABLE)
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints to keep.", json_schema_extra=RESUMABLE)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on GPUs that support it, otherwise fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(False, description="torch.compile the model.")
    chunked_loss: bool = Field(True, description="Output layer + cross-entropy in token chunks, without full logits (same loss).")
    skip_nonfinite_steps: int = Field(0, ge=0, description="Skip up to this many steps with a non-finite loss before stopping.")
    trackers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list, description="Experiment trackers.", json_schema_extra=RESUMABLE)
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.", json_schema_extra=RESUMABLE)

    @model_validator(mode="after")
    def _check_budget(self) -> TrainConfig:
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("set train.max_steps or train.max_tokens")
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) is larger than train.max_steps ({self.max_steps})"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) is larger than train.lr ({self.lr})")
        return self


# --------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------


class PretrainRecipe(Section):
    """`llmkit pretrain`: causal-LM pretraining from scratch or continued from a checkpoint."""

    stage: Literal["pretrain"] = Field(description="Recipe kind.")
    output_dir: Path = Field(description="Run directory: recipe, metrics, checkpoints, final model.")
    tokenizer: str = Field(description="Tokenizer directory (from `llmkit tokenizer train`) or hub id.")
    model: ModelSpec
    data: LMData
    train: TrainConfig

    @model_validator(mode="after")
    def _check_model(self) -> PretrainRecipe:
        if (self.model.type is None) == (self.model.path is None):
            raise ValueError("give exactly one of model.type (from scratch) or model.path (continued pretraining)")
        return self


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------


class TaskSpec(Section):
    """A downstream task: how records become (prompt, target) pairs."""

    type: Literal["summarization", "instruction", "classification", "text"] = Field(description="Task kind.")
    prompt_template: str | None = Field(
        None, description="Prompt with {field} placeholders naming record fields (task default when null)."
    )
    target_field: str | None = Field(None, description="Record field holding the target (task default when null).")
    messages_field: str = Field("messages", description="Field of chat records (instruction task).")
    text_field: str = Field("text", description="Field of raw-text records (text task).")
    labels: list[str] | None = Field(None, description="Classification label words (default: taken from the data).")
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens (default: target tokens only).")
    max_target_tokens: int | None = Field(None, ge=1, description="Longest target kept; longer targets are errors.")


class FinetuneData(Section):
    """Task records for fine-tuning."""

    train: SourceList = Field(description="Training sources (records with the task's fields).")
    validation: list[Source] | None = Field(None, description="Validation sources.")
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Hold out this fraction when no validation is given.")
    seq_len: int = Field(512, ge=8, description="Longest example in tokens; prompts are truncated to fit, targets never.")
    packing: bool = Field(False, description="Pack several examples per row (no cross-example attention where supported).")
    group_by_length: bool = Field(True, description="Batch examples of similar length to cut padding.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many records.")
    cache_dir: Path | None = Field(
        None, description="Tokenization cache (default: $LLMKIT_CACHE_DIR, else ~/.cache/llmkit/data).", json_schema_extra=RESUMABLE
    )

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _as_list(value)


class LoraSpec(Section):
    """LoRA / QLoRA adapters through peft (pip install 'llmkit[lora]')."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Adapter scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Modules to adapt: 'all-linear' or a list of module names."
    )
    merge: bool = Field(False, description="Also write the adapter merged into a full model.")
    load_in_4bit: bool = Field(False, description="QLoRA: load the base model in 4-bit (needs CUDA and bitsandbytes).")


class TaskEval(Section):
    """Task metric on a validation sample during fine-tuning."""

    samples: int = Field(32, ge=0, description="Validation examples generated for the task metric (0 disables).", json_schema_extra=RESUMABLE)
    max_new_tokens: int = Field(64, ge=1, description="Generation length for the task metric.", json_schema_extra=RESUMABLE)


class FinetuneRecipe(Section):
    """`llmkit finetune`: fine-tune a checkpoint on a downstream task, full or LoRA."""

    stage: Literal["finetune"] = Field(description="Recipe kind.")
    output_dir: Path = Field(description="Run directory.")
    model: ModelSpec
    tokenizer: str | None = Field(None, description="Tokenizer (default: the one saved with model.path).")
    task: TaskSpec
    data: FinetuneData
    train: TrainConfig
    lora: LoraSpec = Field(default_factory=LoraSpec)
    task_eval: TaskEval = Field(default_factory=TaskEval)

    @model_validator(mode="after")
    def _check_model(self) -> FinetuneRecipe:
        if self.model.path is None:
            raise ValueError("model.path is required: the checkpoint to fine-tune")
        if self.model.type is not None:
            raise ValueError("model.type is for pretraining from scratch; fine-tuning starts from model.path")
        return self


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


class EvalModel(Section):
    """One or several checkpoints to score."""

    path: Union[str, list[str]] = Field(description="Checkpoint directory or hub id, or a list of them to compare.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype to run the model in.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = Field(
        "sdpa", description="Attention kernel."
    )

    @property
    def paths(self) -> list[str]:
        """The checkpoint paths as a list."""
        return [self.path] if isinstance(self.path, str) else list(self.path)


class EvalData(Section):
    """Test data: raw text for perplexity, task records for generation metrics."""

    test: SourceList = Field(description="Test sources.")
    text_field: str = Field("text", description="Field holding the text for perplexity.")
    seq_len: int | None = Field(None, ge=2, description="Perplexity window in tokens (default: model's max positions, at most 1024).")
    stride: int | None = Field(None, ge=1, description="Perplexity window stride (default: seq_len // 2); must be < seq_len.")
    max_samples: int | None = Field(None, ge=1, description="Score at most this many records.")
    batch_size: int = Field(8, ge=1, description="Windows (perplexity) or prompts (generation) per forward pass.")

    @field_validator("test", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _as_list(value)

    @model_validator(mode="after")
    def _check_stride(self) -> EvalData:
        if self.seq_len is not None and self.stride is not None and self.stride >= self.seq_len:
            raise ValueError(f"data.stride ({self.stride}) must be smaller than data.seq_len ({self.seq_len})")
        return self


class GenerationSpec(Section):
    """Decoding settings for generation-based metrics and `llmkit generate`."""

    max_new_tokens: int = Field(64, ge=1, description="Tokens to generate per prompt.")
    do_sample: bool = Field(False, description="Sample instead of greedy / beam search.")
    num_beams: int = Field(1, ge=1, description="Beam width (1 = no beam search).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(50, ge=0, description="Sample among the k most likely tokens (0 = all).")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalty on repeated tokens (1 = none).")
    stop: list[str] = Field(default_factory=list, description="Stop strings; generation ends at the first.")
    seed: int = Field(1234, description="Sampling seed.")


class RougeSpec(Section):
    """ROUGE options."""

    bootstrap_samples: int = Field(0, ge=0, description="Bootstrap resamples for a confidence interval (0 = none).")
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of the bootstrap interval.")
    seed: int = Field(1234, description="Bootstrap seed.")


class EvalRecipe(Section):
    """`llmkit eval`: score checkpoints by perplexity, ROUGE and task metrics."""

    stage: Literal["eval"] = Field(description="Recipe kind.")
    output_dir: Path = Field(description="Where metrics.json, predictions.jsonl and comparisons go.")
    model: EvalModel
    tokenizer: str | None = Field(None, description="Tokenizer (default: the one saved with each model).")
    data: EvalData
    metrics: list[Literal["perplexity", "rouge", "accuracy", "exact_match", "bleu"]] = Field(
        min_length=1, description="Metrics to compute."
    )
    task: TaskSpec | None = Field(
        None, description="Prompt format for generation metrics (default: the task in the model's recipe.yaml)."
    )
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    rouge: RougeSpec = Field(default_factory=RougeSpec)


Recipe = Union[TokenizerRecipe, PretrainRecipe, FinetuneRecipe, EvalRecipe]
RECIPE_CLASSES: dict[str, type[Section]] = {
    "tokenizer": TokenizerRecipe,
    "pretrain": PretrainRecipe,
    "finetune": FinetuneRecipe,
    "eval": EvalRecipe,
}


# --------------------------------------------------------------------------------------------
# Bundled recipes
# --------------------------------------------------------------------------------------------


def bundled_dir() -> Path:
    """Directory of the bundled recipes: inside the installed package, or recipes/ of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "recipes", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise RecipeError("the bundled recipes are missing from this installation; reinstall llmkit")


def bundled_names() -> list[str]:
    """Names of the bundled recipes, like 'pretrain/tiny'."""
    root = bundled_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def resolve_recipe_path(name_or_path: str | Path, stage: str | None = None) -> Path:
    """Find a recipe file: an existing path, or a bundled name ('pretrain/tiny', or 'tiny' for a stage)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.exists():
        raise RecipeError(f"{path}: is not a file; give a recipe .yaml file or a bundled recipe name")
    name = str(name_or_path).removesuffix(".yaml").removesuffix(".yml")
    root = bundled_dir()
    for candidate in ([f"{stage}/{name}"] if stage else []) + [name]:
        if (root / f"{candidate}.yaml").is_file():
            return root / f"{candidate}.yaml"
    # Suggest within the named stage ('pretrain/tinny' -> 'pretrain/tiny'), so a shared
    # 'pretrain/' prefix alone never makes an unrelated recipe look close.
    query_stage, _, query_stem = name.rpartition("/")
    query_stage = query_stage or stage
    same_stage = [n for n in bundled_names() if query_stage is None or n.startswith(f"{query_stage}/")]
    stems = {n.rpartition("/")[2]: n for n in same_stage}
    close = difflib.get_close_matches(query_stem, list(stems), n=1, cutoff=0.6)
    hint = f"; did you mean '{stems[close[0]]}'?" if close else ""
    raise RecipeError(
        f"{name_or_path}: no such recipe file or bundled recipe{hint}; `llmkit recipes list` shows the bundled ones"
    )


# --------------------------------------------------------------------------------------------
# Loading, overrides and error messages
# --------------------------------------------------------------------------------------------


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each dotted key path in a YAML document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*prefix, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*prefix, str(i))] = item.start_mark.line + 1
                walk(item, (*prefix, str(i)))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split 'a.b.c=value' into (['a', 'b', 'c'], parsed YAML value)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise RecipeError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {item!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply --set overrides to a raw recipe mapping (validation happens afterwards)."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {'.'.join(keys[: depth + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _section_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at `loc` (for did-you-mean on unknown keys)."""
    current: Any = cls
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _first_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _first_model(annotation: Any) -> Any:
    """The first BaseModel class inside an annotation such as `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(exc: ValidationError, cls: type[BaseModel], where: str, lines: dict) -> str:
    """Turn the first pydantic error into one line naming file, line, key and the fix."""
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "HubSource"))))
    dotted = ".".join(str(p) for p in loc)
    line = next((lines[tuple(str(p) for p in loc[:n])] for n in range(len(loc), 0, -1) if tuple(str(p) for p in loc[:n]) in lines), None)
    prefix = f"{where}:{line}" if line else where
    kind = err["type"]
    if kind == "extra_forbidden":
        section = _section_at(cls, loc)
        choices = list(section.model_fields) if section else []
        hint = did_you_mean(loc[-1], choices)
        if not hint and choices:
            hint = f"; valid keys here: {', '.join(choices)}"
        return f"{prefix}: {dotted}: unknown key{hint}"
    if kind == "missing":
        return f"{prefix}: {dotted}: required key is missing"
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
        hint = did_you_mean(err.get("input"), expected)
        return f"{prefix}: {dotted}: {err.get('input')!r} is not allowed (choose one of {', '.join(expected)}){hint}"
    if kind == "value_error":
        message = str(err.get("ctx", {}).get("error", err["msg"]))
        # Cross-field messages already name their keys ("train.warmup_steps (500) is larger than ...").
        return f"{prefix}: {message}" if not dotted or message.startswith(f"{dotted}.") else f"{prefix}: {dotted}: {message}"
    return f"{prefix}: {dotted}: {err['msg'].rstrip('.')} (got {err.get('input')!r})"


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None, stage: str | None = None) -> Recipe:
    """Load, override and validate a recipe; `stage` is the command that runs it."""
    path = resolve_recipe_path(name_or_path, stage)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.__class__.__name__}: {exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: invalid YAML at {_yaml_problem(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of keys, got {type(data).__name__}")
    return recipe_from_dict(apply_overrides(data, overrides or []), where=str(path), stage=stage, text=text)


def recipe_from_dict(data: dict[str, Any], where: str = "<recipe>", stage: str | None = None, text: str = "") -> Recipe:
    """Validate a raw recipe mapping against the schema of its stage."""
    lines = _key_lines(text) if text else {}
    kind = data.get("stage", stage)
    if kind is None:
        raise RecipeError(f"{where}: stage: required key is missing; add 'stage: {stage or 'pretrain'}' (one of {', '.join(STAGES)})")
    if kind not in RECIPE_CLASSES:
        raise RecipeError(f"{where}: stage: {kind!r} is not a stage{did_you_mean(kind, STAGES)}; choose one of {', '.join(STAGES)}")
    if stage is not None and kind != stage:
        raise RecipeError(f"{where}: this is a {kind} recipe; run it with `llmkit {'tokenizer train' if kind == 'tokenizer' else kind}`")
    data.setdefault("stage", kind)
    cls = RECIPE_CLASSES[kind]
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, cls, where, lines)) from None


def check_model_overrides(model: ModelSpec) -> None:
    """Check model.* keys against the transformers config class of model.type (or of model.path)."""
    overrides = model.config_overrides
    if not overrides:
        return
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model.type is not None:
        if model.type not in CONFIG_MAPPING:
            raise RecipeError(
                f"model.type: {model.type!r} is not a transformers model type{did_you_mean(model.type, list(CONFIG_MAPPING.keys()))}"
            )
        config = AutoConfig.for_model(model.type)
    else:
        return  # a checkpoint's config is checked when it is loaded
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}) or {})
    for key in overrides:
        if key not in known:
            raise RecipeError(
                f"model.{key}: unknown key for a {model.type} config{did_you_mean(key, sorted(known))}"
            )


def resumable_keys(cls: type[BaseModel], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Dotted keys (as tuples) of the fields marked RESUMABLE anywhere in a recipe class."""
    keys: set[tuple[str, ...]] = set()
    for name, field in cls.model_fields.items():
        if (field.json_schema_extra or {}).get("resumable"):
            keys.add((*prefix, name))
        sub = _first_model(field.annotation)
        if sub is not None and sub is not HubSource:
            keys |= resumable_keys(sub, (*prefix, name))
    return keys


def recipe_to_yaml(recipe: BaseModel) -> str:
    """The resolved recipe as YAML, every default filled in."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def schema_reference() -> str:
    """Markdown reference of every recipe key, its type, default and description (for the README)."""
    out: list[str] = []

    def emit(cls: type[BaseModel], prefix: str, seen: set) -> None:
        for name, field in cls.model_fields.items():
            sub = _first_model(field.annotation)
            key = f"{prefix}{name}"
            if sub is not None and sub is not HubSource and sub not in seen:
                emit(sub, f"{key}.", seen | {sub})
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            cells = [f"`{key}`", default.replace("|", "\\|"), (field.description or "").replace("|", "\\|")]
            out.append(f"| {' | '.join(cells)} |")
        if cls is ModelSpec:
            out.append(f"| `{prefix}<config key>` | | Any other key goes to the transformers config: hidden_size, num_hidden_layers, ... |")

    for stage, cls in RECIPE_CLASSES.items():
        out.append(f"\n### `{stage}` recipes\n\n| key | default | meaning |\n|---|---|---|")
        emit(cls, "", set())
    return "\n".join(out) + "\n"
