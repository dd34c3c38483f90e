"""Corpus sources: local files, globs and directories, hub datasets, and the built-in demo corpora.

    python -c "from llmkit.data.sources import iter_texts; print(next(iter_texts('builtin:pydoc/train'))[:300])"

A recipe's `data.train` / `data.validation` / `data.test` is a list of sources:

- a local file, glob (`data/**/*.jsonl`) or directory (every supported file below it, sorted);
  `.txt` files are one document each (files over ~1 MB are cut into ~1 MB newline-aligned
  documents), `.jsonl` / `.json` / `.csv` / `.tsv` / `.parquet` rows are records; `.gz`, `.bz2` and
  `.xz` compressed text formats are read transparently;
- `builtin:pydoc[/SPLIT]`, `builtin:docsum[/SPLIT]`, `builtin:docsum-choice[/SPLIT]` and `builtin:docchat[/SPLIT]`, demo corpora
  (and a multiple-choice task) built from text that ships with Python (see llmkit/data/builtin.py);
  SPLIT is train, validation or test;
- `hub:ID` or a HubSource mapping `{hub: ID, name: CONFIG, split: train, max_samples: N}`,
  streamed with `datasets.load_dataset(..., streaming=True)`.

Everything streams: text files are read in ~1 MB pieces, JSON lines one line at a time, parquet
in record batches, hub datasets as an iterable. The exception is a `.json` file holding one JSON
array, which has to be parsed whole (use `.jsonl` for corpora that do not fit in memory).
Every problem with a source raises `DataError` with one line naming the file, line or field.
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import hashlib
import json
import lzma
import os
import platform
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llmkit.data.builtin import BUILTIN_LAYOUT, parse_builtin, read_builtin
from llmkit.errors import DataError, did_you_mean
from llmkit.recipes import HubSource, WeightedSource

SourceLike = str | Path | HubSource | dict
Sources = SourceLike | Iterable[SourceLike]

TEXT_CHUNK_CHARS = 1 << 20
"""Text files are cut into documents of about this many characters, at a line boundary."""

FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
COMPRESSION = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
SUPPORTED_HINT = ".txt, .jsonl, .json, .csv, .tsv, .parquet (text formats may be .gz/.bz2/.xz compressed)"


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def iter_records(sources: Sources, max_samples: int | None = None, encoding_errors: str = "strict") -> Iterator[dict]:
    """Stream the records of all sources in order, at most `max_samples` of them."""
    for _, record in iter_located_records(sources, max_samples, encoding_errors):
        yield record


def iter_located_records(
    sources: Sources, max_samples: int | None = None, encoding_errors: str = "strict"
) -> Iterator[tuple[str, dict]]:
    """Stream (where, record) pairs; `where` names the file and line (or row, item, part) for error messages.

    `encoding_errors` (data.encoding_errors) says what bytes that are not UTF-8 do: strict = DataError
    naming the file, byte offset and line; replace = read as U+FFFD; skip = dropped.
    """
    count = 0
    for where, record in _iter_located(_normalise(sources), errors=encoding_errors):
        count += 1
        yield where, record
        if max_samples is not None and count >= max_samples:
            return  # before reading further: a capped read never touches the rest of the corpus
    if count == 0:
        raise DataError(f"{source_names(sources)}: the sources hold no records; check the files are not empty")


def iter_texts(
    sources: Sources, text_field: str = "text", max_samples: int | None = None, encoding_errors: str = "strict"
) -> Iterator[str]:
    """Stream the non-empty `text_field` strings of all sources, at most `max_samples` of them (see iter_located_records)."""
    count = 0
    for where, record in _iter_located(_normalise(sources), columns=[text_field], errors=encoding_errors):
        text = _field(record, text_field, where)
        if text is None or not text.strip():
            continue  # empty rows carry nothing to learn from; a corpus of only empty rows fails below
        count += 1
        yield text
        if max_samples is not None and count >= max_samples:
            return
    if count == 0:
        raise DataError(f"{source_names(sources)}: no text found in field {text_field!r}; the corpus is empty")


def check_sources(sources: Sources) -> None:
    """Fail early with DataError if a local source is missing/empty or a built-in name or split is unknown."""
    for source in _normalise(sources):
        if isinstance(source, str) and source.startswith("builtin:"):
            parse_builtin(source)
        elif isinstance(source, str) and not source.startswith("hub:"):
            _expand(source)


def decoding_settings(encoding_errors: str) -> dict[str, str]:
    """The fingerprint setting for data.encoding_errors: nothing for strict, so existing cache keys stay valid."""
    return {} if encoding_errors == "strict" else {"encoding_errors": encoding_errors}


def fingerprint(sources: Sources, **settings: Any) -> str:
    """A stable hash of the sources' identity and contents (path, size, mtime) plus `settings`, for caches."""
    parts: list[Any] = []
    for source in _normalise(sources):
        if isinstance(source, HubSource):
            parts.append(["hub", source.model_dump(mode="json")])
        elif source.startswith("hub:"):
            parts.append(["hub", source])
        elif source.startswith("builtin:"):
            name, split = parse_builtin(source)
            parts.append(["builtin", name, split, BUILTIN_LAYOUT, platform.python_version()])
        else:
            for path in _expand(source):
                stat = path.stat()
                parts.append(["file", str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    payload = json.dumps({"sources": parts, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def file_states(sources: Sources) -> dict[str, str]:
    """{source file or name: "SIZE bytes, mtime NS"}: what a checkpoint records to tell that its training data changed."""
    states: dict[str, str] = {}
    for source in _normalise(sources):
        if isinstance(source, HubSource) or source.startswith("hub:"):
            hub = _as_hub(source)
            states[f"hub:{hub.hub}"] = json.dumps(hub.model_dump(mode="json"), sort_keys=True)
        elif source.startswith("builtin:"):
            states[source] = f"{BUILTIN_LAYOUT} Python {platform.python_version()}"
        else:
            for path in _expand(source):
                stat = path.stat()
                states[str(path.resolve())] = f"{stat.st_size} bytes, mtime {stat.st_mtime_ns}"
    return states


def describe(sources: Sources) -> str:
    """One line describing the sources: files and sizes, built-in corpora, hub datasets."""
    out = []
    for source in _normalise(sources):
        if isinstance(source, HubSource) or source.startswith("hub:"):
            hub = _as_hub(source)
            extra = [f"config {hub.name}"] if hub.name else []
            extra += [f"split {hub.split}"] + ([f"up to {hub.max_samples:,} records"] if hub.max_samples else [])
            out.append(f"hub:{hub.hub} ({', '.join(extra)})")
        elif source.startswith("builtin:"):
            name, split = parse_builtin(source)
            what = "Python reference docs and stdlib docstrings" if name == "pydoc" else "stdlib docstring summaries"
            out.append(f"{source} ({what}, Python {platform.python_version()}, {split or 'all splits'})")
        else:
            files = _expand(source)
            size = sum(p.stat().st_size for p in files)
            out.append(f"{source} ({len(files)} file{'s' if len(files) != 1 else ''}, {_human_bytes(size)})")
    return "; ".join(out)


# --------------------------------------------------------------------------------------------
# Source dispatch
# --------------------------------------------------------------------------------------------


def _normalise(sources: Sources) -> list[str | HubSource]:
    """Turn one source or a list of them into a list of str / HubSource."""
    if sources is None:
        raise DataError("no data sources given; list files, globs, directories, builtin:NAME or hub:ID")
    if isinstance(sources, (str, Path, dict, HubSource)):
        sources = [sources]
    out: list[str | HubSource] = []
    for source in sources:
        if isinstance(source, WeightedSource):
            out.append(source.path)  # a mixture entry reads like its path; lm.py handles the weights
        elif type(source) is not HubSource and isinstance(source, HubSource):
            out.append(HubSource(**source.model_dump(include=set(HubSource.model_fields))))
        elif isinstance(source, Path):
            out.append(str(source))
        elif isinstance(source, dict):
            try:
                out.append(HubSource.model_validate(source))
            except Exception as exc:  # pydantic ValidationError: report the first problem on one line
                first = str(exc).splitlines()
                raise DataError(f"data source {source!r}: not a valid hub source ({first[1] if len(first) > 1 else exc})") from None
        elif isinstance(source, (str, HubSource)):
            out.append(source)
        else:
            raise DataError(f"data source {source!r}: expected a path, glob, builtin:NAME, hub:ID or a hub mapping")
    if not out:
        raise DataError("no data sources given; list files, globs, directories, builtin:NAME or hub:ID")
    return out


def _iter_located(
    sources: list[str | HubSource], columns: list[str] | None = None, errors: str = "strict"
) -> Iterator[tuple[str, dict]]:
    """Yield (where, record) for every record; `where` names the file and line for error messages."""
    for source in sources:
        if isinstance(source, HubSource) or source.startswith("hub:"):
            yield from _read_hub(_as_hub(source))
        elif source.startswith("builtin:"):
            yield from read_builtin(source)
        else:
            for path in _expand(source):
                yield from _read_file(path, columns, errors)


def source_names(sources: Sources | None) -> str:
    """The sources as written, for messages and model cards (never touches the disk); "none" for no sources."""
    if not sources:
        return "none"
    try:
        items = _normalise(sources)
    except DataError:
        return str(sources)
    return ", ".join(s if isinstance(s, str) else f"hub:{s.hub}" for s in items)


def _human_bytes(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


def _field(record: dict, field: str, where: str) -> str | None:
    """The text in `record[field]`, or DataError naming the record and the fields it does have."""
    if field not in record:
        keys = [str(k) for k in record]
        raise DataError(
            f"{where}: record has no field {field!r} (its fields: {', '.join(repr(k) for k in keys) or 'none'}); "
            f"set data.text_field to the one holding the text{did_you_mean(field, keys)}"
        )
    value = record[field]
    if value is None or isinstance(value, str):
        return value
    raise DataError(f"{where}: field {field!r} holds {type(value).__name__}, not text; point data.text_field at a text field")


# --------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------


def _format_of(path: Path) -> str | None:
    """The reader for a file name ('text', 'jsonl', ...), looking through a compression suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
        kind = FORMATS.get(suffixes[-1]) if suffixes else None
        return None if kind == "parquet" else kind  # parquet compresses internally
    return FORMATS.get(suffixes[-1]) if suffixes else None


def _expand(source: str) -> list[Path]:
    """The files a local source names: itself, a glob's matches, or a directory's supported files."""
    path = Path(source).expanduser()
    if glob.has_magic(source):
        matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        if not matches:
            raise DataError(f"{source}: the glob matches no files; check the pattern and the working directory ({Path.cwd()})")
        files: list[Path] = []
        for match in matches:
            files.extend(_dir_files(match) if match.is_dir() else [match] if _format_of(match) else [])
        if not files:
            raise DataError(f"{source}: the glob matches {len(matches)} path(s) but no supported file; supported: {SUPPORTED_HINT}")
        return files
    if path.is_dir():
        files = _dir_files(path)
        if not files:
            raise DataError(f"{source}: the directory holds no supported files; supported: {SUPPORTED_HINT}")
        return files
    if path.is_file():
        if _format_of(path) is None:
            suffix = "".join(path.suffixes) or "(none)"
            raise DataError(f"{source}: unsupported file type {suffix}; supported: {SUPPORTED_HINT}")
        return [path]
    hint = ""
    if path.parent.is_dir():
        hint = did_you_mean(path.name, [p.name for p in path.parent.iterdir()])
    raise DataError(f"{source}: no such file or directory{hint}")


def _dir_files(directory: Path) -> list[Path]:
    """Supported, non-hidden files below a directory, in a stable (sorted) order."""
    files = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).parts
        if any(part.startswith(".") for part in rel) or not path.is_file():
            continue
        if _format_of(path):
            files.append(path)
    return files


ENCODING_ERRORS = {"strict": "strict", "replace": "replace", "skip": "ignore"}
"""data.encoding_errors -> the codec error handler: fail, read a bad byte as U+FFFD, or drop it."""


def _open_text(path: Path, errors: str = "strict"):
    """Open a possibly compressed text file; utf-8-sig drops a byte-order mark, newline='' keeps \\r\\n as is."""
    opener = COMPRESSION.get(path.suffix.lower(), open)
    return opener(path, "rt", encoding="utf-8-sig", errors=ENCODING_ERRORS[errors], newline="")


def first_invalid_utf8(path: Path) -> tuple[int, int, bytes] | None:
    """(byte offset, line number, the bad bytes) of the first bytes of a file that are not UTF-8, or None.

    The offset counts bytes of the (decompressed) file from its start. A decoding error raised while
    reading only knows its position inside the chunk being decoded, so the file is scanned again.
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    opener = COMPRESSION.get(path.suffix.lower(), open)
    offset, line = 0, 1
    with opener(path, "rb") as handle:
        while block := handle.read(1 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                # The decoder keeps an incomplete sequence from the previous block in its buffer.
                carried = len(exc.object) - len(block)
                start = offset - carried + exc.start
                return start, line + exc.object[: exc.start].count(b"\n"), exc.object[exc.start : exc.end]
            line += block.count(b"\n")
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            carried = len(exc.object)
            return offset - carried + exc.start, line, exc.object[exc.start : exc.end]
    return None


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> DataError:
    """A DataError naming the file offset and line of the first bytes that are not UTF-8, and the two fixes."""
    found = first_invalid_utf8(path)
    where = f"byte {found[0]:,} (line {found[1]:,}: {found[2].hex(' ')})" if found else f"a byte ({exc.reason})"
    return DataError(
        f"{path}: not UTF-8 text: invalid bytes at {where}; convert the file to UTF-8 (iconv -f latin1 -t utf-8), "
        "or set data.encoding_errors to replace (read them as U+FFFD) or skip (drop them)"
    )


def decode_utf8(data: bytes, where: str) -> str:
    """`data` as UTF-8 text (a byte-order mark dropped); DataError naming `where` and the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{where}: not UTF-8 text (byte {exc.start:,}, line {line:,}: {data[exc.start : exc.end].hex(' ')}); "
            "give a text file, or convert it to UTF-8 (iconv -f latin1 -t utf-8)"
        ) from None


def read_text_file(path: Path, label: str) -> str:
    """The whole text of a file a user named on the command line (`label`, e.g. "--file"); DataError when it is not one.

    A directory, a missing path and bytes that are not UTF-8 each get one line naming `label` and the
    path; a named pipe or /dev/stdin is read like a file.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{label} {path}: is a directory; give a text file")
    if not path.exists():
        raise DataError(f"{label} {path}: no such file")
    return decode_utf8(path.read_bytes(), f"{label} {path}")


def _read_file(path: Path, columns: list[str] | None, errors: str = "strict") -> Iterator[tuple[str, dict]]:
    """Records of one local file, with decoding errors turned into one-line DataErrors."""
    kind = _format_of(path)
    readers = {"text": _read_text, "jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "tsv": _read_csv}
    try:
        if kind == "parquet":
            yield from _read_parquet(path, columns)
        else:
            yield from readers[kind](path, errors)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    except (EOFError, gzip.BadGzipFile, lzma.LZMAError, OSError) as exc:
        raise DataError(f"{path}: cannot read the file ({exc.__class__.__name__}: {exc})") from None


def _read_text(path: Path, errors: str = "strict") -> Iterator[tuple[str, dict]]:
    """A text file as one document, or ~1 MB newline-aligned documents when it is large."""
    with _open_text(path, errors) as handle:
        part = 0
        while True:
            chunk = handle.read(TEXT_CHUNK_CHARS)
            if not chunk:
                return
            if len(chunk) == TEXT_CHUNK_CHARS:
                # finish the current line so no line is split; the limit still cuts a file without newlines
                chunk += handle.readline(TEXT_CHUNK_CHARS)
            part += 1
            if chunk.strip():
                yield (f"{path}" if part == 1 else f"{path} (part {part})"), {"text": chunk}


def _read_jsonl(path: Path, errors: str = "strict") -> Iterator[tuple[str, dict]]:
    """One JSON object per line; blank lines are skipped."""
    with _open_text(path, errors) as handle:
        for lineno, line in enumerate(handle, 1):
            if line.strip():
                yield f"{path}:{lineno}", _json_object(line, path, lineno)


def _json_object(line: str, path: Path, lineno: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object"
        ) from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object (a record with fields), got a JSON {type(record).__name__}")
    return record


def _read_json(path: Path, errors: str = "strict") -> Iterator[tuple[str, dict]]:
    """A JSON array of records, JSON lines under a .json name, or one object (or {key: [records]})."""
    with _open_text(path, errors) as handle:
        first = handle.readline()
        while first and not first.strip():
            first = handle.readline()
    stripped = first.strip()
    if not stripped:
        return
    if stripped.startswith("{"):
        try:
            json.loads(stripped)
            yield from _read_jsonl(path, errors)  # the first line is a whole object: JSON lines
            return
        except json.JSONDecodeError:
            pass  # a pretty-printed object spanning lines: parse the whole file below
    with _open_text(path, errors) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) == 1:  # the common {"data": [...]} layout
            data = data[lists[0]]
        else:
            yield str(path), data
            return
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records or JSON lines, got a JSON {type(data).__name__}")
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path}: item {index} is a JSON {type(record).__name__}, expected an object (a record with fields)")
        yield f"{path} item {index}", record


def _read_csv(path: Path, errors: str = "strict") -> Iterator[tuple[str, dict]]:
    """CSV/TSV rows as records keyed by the header row."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents are often longer than csv's 128 KB default
    delimiter = "\t" if _format_of(path) == "tsv" else ","
    with _open_text(path, errors) as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        try:
            for row in reader:
                if None in row:
                    raise DataError(f"{path}:{reader.line_num}: the row has more fields than the header ({len(reader.fieldnames or [])})")
                yield f"{path}:{reader.line_num}", row
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def _read_parquet(path: Path, columns: list[str] | None) -> Iterator[tuple[str, dict]]:
    """Parquet rows in record batches, reading only the wanted columns when they all exist."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError subclasses for bad files
        raise DataError(f"{path}: not a readable parquet file ({exc.__class__.__name__}: {exc})") from None
    names = parquet.schema_arrow.names
    # read every column when one is missing, so the caller's missing-field error can list them all
    wanted = columns if columns and all(c in names for c in columns) else None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=wanted):
        for record in batch.to_pylist():
            row += 1
            yield f"{path} row {row}", record


# --------------------------------------------------------------------------------------------
# Hugging Face Hub
# --------------------------------------------------------------------------------------------


def _as_hub(source: str | HubSource) -> HubSource:
    if isinstance(source, HubSource):
        return source
    ident = source.removeprefix("hub:").strip()
    if not ident:
        raise DataError(f"{source!r}: name the dataset, e.g. hub:wikitext or {{hub: wikitext, name: wikitext-2-raw-v1}}")
    return HubSource(hub=ident)


def _offline_env() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def hub_host_resolves() -> bool:
    """Whether the Hub's host name resolves: a local, millisecond check that spares half a minute of download retries."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _in_datasets_cache(hub: HubSource) -> bool:
    """Whether the datasets cache holds a copy of the dataset (what a non-streamed load falls back to offline)."""
    import datasets.config

    return (Path(datasets.config.HF_DATASETS_CACHE) / hub.hub.replace("/", "___")).is_dir()


def _hub_error(hub: HubSource, exc: BaseException | None) -> DataError:
    """A one-line DataError for a hub dataset that cannot be read, saying how to work offline."""
    local = (
        "download it where you have network and list the local .jsonl/.parquet/.txt files in the recipe "
        "(or set streaming: false to read a copy already in the datasets cache), or use builtin:pydoc"
    )
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    network = exc is None or any(
        any(w in type(e).__name__ for w in ("Connect", "Timeout", "Offline", "HTTP"))
        or any(w in str(e).lower() for w in ("offline", "connection", "resolve", "network", "unreachable"))
        for e in chain
    )
    if network:
        return DataError(f"hub:{hub.hub}: the Hugging Face Hub is unreachable (offline?); {local}")
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return DataError(f"hub:{hub.hub}: cannot load the dataset ({detail}); check the id, name and split, or {local}")


def _read_hub(hub: HubSource) -> Iterator[tuple[str, dict]]:
    """Records of a hub dataset, streamed when `hub.streaming`, capped at `hub.max_samples`."""
    if (_offline_env() or not hub_host_resolves()) and (hub.streaming or not _in_datasets_cache(hub)):
        # Offline (HF_HUB_OFFLINE, or no DNS): fail at once instead of after ~25 s of retries. Streaming
        # always needs the network; a copy in the datasets cache is read with streaming: false.
        raise _hub_error(hub, None)
    try:
        import datasets

        dataset = datasets.load_dataset(hub.hub, hub.name, split=hub.split, streaming=hub.streaming, revision=hub.revision)
    except DataError:
        raise
    except Exception as exc:  # datasets and huggingface_hub raise many unrelated types; all mean "cannot load"
        raise _hub_error(hub, exc) from None
    index = 0
    iterator = iter(dataset)
    while hub.max_samples is None or index < hub.max_samples:
        try:
            record = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # streaming fetches lazily: network errors surface here
            raise _hub_error(hub, exc) from None
        yield f"hub:{hub.hub} ({hub.split}) record {index}", dict(record)
        index += 1
