"""Packing: pretraining blocks over a flat token stream, fine-tuning rows of whole examples, and their collates.

    llmkit data prepare pretrain/tiny      # reports blocks and the tokens packing drops (the final partial block only)

Pretraining. Block i holds tokens [i*seq_len, (i+1)*seq_len) of the flat stream: documents are
separated by EOS, no token is dropped except the final partial block (counts are reported). With
data.doc_masking = position_ids each block carries position ids that restart at every document;
with attention, attention also stays within each document (transformers builds that mask from the
restarting position ids for sdpa, eager, flex and flash attention).

Fine-tuning. Whole examples are packed first-fit-decreasing into rows of at most seq_len tokens,
with position ids restarting per example and no attention mask, so transformers builds a
block-diagonal causal mask and examples never attend to each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
"""The label of a token that is not trained on (prompt, padding); cross-entropy skips it."""

@dataclass
class PackStats:
    """What packing did: every count a user needs to check that nothing was lost."""

    documents: int
    tokens: int
    seq_len: int
    blocks: int
    dropped_tokens: int

    def line(self, name: str) -> str:
        """One human-readable line."""
        return (
            f"{name}: {self.documents:,} documents, {self.tokens:,} tokens -> {self.blocks:,} blocks of {self.seq_len}; "
            f"dropped {self.dropped_tokens:,} tokens (the final partial block{'' if self.dropped_tokens else ': none'})"
        )


class PackedBlocks(Sequence):
    """Map-style dataset of seq_len blocks over a flat token array (memory-mapped from the cache).

    keep_partial pads the final partial block (labels -100 on the padding) instead of dropping it;
    validation uses it so that every validation token is scored.
    """

    def __init__(self, tokens, doc_starts, seq_len: int, *, positions: bool, keep_partial: bool = False, pad_id: int = 0):
        self.tokens = tokens
        self.doc_starts = doc_starts
        self.seq_len = seq_len
        self.positions = positions
        self.pad_id = pad_id
        full = len(tokens) // seq_len
        self.partial = keep_partial and len(tokens) % seq_len > 0
        self.num_blocks = full + int(self.partial)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers receive the dataset pickled: send the memory-mapped file's name, not
        # its contents (pickling a np.memmap copies the whole array).
        state = dict(self.__dict__)
        tokens = state["tokens"]
        if getattr(tokens, "filename", None):
            state["tokens"] = ("memmap", str(tokens.filename), tokens.dtype.str, len(tokens))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import numpy as np

        tokens = state["tokens"]
        if isinstance(tokens, tuple) and tokens[0] == "memmap":
            _, filename, dtype, length = tokens
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=(length,))
        self.__dict__.update(state)

    def stats(self) -> PackStats:
        """Counts of documents, tokens, blocks and dropped tokens."""
        dropped = 0 if self.partial else len(self.tokens) % self.seq_len
        return PackStats(len(self.doc_starts), len(self.tokens), self.seq_len, self.num_blocks, dropped)

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np

        if not 0 <= index < self.num_blocks:
            raise IndexError(index)
        start = index * self.seq_len
        ids = np.asarray(self.tokens[start : start + self.seq_len], dtype=np.int64)
        example: dict[str, Any] = {"input_ids": ids}
        if len(ids) < self.seq_len:
            pad = self.seq_len - len(ids)
            example["input_ids"] = np.concatenate([ids, np.full(pad, self.pad_id, dtype=np.int64)])
            example["labels"] = np.concatenate([ids, np.full(pad, -100, dtype=np.int64)])
        if self.positions:
            example["position_ids"] = block_positions(self.doc_starts, start, self.seq_len)
        return example


class ConcatBlocks(Sequence):
    """Several block datasets as one map-style dataset: part k's blocks follow part k-1's (a mixture's sources)."""

    def __init__(self, parts: Sequence[Sequence]) -> None:
        self.parts = list(parts)
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        import bisect

        if not 0 <= index < len(self):
            raise IndexError(index)
        k = bisect.bisect_right(self.offsets, index) - 1
        return self.parts[k][index - self.offsets[k]]


def block_positions(doc_starts, start: int, seq_len: int):
    """Position ids of the block starting at `start`: 0 at the block start and at every document start."""
    import numpy as np

    t = np.arange(start, start + seq_len, dtype=np.int64)
    # Index of the document each token belongs to; a document that began before the block restarts at 0.
    owner = np.searchsorted(doc_starts, t, side="right") - 1
    begin = np.maximum(np.asarray(doc_starts, dtype=np.int64)[np.maximum(owner, 0)], start)
    return t - begin


def collate_blocks(doc_masking: str = "none"):
    """Collate packed blocks into tensors: input_ids, labels (= input_ids unless given) and position ids.

    doc_masking "position_ids" passes an all-ones attention_mask so that transformers keeps plain
    causal attention across documents; "attention" passes none, and transformers then infers
    per-document attention from the restarting position ids.
    """

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack blocks into a batch of tensors."""
        import numpy as np
        import torch

        input_ids = torch.from_numpy(np.stack([e["input_ids"] for e in examples]))
        labels = torch.from_numpy(np.stack([e.get("labels", e["input_ids"]) for e in examples])).clone()
        batch = {"input_ids": input_ids, "labels": labels}
        if doc_masking != "none" and "position_ids" in examples[0]:
            batch["position_ids"] = torch.from_numpy(np.stack([e["position_ids"] for e in examples]))
            if doc_masking == "position_ids":
                batch["attention_mask"] = torch.ones_like(input_ids)
        return batch

    return collate


def pack_examples(examples: Sequence[dict], seq_len: int) -> list[dict]:
    """Pack examples into rows of at most seq_len tokens (first-fit decreasing); position ids restart per example.

    Deterministic, and every example lands in exactly one row.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
    packed = []
    for members in rows:
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for i in members:
            ids = examples[i]["input_ids"]
            row["input_ids"] += ids
            row["labels"] += examples[i]["labels"]
            row["position_ids"] += list(range(len(ids)))
        packed.append(row)
    return packed


def padded_collate(pad_id: int):
    """Collate that pads to the longest example of the micro-batch (right padding, labels -100)."""
    return _collate(pad_id, packed=False)


def packed_collate(pad_id: int):
    """Collate for packed rows: position ids instead of an attention mask, so examples stay isolated.

    With no attention mask, transformers reads the restarts of position_ids as sequence boundaries
    and builds a block-diagonal causal mask (masking_utils.find_packed_sequence_indices). A row's
    padding tail gets its own positions 0..k, so it is a separate (untrained) sequence too.
    """
    return _collate(pad_id, packed=True)


def _collate(pad_id: int, packed: bool):
    import torch

    def collate(rows: list[dict]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        extra = torch.zeros((len(rows), width), dtype=torch.long)  # position ids, or the attention mask
        for row, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[row, :n] = torch.tensor(r["input_ids"])
            labels[row, :n] = torch.tensor(r["labels"])
            if packed:
                extra[row, :n] = torch.tensor(r["position_ids"])
                extra[row, n:] = torch.arange(width - n)
            else:
                extra[row, :n] = 1
        return {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}

    return collate
