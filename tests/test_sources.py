"""Data sources: every local format, globs and directories, built-in corpora, and one-line errors.

    pytest tests/test_sources.py -q
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from llmkit.data.builtin import docsum_records, pydoc_records
from llmkit.data.sources import TEXT_CHUNK_CHARS, describe, fingerprint, iter_records, iter_texts
from llmkit.errors import DataError


def load_records(sources, max_samples=None) -> list[dict]:
    """Every record of `sources`, in order."""
    return list(iter_records(sources, max_samples=max_samples))

RECORDS = [{"text": "first document", "label": 1}, {"text": "second — ünïcode 中文 🙂", "label": 2}]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------


def test_txt_file_is_one_document_and_keeps_text_exactly(tmp_path):
    text = "line one\r\n\tindented  with  runs\n\n中文 and emoji 🙂\n"
    path = tmp_path / "a.txt"
    path.write_bytes(text.encode("utf-8"))
    assert load_records(str(path)) == [{"text": text}]


def test_large_txt_is_cut_into_newline_aligned_documents(tmp_path):
    line = "x" * 99 + "\n"
    text = line * (3 * TEXT_CHUNK_CHARS // len(line))
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    docs = list(iter_texts(str(path)))
    assert len(docs) >= 3
    assert "".join(docs) == text
    assert all(doc.endswith("\n") for doc in docs)


def test_txt_gz(tmp_path):
    path = tmp_path / "a.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("compressed text")
    assert list(iter_texts(str(path))) == ["compressed text"]


def test_jsonl_and_jsonl_gz(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", RECORDS)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(RECORDS[0]) + "\n\n")  # blank lines are skipped
    assert load_records(str(tmp_path / "a.jsonl")) == RECORDS
    assert load_records(str(tmp_path / "b.jsonl.gz")) == RECORDS[:1]


def test_json_array_json_lines_and_wrapped_records(tmp_path):
    (tmp_path / "array.json").write_text(json.dumps(RECORDS, indent=2), encoding="utf-8")
    write_jsonl(tmp_path / "lines.json", RECORDS)
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": RECORDS}, indent=2), encoding="utf-8")
    for name in ("array.json", "lines.json", "wrapped.json"):
        assert load_records(str(tmp_path / name)) == RECORDS, name


def test_csv_and_tsv(tmp_path):
    long_text = "a, \"quoted\" field\nwith a newline " + "y" * 200_000  # over csv's default field limit
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerow({"text": long_text, "label": "1"})
    (tmp_path / "b.tsv").write_text("text\tlabel\nhello\t2\n", encoding="utf-8")
    assert load_records(str(tmp_path / "a.csv")) == [{"text": long_text, "label": "1"}]
    assert load_records(str(tmp_path / "b.tsv")) == [{"text": "hello", "label": "2"}]


def test_parquet_streams_in_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"doc {i}", "n": i} for i in range(2500)]  # more than one 1024-row batch
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=700)
    assert load_records(str(tmp_path / "a.parquet")) == rows
    assert list(iter_texts(str(tmp_path / "a.parquet"), max_samples=3)) == ["doc 0", "doc 1", "doc 2"]


def test_glob_directory_order_and_max_samples(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("B", encoding="utf-8")
    (tmp_path / "d" / "a.txt").write_text("A", encoding="utf-8")
    (tmp_path / "d" / "sub" / "c.txt").write_text("C", encoding="utf-8")
    (tmp_path / "d" / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / "d" / "notes.log").write_text("ignored in directories", encoding="utf-8")
    assert list(iter_texts(str(tmp_path / "d"))) == ["A", "B", "C"]
    assert list(iter_texts(str(tmp_path / "d" / "**" / "*.txt"))) == ["A", "B", "C"]
    assert list(iter_texts([str(tmp_path / "d" / "b.txt"), tmp_path / "d" / "a.txt"], max_samples=1)) == ["B"]
    assert "3 files" in describe(str(tmp_path / "d"))


def test_iter_records_streams_lazily(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("this line is broken\n")
    # the malformed line is never reached when only the first records are asked for
    assert len(list(iter_records(str(path), max_samples=2))) == 2


def test_fingerprint_changes_with_contents_and_settings(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one", encoding="utf-8")
    first = fingerprint([str(path)], seq_len=8)
    assert fingerprint([str(path)], seq_len=8) == first
    assert fingerprint([str(path)], seq_len=16) != first
    path.write_text("one two", encoding="utf-8")
    assert fingerprint([str(path)], seq_len=8) != first
    assert fingerprint("builtin:pydoc/train") != fingerprint("builtin:pydoc/test")


# --------------------------------------------------------------------------------------------
# errors: one line, naming the file / line / field
# --------------------------------------------------------------------------------------------


def _error(sources, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        list(iter_texts(sources, **kwargs))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file_suggests_a_close_name(tmp_path):
    (tmp_path / "corpus.jsonl").write_text("", encoding="utf-8")
    message = _error(str(tmp_path / "corpsu.jsonl"))
    assert "corpsu.jsonl: no such file" in message and "corpus.jsonl" in message


def test_glob_matching_nothing(tmp_path):
    assert "matches no files" in _error(str(tmp_path / "*.jsonl"))


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    message = _error(str(tmp_path / "empty"))
    assert "empty" in message and "no supported files" in message


def test_unsupported_extension_lists_the_supported_ones(tmp_path):
    (tmp_path / "data.xlsx").write_bytes(b"\x00")
    message = _error(str(tmp_path / "data.xlsx"))
    assert ".xlsx" in message and ".jsonl" in message and ".parquet" in message


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    assert f"{path}:3: not valid JSON" in _error(str(path))
    path.write_text('{"text": "ok"}\n[1, 2]\n', encoding="utf-8")
    assert f"{path}:2: expected a JSON object" in _error(str(path))


def test_missing_text_field_names_record_and_suggests(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"txt": "hello", "id": 1}])
    message = _error(str(path))
    assert f"{path}:1" in message and "'text'" in message and "did you mean 'txt'" in message


def test_missing_field_in_parquet_and_builtin(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), tmp_path / "a.parquet")
    assert "'body'" in _error(str(tmp_path / "a.parquet"))
    assert "did you mean 'summary'" in _error("builtin:docsum/test", text_field="sumary")


def test_corpus_without_text(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n", encoding="utf-8")
    write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": None}])
    assert "no text found" in _error([str(tmp_path / "blank.txt"), str(tmp_path / "empty.jsonl")])
    (tmp_path / "nothing.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        load_records(str(tmp_path / "nothing.jsonl"))


def test_non_utf8_and_non_text_field(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "not UTF-8" in _error(str(tmp_path / "latin1.txt"))
    write_jsonl(tmp_path / "a.jsonl", [{"text": ["a", "list"]}])
    assert "holds list, not text" in _error(str(tmp_path / "a.jsonl"))


def test_unknown_builtin_and_split():
    assert "did you mean 'pydoc'" in _error("builtin:pydco")
    assert "did you mean 'validation'" in _error("builtin:pydoc/valid")


def test_hub_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    message = _error("hub:wikitext")
    assert "hub:wikitext" in message and "unreachable" in message and "local" in message


# --------------------------------------------------------------------------------------------
# built-in demo corpora
# --------------------------------------------------------------------------------------------


def test_pydoc_corpus_is_deterministic_and_split_disjoint():
    records = [r for _, r in pydoc_records()]
    assert sum(len(r["text"]) for r in records) > 2_000_000  # a few MB of English prose and code
    splits = {s: [r["title"] for r in iter_records(f"builtin:pydoc/{s}")] for s in ("train", "validation", "test")}
    titles = [t for s in splits.values() for t in s]
    assert len(titles) == len(set(titles)) == len(records)
    assert len(splits["train"]) > 0.8 * len(records) and splits["validation"] and splits["test"]
    # rebuilding from scratch gives the very same corpus
    pydoc_records.cache_clear()
    from llmkit.data import builtin

    builtin._stdlib_docs.cache_clear()
    assert [r for _, r in pydoc_records()] == records


def test_docsum_records_have_summary_and_body():
    records = load_records("builtin:docsum")
    assert len(records) > 1000
    assert all(set(r) == {"id", "document", "summary"} for r in records)
    assert all("\n" not in r["summary"] and len(r["document"]) >= 100 for r in records)
    ids = {s: {r["id"] for r in iter_records(f"builtin:docsum/{s}")} for s in ("train", "validation", "test")}
    assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"]) and not (ids["validation"] & ids["test"])
    assert sum(len(v) for v in ids.values()) == len(records)
    # records are copies: mutating one does not change the cached corpus
    first = next(iter_records("builtin:docsum"))
    first["summary"] = "changed"
    assert next(iter_records("builtin:docsum"))["summary"] != "changed"
    assert docsum_records()[0][1]["summary"] != "changed"


def test_hub_source_streams_with_a_sample_cap(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, revision=None):
        calls.append((path, name, split, streaming))
        return iter({"text": f"row {i}", "id": i} for i in range(100))

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("llmkit.data.sources.hub_host_resolves", lambda: True)  # as if online: no DNS here
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = {"hub": "someone/corpus", "name": "en", "split": "validation", "max_samples": 3}
    assert list(iter_texts([source, "hub:other/set"], max_samples=5)) == ["row 0", "row 1", "row 2", "row 0", "row 1"]
    assert calls == [("someone/corpus", "en", "validation", True), ("other/set", None, "train", True)]
    assert "hub:someone/corpus (config en, split validation, up to 3 records)" in describe([source])


def test_hub_load_failure_is_one_line(monkeypatch):
    import datasets

    def missing(*args, **kwargs):
        raise FileNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub\nmore details")

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("llmkit.data.sources.hub_host_resolves", lambda: True)  # as if online: no DNS here
    monkeypatch.setattr(datasets, "load_dataset", missing)
    message = _error("hub:nobody/nothing")
    assert "hub:nobody/nothing: cannot load the dataset (FileNotFoundError" in message


def test_located_records_name_file_and_line(tmp_path):
    from llmkit.data.sources import iter_located_records

    path = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    assert [where for where, _ in iter_located_records(str(path))] == [f"{path}:1", f"{path}:2"]
