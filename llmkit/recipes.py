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
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from llmkit.commands import RECIPE_KINDS, command_running
from llmkit.errors import RecipeError, did_you_mean

STAGES = RECIPE_KINDS
"""The recipe kinds (`stage:`), from the command table in llmkit/commands.py."""


RESUMABLE = {"resumable": True}
"""Marks a field that may change between an interrupted run and its resumption: it changes the
budget or the bookkeeping, not what a given step computes (see `resumable_keys`)."""


_SCIENTIFIC = re.compile(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+")


def _whole_number(value: Any) -> Any:
    """Let a count be written 1e6 or 2.5e9: YAML reads those as a string or a float, not an int.

    Parsed as an exact decimal, not through a float: 1e30 is 10**30, not 1000000000000000019884624838656.
    """
    from decimal import Decimal

    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        exact = Decimal(value.strip())
        return int(exact) if exact == exact.to_integral_value() else value
    if isinstance(value, float) and value.is_integer():
        return int(Decimal(repr(value)))
    return value  # anything else is left to the int check, which names the key


Count = Annotated[int, BeforeValidator(_whole_number)]
"""An integer count of steps, tokens or records that may also be written 1e6 or 2.5e9."""


def _pair(value: Any) -> Any:
    """Name the count when a pair is given too few or too many values ('needs 2 values, got 1')."""
    if isinstance(value, (list, tuple)) and len(value) != 2:
        raise ValueError(f"needs 2 values, got {len(value)}")
    return value


Beta = Annotated[float, Field(ge=0, lt=1)]
Betas = Annotated[tuple[Beta, Beta], BeforeValidator(_pair)]
"""Adam's (beta1, beta2): two decay rates in [0, 1)."""


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated, numbers are finite."""

    # allow_inf_nan=False: YAML reads .inf and .nan as floats, and `gt=0` lets inf through (train.lr: .inf).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


# --------------------------------------------------------------------------------------------
# Data sources
# --------------------------------------------------------------------------------------------


class HubSource(Section):
    """A dataset on the Hugging Face Hub (needs the network unless it is already cached)."""

    hub: str = Field(description="Hub dataset id, e.g. 'wikitext' or 'owner/name'.")
    name: str | None = Field(None, description="Dataset configuration name, e.g. 'wikitext-103-raw-v1'.")
    split: str = Field("train", description="Split to read.")
    streaming: bool = Field(True, description="Stream the dataset instead of downloading it whole.")
    max_samples: Count | None = Field(None, ge=1, description="Read at most this many records.")
    revision: str | None = Field(None, description="Dataset revision (branch, tag or commit).")


Source = Union[str, HubSource]
"""A local file, glob or directory; 'builtin:NAME[/SPLIT]'; 'hub:ID'; or a HubSource mapping."""


class MixtureEntry(Section):
    """What a weighted pretraining source adds to a plain one (see llmkit/data/mixture.py)."""

    weight: float | None = Field(None, gt=0, description="Share of the mixture's tokens (weights are normalised to sum to 1).")
    label: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="Name in reports and in val_loss/LABEL (default: from the path or hub id)."
    )
    validation: list[Source] | None = Field(None, description="This source's own validation text, reported as val_loss/LABEL.")

    @field_validator("validation", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _as_list(value)


class WeightedSource(MixtureEntry):
    """A local or built-in pretraining source with its share of the mixture: {path: prose/*.txt, weight: 0.7}."""

    path: str = Field(description="A local file, glob or directory, 'builtin:NAME[/SPLIT]' or 'hub:ID' (or a HubSource mapping with a weight).")
    weight: float = Field(gt=0, description="Share of the mixture's tokens (weights are normalised to sum to 1).")


class WeightedHubSource(HubSource, MixtureEntry):
    """A HubSource that may carry a mixture weight, a label and its own validation sources."""


def _source_tag(value: Any) -> str | None:
    """Which kind of source a data.train entry is, so a mistake is reported against the right schema."""
    if isinstance(value, dict):
        return "HubSource" if "hub" in value else "WeightedSource" if "path" in value else None
    if isinstance(value, HubSource):
        return "HubSource"
    return "WeightedSource" if isinstance(value, WeightedSource) else "str"


MixSource = Annotated[
    Union[Annotated[str, Tag("str")], Annotated[WeightedHubSource, Tag("HubSource")], Annotated[WeightedSource, Tag("WeightedSource")]],
    Discriminator(
        _source_tag,
        custom_error_type="source_kind",
        custom_error_message="a mapping source needs 'path' (with 'weight') or 'hub', e.g. {path: prose/*.txt, weight: 0.7}",
    ),
]
"""A pretraining source: a Source, or a weighted one ({path: ..., weight: ...} or a HubSource with weight)."""

SOURCE_MODELS = (HubSource, MixtureEntry)
"""Source mappings: listed as one key in the reference, never recursed into."""

SOURCE_TAGS: dict[str, type[Section] | None] = {"str": None, "HubSource": WeightedHubSource, "WeightedSource": WeightedSource}
"""Union tags that pydantic puts in an error's location; error messages leave them out."""


def _as_list(value: Any) -> Any:
    """Let a single source be written without list brackets."""
    return [value] if isinstance(value, (str, dict, *SOURCE_MODELS)) else value


SourceList = Annotated[list[Source], Field(min_length=1)]

EncodingErrors = Literal["strict", "replace", "skip"]
ChoiceLayout = Literal["auto", "generic", "arc", "hellaswag", "piqa", "winogrande", "mmlu"]
"""Multiple-choice record layouts (llmkit/metrics/choice.py); generic = {context, choices, label}."""
ENCODING_ERRORS_HELP = "Bytes in local files that are not UTF-8: strict = error naming the byte, replace = U+FFFD, skip = drop them."


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
    encoding_errors: EncodingErrors = Field("strict", description=ENCODING_ERRORS_HELP)
    max_samples: Count | None = Field(None, ge=1, description="Train on at most this many documents.")
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
    # The size dial (llmkit/scaling/shapes.py). Training turns it into explicit model.* sizes, which the
    # run directory's recipe.yaml records and compares on resume, so the dial keys themselves are
    # bookkeeping there (RESUMABLE): a changed dial that changes the model shows up as a changed size.
    target_params: Count | None = Field(
        None, ge=1, description="Size dial: build a model of about this many parameters (counted as param_convention), e.g. 20e6.",
        json_schema_extra=RESUMABLE,
    )
    depth: int | None = Field(
        None, ge=1, description="Size dial: layers; alone it sets hidden = aspect_ratio x depth (nanochat's rule).",
        json_schema_extra=RESUMABLE,
    )
    aspect_ratio: int = Field(64, ge=8, description="Size dial: hidden size per layer it aims for.", json_schema_extra=RESUMABLE)
    param_convention: Literal["total", "non_embedding", "matmul"] = Field(
        "non_embedding", description="Size dial: which count target_params means (non_embedding: no embedding or output matrix).",
        json_schema_extra=RESUMABLE,
    )

    @model_validator(mode="after")
    def _check_dial(self) -> ModelSpec:
        if self.path is not None and (self.target_params is not None or self.depth is not None):
            raise ValueError(
                "model.target_params / model.depth size a model built from model.type; a checkpoint (model.path) keeps its size"
            )
        return self

    @property
    def has_size_dial(self) -> bool:
        """Whether model.target_params or model.depth asks llmkit to choose the shape."""
        return self.target_params is not None or self.depth is not None

    @property
    def config_overrides(self) -> dict[str, Any]:
        """The extra keys meant for the transformers config."""
        return dict(self.model_extra or {})


class LMData(Section):
    """Language-modelling data: raw text packed into seq_len blocks."""

    train: Annotated[list[MixSource], Field(min_length=1)] = Field(
        description="Training sources; give each a weight ({path: ..., weight: 0.7}) to sample a mixture."
    )
    validation: list[Source] | None = Field(None, description="Validation sources.")
    validation_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Hold out this fraction of train documents when no validation is given."
    )
    text_field: str = Field("text", description="Field holding the text in structured sources.")
    encoding_errors: EncodingErrors = Field("strict", description=ENCODING_ERRORS_HELP)
    seq_len: int = Field(512, ge=8, description="Tokens per training sequence.")
    max_samples: Count | None = Field(None, ge=1, description="Use at most this many documents.")
    streaming: bool = Field(False, description="Tokenize on the fly instead of caching; for corpora larger than disk/RAM.")
    doc_masking: Literal["none", "position_ids", "attention"] = Field(
        "none",
        description="Packed-document boundaries: none, restart position ids per document, or also block cross-document attention.",
    )
    cache_dir: Path | None = Field(
        None, description="Tokenization cache (default: $LLMKIT_CACHE_DIR, else ~/.cache/llmkit/data).", json_schema_extra=RESUMABLE
    )
    mixture_repeat: Literal["warn", "error"] = Field(
        "warn", description="A mixture source too small for its share of the run: repeat it with a warning, or refuse.",
        json_schema_extra=RESUMABLE,
    )

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _as_list(value)

    @property
    def is_mixture(self) -> bool:
        """Whether data.train is a weighted mixture (every entry has a weight)."""
        return any(getattr(entry, "weight", None) is not None for entry in self.train)

    @model_validator(mode="after")
    def _check_mixture(self) -> LMData:
        weighted = [getattr(entry, "weight", None) is not None for entry in self.train]
        if any(weighted) and not all(weighted):
            index = weighted.index(False)
            raise ValueError(
                f"data.train.{index}: has no weight while other sources have one; give every source a weight, "
                f"e.g. {{path: {self.train[index] if isinstance(self.train[index], str) else '...'}, weight: 0.3}}"
            )
        for index, entry in enumerate(self.train):
            if isinstance(entry, MixtureEntry) and not any(weighted) and (entry.label or entry.validation):
                raise ValueError(f"data.train.{index}: label and validation belong to a weighted source; add a weight")
        return self


class TrainConfig(Section):
    """Optimisation, schedule, budget, checkpointing and logging."""

    max_steps: Count | None = Field(None, ge=1, description="Optimizer steps to run (or give max_tokens instead).", json_schema_extra=RESUMABLE)
    max_tokens: Count | None = Field(None, ge=1, description="Training budget in tokens (e.g. 1e6), instead of max_steps.", json_schema_extra=RESUMABLE)
    micro_batch_size: int = Field(8, ge=1, description="Sequences per device per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw, or muon on the blocks' hidden weight matrices with AdamW (train.lr) on the rest."
    )
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (of AdamW; with muon, of the embeddings, output layer, norms, biases).")
    min_lr: float = Field(0.0, ge=0, description="Learning rate at the end of a cosine/linear/wsd schedule.")
    schedule: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine", description="Learning-rate schedule after warmup; wsd = warmup, stable, then 1-sqrt decay over decay_fraction."
    )
    warmup_steps: Count = Field(0, ge=0, description="Linear warmup steps.")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of train.max_steps in the final decay to min_lr.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not applied to norms, biases, embeddings).")
    betas: Betas = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    muon_lr: float = Field(0.02, gt=0, description="muon: peak learning rate of the hidden matrices (Keller Jordan's Muon default).")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="muon: Nesterov momentum.")
    muon_weight_decay: float = Field(0.01, ge=0, description="muon: decoupled weight decay of the hidden matrices (times muon_lr).")
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = Field(
        "original", description="muon: per-shape lr scale, sqrt(max(1, out/in)) or 0.2*sqrt(max(out, in)) (torch.optim.Muon adjust_lr_fn)."
    )
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null disables.")
    seed: int = Field(1234, description="Seed for model init, data order and dropout.")
    save_every: Count = Field(500, ge=1, description="Save a resumable checkpoint every this many steps.", json_schema_extra=RESUMABLE)
    eval_every: Count = Field(500, ge=1, description="Run validation every this many steps.", json_schema_extra=RESUMABLE)
    eval_batches: Count | None = Field(None, ge=1, description="Cap validation at this many batches.", json_schema_extra=RESUMABLE)
    log_every: Count = Field(10, ge=1, description="Log training metrics every this many steps.", json_schema_extra=RESUMABLE)
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
    # RESUMABLE: scoring runs under inference_mode and draws no random numbers, so no step changes.
    evals: list[EvalTask] = Field(
        default_factory=list, description="Evaluations scored at every eval, as `llmkit eval` scores them (see docs/evaluation.md).",
        json_schema_extra=RESUMABLE,
    )

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "choice_eval" in data:
            raise ValueError(
                "train.choice_eval was replaced by train.evals: write "
                "'evals: [{name: choice, metrics: [multiple_choice], data: {test: SOURCE, max_samples: 100}}]'"
            )
        return data

    @model_validator(mode="after")
    def _check_budget(self) -> TrainConfig:
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("set train.max_steps or train.max_tokens")
        if self.max_steps is not None and self.max_tokens is not None:
            raise ValueError(
                f"train.max_steps ({self.max_steps}) and train.max_tokens ({self.max_tokens}) are both set; set one of "
                "them (a --set of one replaces the other written in the recipe file)"
            )
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) is larger than train.max_steps ({self.max_steps})"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) is larger than train.lr ({self.lr})")
        if self.schedule == "wsd" and self.max_steps is not None:
            check_wsd(self.warmup_steps, self.max_steps, self.decay_fraction)
        return self

    def planned_steps(self, seq_len: int, world_size: int = 1) -> int:
        """Optimizer steps of the run: max_steps, or max_tokens over the tokens of one step (rounded up)."""
        tokens_per_step = self.micro_batch_size * self.grad_accum_steps * seq_len * world_size
        return self.max_steps or -(-self.max_tokens // tokens_per_step)


MAX_STEPS = 10**12
"""More optimizer steps than any run takes (a million steps a second for ten days): a budget above is a typo."""


def check_step_count(train: TrainConfig, seq_len: int) -> None:
    """ValueError when the budget means more than MAX_STEPS optimizer steps (counted for one process, the most)."""
    steps = train.planned_steps(seq_len)
    if steps <= MAX_STEPS:
        return
    if train.max_tokens is not None:
        per_step = train.micro_batch_size * train.grad_accum_steps * seq_len
        raise ValueError(
            f"train.max_tokens ({train.max_tokens:.3g}) is {steps:.3g} optimizer steps of {per_step:,} tokens "
            f"(micro_batch_size x grad_accum_steps x data.seq_len), more than any run ({MAX_STEPS:.0e} steps); lower it"
        )
    raise ValueError(f"train.max_steps ({steps:.3g}) is more than any run takes ({MAX_STEPS:.0e} steps); lower it")


def wsd_decay_steps(max_steps: int, decay_fraction: float) -> int:
    """Steps in the final decay of the wsd schedule: decay_fraction of max_steps, at least one."""
    return max(1, round(decay_fraction * max_steps))


def check_wsd(warmup_steps: int, max_steps: int, decay_fraction: float) -> None:
    """ValueError when the warmup and the decay of a wsd schedule overlap."""
    decay = wsd_decay_steps(max_steps, decay_fraction)
    if warmup_steps + decay > max_steps:
        raise ValueError(
            f"train.warmup_steps ({warmup_steps}) + the wsd decay ({decay} steps = train.decay_fraction {decay_fraction} "
            f"x {max_steps} steps) is more than train.max_steps ({max_steps}); lower one of them"
        )


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
        check_step_count(self.train, self.data.seq_len)
        return self


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------


PreferenceLoss = Literal["dpo", "ipo", "simpo", "orpo"]
REFERENCE_FREE_LOSSES = ("simpo", "orpo")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 1.0}
"""task.beta when the recipe leaves it null (orpo has none: its rewards are plain average log-probs)."""
PREFERENCE_KEYS = ("loss", "beta", "label_smoothing", "simpo_gamma", "orpo_lambda", "reference")


class TaskSpec(Section):
    """A downstream task: how records become (prompt, target) pairs."""

    type: Literal["summarization", "instruction", "classification", "text", "preference"] = Field(
        description="Task kind (preference: {prompt or messages, chosen, rejected} pairs, trained with task.loss)."
    )
    prompt_template: str | None = Field(
        None, description="Prompt with {field} placeholders naming record fields (task default when null)."
    )
    target_field: str | None = Field(None, description="Record field holding the target (task default when null).")
    messages_field: str = Field("messages", description="Field of chat records (instruction and preference tasks).")
    text_field: str = Field("text", description="Field of raw-text records (text task).")
    labels: list[str] | None = Field(None, description="Classification label words (default: taken from the data).")
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens (default: target tokens only).")
    max_target_tokens: int | None = Field(None, ge=1, description="Longest target kept; longer targets are errors.")
    record_format: Literal["auto", "chat", "template"] = Field(
        "auto",
        description="Instruction and preference records: chat (messages) or template (prompt_template fields); auto reads the training data.",
    )
    train_on: Literal["all_assistant_turns", "last_assistant_turn"] = Field(
        "all_assistant_turns", description="Chat records: train every assistant reply, or only the last one."
    )
    system_prompt: str | None = Field(
        None, description="Instruction task: system message before every conversation that has none (also at generate)."
    )

    @model_validator(mode="after")
    def _check_chat_keys(self) -> TaskSpec:
        # These shape chat prompts; on another task they would be silently ignored.
        if self.type != "instruction":
            if self.record_format != "auto" and self.type != "preference":
                raise ValueError(f"task.record_format: {self.record_format!r} applies to the instruction and preference tasks only; drop it")
            if self.system_prompt is not None:
                raise ValueError("task.system_prompt applies to the instruction task only; drop it")
        return self

    loss: PreferenceLoss = Field(
        "dpo",
        description="Preference loss: dpo (sigmoid), ipo, and the reference-free simpo and orpo (see docs/finetuning.md).",
    )
    beta: float | None = Field(
        None, gt=0, description="Preference temperature beta (default: 0.1 for dpo and ipo, 2.0 for simpo; orpo has none)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="dpo and simpo: probability that a pair's preference label is flipped (conservative DPO)."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin gamma, in reward units (beta x average log-prob).")
    orpo_lambda: float = Field(0.1, gt=0, description="orpo: weight lambda of the odds-ratio term added to the chosen completion's NLL.")
    reference: Literal["cached", "live", "none"] = Field(
        "cached",
        description="dpo/ipo reference model: cached = its log-probs computed once into the data cache; live = kept in memory.",
    )

    @model_validator(mode="after")
    def _check_preference(self) -> TaskSpec:
        # A key that the task ignores is an error. "Given" is "differs from its default": the resolved
        # recipe.yaml of a run spells out every default, and must load again.
        given = {k for k in self.model_fields_set if getattr(self, k) != type(self).model_fields[k].default}
        if self.type != "preference":
            stray = [k for k in PREFERENCE_KEYS if k in given]
            if stray:
                raise ValueError(f"task.{stray[0]} applies to task.type: preference only (this task is {self.type})")
            return self
        stray = [k for k in ("target_field", "labels", "train_on_prompt", "max_target_tokens", "text_field", "train_on") if k in given]
        if stray:
            raise ValueError(
                f"task.{stray[0]} does not apply to task.type: preference (records hold prompt or messages, chosen and rejected)"
            )
        reference_free = self.loss in REFERENCE_FREE_LOSSES
        if self.reference == "none" and not reference_free:
            raise ValueError(
                f"task.reference: none, but task.loss {self.loss} compares with a reference model; "
                "use cached (the default) or live, or a reference-free loss (simpo, orpo)"
            )
        if reference_free and self.reference == "live":
            raise ValueError(f"task.reference: task.loss {self.loss} is reference-free and uses no reference model; remove task.reference")
        if self.loss == "orpo" and self.beta is not None:
            raise ValueError("task.beta: orpo has no beta; its odds-ratio term is weighted by task.orpo_lambda")
        if self.label_smoothing and self.loss not in ("dpo", "simpo"):
            raise ValueError(f"task.label_smoothing applies to dpo and simpo, not to task.loss {self.loss}")
        for key, loss in (("simpo_gamma", "simpo"), ("orpo_lambda", "orpo")):
            if key in given and self.loss != loss:
                raise ValueError(f"task.{key} applies to task.loss: {loss}, not {self.loss}")
        return self

    @property
    def preference_beta(self) -> float:
        """task.beta, or the default of task.loss."""
        return self.beta if self.beta is not None else DEFAULT_BETA[self.loss]

    @property
    def uses_reference(self) -> bool:
        """Whether this preference task compares with a reference model (dpo and ipo do)."""
        return self.type == "preference" and self.loss not in REFERENCE_FREE_LOSSES

    @model_validator(mode="after")
    def _check_labels(self) -> TaskSpec:
        # The same rule as labels taken from the data (llmkit/data/sft.py `label_set`): two or more, distinct.
        if self.type != "classification" or self.labels is None:
            return self
        words = [str(w).strip() for w in self.labels]
        if "" in words:
            raise ValueError("task.labels: a label is empty; give label words such as [positive, negative]")
        twice = next((w for i, w in enumerate(words) if w in words[:i]), None)
        if twice is not None:
            raise ValueError(f"task.labels: {twice!r} is listed twice")
        if len(words) < 2:
            raise ValueError(f"task.labels: classification needs at least 2 labels, got {len(words)} ({', '.join(words) or 'none'})")
        return self


class FinetuneData(Section):
    """Task records for fine-tuning."""

    train: SourceList = Field(description="Training sources (records with the task's fields).")
    validation: list[Source] | None = Field(None, description="Validation sources.")
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Hold out this fraction when no validation is given.")
    seq_len: int = Field(512, ge=8, description="Longest example in tokens; prompts are truncated to fit, targets never.")
    packing: bool = Field(False, description="Pack several examples per row (no cross-example attention where supported).")
    group_by_length: bool = Field(True, description="Batch examples of similar length to cut padding.")
    max_samples: Count | None = Field(None, ge=1, description="Use at most this many records.")
    encoding_errors: EncodingErrors = Field("strict", description=ENCODING_ERRORS_HELP)
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

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "task_eval" in data:
            raise ValueError(
                "task_eval was replaced by train.evals: write 'train: {evals: [{metrics: [rouge], "
                "data: {max_samples: 32}, generation: {max_new_tokens: 64}}]}' (no data.test = the run's validation records)"
            )
        return data

    @model_validator(mode="after")
    def _check_model(self) -> FinetuneRecipe:
        if self.model.path is None:
            raise ValueError("model.path is required: the checkpoint to fine-tune")
        if self.model.type is not None:
            raise ValueError("model.type is for pretraining from scratch; fine-tuning starts from model.path")
        if self.task.type == "preference" and self.data.packing:
            raise ValueError(
                "data.packing: preference pairs are batched padded, chosen and rejected side by side, so that no row mixes "
                "two pairs; set data.packing: false (data.group_by_length keeps the padding small)"
            )
        if self.lora.enabled and self.train.optimizer == "muon":
            raise ValueError(
                "train.optimizer: muon orthogonalizes whole weight matrices; LoRA adapters are low-rank factors, "
                "so use train.optimizer: adamw with lora.enabled (or full fine-tuning with muon)"
            )
        check_step_count(self.train, self.data.seq_len)
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

    test: SourceList | None = Field(None, description="Test sources (required in `llmkit eval`; in train.evals, null = the run's validation records).")
    text_field: str = Field("text", description="Field holding the text for perplexity.")
    encoding_errors: EncodingErrors = Field("strict", description=ENCODING_ERRORS_HELP)
    seq_len: int | None = Field(None, ge=2, description="Perplexity window in tokens (default: model's max positions, at most 1024).")
    stride: int | None = Field(None, ge=1, description="Perplexity window stride (default: seq_len // 2); must be < seq_len.")
    max_samples: Count | None = Field(None, ge=1, description="Score at most this many records.")
    batch_size: int = Field(8, ge=1, description="Windows (perplexity) or prompts (generation) per forward pass.")

    @field_validator("test", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return None if value is None else _as_list(value)

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


class ChoiceFields(Section):
    """Record fields of a generic multiple-choice layout, by role."""

    context: str | None = Field(None, description="Field with the question or context (default: question, context or query).")
    choices: str | None = Field(None, description="Field with the list of choices (default: choices).")
    label: str | None = Field(None, description="Field with the right choice: index, letter or text (default: label or answer).")


class ChoiceSpec(Section):
    """Multiple-choice and cloze scoring (metrics multiple_choice / cloze), as lm-evaluation-harness scores them."""

    layout: ChoiceLayout = Field("auto", description="Record layout; auto = recognised by the record's fields; a fields mapping implies generic.")
    fields: ChoiceFields | None = Field(None, description="Generic layout: which record fields hold context, choices and label.")
    num_fewshot: int = Field(0, ge=0, description="Solved examples put before each question.")
    fewshot_split: SourceList | None = Field(
        None, description="Where few-shot examples come from (default: data.test itself, leaving each question out of its own prompt)."
    )
    fewshot_seed: int | None = Field(1234, description="Seed of the few-shot draw (example i uses seed + i); null = the first num_fewshot (MMLU's dev-split convention).")
    pair_encoding: Literal["separate", "joint"] = Field(
        "separate", description="separate = context and choice tokenized apart; joint = lm-eval's encode-together-then-split (BOS kept while choice.add_bos is true)."
    )
    add_bos: bool = Field(True, description="Start each context with the tokenizer's BOS (if it adds one); false = lm-eval's default.")
    tasks: Literal["per_source", "pooled"] = Field(
        "per_source", description="Several data.test sources: score each as its own task and macro-average, or pool them as one task."
    )
    batch_size: int = Field(8, ge=1, description="Questions (all their choices in one row) or cloze texts per forward pass.")
    max_length: int | None = Field(None, ge=2, description="Window in tokens (default: the model's); longer contexts are cut from the left and counted.")

    @field_validator("fewshot_split", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return None if value is None else _as_list(value)

    @model_validator(mode="after")
    def _check_fields(self) -> ChoiceSpec:
        if self.fields is not None and self.layout not in ("auto", "generic"):
            raise ValueError(f"choice.fields names generic record fields; it does not apply to choice.layout {self.layout!r}")
        return self

    def field_names(self) -> dict[str, str]:
        """The fields mapping as {role: field} for the roles that are set."""
        return {} if self.fields is None else {k: v for k, v in self.fields.model_dump().items() if v is not None}


MetricName = Literal[
    "perplexity", "rouge", "accuracy", "exact_match", "bleu", "multiple_choice", "cloze", "generative", "preference",
]  # fmt: skip
"""The evaluators of llmkit/evals/ (its EVALUATORS registry holds one entry per name)."""

GSM8K_STRICT = r"#### (\-?[0-9\.\,]+)"
"""lm-eval gsm8k's strict-match filter: the number after '#### '."""


class PromptSpec(Section):
    """How a question becomes the model's input (multiple_choice and generative); recorded in metrics.json."""

    chat_template: bool = Field(False, description="Render the prompt through the tokenizer's chat template (lm-eval --apply_chat_template).")
    fewshot_as: Literal["text", "turns"] = Field(
        "text", description="Few-shot examples as one text before the question, or as user/assistant turns (needs chat_template)."
    )
    system_prompt: str | None = Field(None, description="A system message (with chat_template) or a line of text before the prompt.")

    @model_validator(mode="after")
    def _check_turns(self) -> PromptSpec:
        if self.fewshot_as == "turns" and not self.chat_template:
            raise ValueError("prompt.fewshot_as: turns are chat turns; set prompt.chat_template: true (or fewshot_as: text)")
        return self


class AnswerFilter(Section):
    """One way to read the answer out of a generation (an lm-eval filter); each gives its own score."""

    name: str = Field(description="Name of the score, e.g. strict-match (metrics.json: exact_match/NAME).")
    extract: Literal["regex", "last_number", "first_line", "choice_letter", "whole"] = Field(
        description="regex = lm-eval's regex filter; last_number = lm-eval gsm8k flexible-extract; first_line; "
        "choice_letter = the first standalone A-Z letter; whole = the stripped generation."
    )
    regex: str | None = Field(None, description="extract: regex: the pattern (its first non-empty group, else the whole match).")
    group_select: int = Field(0, description="extract: regex: which match to take (0 = first, -1 = last), as lm-eval's group_select.")
    fallback: str = Field("[invalid]", description="The answer when nothing matches (lm-eval's fallback; never equals a reference).")

    @model_validator(mode="after")
    def _check_regex(self) -> AnswerFilter:
        if (self.extract == "regex") != (self.regex is not None):
            raise ValueError(f"answer.filters ({self.name}): regex is set exactly when extract is regex")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"answer.filters ({self.name}): regex {self.regex!r} does not compile ({exc})") from None
        return self


def _gsm8k_filters() -> list[AnswerFilter]:
    return [
        AnswerFilter(name="strict-match", extract="regex", regex=GSM8K_STRICT),
        AnswerFilter(name="flexible-extract", extract="last_number"),
    ]


class AnswerSpec(Section):
    """Generative tasks (metric generative): few-shot prompt, generated answer, extracted and matched (lm-eval filters)."""

    prompt_template: str = Field("Question: {question}\nAnswer:", description="The question's text, {field} naming record fields (lm-eval gsm8k doc_to_text).")
    answer_field: str = Field("answer", description="Record field holding the reference answer (GSM8K: reasoning, then '#### N').")
    target_delimiter: str = Field(" ", description="Between a few-shot question and its answer (lm-eval target_delimiter).")
    fewshot_delimiter: str = Field("\n\n", description="After every solved few-shot example (lm-eval fewshot_delimiter).")
    num_fewshot: int = Field(0, ge=0, description="Solved examples put before each question.")
    fewshot_split: SourceList | None = Field(
        None, description="Where few-shot examples come from (default: data.test itself, leaving each question out of its own prompt)."
    )
    fewshot_seed: int | None = Field(1234, description="Seed of the few-shot draw (question i uses seed + i); null = the first num_fewshot.")
    add_bos: bool = Field(True, description="Start each prompt with the tokenizer's BOS (if it adds one); false = lm-eval's HF default.")
    filters: list[AnswerFilter] = Field(default_factory=_gsm8k_filters, min_length=1, description="How answers are extracted; each gives a score (default: gsm8k's strict-match and flexible-extract).")
    match: Literal["exact", "numeric"] = Field("exact", description="exact = lm-eval exact_match after the normalisation below; numeric = equal as numbers (',' and '$' dropped).")
    ignore_case: bool = Field(True, description="exact: compare lowercased (lm-eval exact_match ignore_case).")
    ignore_punctuation: bool = Field(False, description="exact: drop punctuation before comparing (lm-eval ignore_punctuation).")
    regexes_to_ignore: list[str] = Field(
        default_factory=lambda: [",", "\\$", "(?s).*#### ", "\\.$"],
        description="Patterns removed from answer and reference before comparing (lm-eval gsm8k's, which keeps the reference's number).",
    )

    @field_validator("fewshot_split", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return None if value is None else _as_list(value)

    @model_validator(mode="after")
    def _check_names(self) -> AnswerSpec:
        names = [f.name for f in self.filters]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise ValueError(f"answer.filters: the name {twice!r} is used twice; each filter's score needs its own name")
        for pattern in self.regexes_to_ignore:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"answer.regexes_to_ignore: {pattern!r} does not compile ({exc})") from None
        return self


class PreferenceEvalSpec(Section):
    """Options of the preference metric (accuracy and margin on {prompt, chosen, rejected} pairs)."""

    reference: str | None = Field(
        None, description="Model directory to measure margins against (DPO's log-ratios); null = reference-free log-prob margins."
    )


class EvalTask(Section):
    """One evaluation: metrics on test records, with the options of their evaluators (an eval recipe, a suite entry or a train.evals entry)."""

    name: str | None = Field(None, description="Label in tables and training logs (default: the test sources' names).")
    data: EvalData = Field(default_factory=EvalData, description="Test data.")
    metrics: list[MetricName] = Field(
        min_length=1, description="Metrics to compute; multiple_choice and cloze score log-likelihoods, generative extracts answers."
    )
    task: TaskSpec | None = Field(
        None, description="Prompt format for generation metrics (default: the task in the model's recipe.yaml)."
    )
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    rouge: RougeSpec = Field(default_factory=RougeSpec)
    choice: ChoiceSpec = Field(default_factory=ChoiceSpec)
    answer: AnswerSpec = Field(default_factory=AnswerSpec)
    prompt: PromptSpec = Field(default_factory=PromptSpec)
    preference: PreferenceEvalSpec = Field(default_factory=PreferenceEvalSpec)
    chance: float | None = Field(
        None, ge=0, lt=1, description="Accuracy of a blind guess, for the suite's centered accuracy (default: mean 1/choices; 0 for generative)."
    )

    @model_validator(mode="after")
    def _check_choice_metrics(self) -> EvalTask:
        if "multiple_choice" in self.metrics and "cloze" in self.metrics:
            raise ValueError("metrics: multiple_choice and cloze read data.test differently; run them as two evals")
        return self


class EvalRecipe(EvalTask):
    """`llmkit eval`: score checkpoints by perplexity, ROUGE, task, multiple-choice and generative metrics, or a suite."""

    stage: Literal["eval"] = Field(description="Recipe kind.")
    output_dir: Path = Field(description="Where metrics.json, predictions.jsonl and comparisons go.")
    model: EvalModel
    tokenizer: str | None = Field(None, description="Tokenizer (default: the one saved with each model).")
    metrics: list[MetricName] = Field(
        default_factory=list, description="Metrics to compute (required without suite); multiple_choice and cloze score log-likelihoods, generative extracts answers."
    )
    suite: list[EvalTask] = Field(
        default_factory=list, description="Several tasks scored in one run, each with the keys of an eval task; adds a suite score (macro and centered accuracy)."
    )

    @model_validator(mode="after")
    def _check_suite(self) -> EvalRecipe:
        if self.suite:
            if self.metrics:
                raise ValueError("metrics: a recipe with a suite lists its metrics in each suite entry; remove the top-level metrics")
            names = [t.name for t in self.suite if t.name]
            twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
            if twice is not None:
                raise ValueError(f"suite: two entries are named {twice!r}; give each a distinct name")
            for i, entry in enumerate(self.suite):
                if entry.data.test is None:
                    raise ValueError(f"suite.{i}.data.test: required key is missing")
            return self
        if not self.metrics:
            raise ValueError("metrics: required key is missing (or give a suite of tasks)")
        if self.data.test is None:
            raise ValueError("data.test: required key is missing")
        return self

    def tasks(self) -> list[EvalTask]:
        """The evaluations of the recipe: its suite, or itself as one task."""
        return list(self.suite) if self.suite else [self]


TrainConfig.model_rebuild()
PretrainRecipe.model_rebuild()
FinetuneRecipe.model_rebuild()


# --------------------------------------------------------------------------------------------
# Scaling-law sweeps
# --------------------------------------------------------------------------------------------

PositiveCount = Annotated[Count, Field(ge=1)]


class ScaleGrid(Section):
    """The points of a sweep: every size with every token budget, or sizes around each FLOP budget's optimum."""

    sizes: list[PositiveCount] | None = Field(
        None, description="Model sizes in parameters (as param_convention); each is trained on every grid.tokens budget."
    )
    tokens: list[PositiveCount] | None = Field(None, description="Training tokens of each point (its train.max_tokens).")
    flops: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] | None = Field(
        None, description="IsoFLOP budgets C in FLOPs, instead of sizes x tokens: each trains sizes_per_budget sizes on D = C / (6 N)."
    )
    sizes_per_budget: int = Field(5, ge=3, description="IsoFLOP: model sizes per budget, log-spaced around its expected optimum.")
    size_spread: float = Field(4.0, gt=1, description="IsoFLOP: the sizes run from optimum / size_spread to optimum x size_spread.")
    center_fit: str | None = Field(
        None, description="IsoFLOP: a fit.json (or sweep directory) whose law places the optimum (default: Epoch AI's Chinchilla refit)."
    )

    @model_validator(mode="after")
    def _check_mode(self) -> ScaleGrid:
        pairs = self.sizes is not None or self.tokens is not None
        if pairs and self.flops is not None:
            raise ValueError("give grid.sizes with grid.tokens, or grid.flops, not both")
        if not pairs and self.flops is None:
            raise ValueError("give grid.sizes and grid.tokens (every size x every budget), or grid.flops (IsoFLOP budgets)")
        if pairs and (not self.sizes or not self.tokens):
            missing = "grid.tokens" if self.sizes else "grid.sizes"
            raise ValueError(f"{missing} is missing or empty; a sizes x tokens grid needs both lists")
        for key in ("sizes", "tokens", "flops"):
            values = getattr(self, key)
            if values is not None and len(set(values)) != len(values):
                raise ValueError(f"grid.{key} lists a value twice ({values}); give each once")
        if self.flops is not None and not self.flops:
            raise ValueError("grid.flops is empty; give one or more FLOP budgets, e.g. [1e12, 3e12]")
        return self


class HpGrid(Section):
    """`llmkit scale hp`: a small learning-rate x batch grid at a few sizes, to fit your own lr and batch rule."""

    sizes: list[PositiveCount] = Field(description="Two or three small model sizes (as param_convention).")
    tokens_per_param: float = Field(20.0, gt=0, description="Training tokens of each run: this many per parameter (param_convention).")
    lrs: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        description="Peak learning rates tried at every size (train.muon_lr when the base trains with muon)."
    )
    batch_tokens: list[PositiveCount] = Field(description="Batches tried at every size, in tokens (rounded to whole sequences).")

    @model_validator(mode="after")
    def _check_grid(self) -> HpGrid:
        for key, need in (("sizes", 2), ("lrs", 3), ("batch_tokens", 1)):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"hp.{key} lists a value twice ({values}); give each once")
            if len(values) < need:
                raise ValueError(
                    f"hp.{key} has {len(values)} value(s); give at least {need}"
                    + (" (a rule in N needs two sizes)" if key == "sizes" else " (the best lr is the vertex of a parabola)" if key == "lrs" else "")
                )
        return self


class ScaleRecipe(Section):
    """`llmkit scale sweep`: pretraining runs of one base recipe over a grid of sizes and budgets, to fit L(N, D)."""

    stage: Literal["scale"] = Field(description="Recipe kind.")
    output_dir: Path = Field(description="Sweep directory: recipe.yaml, points/NAME/ (one pretrain run each), sweep.jsonl, sweep.csv.")
    base: str = Field(description="Pretrain recipe every point starts from: a YAML path or a bundled name (pretrain/tiny).")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Changes to the base for every point, by dotted key: {train.micro_batch_size: 4}."
    )
    grid: ScaleGrid = Field(description="The points. May grow between runs: finished points are kept.", json_schema_extra=RESUMABLE)
    param_convention: Literal["total", "non_embedding", "matmul"] = Field(
        "non_embedding", description="What N counts in the sizes, C = 6 N D and the fit: total, non_embedding (Kaplan) or matmul."
    )
    flop_convention: Literal["6N", "6N_output", "6N_attention", "M"] = Field(
        "6N", description="What C counts for IsoFLOP budgets: 6N, 6N_output (with the output layer), 6N_attention, or DeepSeek's M.",
    )
    lr_rule: Literal["constant", "inverse_sqrt", "deepseek", "step_law", "porian", "fitted"] = Field(
        "constant", description="Learning rate per point: constant, inverse_sqrt (x (N_base / N)^0.5), a published law, or fitted (hp_fit).",
    )
    batch_rule: Literal["constant", "deepseek", "step_law", "porian", "fitted"] = Field(
        "constant", description="Batch per point: the base's, a published law (tokens, rounded to whole sequences), or fitted (hp_fit).",
    )
    warmup_rule: Literal["fraction", "porian"] = Field(
        "fraction", description="Warmup per point: the base's share of the steps, or porian (warmup tokens = N).",
    )
    hp_fit: Path | None = Field(None, description="hp.json of `llmkit scale hp` for lr_rule / batch_rule fitted.")
    hp: HpGrid | None = Field(None, description="`llmkit scale hp`: the lr x batch grid that fits lr_rule / batch_rule fitted.")
    branch: bool = Field(
        False, description="One stable-phase (constant lr) run per size and a WSD cooldown branched from it at each token budget.",
    )
    allow_repeat: bool = Field(
        False, description="Allow points that need more tokens than data.train holds (it is repeated, epoch after epoch).",
        json_schema_extra=RESUMABLE,
    )


Recipe = Union[TokenizerRecipe, PretrainRecipe, FinetuneRecipe, EvalRecipe, ScaleRecipe]
RECIPE_CLASSES: dict[str, type[Section]] = {
    "tokenizer": TokenizerRecipe,
    "pretrain": PretrainRecipe,
    "finetune": FinetuneRecipe,
    "eval": EvalRecipe,
    "scale": ScaleRecipe,
}


def bundled_command_writing(output_dir: str | Path) -> str | None:
    """The command of the bundled recipe whose output_dir is `output_dir` ("llmkit tokenizer train tokenizer/tiny"
    for runs/tokenizer-tiny), or None: what to run first when a bundled recipe names a run that is not there yet."""
    target = Path(output_dir).as_posix().rstrip("/")
    root = bundled_dir()
    for name in bundled_names():
        try:
            data = yaml.safe_load((root / f"{name}.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and data.get("stage") in RECIPE_CLASSES and str(data.get("output_dir", "")).rstrip("/") == target:
            return f"llmkit {command_running(data['stage']).name} {name}"
    return None


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


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping that names a key twice (PyYAML would silently keep the last value)."""

    def __init__(self, key: str, line: int, first: int):
        super().__init__(f"line {line}: {key}: duplicate key (first at line {first})")
        self.key, self.line, self.first = key, line, first


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate mapping keys; a `<<:` merge may still be overridden."""

    def compose_document(self):
        """Compose as usual, and remember each mapping's dotted path for duplicate-key messages."""
        root = super().compose_document()
        self.mapping_paths: dict[int, tuple[str, ...]] = {}

        def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
            if isinstance(node, yaml.MappingNode):
                self.mapping_paths[id(node)] = path
                for key_node, value_node in node.value:
                    walk(value_node, (*path, str(key_node.value)))
            elif isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    walk(item, (*path, str(i)))

        if root is not None:
            walk(root, ())
        return root

    def construct_mapping(self, node, deep=False):
        """The mapping, after checking that no key is written twice (before merges are flattened in)."""
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    dotted = ".".join((*getattr(self, "mapping_paths", {}).get(id(node), ()), str(key)))
                    raise DuplicateKeyError(dotted, line, first_line[key])
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """yaml.safe_load, refusing duplicate keys (DuplicateKeyError)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split 'a.b.c=value' into (['a', 'b', 'c'], parsed YAML value)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise RecipeError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.lr=3e-4")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except DuplicateKeyError as exc:
        raise RecipeError(f"--set {item!r}: {key.strip()}.{exc.key}: duplicate key") from None
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
    overridden = {tuple(parse_override(item)[0]) for item in overrides}
    _one_budget(data, overridden)
    _one_size(data, overridden)
    return data


SIZE_KEYS = frozenset({
    "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim",
    "n_layer", "n_embd", "n_head", "n_inner",
})  # fmt: skip
"""model.* keys that give a shape by hand, for every family the size dial knows (llmkit/scaling/shapes.py checks it)."""


def _one_size(data: dict[str, Any], overridden: set[tuple[str, ...]]) -> None:
    """A --set of the size dial (model.target_params or model.depth) replaces the shape the recipe file gives.

    Bundled pretraining recipes spell out their shape, so without this `--set model.target_params=20e6`
    alone would contradict them; shape keys also given with --set stay and must agree with the dial.
    """
    model = data.get("model")
    if not isinstance(model, dict):
        return
    if not any(("model", k) in overridden and model.get(k) is not None for k in ("target_params", "depth")):
        return
    for key in SIZE_KEYS & set(model):
        if ("model", key) not in overridden:
            model.pop(key)


BUDGET_KEYS = ("max_steps", "max_tokens")
"""The two ways to give a training budget; a recipe gives one of them."""


def _one_budget(data: dict[str, Any], overridden: set[tuple[str, ...]]) -> None:
    """A --set of train.max_steps or train.max_tokens replaces the other one given in the recipe file.

    Every bundled recipe gives one of them, so `--set train.max_tokens=1e6` alone means "train on a
    million tokens" instead of being an error; setting both with --set is still an error.
    """
    train = data.get("train")
    if not isinstance(train, dict):
        return
    given = [k for k in BUDGET_KEYS if ("train", k) in overridden and train.get(k) is not None]
    if len(given) == 1:
        other = next(k for k in BUDGET_KEYS if k != given[0])
        if ("train", other) not in overridden:
            train.pop(other, None)


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


def _blamed_override(loc: tuple[str, ...], message: str, overrides: list[str]) -> str | None:
    """The --set item behind an error at `loc` (the last one wins), or None when the value came from the file.

    An override of the key itself or of a section above it is to blame; a cross-field error of a
    section ("train.warmup_steps (500) is larger than train.max_steps (100)") blames an override of
    a key the message names.
    """
    for item in reversed(overrides):
        keys = tuple(item.partition("=")[0].strip().split("."))
        if loc[: len(keys)] == keys or (keys[: len(loc)] == loc and ".".join(keys) in message):
            return item
    return None


def format_validation_error(
    exc: ValidationError, cls: type[BaseModel], where: str, lines: dict, overrides: list[str] | None = None
) -> str:
    """Turn the first pydantic error into one line naming file, line (or the --set to blame), key and the fix."""
    errors = exc.errors()
    err = errors[0]
    if err["type"] == "missing":
        # A misspelt key is both missing and unknown: the unknown one, with its did-you-mean, names the fix.
        err = next((e for e in errors if e["type"] == "extra_forbidden" and e["loc"][:-1] == err["loc"][:-1]), err)
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in SOURCE_TAGS)))
    dotted = ".".join(str(p) for p in loc)
    line = next((lines[tuple(str(p) for p in loc[:n])] for n in range(len(loc), 0, -1) if tuple(str(p) for p in loc[:n]) in lines), None)
    prefix = f"{where}:{line}" if line else where
    blamed = _blamed_override(tuple(str(p) for p in loc), str(err.get("ctx", {}).get("error", err["msg"])), overrides or [])
    if blamed is not None:
        prefix = f"--set {blamed}"  # the value is not on that line of the file: it came from the command line
    kind = err["type"]
    if kind == "extra_forbidden":
        # A source mapping's tag (see _source_tag) names its schema; the path to it runs through a list index.
        tag = next((SOURCE_TAGS[p] for p in err["loc"] if isinstance(p, str) and p in SOURCE_TAGS), None)
        section = tag or _section_at(cls, loc)
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


REPLACED_KEYS = (("task_eval",), ("train", "choice_eval"))
"""Keys that newer recipes refuse (naming their replacement) but that a run's recipe.yaml written
before the change still holds; they only chose what was evaluated, never what a step computes."""


def drop_replaced_keys(data: dict) -> dict:
    """`data` without REPLACED_KEYS (a run's recipe.yaml written by an older llmkit)."""
    out = dict(data)
    out.pop("task_eval", None)
    if isinstance(out.get("train"), dict):
        out["train"] = {k: v for k, v in out["train"].items() if k != "choice_eval"}
    return out


def load_recipe(
    name_or_path: str | Path, overrides: list[str] | None = None, stage: str | None = None, run_recipe: bool = False
) -> Recipe:
    """Load, override and validate a recipe; `stage` is the command that runs it.

    run_recipe=True reads a run directory's recipe.yaml: keys an older llmkit wrote and this one
    replaced (REPLACED_KEYS) are dropped instead of refused.
    """
    path = resolve_recipe_path(name_or_path, stage)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.__class__.__name__}: {exc})") from None
    try:
        data = load_yaml(text)
    except DuplicateKeyError as exc:
        raise RecipeError(f"{path}:{exc.line}: {exc.key}: duplicate key (first at line {exc.first})") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: invalid YAML at {_yaml_problem(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of keys, got {type(data).__name__}")
    if run_recipe:
        data = drop_replaced_keys(data)
    overrides = list(overrides or [])
    return recipe_from_dict(apply_overrides(data, overrides), where=str(path), stage=stage, text=text, overrides=overrides)


def recipe_from_dict(
    data: dict[str, Any], where: str = "<recipe>", stage: str | None = None, text: str = "", overrides: list[str] | None = None
) -> Recipe:
    """Validate a raw recipe mapping against the schema of its stage; `overrides` are the --set items applied to it."""
    lines = _key_lines(text) if text else {}
    kind = data.get("stage", stage)
    if kind is None:
        raise RecipeError(f"{where}: stage: required key is missing; add 'stage: {stage or 'pretrain'}' (one of {', '.join(STAGES)})")
    if kind not in RECIPE_CLASSES:
        raise RecipeError(f"{where}: stage: {kind!r} is not a stage{did_you_mean(kind, STAGES)}; choose one of {', '.join(STAGES)}")
    if stage is not None and kind != stage:
        raise RecipeError(f"{where}: this is a {kind} recipe; run it with `llmkit {command_running(kind).name}`")
    data.setdefault("stage", kind)
    cls = RECIPE_CLASSES[kind]
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, cls, where, lines, overrides)) from None


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
        if sub is not None and not issubclass(sub, SOURCE_MODELS):
            keys |= resumable_keys(sub, (*prefix, name))
    return keys


def recipe_to_yaml(recipe: BaseModel) -> str:
    """The resolved recipe as YAML, every default filled in."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def schema_reference() -> str:
    """Markdown reference of every recipe key, its default and description (docs/recipes.md holds it)."""
    out: list[str] = []

    def emit(cls: type[BaseModel], prefix: str, seen: set) -> None:
        for name, field in cls.model_fields.items():
            sub = _first_model(field.annotation)
            key = f"{prefix}{name}"
            if sub is EvalTask:  # a list of eval tasks: its keys are the eval recipe's, listed there once
                keys = ", ".join(EvalTask.model_fields)
                out.append(f"| `{key}` | [] | {field.description} Each entry takes an eval task's keys ({keys}), as in `eval` recipes. |")
                continue
            if sub is not None and not issubclass(sub, SOURCE_MODELS) and sub not in seen:
                emit(sub, f"{key}.", seen | {sub})
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            cells = [f"`{key}`", default.replace("|", "\\|"), (field.description or "").replace("|", "\\|")]
            out.append(f"| {' | '.join(cells)} |")
            if sub is WeightedHubSource:  # the keys a weighted mixture entry adds
                for entry_key, entry_field in WeightedSource.model_fields.items():
                    entry_default = "required" if entry_field.is_required() else repr(entry_field.get_default())
                    out.append(f"| `{key}[].{entry_key}` | {entry_default} | {entry_field.description} |")
        if cls is ModelSpec:
            out.append(f"| `{prefix}<config key>` | | Any other key goes to the transformers config: hidden_size, num_hidden_layers, ... |")

    for stage, cls in RECIPE_CLASSES.items():
        out.append(f"\n### `{stage}` recipes\n\n| key | default | meaning |\n|---|---|---|")
        emit(cls, "", set())
    return "\n".join(out) + "\n"


REFERENCE_START = "<!-- recipe-reference:start -->"
REFERENCE_END = "<!-- recipe-reference:end -->"
"""The markers around the generated reference in docs/recipes.md; the text outside them is written by hand."""


def with_schema_reference(document: str, where: str) -> str:
    """`document` with the text between the reference markers replaced by `schema_reference()`."""
    start, end = document.find(REFERENCE_START), document.find(REFERENCE_END)
    if start < 0 or end < start:
        raise RecipeError(
            f"{where}: has no '{REFERENCE_START}' ... '{REFERENCE_END}' markers; add them where the reference goes"
        )
    head, tail = document[: start + len(REFERENCE_START)], document[end:]
    return f"{head}\n{schema_reference().strip()}\n{tail}"
