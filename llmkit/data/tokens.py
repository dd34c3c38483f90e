"""Tokenized documents: byte-bounded tokenizer batches, long documents split at verified cuts, the token writer.

    python -c "from transformers import AutoTokenizer; from llmkit.data.tokens import DocumentEncoder; \
        print(DocumentEncoder(AutoTokenizer.from_pretrained('runs/tiny')).encode(['hello world']))"

Memory stays flat however large the corpus or its documents are:

- the tokenizer sees at most about BATCH_CHARS characters per call (a batch is bounded in text,
  not in documents, so 256 book-length records never meet in one call);
- a document longer than PIECE_CHARS is cut into pieces and each piece is tokenized on its own.
  A cut sits before a space between two non-space characters, after a newline that precedes a word
  character, or before a newline that follows a non-space character, and is accepted only when tokenizing CUT_CHECK_CHARS of text
  on each side of it as one string gives exactly the ids of the two sides tokenized apart. So the ids of a split document are those of the whole
  document, token for token (tests/test_data_scale.py checks this on byte-level BPE, Metaspace and
  WordPiece tokenizers). A document with no such cut is tokenized whole, as before;
- token ids go to disk as they are produced (`TokenWriter`); the cache records an xxh3 checksum of each file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

BATCH_CHARS = 1 << 20
"""Characters of text per tokenizer call: the bound on tokenization memory (~100 bytes per token in flight).

benchmarks/RESULTS.md "Data preparation at scale": 1 MB calls peak ~300 MB lower than 4 MB calls at
the same speed (the encodings of a call, not the tokenizer's work, set the peak)."""

PIECE_CHARS = 1 << 18
"""Documents longer than this many characters are tokenized in pieces of at most about this size."""

CUT_CHECK_CHARS = 1024
"""Characters on each side of a cut that must tokenize the same together and apart for the cut to be used."""

CUT_TRIES = 32
"""Candidate cuts tried per piece before the rest of the document is tokenized whole."""

# Candidate cuts: before a single space between two non-spaces, at the start of a line that begins with
# a word character, at the end of a line. Indented JSON or YAML has few of the first kind and none of the
# second; tokenizers that prefix a space to every text (Metaspace, add_prefix_space) only pass the first.
# Each candidate is verified before use.
_CUT = re.compile(r"(?<=\S) (?=\S)|(?<=\n)(?=\w)|(?<=\S)(?=\n)")


def token_id_bound(tokenizer) -> int:
    """One more than the largest id the tokenizer can produce (len(tokenizer) undercounts sparse vocabularies)."""
    largest = len(tokenizer) - 1
    try:
        largest = max(largest, max(tokenizer.get_vocab().values(), default=0))
    except (AttributeError, TypeError, ValueError):
        pass
    return largest + 1


def token_dtype(tokenizer):
    """uint16 when every id fits, else uint32: half the disk and page cache for small vocabularies."""
    import numpy as np

    return np.uint16 if token_id_bound(tokenizer) <= 65536 else np.uint32


class DocumentEncoder:
    """Turns texts into token ids (each document followed by EOS), as tokenizer(text) would, in bounded memory."""

    def __init__(self, tokenizer, *, batch_chars: int = BATCH_CHARS, piece_chars: int = PIECE_CHARS) -> None:
        self.eos = tokenizer.eos_token_id
        self.batch_chars = batch_chars
        self.piece_chars = piece_chars
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
        self.specials = self._specials()
        self.unsplittable = 0  # long documents with no verified cut (tokenized whole)

    def _ids(self, texts: list[str], special: bool) -> list[list[int]]:
        """Token ids of each text, with or without the tokenizer's special tokens (BOS, ...)."""
        if not texts:
            return []
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=special)]
        return [list(x) for x in self.tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"]]

    def _specials(self) -> tuple[list[int], list[int]] | None:
        """(prefix, suffix): what the tokenizer puts around a text's own ids; None when it does more (no splitting then)."""
        found = None
        for probe in ("hello world", "x"):
            full, plain = self._ids([probe], True)[0], self._ids([probe], False)[0]
            starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
            if not plain or not starts:
                return None
            pair = (full[: starts[0]], full[starts[0] + len(plain) :])
            if found is not None and pair != found:
                return None
            found = pair
        return found

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each whole text with EOS appended (not doubled when the tokenizer already adds it)."""
        ids = self._ids(texts, True)
        for doc in ids:
            if not doc or doc[-1] != self.eos:
                doc.append(self.eos)
        return ids

    # ------------------------------------------------------------------------------------------
    # Long documents
    # ------------------------------------------------------------------------------------------

    def split(self, text: str) -> list[str]:
        """`text` as consecutive pieces of at most ~piece_chars whose ids, joined, are the whole text's ids."""
        if len(text) <= self.piece_chars or self.specials is None:
            return [text]
        pieces, start = [], 0
        while len(text) - start > self.piece_chars:
            cut = self._safe_cut(text, start)
            if cut is None:
                self.unsplittable += 1  # no verified cut in the rest: it stays one piece
                break
            pieces.append(text[start:cut])
            start = cut
        pieces.append(text[start:])
        return pieces

    def _safe_cut(self, text: str, start: int) -> int | None:
        """The first verified cut after `start` + piece_chars / 2, preferring the last one before piece_chars; None when none.

        A window without a verified cut (a long run of CJK text, a base64 blob) moves the search on to
        the next window, so only such a run itself ends up longer than piece_chars.
        """
        low, high = start + self.piece_chars // 2, start + self.piece_chars
        first_window = True
        while low < len(text):
            candidates = [m.start() for m in _CUT.finditer(text, low, high)]
            # In the first window the last cut makes the longest piece; past it, the first cut the shortest.
            for cut in reversed(candidates[-CUT_TRIES:]) if first_window else candidates[:CUT_TRIES]:
                if self._cut_is_safe(text, cut):
                    return cut
            low, high, first_window = high, high + self.piece_chars, False
        return None

    def _cut_is_safe(self, text: str, cut: int) -> bool:
        """Whether the text around `cut` tokenizes to the same ids as one string and as two."""
        a, b = max(0, cut - CUT_CHECK_CHARS), min(len(text), cut + CUT_CHECK_CHARS)
        whole, left, right = self._ids([text[a:b], text[a:cut], text[cut:b]], False)
        return whole == left + right

    def pieces(self, items: Iterable[tuple[Any, str]]) -> Iterator[tuple[Any, list[int], bool]]:
        """(tag, ids, starts a document) for each piece of each (tag, text), in order.

        A document's pieces joined are exactly encode([text])[0]. A tokenizer call holds at most
        batch_chars characters, or one piece when a piece is longer (a run with no verified cut).
        """
        pending: list[tuple[Any, str, bool, bool]] = []  # (tag, text, first piece, last piece)
        chars = 0
        for tag, text in items:
            parts = self.split(text)
            for index, part in enumerate(parts):
                if pending and chars + len(part) > self.batch_chars:
                    yield from self._encode_pieces(pending)
                    pending, chars = [], 0
                pending.append((tag, part, index == 0, index == len(parts) - 1))
                chars += len(part)
        yield from self._encode_pieces(pending)

    def _encode_pieces(self, pending: list[tuple[Any, str, bool, bool]]) -> Iterator[tuple[Any, list[int], bool]]:
        """Encode one batch of pieces: whole documents as `encode`, pieces bare plus the prefix/suffix specials."""
        whole = [i for i, (_, _, first, last) in enumerate(pending) if first and last]
        parts = [i for i, (_, _, first, last) in enumerate(pending) if not (first and last)]
        ids: dict[int, list[int]] = dict(zip(whole, self.encode([pending[i][1] for i in whole]), strict=True))
        ids.update(zip(parts, self._ids([pending[i][1] for i in parts], False), strict=True))
        prefix, suffix = self.specials or ([], [])
        for i, (tag, _, first, last) in enumerate(pending):
            piece = ids.pop(i)
            if not (first and last):
                if first:
                    piece = prefix + piece
                if last:
                    piece = piece + suffix
                    if not piece or piece[-1] != self.eos:
                        piece.append(self.eos)
            yield tag, piece, first


def batched(texts: Iterable[str], max_chars: int = BATCH_CHARS, max_items: int = 256) -> Iterator[list[str]]:
    """Lists of consecutive texts holding at most `max_items` texts and about `max_chars` characters."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) == max_items or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class TokenWriter:
    """Appends token ids to `<name>.tokens.bin` and document start offsets to `<name>.docs.bin`, as they come."""

    def __init__(self, directory: Path, name: str, dtype) -> None:
        import numpy as np

        self.np = np
        self.dtype = np.dtype(dtype)
        self.paths = (Path(directory) / f"{name}.tokens.bin", Path(directory) / f"{name}.docs.bin")
        self.files = tuple(open(p, "wb") for p in self.paths)
        self.num_tokens = 0
        self.num_docs = 0

    def _write(self, k: int, array) -> None:
        self.files[k].write(array.tobytes())

    def add_piece(self, ids: list[int], starts_document: bool) -> None:
        """Append one piece of a document (a new document when `starts_document`)."""
        np = self.np
        if starts_document:
            self._write(1, np.asarray([self.num_tokens], dtype=np.int64))
            self.num_docs += 1
        self._write(0, np.asarray(ids, dtype=self.dtype))
        self.num_tokens += len(ids)

    def add(self, docs: list[list[int]]) -> None:
        """Append whole tokenized documents."""
        for doc in docs:
            self.add_piece(doc, True)

    def add_arrays(self, tokens, doc_starts) -> None:
        """Append a run of tokens (already of this dtype) and its document starts, relative to the run."""
        np = self.np
        self._write(1, np.asarray(doc_starts, dtype=np.int64) + self.num_tokens)
        self._write(0, np.asarray(tokens, dtype=self.dtype))
        self.num_tokens += len(tokens)
        self.num_docs += len(doc_starts)

    def close(self) -> None:
        """Flush, fsync and close both files."""
        import os

        for f in self.files:
            f.flush()
            os.fsync(f.fileno())
            f.close()


def file_checksum(path: Path) -> str:
    """xxh3-64 hex digest of a file, read in 16 MB blocks (several GB/s: cheap enough to verify every cache hit)."""
    import xxhash

    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()
