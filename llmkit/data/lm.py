"""Language-modelling data: tokenization with a fingerprinted on-disk cache, packing, streaming.

    llmkit data prepare pretrain/tiny      # tokenize once, ahead of (multi-GPU) training
    llmkit pretrain pretrain/tiny          # reuses the cache and says so

Tokenization. Each document becomes exactly what `tokenizer(text)` returns (BOS included when the
tokenizer adds one) followed by EOS. The token ids of all documents are appended to one flat file
(uint16 or uint32), with the start offset of every document in a second file, so corpora larger
than RAM are tokenized in a single streaming pass and read back memory-mapped. The cache directory
is keyed on the sources (identity, size, mtime), the text field, max_samples, the validation split
and the tokenizer's full definition; seq_len is not part of the key, because packing is a view.

Packing. Block i holds tokens [i*seq_len, (i+1)*seq_len) of the flat stream: documents are
separated by EOS, no token is dropped except the final partial block (counts are reported).
With data.doc_masking = position_ids each block carries position ids that restart at every
document; with attention, attention also stays within each document (transformers builds that
mask from the restarting position ids for sdpa, eager, flex and flash attention).

Streaming (data.streaming: true). Nothing is cached: documents are read and tokenized on the fly
into the same blocks, in corpus order, epoch after epoch. The position after each block
({epoch, document index, token offset}) is saved in checkpoints, so resuming skips the documents
already consumed without tokenizing them again.

Multi-process runs. The main process builds the cache; the others wait by polling the cache
directory (no collective operation is involved, so a long tokenization never hits a distributed
timeout), then read it.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmkit import dist
from llmkit.data import mixture, sources
from llmkit.data.batches import TrainData, shuffled_batch_order
from llmkit.data.cache import build_once, cache_root, entry_name, tokenizer_fingerprint
from llmkit.data.packing import ConcatBlocks, PackedBlocks, PackStats, block_positions, collate_blocks
from llmkit.data.splits import held_out
from llmkit.errors import DataError, RecipeError

CACHE_VERSION = 2
"""Bump when the cached token layout changes, so old entries are not reused (2: verified file sizes)."""


def check_lm_data(recipe) -> None:
    """RecipeError or DataError for sources that are missing, or settings that cannot hold out a validation split."""
    data = recipe.data
    if data.streaming and data.validation_fraction > 0 and not data.validation:
        raise RecipeError(
            "data.validation_fraction cannot hold out documents of a streamed corpus; give data.validation instead"
        )
    sources.check_sources(data.train)
    if data.validation:
        sources.check_sources(data.validation)


def check_blocks(stats: PackStats, recipe, world_size: int = 1) -> None:
    """DataError when the corpus cannot fill one optimizer step."""
    train = recipe.train
    needed = train.micro_batch_size * train.grad_accum_steps * world_size
    if stats.blocks < needed:
        raise DataError(
            f"data.train: the corpus has {stats.tokens:,} tokens = {stats.blocks} blocks of {stats.seq_len}, fewer than one "
            f"optimizer step needs ({needed} = micro_batch_size x grad_accum_steps x processes); add data or lower data.seq_len"
        )


# ----------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------


def stream_blocks(recipe, tokenizer):
    """A `TrainData.stream` function: (position or None) -> iterator of (block, position after it)."""
    import numpy as np

    data = recipe.data
    seq_len = data.seq_len
    encoder = DocumentEncoder(tokenizer)
    positions = data.doc_masking != "none"

    def stream(position: dict | None) -> Iterator[tuple[dict[str, Any], dict]]:
        """Blocks from `position` on, each with the position just after it."""
        epoch = position["epoch"] if position else 0
        doc, offset = (position["doc"], position["offset"]) if position else (0, 0)
        while True:
            buffer: list[int] = []
            starts: list[int] = []  # document starts inside the buffer
            # (doc index, offset) of the token at buffer[0], to name the position after each block
            head_doc, head_offset = doc, offset
            lengths: list[int] = []
            texts = sources.iter_texts(
                data.train, text_field=data.text_field, max_samples=data.max_samples, encoding_errors=data.encoding_errors
            )
            produced = False
            skip = doc
            for batch in _batched(texts, ENCODE_BATCH):
                if skip >= len(batch):
                    skip -= len(batch)  # documents consumed before the resume point: not tokenized again
                    continue
                batch, skip = batch[skip:], 0
                for ids in encoder.encode(batch):
                    if offset:
                        ids, offset = ids[offset:], 0
                        starts.append(-1)  # continues a document from the previous block: no start here
                    else:
                        starts.append(len(buffer))
                    lengths.append(len(ids))
                    buffer.extend(ids)
                    while len(buffer) >= seq_len:
                        block = np.asarray(buffer[:seq_len], dtype=np.int64)
                        example: dict[str, Any] = {"input_ids": block}
                        if positions:
                            # 0 is always a start: a document carried over from the previous block restarts there.
                            doc_starts = np.asarray(sorted({0, *(s for s in starts if 0 <= s < seq_len)}), dtype=np.int64)
                            example["position_ids"] = block_positions(doc_starts, 0, seq_len)
                        # Advance the head past seq_len tokens to find where the next block starts.
                        remaining = seq_len
                        while remaining:
                            take = min(remaining, lengths[0])
                            remaining -= take
                            if take == lengths[0]:
                                lengths.pop(0)
                                head_doc, head_offset = head_doc + 1, 0
                            else:
                                lengths[0] -= take
                                head_offset += take
                        buffer = buffer[seq_len:]
                        starts = [s - seq_len for s in starts if s - seq_len >= 0]
                        produced = True
                        yield example, {"epoch": epoch, "doc": head_doc, "offset": head_offset}
            if not produced and doc == 0 and offset == 0:
                raise DataError(f"data.train: the corpus holds fewer than {seq_len} tokens, not one block of data.seq_len")
            # The final partial block of an epoch is dropped, as in the cached path.
            epoch, doc, offset = epoch + 1, 0, 0

    return stream


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def lm_train_data(recipe, tokenizer, world_size: int | None = None):
    """The TrainData of a pretraining recipe: cached packed blocks (or a stream) plus validation blocks."""
    data = recipe.data
    if world_size is None:
        world_size = dist.world_size()
    positions = data.doc_masking != "none"
    collate = collate_blocks(data.doc_masking)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if data.is_mixture:
        return mixture_train_data(recipe, tokenizer, world_size, positions, collate, pad_id)
    if data.streaming:
        check_lm_data(recipe)
        validation = None
        if data.validation:
            validation = _memory_blocks(recipe, tokenizer, data.validation, positions, pad_id)
        return TrainData(
            train=None,
            stream=stream_blocks(recipe, tokenizer),
            collate_fn=collate,
            validation=validation,
            description=f"streaming {data.train} in {data.seq_len}-token blocks (corpus order)",
        )
    path = prepare_cache(recipe, tokenizer)
    tokens, docs = open_cache(path, "train")
    train = PackedBlocks(tokens, docs, data.seq_len, positions=positions)
    stats = train.stats()
    dist.log("data: " + stats.line("train"))
    check_blocks(stats, recipe, world_size)
    validation = None
    val_tokens, val_docs = open_cache(path, "validation")
    if len(val_tokens):
        validation = PackedBlocks(val_tokens, val_docs, data.seq_len, positions=positions, keep_partial=True, pad_id=pad_id)
        dist.log("data: " + validation.stats().line("validation"))
    elif data.validation or data.validation_fraction:
        raise DataError("data.validation: no validation text found; check the sources or data.validation_fraction")
    return TrainData(
        train=train,
        collate_fn=collate,
        batch_order=shuffled_batch_order(len(train)),
        validation=validation,
        description=f"{stats.blocks:,} blocks of {data.seq_len} tokens ({stats.tokens:,} tokens)",
        extra={"pack_stats": asdict(stats), "cache": str(path)},
    )


def _memory_blocks(recipe, tokenizer, source_list, positions: bool, pad_id: int) -> PackedBlocks:
    """Validation blocks tokenized in memory (streaming runs keep their validation small)."""
    import numpy as np

    encoder = DocumentEncoder(tokenizer)
    flat: list[int] = []
    starts: list[int] = []
    texts = sources.iter_texts(source_list, text_field=recipe.data.text_field, encoding_errors=recipe.data.encoding_errors)
    for batch in _batched(texts, ENCODE_BATCH):
        for ids in encoder.encode(batch):
            starts.append(len(flat))
            flat.extend(ids)
    return PackedBlocks(
        np.asarray(flat, dtype=np.int64), np.asarray(starts, dtype=np.int64), recipe.data.seq_len,
        positions=positions, keep_partial=True, pad_id=pad_id,
    )


ENCODE_BATCH = 256  # documents per tokenizer call: large enough for the Rust thread pool, small in RAM


class DocumentEncoder:
    """Turns batches of texts into lists of token ids (each followed by EOS), as tokenizer(text) would."""

    def __init__(self, tokenizer) -> None:
        self.eos = tokenizer.eos_token_id
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            # A private copy without truncation or padding: documents are never cut here.
            self.backend = Tokenizer.from_str(backend.to_str())
            self.backend.no_truncation()
            self.backend.no_padding()
            self.tokenizer = None
        else:
            self.backend = None
            self.tokenizer = tokenizer

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text with EOS appended (not doubled when the tokenizer already adds it)."""
        if self.backend is not None:
            ids = [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=True)]
        else:
            ids = self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        for doc in ids:
            if not doc or doc[-1] != self.eos:
                doc.append(self.eos)
        return ids


def _batched(items, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class TokenWriter:
    """Appends documents' token ids to `<name>.tokens.bin` and their start offsets to `<name>.docs.bin`."""

    def __init__(self, directory: Path, name: str, dtype) -> None:
        import numpy as np

        self.np = np
        self.dtype = dtype
        self.tokens = open(directory / f"{name}.tokens.bin", "wb")
        self.docs = open(directory / f"{name}.docs.bin", "wb")
        self.num_tokens = 0
        self.num_docs = 0

    def add(self, docs: list[list[int]]) -> None:
        """Append a batch of tokenized documents."""
        np = self.np
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        starts = self.num_tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=self.dtype, count=int(lengths.sum()))
        self.tokens.write(flat.tobytes())
        self.docs.write(starts.astype(np.int64).tobytes())
        self.num_tokens += int(lengths.sum())
        self.num_docs += len(docs)

    def close(self) -> None:
        """Flush and close both files."""
        for f in (self.tokens, self.docs):
            f.flush()
            os.fsync(f.fileno())
            f.close()


def token_dtype(tokenizer):
    """uint16 when every id fits, else uint32: half the disk and page cache for small vocabularies."""
    import numpy as np

    return np.uint16 if len(tokenizer) <= 65536 else np.uint32


def cache_key(recipe, tokenizer) -> str:
    """The cache entry name for a recipe's data with this tokenizer (seq_len is not part of it: packing is a view)."""
    data = recipe.data
    return entry_name("lm", {
        "version": CACHE_VERSION,
        "train": sources.fingerprint(
            data.train, text_field=data.text_field, max_samples=data.max_samples, **sources.decoding_settings(data.encoding_errors)
        ),
        "validation": sources.fingerprint(
            data.validation, text_field=data.text_field, **sources.decoding_settings(data.encoding_errors)
        ) if data.validation else None,
        "validation_fraction": data.validation_fraction if not data.validation else 0.0,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    })


def _build(recipe, tokenizer, target: Path) -> dict:
    """Tokenize train (and validation) sources into `target` (a fresh directory); return the metadata."""
    data = recipe.data
    dist.log(f"data: tokenizing {sources.source_names(data.train)[:120]} into the cache {target.parent}")
    dtype = token_dtype(tokenizer)
    encoder = DocumentEncoder(tokenizer)
    started = time.perf_counter()
    train = TokenWriter(target, "train", dtype)
    validation = TokenWriter(target, "validation", dtype)
    held = data.validation_fraction if not data.validation else 0.0
    index = 0
    texts = sources.iter_texts(
        data.train, text_field=data.text_field, max_samples=data.max_samples, encoding_errors=data.encoding_errors
    )
    for batch in _batched(texts, ENCODE_BATCH):
        docs = encoder.encode(batch)
        if held:
            keep = [held_out(index + i, held) for i in range(len(docs))]
            train.add([d for d, k in zip(docs, keep, strict=True) if not k])
            validation.add([d for d, k in zip(docs, keep, strict=True) if k])
        else:
            train.add(docs)
        index += len(docs)
    if data.validation:
        held_texts = sources.iter_texts(data.validation, text_field=data.text_field, encoding_errors=data.encoding_errors)
        for batch in _batched(held_texts, ENCODE_BATCH):
            validation.add(encoder.encode(batch))
    train.close()
    validation.close()
    seconds = time.perf_counter() - started
    meta = {
        "version": CACHE_VERSION,
        "dtype": "uint16" if dtype.__name__ == "uint16" else "uint32",
        "train": {"documents": train.num_docs, "tokens": train.num_tokens},
        "validation": {"documents": validation.num_docs, "tokens": validation.num_tokens},
        "sources": sources.describe(data.train),
        "validation_sources": sources.describe(data.validation) if data.validation else None,
        "validation_fraction": held,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seconds": round(seconds, 3),
        "tokens_per_s": round((train.num_tokens + validation.num_tokens) / max(seconds, 1e-9)),
    }
    if train.num_tokens == 0:
        raise DataError(f"data.train: the corpus holds no text in field {data.text_field!r}")
    dist.log(
        f"data: tokenized {train.num_docs:,} documents ({train.num_tokens:,} tokens) "
        f"in {seconds:.1f}s ({meta['tokens_per_s']:,} tokens/s)"
    )
    return meta


def prepare_cache(recipe, tokenizer, *, main_process: bool | None = None, poll_s: float = 2.0) -> Path:
    """The cache entry holding this recipe's tokenized data, built on a miss by the local main process."""
    check_lm_data(recipe)
    root = cache_root(recipe.data)
    name = cache_key(recipe, tokenizer)
    entry, meta, hit = build_once(root, name, lambda tmp: _build(recipe, tokenizer, tmp), main_process=main_process, poll_s=poll_s)
    if hit:
        dist.log(
            f"data: tokenization cache hit, skipping tokenization: {entry} "
            f"({meta['train']['tokens']:,} train tokens, {meta['validation']['tokens']:,} validation tokens)"
        )
    return entry


def open_cache(path: Path, split: str):
    """(tokens, doc_starts) arrays of a cached split, memory-mapped."""
    import numpy as np

    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    dtype = np.uint16 if meta["dtype"] == "uint16" else np.uint32
    if meta[split]["tokens"] == 0:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    tokens = np.memmap(path / f"{split}.tokens.bin", dtype=dtype, mode="r")
    docs = np.fromfile(path / f"{split}.docs.bin", dtype=np.int64)
    return tokens, docs


# ----------------------------------------------------------------------------------------------
# Weighted mixtures (llmkit/data/mixture.py)
# ----------------------------------------------------------------------------------------------


def _with_data(recipe, **data_fields):
    """The recipe with some data.* fields replaced: how one source of a mixture is cached or streamed alone."""
    return recipe.model_copy(update={"data": recipe.data.model_copy(update=data_fields)})


def _validation_set(parts: list[tuple[str, PackedBlocks]]):
    """(validation dataset, validation_parts) over named validation block sets; (None, None) for none."""
    if not parts:
        return None, None
    ranges, start = [], 0
    for label, blocks in parts:
        ranges.append((label, start, start + len(blocks)))
        start += len(blocks)
    return ConcatBlocks([blocks for _, blocks in parts]), ranges


def mixture_train_data(recipe, tokenizer, world_size: int, positions: bool, collate, pad_id: int) -> TrainData:
    """The TrainData of a weighted data.train: each source cached (or streamed) on its own, sampled by its share.

    Validation: a source's own `validation` sources, else (without data.validation) its held-out
    data.validation_fraction, reported as val_loss/LABEL; data.validation counts in val_loss only.
    """
    data, cfg = recipe.data, recipe.train
    mix = mixture.mixture_of(data)
    check_lm_data(recipe)
    for extra in mix.validation:
        if extra:
            sources.check_sources(extra)
    held = data.validation_fraction if not data.validation else 0.0
    shares = ", ".join(f"{label} {share:.0%}" for label, share in zip(mix.labels, mix.shares, strict=True))
    val_parts: list[tuple[str, PackedBlocks]] = []
    if data.streaming:
        streams = [stream_blocks(_with_data(recipe, train=[source], validation=None), tokenizer) for source in mix.sources]
        for label, extra in zip(mix.labels, mix.validation, strict=True):
            if extra:
                val_parts.append((label, _memory_blocks(recipe, tokenizer, extra, positions, pad_id)))
        if data.validation:
            val_parts.append(("", _memory_blocks(recipe, tokenizer, data.validation, positions, pad_id)))
        validation, ranges = _validation_set(val_parts)
        return TrainData(
            train=None, stream=mixture.interleave(streams, mix, cfg.seed, data.mixture_repeat), collate_fn=collate,
            validation=validation, validation_parts=ranges, report=mixture.stream_report(mix, cfg.seed, data.seq_len),
            description=f"streaming a mixture of {len(mix.labels)} sources ({shares}) in {data.seq_len}-token blocks",
            extra={"mixture_weights": dict(zip(mix.labels, mix.shares, strict=True))},
        )

    blocks, stats, entries = [], [], []
    for index, (label, source, extra) in enumerate(zip(mix.labels, mix.sources, mix.validation, strict=True)):
        path = prepare_cache(_with_data(recipe, train=[source], validation=extra, validation_fraction=0.0 if extra else held), tokenizer)
        tokens, docs = open_cache(path, "train")
        part = PackedBlocks(tokens, docs, data.seq_len, positions=positions)
        stats.append(part.stats())
        dist.log(f"data: {stats[-1].line(label)}")
        if len(part) == 0:
            raise DataError(f"data.train.{index} ({label}): {stats[-1].tokens:,} tokens, not one block of data.seq_len {data.seq_len}; add text to it or remove it")
        blocks.append(part)
        entries.append(str(path))
        val_tokens, val_docs = open_cache(path, "validation")
        if len(val_tokens):
            val_parts.append((label, PackedBlocks(val_tokens, val_docs, data.seq_len, positions=positions, keep_partial=True, pad_id=pad_id)))
    if data.validation:
        # Cached like a one-source corpus; its "train" split is the validation text.
        path = prepare_cache(_with_data(recipe, train=list(data.validation), validation=None, validation_fraction=0.0), tokenizer)
        tokens, docs = open_cache(path, "train")
        val_parts.append(("", PackedBlocks(tokens, docs, data.seq_len, positions=positions, keep_partial=True, pad_id=pad_id)))
    elif held and not val_parts:
        raise DataError("data.validation_fraction: no validation text was held out of any source; raise it or give data.validation")
    for label, part in val_parts:
        dist.log("data: " + part.stats().line(f"validation ({label or 'data.validation'})"))

    order = mixture.MixtureOrder([len(b) for b in blocks], mix.shares)
    total = PackStats(sum(s.documents for s in stats), sum(s.tokens for s in stats), data.seq_len, order.epoch_size, sum(s.dropped_tokens for s in stats))
    check_blocks(total, recipe, world_size)
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps * world_size  # blocks per optimizer step, all processes
    per_epoch = order.epoch_size // per_step * per_step  # blocks of a mixture epoch that fill whole steps
    report = mixture.cached_report(mix, order, cfg.seed, data.seq_len, per_epoch)
    planned = report(cfg.planned_steps(data.seq_len, world_size) * per_step)
    for line in mixture.report_lines(planned, "plans"):
        dist.log(line)
    mixture.check_repeats(planned, data.mixture_repeat)
    validation, ranges = _validation_set(val_parts)
    return TrainData(
        train=ConcatBlocks(blocks), collate_fn=collate, batch_order=order, validation=validation, validation_parts=ranges,
        report=report,
        description=f"mixture of {len(mix.labels)} sources ({shares}): {order.epoch_size:,} blocks of {data.seq_len} tokens per mixture epoch",
        extra={"pack_stats": {label: asdict(st) for label, st in zip(mix.labels, stats, strict=True)}, "cache": entries, "mixture_plan": planned},
    )
