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

Memory. Tokenizer calls are bounded in characters, not documents, and documents longer than
~1 MB are tokenized in pieces cut where the ids cannot change (llmkit/data/tokens.py), with ids
written to disk as they come: peak memory does not grow with the corpus or its largest document.

Multi-process runs. The processes of a launch on one machine tokenize in parallel: documents are
dealt out in chunks of ~8 MB of text (chunk k to local rank k mod n), each process writes its own
part files, and local rank 0 joins them in corpus order into one entry, the same byte for byte as
a single process writes. No collective operation is involved (the processes coordinate through
files in the cache directory), so a long tokenization never hits a distributed timeout. On a
cache shared by several machines one machine claims the build and the others wait for it
(llmkit/data/cache.py `build_shared`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmkit import dist
from llmkit.data import mixture, sources
from llmkit.data.batches import TrainData, shuffled_batch_order
from llmkit.data.cache import build_shared, cache_root, entry_name, tokenizer_fingerprint
from llmkit.data.packing import ConcatBlocks, PackedBlocks, PackStats, block_positions, collate_blocks
from llmkit.data.splits import held_out
from llmkit.data.tokens import DocumentEncoder, TokenWriter, batched, token_dtype
from llmkit.errors import DataError, RecipeError

CACHE_VERSION = 3
"""Bump when the cached token layout changes, so old entries are not reused (2: verified file sizes; 3: checksums)."""


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


def training_files(recipe) -> dict[str, Any]:
    """The part of TrainData.fingerprint known before tokenizing: each training file's size and mtime."""
    data = recipe.data
    return {"files": sources.file_states(mixture.mixture_of(data).sources if data.is_mixture else data.train)}


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
            for batch in batched(texts):
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
            fingerprint={"files": sources.file_states(data.train)},
        )
    # The block count is checked before the entry is published: a corpus too small to train leaves no cache behind.
    path = prepare_cache(recipe, tokenizer, check=lambda meta: check_blocks(meta_stats(meta, "train", data.seq_len), recipe, world_size))
    tokens, docs = open_cache(path, "train")
    train = PackedBlocks(tokens, docs, data.seq_len, positions=positions)
    stats = train.stats()
    dist.log("data: " + stats.line("train"))
    check_blocks(stats, recipe, world_size)
    _log_epochs(recipe, stats.blocks, world_size)
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
        fingerprint={"files": sources.file_states(data.train), "cache": [path.name]},
    )


def _log_epochs(recipe, blocks: int, world_size: int) -> None:
    """Say how many passes over the corpus the budget means; a warning above one (blocks then repeat)."""
    cfg = recipe.train
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps * world_size
    steps = cfg.planned_steps(recipe.data.seq_len, world_size)
    epochs = steps * per_step / max(blocks, 1)
    line = f"the run's {steps:,} steps read {steps * per_step:,} blocks, {epochs:,.2f} epochs of the corpus ({blocks:,} blocks)"
    if epochs > 1:
        budget = "train.max_tokens" if cfg.max_tokens is not None else "train.max_steps"
        dist.log(f"warning: {line}; every block is trained about {epochs:,.0f} times: add data or lower {budget}")
    else:
        dist.log(f"data: {line}")


def _memory_blocks(recipe, tokenizer, source_list, positions: bool, pad_id: int) -> PackedBlocks:
    """Validation blocks tokenized in memory (streaming runs keep their validation small)."""
    import numpy as np

    encoder = DocumentEncoder(tokenizer)
    flat: list[int] = []
    starts: list[int] = []
    texts = sources.iter_texts(source_list, text_field=recipe.data.text_field, encoding_errors=recipe.data.encoding_errors)
    for batch in batched(texts):
        for ids in encoder.encode(batch):
            starts.append(len(flat))
            flat.extend(ids)
    return PackedBlocks(
        np.asarray(flat, dtype=np.int64), np.asarray(starts, dtype=np.int64), recipe.data.seq_len,
        positions=positions, keep_partial=True, pad_id=pad_id,
    )


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


CHUNK_CHARS = 8 << 20
"""Documents are dealt to the tokenizing processes in consecutive chunks of about this many characters."""


def _chunked(documents: Iterator[tuple[str, str]], chunk_chars: int) -> Iterator[tuple[int, str, str]]:
    """(chunk index, split, text): consecutive documents grouped into chunks of about chunk_chars characters."""
    chunk = chars = 0
    for split, text in documents:
        yield chunk, split, text
        chars += len(text)
        if chars >= chunk_chars:
            chunk, chars = chunk + 1, 0


class LMBuild:
    """Builds one pretraining cache entry: each process tokenizes every n-th chunk of documents, worker 0 merges.

    The merged files are the chunks in corpus order, so the entry is the same byte for byte whatever
    the number of processes (tests/test_data_scale.py checks 2 processes against 1).
    """

    def __init__(self, recipe, tokenizer, chunk_chars: int | None = None) -> None:
        self.recipe, self.tokenizer, self.chunk_chars = recipe, tokenizer, chunk_chars or CHUNK_CHARS
        self.dtype = token_dtype(tokenizer)
        self.started = time.perf_counter()

    def _documents(self) -> Iterator[tuple[str, str]]:
        """(split, text) for every document: the training sources (less the held-out fraction), then data.validation."""
        data = self.recipe.data
        held = data.validation_fraction if not data.validation else 0.0
        texts = sources.iter_texts(data.train, text_field=data.text_field, max_samples=data.max_samples, encoding_errors=data.encoding_errors)
        for index, text in enumerate(texts):
            yield ("validation" if held_out(index, held) else "train"), text
        if data.validation:
            for text in sources.iter_texts(data.validation, text_field=data.text_field, encoding_errors=data.encoding_errors):
                yield "validation", text

    def shard(self, tmp: Path, worker: int, workers: int) -> dict[str, Any]:
        """Tokenize chunks worker, worker + workers, ... into `tmp` (the final files when there is one worker)."""
        data = self.recipe.data
        if worker == 0:
            dist.log(f"data: tokenizing {sources.source_names(data.train)[:120]} into the cache {tmp.parent}"
                     + (f" with {workers} processes" if workers > 1 else ""))
        suffix = "" if workers == 1 else f".part{worker}"
        writers = {split: TokenWriter(tmp, split + suffix, self.dtype) for split in ("train", "validation")}
        encoder = DocumentEncoder(self.tokenizer)
        mine = (((chunk, split), text) for chunk, split, text in _chunked(self._documents(), self.chunk_chars) if chunk % workers == worker)
        rows: list[list[int]] = []  # [chunk, train tokens, train documents, validation tokens, validation documents]
        for (chunk, split), ids, first in encoder.pieces(mine):
            if not rows or rows[-1][0] != chunk:
                rows.append([chunk, 0, 0, 0, 0])
            writers[split].add_piece(ids, first)
            column = 1 if split == "train" else 3
            rows[-1][column] += len(ids)
            rows[-1][column + 1] += int(first)
        for writer in writers.values():
            writer.close()
        if encoder.unsplittable:
            dist.log(f"data: {encoder.unsplittable} long document(s) had no cut that keeps this tokenizer's ids; tokenized whole")
        return {"chunks": rows}

    def merge(self, tmp: Path, parts: list[dict[str, Any]], workers: int) -> dict[str, Any]:
        """Join the workers' chunks in corpus order into train/validation files; the entry's metadata."""
        import numpy as np

        totals = {"train": [0, 0], "validation": [0, 0]}
        if workers > 1:
            rows = sorted((row for part in parts for row in part["chunks"]), key=lambda row: row[0])
            for split, column in (("train", 1), ("validation", 3)):
                out = TokenWriter(tmp, split, self.dtype)
                # Token parts are read chunk by chunk with plain reads: a memory map would keep every page
                # it touched resident, and the merge touches all of them (peak RSS would grow with the corpus).
                token_parts = [open(tmp / f"{split}.part{k}.tokens.bin", "rb") for k in range(workers)]
                doc_parts = [np.fromfile(tmp / f"{split}.part{k}.docs.bin", dtype=np.int64) for k in range(workers)]
                cursors = [[0, 0] for _ in range(workers)]  # (token, document) read so far in each part
                for row in rows:
                    k, (tokens, docs) = row[0] % workers, row[column : column + 2]
                    t, d = cursors[k]
                    out.add_arrays(np.fromfile(token_parts[k], dtype=self.dtype, count=tokens), doc_parts[k][d : d + docs] - t)
                    cursors[k] = [t + tokens, d + docs]
                out.close()
                for f in token_parts:
                    f.close()
                for k in range(workers):
                    for kind in ("tokens", "docs"):
                        (tmp / f"{split}.part{k}.{kind}.bin").unlink()
        for split in totals:
            size = (tmp / f"{split}.tokens.bin").stat().st_size
            totals[split] = [size // np.dtype(self.dtype).itemsize, (tmp / f"{split}.docs.bin").stat().st_size // 8]
        data = self.recipe.data
        if totals["train"][0] == 0:
            raise DataError(f"data.train: the corpus holds no text in field {data.text_field!r}")
        seconds = time.perf_counter() - self.started
        all_tokens = totals["train"][0] + totals["validation"][0]
        meta = {
            "version": CACHE_VERSION,
            "dtype": np.dtype(self.dtype).name,
            "train": {"documents": totals["train"][1], "tokens": totals["train"][0]},
            "validation": {"documents": totals["validation"][1], "tokens": totals["validation"][0]},
            "sources": sources.describe(data.train),
            "validation_sources": sources.describe(data.validation) if data.validation else None,
            "validation_fraction": data.validation_fraction if not data.validation else 0.0,
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "processes": workers,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(all_tokens / max(seconds, 1e-9)),
        }
        dist.log(
            f"data: tokenized {totals['train'][1]:,} documents ({totals['train'][0]:,} tokens) "
            f"in {seconds:.1f}s ({meta['tokens_per_s']:,} tokens/s{f', {workers} processes' if workers > 1 else ''})"
        )
        return meta


def meta_stats(meta: dict[str, Any], split: str, seq_len: int) -> PackStats:
    """The PackStats of a cache entry's split, from its metadata alone (before any file is opened)."""
    tokens = meta[split]["tokens"]
    return PackStats(meta[split]["documents"], tokens, seq_len, tokens // seq_len, tokens % seq_len)


def prepare_caches(recipes: list, tokenizer, *, check=None, main_process: bool | None = None, poll_s: float = 2.0) -> list[Path]:
    """The cache entries of several recipes' data (a mixture's sources), built together; `check(metas)` before publishing.

    Under a launch of several processes, the processes of each machine tokenize shards in parallel
    (llmkit/data/cache.py `build_shared`); a DataError from `check` leaves the cache as it was.
    """
    for recipe in recipes:
        check_lm_data(recipe)
    root = cache_root(recipes[0].data)
    keys = [cache_key(recipe, tokenizer) for recipe in recipes]
    unique = list(dict.fromkeys(keys))  # a source listed twice is tokenized once
    builds = [(key, LMBuild(recipes[keys.index(key)], tokenizer)) for key in unique]
    role = {} if main_process is None else {"worker": 0 if main_process else 1, "workers": 1}
    checks = None if check is None else (lambda metas: check([metas[unique.index(key)] for key in keys]))
    built = build_shared(root, builds, check=checks, poll_s=poll_s, **role)
    results = [built[unique.index(key)] for key in keys]
    for entry, meta, hit in built:
        if hit:
            dist.log(
                f"data: tokenization cache hit, skipping tokenization: {entry} "
                f"({meta['train']['tokens']:,} train tokens, {meta['validation']['tokens']:,} validation tokens)"
            )
    return [entry for entry, _, _ in results]


def prepare_cache(recipe, tokenizer, *, check=None, main_process: bool | None = None, poll_s: float = 2.0) -> Path:
    """The cache entry holding this recipe's tokenized data, built on a miss (in parallel under a launch)."""
    checks = None if check is None else (lambda metas: check(metas[0]))
    return prepare_caches([recipe], tokenizer, check=checks, main_process=main_process, poll_s=poll_s)[0]


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
            fingerprint={"files": sources.file_states(mix.sources)},
        )

    specs = [_with_data(recipe, train=[source], validation=extra, validation_fraction=0.0 if extra else held)
             for source, extra in zip(mix.sources, mix.validation, strict=True)]
    if data.validation:
        # Cached like a one-source corpus; its "train" split is the validation text.
        specs.append(_with_data(recipe, train=list(data.validation), validation=None, validation_fraction=0.0))

    def check_sizes(metas: list[dict]) -> None:
        """The mixture's size checks on the entries' metadata, before any is published (exit 2 leaves no cache)."""
        found = [meta_stats(meta, "train", data.seq_len) for meta in metas[: len(mix.labels)]]
        _check_mixture(recipe, mix, found, world_size, log=False)

    paths = prepare_caches(specs, tokenizer, check=check_sizes)
    blocks, stats, entries = [], [], []
    for label, path in zip(mix.labels, paths, strict=False):
        tokens, docs = open_cache(path, "train")
        part = PackedBlocks(tokens, docs, data.seq_len, positions=positions)
        stats.append(part.stats())
        dist.log(f"data: {stats[-1].line(label)}")
        blocks.append(part)
        entries.append(str(path))
        val_tokens, val_docs = open_cache(path, "validation")
        if len(val_tokens):
            val_parts.append((label, PackedBlocks(val_tokens, val_docs, data.seq_len, positions=positions, keep_partial=True, pad_id=pad_id)))
    if data.validation:
        tokens, docs = open_cache(paths[-1], "train")
        val_parts.append(("", PackedBlocks(tokens, docs, data.seq_len, positions=positions, keep_partial=True, pad_id=pad_id)))
    elif held and not val_parts:
        raise DataError("data.validation_fraction: no validation text was held out of any source; raise it or give data.validation")
    for label, part in val_parts:
        dist.log("data: " + part.stats().line(f"validation ({label or 'data.validation'})"))
    order, planned, report = _check_mixture(recipe, mix, stats, world_size, log=True)
    validation, ranges = _validation_set(val_parts)
    return TrainData(
        train=ConcatBlocks(blocks), collate_fn=collate, batch_order=order, validation=validation, validation_parts=ranges,
        report=report,
        description=f"mixture of {len(mix.labels)} sources ({shares}): {order.epoch_size:,} blocks of {data.seq_len} tokens per mixture epoch",
        extra={"pack_stats": {label: asdict(st) for label, st in zip(mix.labels, stats, strict=True)}, "cache": entries, "mixture_plan": planned},
        fingerprint={"files": sources.file_states(mix.sources), "cache": [Path(e).name for e in entries]},
    )


def _check_mixture(recipe, mix, stats: list[PackStats], world_size: int, log: bool):
    """(order, planned report, report function) of a cached mixture; DataError when a source or the whole is too small."""
    data, cfg = recipe.data, recipe.train
    for index, (label, st) in enumerate(zip(mix.labels, stats, strict=True)):
        if st.blocks == 0:
            raise DataError(f"data.train.{index} ({label}): {st.tokens:,} tokens, not one block of data.seq_len {data.seq_len}; add text to it or remove it")
    order = mixture.MixtureOrder([st.blocks for st in stats], mix.shares)
    total = PackStats(sum(s.documents for s in stats), sum(s.tokens for s in stats), data.seq_len, order.epoch_size, sum(s.dropped_tokens for s in stats))
    check_blocks(total, recipe, world_size)
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps * world_size  # blocks per optimizer step, all processes
    per_epoch = order.epoch_size // per_step * per_step  # blocks of a mixture epoch that fill whole steps
    report = mixture.cached_report(mix, order, cfg.seed, data.seq_len, per_epoch)
    planned = report(cfg.planned_steps(data.seq_len, world_size) * per_step)
    if log:
        for line in mixture.report_lines(planned, "plans"):
            dist.log(line)
        mixture.check_repeats(planned, data.mixture_repeat)
    elif data.mixture_repeat == "error":
        mixture.check_repeats(planned, data.mixture_repeat)
    return order, planned, report
