"""The one held-out rule: which documents or records are set aside for validation.

    llmkit pretrain pretrain/tiny --set data.validation=null --set data.validation_fraction=0.05

Each item is scored by a hash of (seed, its index in the source order): a pure function, so the
split is the same on every process, on every resume, and whether the corpus is streamed or not.
A streamed corpus (pretraining, tokenizer reports) holds out every item whose score is below the
fraction; a record set of known size (fine-tuning) holds out exactly round(count * fraction) of them
(at least one), those with the lowest scores.
"""

from __future__ import annotations

import hashlib


def held_out_score(index: int, seed: int = 0) -> float:
    """A uniform number in [0, 1) fixed by (seed, index)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def held_out(index: int, fraction: float, seed: int = 0) -> bool:
    """Whether item `index` of a stream belongs to the held-out fraction."""
    return fraction > 0 and held_out_score(index, seed) < fraction


def held_out_indices(count: int, fraction: float, seed: int = 0) -> set[int]:
    """The indices of exactly max(1, round(count * fraction)) held-out items out of `count` (none for fraction 0)."""
    if fraction <= 0 or count == 0:
        return set()
    size = max(1, round(count * fraction))
    return set(sorted(range(count), key=lambda i: held_out_score(i, seed))[:size])
