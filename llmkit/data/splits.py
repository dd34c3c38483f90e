"""The one held-out rule: which documents or records are set aside for validation.

    llmkit pretrain pretrain/tiny --set data.validation=null --set data.validation_fraction=0.05

Each item is scored by a hash of (seed, its index in the source order): a pure function, so the
split is the same on every process, on every resume, and whether the corpus is streamed or not.
A streamed corpus (pretraining, tokenizer reports) holds out every item whose score is below the
fraction; a record set of known size (fine-tuning) holds out exactly round(count * fraction) of them
(at least one), those with the lowest scores.

The bundled recipes validate on built-in text; `builtin_validation_warning` is the one-line warning
every training stage prints when data.train is the user's own data but data.validation is still
built-in (llmkit does not swap the split silently: the fix is one --set, shown in the warning).
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


def _source_name(source) -> str:
    """A source as written: a path, glob or builtin:/hub: string, a hub mapping's id, a weighted entry's path."""
    if isinstance(source, str):
        return source
    if getattr(source, "hub", None):
        return f"hub:{source.hub}"
    return str(getattr(source, "path", source))


def builtin_validation_warning(data) -> str | None:
    """A warning when data.train is the user's own data but data.validation still names built-in corpora.

    The bundled recipes validate on built-in text (builtin:pydoc/validation); overriding only
    data.train would score the tokenizer report, val_ppl and the task metric on Python's docs.
    """
    validation = [_source_name(s) for s in (getattr(data, "validation", None) or [])]
    train = [_source_name(s) for s in data.train]
    if not validation or not all(v.startswith("builtin:") for v in validation):
        return None
    if any(t.startswith("builtin:") for t in train):
        return None
    fix = (
        "--set data.validation=null --set data.validation_fraction=0.05 (holds out 5% of data.train)"
        if hasattr(data, "validation_fraction")
        else "--set data.validation=null (holds out 1 in 20 training documents)"
    )
    return (
        f"warning: data.validation is {', '.join(validation)} (built-in text) while data.train is your data, "
        f"so validation measures the wrong text; set data.validation to your held-out files, or {fix}"
    )
