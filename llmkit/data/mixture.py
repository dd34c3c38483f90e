"""Weighted mixtures of pretraining sources: shares, the seeded block sampler, the streamed schedule, reports.

    llmkit pretrain recipes/pretrain/tiny-muon.yaml \
        --set 'data.train=[{path: builtin:pydoc/train, weight: 0.7}, {path: builtin:docsum/train, weight: 0.3}]'

A weight is a token share of the final mixture; weights are normalised to sum to 1. Every training
block holds data.seq_len tokens, so a token share is a block share.

Cached data (llmkit/data/lm.py). Each source is tokenized into its own cache entry and packed into
its own n_k blocks. A mixture epoch has as many blocks as all sources together, M = sum n_k; source
k contributes c_k of them, its share of M (largest-remainder rounding, so the c_k sum to M). Source
k's blocks are drawn in turn from an endless sequence of seeded permutations of its blocks (a fresh
permutation per pass), so no block of a source repeats before all of that source's blocks have been
used; the epoch's M blocks are then shuffled together. All of it is a pure function of (train.seed,
epoch), like the plain batch orders in llmkit/data/batches.py, so resume recomputes it and exact
resume holds.

Streamed data. The sources' block streams are interleaved in chunks of SCHEDULE_CHUNK blocks: each
chunk holds every source's share of the chunk, in an order seeded by (train.seed, chunk). The stream
position saved in checkpoints is the number of blocks served and each source's own stream position,
flattened into one object of integers.

Repetition. A source whose share of the run needs more blocks than it holds is repeated (later passes
use fresh permutations) with a warning, or refused (data.mixture_repeat: error): before training
for cached data, where the whole run's draw is known; when the source's stream wraps for streamed
data. At the end, the run logs each source's realised share of the trained tokens and the epochs
of the source that it used (a "mixture" event in metrics.jsonl, and summary.json).
"""

from __future__ import annotations

import glob
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from llmkit import dist
from llmkit.data.batches import Position, Stream
from llmkit.errors import DataError, RecipeError
from llmkit.recipes import HubSource, WeightedSource

SCHEDULE_CHUNK = 1000
"""Blocks per chunk of the streamed schedule: each chunk holds every source's share of it exactly."""

_SOURCE_SALT = 0x6D6978  # keeps a source's permutations apart from the epoch shuffle's seed sequence
_SCHEDULE_SALT = 0x736368


# ----------------------------------------------------------------------------------------------
# Which sources, what shares
# ----------------------------------------------------------------------------------------------


@dataclass
class Mixture:
    """The sources of a weighted data.train: labels, the weights as written, and normalised shares."""

    labels: list[str]
    weights: list[float]
    sources: list[Any]  # each entry as a plain source (str or HubSource) for the data layer
    validation: list[list | None]  # each entry's own validation sources

    @property
    def shares(self) -> list[float]:
        """Weights normalised to sum to 1."""
        total = sum(self.weights)
        return [w / total for w in self.weights]


def _derived_label(entry) -> str:
    """A short name for a source: the built-in corpus, the hub dataset, or the path before any glob."""
    if isinstance(entry, HubSource):
        text = entry.hub.rsplit("/", 1)[-1]
    else:
        text = entry.path if isinstance(entry, WeightedSource) else str(entry)
        if text.startswith("builtin:"):
            text = text.removeprefix("builtin:").split("/", 1)[0]
        elif text.startswith("hub:"):
            text = text.removeprefix("hub:").rsplit("/", 1)[-1]
        else:
            parts = [p for p in text.replace("\\", "/").split("/") if p not in ("", ".", "..")] or ["source"]
            plain = list(itertools.takewhile(lambda part: not glob.has_magic(part), parts))
            # A file or directory: its stem ("data/web.jsonl" -> "web"); a glob: the directory before
            # the pattern ("prose/*.txt" -> "prose").
            text = parts[-1].split(".", 1)[0] if len(plain) == len(parts) or not plain else plain[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "source"


def plain_source(entry):
    """A data.train entry as the data layer reads it: the path string, or a HubSource without mixture keys."""
    if isinstance(entry, WeightedSource):
        return entry.path
    if isinstance(entry, HubSource):
        return HubSource(**entry.model_dump(include=set(HubSource.model_fields)))
    return entry


def mixture_of(data) -> Mixture:
    """The Mixture of a weighted LMData.train; labels default to a name derived from each source, made unique."""
    explicit = [getattr(entry, "label", None) for entry in data.train]
    for index, label in enumerate(explicit):
        if label is not None and explicit.index(label) != index:
            raise RecipeError(f"data.train.{index}.label: {label!r} is already the label of data.train.{explicit.index(label)}; labels must differ")
    labels: list[str] = []
    for entry, label in zip(data.train, explicit, strict=True):
        if label is None:
            base = _derived_label(entry)
            label, n = base, 2
            while label in labels or label in explicit:
                label, n = f"{base}-{n}", n + 1
        labels.append(label)
    return Mixture(
        labels=labels,
        weights=[float(entry.weight) for entry in data.train],
        sources=[plain_source(entry) for entry in data.train],
        validation=[getattr(entry, "validation", None) for entry in data.train],
    )


def largest_remainder(shares: list[float], total: int) -> list[int]:
    """Integer counts summing to `total` that are as close as possible to shares * total (ties: lower index)."""
    exact = [s * total for s in shares]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    return counts


# ----------------------------------------------------------------------------------------------
# Cached data: the seeded block sampler
# ----------------------------------------------------------------------------------------------


class MixtureOrder:
    """The BatchOrder of a cached mixture over sources of `sizes` blocks, laid out one after another."""

    def __init__(self, sizes: list[int], shares: list[float]) -> None:
        self.sizes = list(sizes)
        self.offsets = [sum(self.sizes[:k]) for k in range(len(self.sizes))]
        self.epoch_size = sum(self.sizes)
        self.counts = largest_remainder(shares, self.epoch_size)

    def _draws(self, seed: int, k: int, start: int, count: int):
        """Blocks start .. start+count-1 of source k's endless sequence of seeded permutations (local indices)."""
        import numpy as np

        n, pieces, position = self.sizes[k], [], start
        while count > 0:
            passes, index = divmod(position, n)
            perm = np.random.default_rng([seed, _SOURCE_SALT, k, passes]).permutation(n)
            take = min(count, n - index)
            pieces.append(perm[index : index + take])
            position, count = position + take, count - take
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

    def epoch_blocks(self, seed: int, epoch: int):
        """The global block indices of mixture epoch `epoch`, shuffled: a pure function of (seed, epoch)."""
        import numpy as np

        drawn = [self._draws(seed, k, epoch * c, c) + self.offsets[k] for k, c in enumerate(self.counts)]
        blocks = np.concatenate(drawn).astype(np.int64)
        return blocks[np.random.default_rng([seed, epoch]).permutation(len(blocks))]

    def __call__(self, seed: int, epoch: int, micro_batch_size: int) -> list[list[int]]:
        """Micro-batches of epoch `epoch` (see `BatchOrder`); a final incomplete one is left out."""
        blocks = self.epoch_blocks(seed, epoch).tolist()
        usable = len(blocks) - len(blocks) % micro_batch_size
        return [blocks[i : i + micro_batch_size] for i in range(0, usable, micro_batch_size)]

    def source_of(self, blocks):
        """The source index of each global block index."""
        import numpy as np

        return np.searchsorted(np.asarray(self.offsets[1:], dtype=np.int64), np.asarray(blocks), side="right")

    def drawn(self, seed: int, consumed: int, per_epoch: int) -> list[int]:
        """Blocks of each source among the first `consumed` training blocks, `per_epoch` of them used per epoch."""
        import numpy as np

        counts = np.zeros(len(self.sizes), dtype=np.int64)
        epoch = 0
        while consumed > 0 and per_epoch > 0:
            take = min(consumed, per_epoch)
            counts += np.bincount(self.source_of(self.epoch_blocks(seed, epoch)[:take]), minlength=len(self.sizes))
            consumed, epoch = consumed - take, epoch + 1
        return counts.tolist()


def cached_report(mixture: Mixture, order: MixtureOrder, seed: int, seq_len: int, per_epoch: int) -> Callable[[int, Position | None], dict]:
    """`report(consumed blocks, position)` for a cached mixture (see TrainData.report)."""

    def report(consumed: int, position: Position | None = None) -> dict[str, Any]:
        drawn = order.drawn(seed, consumed, per_epoch)
        total = max(1, sum(drawn))
        return {
            label: {"weight": round(share, 6), "blocks": d, "tokens": d * seq_len, "share": round(d / total, 6),
                    "epochs": round(d / n, 4), "source_blocks": n}
            for label, share, d, n in zip(mixture.labels, mixture.shares, drawn, order.sizes, strict=True)
        }

    return report


def check_repeats(report: dict[str, Any], policy: str, what: str = "the run") -> None:
    """Warn about (or, with data.mixture_repeat: error, refuse) sources the run uses more than once."""
    for index, (label, row) in enumerate(report.items()):
        epochs = row.get("epochs")
        if epochs is None or epochs <= 1.0:
            continue
        line = (f"data.train.{index} ({label}): {row['source_blocks']:,} blocks, but its {row['weight']:.1%} share of "
                f"{what} draws {row['blocks']:,} of them ({epochs:.2f} epochs)")
        if policy == "error":
            raise DataError(f"{line}; add data, lower its weight or train.max_steps, or set data.mixture_repeat: warn to repeat it")
        dist.log(f"warning: {line}; repeating it (data.mixture_repeat: warn)")


def report_lines(report: dict[str, Any], verb: str = "plans") -> list[str]:
    """One line per source: realised share of the tokens, its weight, and the epochs of the source used."""
    lines = []
    for label, row in report.items():
        used = f"{row['epochs']:.2f} epochs of it" if row.get("epochs") is not None else f"in pass {row['passes']} of it"
        lines.append(f"mixture:          {label}: {row['share']:.1%} of the tokens the run {verb} "
                     f"(weight {row['weight']:.1%}; {row['tokens']:,} tokens, {used})")
    return lines


# ----------------------------------------------------------------------------------------------
# Streamed data: the seeded interleaving schedule
# ----------------------------------------------------------------------------------------------


class Schedule:
    """Which source serves block t of a streamed mixture: a pure function of (seed, t)."""

    def __init__(self, shares: list[float], seed: int, chunk: int = SCHEDULE_CHUNK) -> None:
        self.seed, self.chunk = seed, chunk
        self.counts = largest_remainder(shares, chunk)
        self._cached: tuple[int, list[int]] | None = None

    def _order(self, chunk_index: int) -> list[int]:
        import numpy as np

        if self._cached is None or self._cached[0] != chunk_index:
            slots = np.repeat(np.arange(len(self.counts)), self.counts)
            perm = np.random.default_rng([self.seed, _SCHEDULE_SALT, chunk_index]).permutation(len(slots))
            self._cached = (chunk_index, slots[perm].tolist())
        return self._cached[1]

    def source(self, t: int) -> int:
        """The source index of block t."""
        chunk_index, within = divmod(t, self.chunk)
        return self._order(chunk_index)[within]

    def served(self, t: int) -> list[int]:
        """Blocks each source served among the first t."""
        full, within = divmod(t, self.chunk)
        counts = [c * full for c in self.counts]
        for k in self._order(full)[:within]:
            counts[k] += 1
        return counts


def _flat_position(t: int, where: list[Position | None]) -> Position:
    """A mixture stream position as one flat object of integers (as checkpoints store stream positions):
    {"t": blocks served, "K.epoch": ..., "K.doc": ..., "K.offset": ...} for every source K already read."""
    flat = {"t": t}
    for k, position in enumerate(where):
        flat.update({f"{k}.{name}": value for name, value in (position or {}).items()})
    return flat


def _split_position(position: Position | None, count: int) -> tuple[int, list[Position | None]]:
    """(blocks served, each source's own position or None) of a flat mixture stream position."""
    where: list[Position | None] = [None] * count
    for key, value in (position or {}).items():
        if key != "t":
            k, name = key.split(".", 1)
            where[int(k)] = {**(where[int(k)] or {}), name: value}
    return (position or {}).get("t", 0), where


def interleave(streams: list[Stream], mixture: Mixture, seed: int, policy: str) -> Stream:
    """One Stream serving the sources' streams in the seeded schedule (position: see `_flat_position`)."""

    def stream(position: Position | None) -> Iterator[tuple[Any, Position]]:
        schedule = Schedule(mixture.shares, seed)
        t, where = _split_position(position, len(streams))
        opened: list[Iterator | None] = [None] * len(streams)
        warned = [False] * len(streams)
        while True:
            k = schedule.source(t)
            if opened[k] is None:
                opened[k] = streams[k](where[k])
            example, after = next(opened[k])
            if after.get("epoch", 0) > 0 and not warned[k]:
                warned[k] = True
                line = f"data.train.{k} ({mixture.labels[k]}): the stream ran through the whole source at mixture block {t:,}"
                if policy == "error":
                    raise DataError(f"{line}; add data or lower its weight, or set data.mixture_repeat: warn to repeat it")
                dist.log(f"warning: {line}; repeating it (data.mixture_repeat: warn)")
            where[k] = after
            t += 1
            yield example, _flat_position(t, where)

    return stream


def stream_report(mixture: Mixture, seed: int, seq_len: int) -> Callable[[int, Position | None], dict]:
    """`report(consumed blocks, position)` for a streamed mixture: shares from the schedule, passes from the position."""

    def report(consumed: int, position: Position | None = None) -> dict[str, Any]:
        served = Schedule(mixture.shares, seed).served(consumed)
        total = max(1, sum(served))
        _, where = _split_position(position, len(served))
        return {
            label: {"weight": round(share, 6), "blocks": s, "tokens": s * seq_len, "share": round(s / total, 6),
                    "epochs": None, "passes": (w or {}).get("epoch", 0) + 1}
            for label, share, s, w in zip(mixture.labels, mixture.shares, served, where, strict=True)
        }

    return report
