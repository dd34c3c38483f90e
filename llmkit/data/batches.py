"""What the training loop consumes: `TrainData` (examples, collate, batch order, validation) and batch orders.

    llmkit pretrain pretrain/tiny      # packed blocks, shuffled_batch_order
    llmkit finetune finetune/tiny-summarization   # examples, grouped_batch_order

Pretraining (llmkit/data/lm.py) and fine-tuning (llmkit/data/sft.py) build a `TrainData`; the loop
(llmkit/training/loop.py) reads it. A batch order is a pure function of (seed, epoch,
micro_batch_size), which is what makes resume exact: a resumed run recomputes the order and skips
the micro-batches already consumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import DataError

BatchOrder = Callable[[int, int, int], list[list[int]]]
"""`batch_order(seed, epoch, micro_batch_size) -> micro-batches`: lists of example indices, in order.

It must be a pure function of its arguments (no global RNG), because resume recomputes it and skips
the micro-batches already consumed. Micro-batch j of an epoch goes to process j % world_size; each
optimizer step takes grad_accum_steps micro-batches per process. Micro-batches left over at the end of
an epoch that do not fill a whole optimizer step on every process are not used in that epoch.
"""


Example = Mapping[str, Any]
"""One tokenized example: {"input_ids": list[int], "labels": list[int] (-100 = not trained on), ...}."""


Position = dict[str, Any]
"""A JSON-able position in a stream, e.g. {"epoch": 0, "doc": 1234, "offset": 56}."""


Stream = Callable[[Position | None], Iterator[tuple[Example, Position]]]
"""`stream(position) -> (example, position after it), ...` forever (epoch after epoch), from `position`
(None = the very beginning). Every process reads the same stream and keeps its share of it."""


@dataclass
class TrainData:
    """Everything `fit` needs to know about the data; pretraining and fine-tuning build it differently.

    train:           map-style dataset (len() and [i]) of tokenized examples (see `Example`); may also
                     hold extra keys such as "position_ids" that collate_fn understands.
    collate_fn:      list of examples -> dict of tensors with at least input_ids and labels (same
                     shape, -100 where nothing is trained: masked prompt tokens, padding) and optionally
                     attention_mask and position_ids, passed to the model as they are. Labels are NOT
                     shifted: the loop shifts them. Throughput counts attention_mask.sum() tokens when an
                     attention_mask is given, else every input id.
    batch_order:     see `BatchOrder`; default: `shuffled_batch_order(len(train))`. Must return the same
                     number of micro-batches every epoch.
    validation:      optional map-style dataset of examples, evaluated in order every eval_every steps
                     and at the end; the loss is token-weighted over every validation token.
    eval_collate_fn: collate for validation (default: collate_fn).
    stream:          instead of `train`, an endless `Stream` (pretraining with data.streaming); its
                     position is saved in checkpoints so that resume continues where it stopped.
    description:     one line for the log, e.g. "12,345 blocks of 128 tokens (1.58M tokens)".
    extra:           free-form facts recorded in summary.json (e.g. packing counts).
    validation_parts: optional named slices (label, start, end) of `validation`, each also reported
                     on its own as val_loss/LABEL (e.g. one per source of a mixture); validation
                     batches never cross a part boundary.
    report:          optional `report(examples consumed, stream position) -> {label: {...}}`: what
                     the first N global training examples held (a mixture's realised share of each
                     source); logged as a "mixture" event at the end and kept in summary.json.
    objective:       optional `objective(accelerator, model, cfg) -> Objective` (llmkit/training/loss.py):
                     what a step minimises when it is not the next-token NLL of the labels (preference
                     pairs: llmkit/training/preference.py). Default: the summed NLL per scored token.
    fingerprint:     optional {"files": {path: size and mtime}, "cache": [entry names]} of the training
                     data; saved in every checkpoint, and a resume whose data differ is refused.
    """

    train: Sequence[Example] | None
    collate_fn: Callable[[list[Example]], dict[str, Any]]
    batch_order: BatchOrder | None = None
    validation: Sequence[Example] | None = None
    eval_collate_fn: Callable[[list[Example]], dict[str, Any]] | None = None
    stream: Stream | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    validation_parts: list[tuple[str, int, int]] | None = None
    report: Callable[[int, Position | None], dict[str, Any]] | None = None
    objective: Callable[..., Any] | None = None
    fingerprint: dict[str, Any] | None = None


def check_same_data(saved: dict[str, Any] | None, now: dict[str, Any] | None, checkpoint) -> None:
    """DataError when the training data differ from those the checkpoint was trained on (N files named)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("files"), dict) or not now:
        return  # a checkpoint of an older llmkit, or data without a fingerprint
    was, is_ = saved["files"], now.get("files", {})
    changed = [p for p in is_ if p in was and was[p] != is_[p]]
    added, removed = [p for p in is_ if p not in was], [p for p in was if p not in is_]
    fix = ("restore the data it was trained on to resume, or start the run again on the new data with --overwrite "
           "(or give another output_dir)")
    if changed:
        what = f"{changed[0]} changed since the checkpoint {checkpoint} was written (now {is_[changed[0]]}; then {was[changed[0]]})"
    elif removed:
        what = f"{removed[0]} was part of the training data of the checkpoint {checkpoint} and is gone"
    elif added:
        what = f"{added[0]} is new: the checkpoint {checkpoint} was not trained with it"
    elif "cache" in saved and "cache" in now and saved["cache"] != now["cache"]:
        what = f"the tokenized training data differ from those of the checkpoint {checkpoint} (cache {now.get('cache')}, then {saved.get('cache')})"
    else:
        return
    more = len(changed) + len(added) + len(removed) - 1
    raise DataError(f"data.train: {what}{f' (and {more} more files)' if more > 0 else ''}; {fix}")


def shuffled_batch_order(num_examples: int) -> BatchOrder:
    """The default batch order: a permutation seeded by (seed, epoch), cut into micro-batches."""
    import numpy as np

    def order(seed: int, epoch: int, micro_batch_size: int) -> list[list[int]]:
        """Micro-batches of epoch `epoch`; a final incomplete micro-batch is left for the next epoch's shuffle."""
        perm = np.random.default_rng([seed, epoch]).permutation(num_examples).tolist()
        usable = len(perm) - len(perm) % micro_batch_size
        return [perm[i : i + micro_batch_size] for i in range(0, usable, micro_batch_size)]

    return order


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
