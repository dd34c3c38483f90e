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

import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmkit.errors import DataError, RecipeError

CACHE_VERSION = 1
MARKER = "COMPLETE"
FAILED = "FAILED"
ENCODE_BATCH = 256  # documents per tokenizer call: large enough for the Rust thread pool, small in RAM


def log(message: str) -> None:
    """Progress line on stderr from the main process only."""
    if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0) == 0:
        print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the ids a tokenizer produces."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode("utf-8"))
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)]).encode())
    return h.hexdigest()[:16]


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


def held_out(index: int, fraction: float, seed: int = 0) -> bool:
    """Whether document `index` belongs to the held-out validation fraction (a pure function of index)."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


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


# ----------------------------------------------------------------------------------------------
# Packed blocks
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where tokenized corpora are cached: $LLMKIT_CACHE_DIR or ~/.cache/llmkit/data."""
    env = os.environ.get("LLMKIT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "llmkit" / "data"


def cache_key(recipe, tokenizer) -> str:
    """The cache directory name for a recipe's data with this tokenizer."""
    from llmkit import sources

    data = recipe.data
    train = sources.fingerprint(data.train, text_field=data.text_field, max_samples=data.max_samples)
    validation = sources.fingerprint(data.validation, text_field=data.text_field) if data.validation else None
    payload = json.dumps(
        {
            "version": CACHE_VERSION,
            "train": train,
            "validation": validation,
            "validation_fraction": data.validation_fraction if not data.validation else 0.0,
            "tokenizer": tokenizer_fingerprint(tokenizer),
        },
        sort_keys=True,
    )
    return "lm-" + hashlib.sha256(payload.encode()).hexdigest()[:20]


def _check_data_recipe(recipe) -> None:
    data = recipe.data
    if data.streaming and data.validation_fraction > 0 and not data.validation:
        raise RecipeError(
            "data.validation_fraction cannot hold out documents of a streamed corpus; give data.validation instead"
        )
    from llmkit import sources

    sources.check_sources(data.train)
    if data.validation:
        sources.check_sources(data.validation)


def _build(recipe, tokenizer, target: Path) -> dict:
    """Tokenize train (and validation) sources into `target` (a fresh directory); return the metadata."""
    from llmkit import sources

    data = recipe.data
    dtype = token_dtype(tokenizer)
    encoder = DocumentEncoder(tokenizer)
    target.mkdir(parents=True)
    started = time.perf_counter()
    train = TokenWriter(target, "train", dtype)
    validation = TokenWriter(target, "validation", dtype)
    held = data.validation_fraction if not data.validation else 0.0
    index = 0
    texts = sources.iter_texts(data.train, text_field=data.text_field, max_samples=data.max_samples)
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
        for batch in _batched(sources.iter_texts(data.validation, text_field=data.text_field), ENCODE_BATCH):
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
    (target / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    (target / MARKER).write_text("ok\n", encoding="utf-8")
    return meta


def _is_main_process() -> bool:
    """The process that builds the cache: local rank 0 of each node (correct for shared and node-local caches).

    Read from the launcher's environment rather than accelerate's state, which must not be created
    before the Accelerator (it fixes the backend on first use).
    """
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0) == 0


def prepare_cache(recipe, tokenizer, *, main_process: bool | None = None, poll_s: float = 2.0) -> Path:
    """The cache directory for this recipe's data, built on a miss (by the main process only).

    Other processes wait for the COMPLETE marker by polling the file system, without any timeout of
    their own: a main process that fails writes a FAILED marker that stops them too.
    """
    _check_data_recipe(recipe)
    root = Path(recipe.data.cache_dir or default_cache_dir())
    final = root / cache_key(recipe, tokenizer)
    if (final / MARKER).is_file():
        meta = json.loads((final / "meta.json").read_text(encoding="utf-8"))
        log(
            f"data: tokenization cache hit, skipping tokenization: {final} "
            f"({meta['train']['tokens']:,} train tokens, {meta['validation']['tokens']:,} validation tokens)"
        )
        return final
    main = _is_main_process() if main_process is None else main_process
    if not main:
        waited = 0.0
        while not (final / MARKER).is_file():
            if (root / f"{final.name}.{FAILED}").is_file():
                raise DataError(f"data: the main process failed to build the cache {final}; see its error")
            time.sleep(poll_s)
            waited += poll_s
        return final
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{final.name}.{FAILED}").unlink(missing_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    log(f"data: tokenizing {recipe.data.train if len(str(recipe.data.train)) < 120 else 'the train sources'} into {final}")
    try:
        meta = _build(recipe, tokenizer, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        (root / f"{final.name}.{FAILED}").write_text("failed\n", encoding="utf-8")
        raise
    if meta["train"]["tokens"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"data.train: the corpus holds no text in field {recipe.data.text_field!r}")
    try:
        tmp.rename(final)
    except OSError:
        # Another process (a concurrent `llmkit data prepare`) published the same cache first.
        shutil.rmtree(tmp, ignore_errors=True)
    log(
        f"data: tokenized {meta['train']['documents']:,} documents ({meta['train']['tokens']:,} tokens) "
        f"in {meta['seconds']:.1f}s ({meta['tokens_per_s']:,} tokens/s)"
    )
    return final


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

    from llmkit import sources

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
            texts = sources.iter_texts(data.train, text_field=data.text_field, max_samples=data.max_samples)
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
    from llmkit.train import TrainData, shuffled_batch_order

    data = recipe.data
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    positions = data.doc_masking != "none"
    collate = collate_blocks(data.doc_masking)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if data.streaming:
        _check_data_recipe(recipe)
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
    log("data: " + stats.line("train"))
    check_blocks(stats, recipe, world_size)
    validation = None
    val_tokens, val_docs = open_cache(path, "validation")
    if len(val_tokens):
        validation = PackedBlocks(val_tokens, val_docs, data.seq_len, positions=positions, keep_partial=True, pad_id=pad_id)
        log("data: " + validation.stats().line("validation"))
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

    from llmkit import sources

    encoder = DocumentEncoder(tokenizer)
    flat: list[int] = []
    starts: list[int] = []
    for batch in _batched(sources.iter_texts(source_list, text_field=recipe.data.text_field), ENCODE_BATCH):
        for ids in encoder.encode(batch):
            starts.append(len(flat))
            flat.extend(ids)
    return PackedBlocks(
        np.asarray(flat, dtype=np.int64), np.asarray(starts, dtype=np.int64), recipe.data.seq_len,
        positions=positions, keep_partial=True, pad_id=pad_id,
    )


def prepare_command(recipe) -> Path | None:
    """`llmkit data prepare RECIPE`: build the tokenization cache now (pretrain; finetune delegates)."""
    from llmkit.recipes import FinetuneRecipe, PretrainRecipe

    if isinstance(recipe, FinetuneRecipe):
        try:
            from llmkit.finetuning import prepare
        except ImportError:
            raise RecipeError("llmkit data prepare: this installation cannot prepare finetune recipes") from None
        return prepare(recipe)
    if not isinstance(recipe, PretrainRecipe):
        raise RecipeError(f"llmkit data prepare: needs a pretrain or finetune recipe, got a {recipe.stage} recipe")
    if recipe.data.streaming:
        raise RecipeError("data.streaming is true: streamed corpora are tokenized during training; nothing to prepare")
    from llmkit.modeling import load_tokenizer

    tokenizer = load_tokenizer(recipe.tokenizer)
    path = prepare_cache(recipe, tokenizer)
    tokens, docs = open_cache(path, "train")
    stats = PackedBlocks(tokens, docs, recipe.data.seq_len, positions=False).stats()
    print(stats.line("train"))
    val_tokens, val_docs = open_cache(path, "validation")
    if len(val_tokens):
        print(PackedBlocks(val_tokens, val_docs, recipe.data.seq_len, positions=False, keep_partial=True).stats().line("validation"))
    print(f"cache: {path}")
    return path
