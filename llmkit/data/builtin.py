"""Built-in demo corpora, made from text every Python installation ships (no download).

    python -c "from llmkit.data.sources import iter_texts; print(next(iter_texts('builtin:docsum/test'))[:300])"

- `builtin:pydoc[/SPLIT]`: the pydoc_data reference topics plus a pydoc-like page per standard-library
  module (records {"title", "text"}), for pretraining.
- `builtin:docsum[/SPLIT]`: one record per standard-library docstring, {"id", "document" (the body),
  "summary" (its first line)}, for summarization.
- `builtin:docsum-choice[/SPLIT]`: the same docstrings as 4-way multiple-choice questions, {"id",
  "context" ("{document}\n\nSummary:"), "choices" (the real summary and three other records'), "label"},
  for `llmkit eval` with metrics [multiple_choice] (see `docsum_choice_records`).
- `builtin:arithmetic[/SPLIT]`: small arithmetic word problems in GSM8K's layout, {"id", "question",
  "answer" (the worked steps, then "#### N")}, generated from a seed, for metrics [generative]
  (see `arithmetic_records`).
- `builtin:docchat[/SPLIT]`: the same docstrings as chat records {"id", "messages"[, "tools"]}: two-turn
  conversations, and (every other record) a `lookup_docs` tool call answered by a tool message, for
  chat fine-tuning (see `docchat_records`).
- `builtin:docsum-pref[/SPLIT]`: the same docstrings as preference pairs, {"id", "prompt"
  ("Summarize ...{document}...Summary:\n"), "chosen" (the real summary), "rejected" (another record's)},
  for `llmkit finetune` with task.type preference (see `docsum_pref_records`).

SPLIT is train, validation or test: a fixed ~90/5/5 split by a hash of each record's id.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import random
import re
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from llmkit.errors import DataError, did_you_mean

SPLITS = ("train", "validation", "test")


BUILTIN_NAMES = ("pydoc", "docsum", "docsum-choice", "docsum-pref", "arithmetic", "docchat")


BUILTIN_LAYOUT = 1
"""Bump when the built-in corpora's construction changes, so fingerprints (and data caches) change too."""


def parse_builtin(source: str) -> tuple[str, str | None]:
    """'builtin:pydoc/train' -> ('pydoc', 'train'); DataError for an unknown name or split."""
    spec = source.removeprefix("builtin:")
    name, _, split = spec.partition("/")
    if name not in BUILTIN_NAMES:
        raise DataError(
            f"{source}: unknown built-in corpus{did_you_mean(name, BUILTIN_NAMES)}; choose one of {', '.join('builtin:' + n for n in BUILTIN_NAMES)}"
        )
    if split and split not in SPLITS:
        raise DataError(f"{source}: unknown split {split!r}{did_you_mean(split, SPLITS)}; choose one of {', '.join(SPLITS)}")
    return name, split or None


def read_builtin(source: str) -> Iterator[tuple[str, dict]]:
    name, split = parse_builtin(source)
    records = {
        "pydoc": pydoc_records, "docsum": docsum_records, "docsum-choice": docsum_choice_records, "docsum-pref": docsum_pref_records,
        "arithmetic": arithmetic_records, "docchat": docchat_records,
    }[name]()  # fmt: skip
    for index, (record_split, record) in enumerate(records):
        if split is None or record_split == split:
            yield f"builtin:{name} record {index}", dict(record)  # a copy: callers may mutate records


def split_of(key: str) -> str:
    """Deterministic ~90/5/5 train/validation/test split of a stable id, by hash."""
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


@functools.lru_cache(maxsize=1)
def _stdlib_docs() -> tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...]:
    """(module name, pydoc-like page, ((qualified name, docstring), ...)) for each stdlib module, sorted.

    The files are parsed with `ast`, never imported: importing arbitrary stdlib modules has side
    effects (antigravity opens a browser, this prints) and what imports depends on the platform.
    One parse serves both corpora and only the extracted text is kept, not the syntax trees.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    modules = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if any(p in skip for p in parts):
            continue
        name = ".".join(p for p in parts if p != "__init__")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules warn while parsing
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # e.g. lib2to3 grammar fixtures; skipping them is deterministic too
        docs = []
        module_doc = ast.get_docstring(tree, clean=True)
        if module_doc:
            docs.append((name, module_doc))
        docs.extend(_documented(tree.body, f"{name}."))
        modules.append((name, _module_text(name, module_doc, tree), tuple(docs)))
    modules.sort(key=lambda item: item[0])
    return tuple(modules)


def _public(name: str) -> bool:
    """Public names and dunder methods (whose docstrings are often the best-written ones)."""
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__") and len(name) > 4)


def _documented(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of the documented public classes and functions in a body, nested classes included."""
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and _public(node.name):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield f"{prefix}{node.name}", doc
            if isinstance(node, ast.ClassDef):
                yield from _documented(node.body, f"{prefix}{node.name}.")


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"class {node.name}({bases})" if bases else f"class {node.name}"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}"


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line.strip() else "" for line in text.splitlines())


def _module_text(name: str, module_doc: str | None, tree: ast.Module) -> str:
    """A pydoc-like plain-text page: the module docstring, then each documented class (with methods) and function."""
    blocks = [module_doc] if module_doc else []

    def add(body: list[ast.stmt], depth: int) -> None:
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and _public(node.name):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    blocks.append(_indent(_signature(node), 4 * depth) + "\n" + _indent(doc, 4 * depth + 4))
                if isinstance(node, ast.ClassDef) and depth < 2:
                    add(node.body, depth + 1)

    add(tree.body, 0)
    if not blocks:
        return ""
    title = f"Module {name}"
    return f"{title}\n{'=' * len(title)}\n\n" + "\n\n".join(blocks) + "\n"


@functools.lru_cache(maxsize=1)
def pydoc_records() -> tuple[tuple[str, dict], ...]:
    """builtin:pydoc as (split, {"title", "text"}): pydoc_data topics plus stdlib module docs, split by title hash."""
    from pydoc_data.topics import topics

    records = [{"title": f"topic:{title}", "text": topics[title]} for title in sorted(topics)]
    for name, text, _ in _stdlib_docs():
        if len(text) >= 200:  # a bare title with a one-line docstring teaches little
            records.append({"title": f"module:{name}", "text": text})
    return tuple((split_of(r["title"]), r) for r in records)


_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")


_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


def _docsum_pair(doc: str) -> tuple[str, str] | None:
    """(summary, document) from a cleaned docstring, or None when it is not a usable example.

    The summary is the docstring's first paragraph (usually one line) joined into one line, or its
    first line when that is a whole sentence followed directly by more text; the document is the
    rest. Keep it only when the summary is a real sentence (not a signature line such as
    'S.find(sub) -> int') and the document is at least 100 characters and two sentences (or 200
    characters) long.
    """
    head, sep, body = doc.partition("\n\n")
    if not sep:
        head, sep, body = doc.partition("\n")
        if not sep or not head.rstrip().endswith("."):
            return None
    summary = " ".join(head.split())
    body = body.strip()
    if not 15 <= len(summary) <= 300 or _SIGNATURE_LINE.match(summary) or "->" in summary:
        return None
    if len(body) < 100 or (len(_SENTENCE_END.findall(body)) < 2 and len(body) < 200):
        return None
    return summary, body


@functools.lru_cache(maxsize=1)
def docsum_records() -> tuple[tuple[str, dict], ...]:
    """builtin:docsum as (split, {"id", "document", "summary"}): one record per stdlib docstring, split by id hash."""
    records, seen = [], set()
    for _, _, docs in _stdlib_docs():
        for ident, doc in docs:
            pair = _docsum_pair(doc)
            if pair is None or pair in seen:  # inherited/copied docstrings repeat; keep the first
                continue
            seen.add(pair)
            records.append({"id": ident, "document": pair[1], "summary": pair[0]})
    return tuple((split_of(r["id"]), r) for r in records)


DOCSUM_CHOICE_TEMPLATE = "{document}\n\nSummary:"
DOCSUM_CHOICE_DOCUMENT_CHARS = 600


def shorten(text: str, max_chars: int) -> str:
    """`text` cut to at most max_chars at the last whitespace before the limit (whole words only)."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]  # a space right after the limit still ends a whole word
    boundary = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
    return (cut[:boundary] if boundary > 0 else text[:max_chars]).rstrip()


def docsum_choice_split(
    split: str, num_choices: int = 4, seed: int = 0, document_chars: int = DOCSUM_CHOICE_DOCUMENT_CHARS
) -> list[dict]:
    """Multiple-choice records of one builtin:docsum split: pick a docstring's summary among num_choices.

    Context "{document}\n\nSummary:" (the document cut to document_chars at a word boundary, so CPU
    scoring stays fast); choices: the record's summary and num_choices - 1 other summaries of the same
    split. Distractors and the answer's position come from random.Random(f"{seed}/{record id}"), so the
    questions are the same in every run on the same Python version (the stdlib is the corpus).
    """
    if split not in SPLITS:
        raise DataError(f"builtin:docsum has splits {', '.join(SPLITS)}, not {split!r}")
    if num_choices < 2:
        raise DataError(f"num_choices ({num_choices}) must be at least 2")
    records = [r for s, r in docsum_records() if s == split]
    summaries = sorted({r["summary"] for r in records})  # distinct, in an order that does not depend on the walk
    if len(summaries) < num_choices:
        raise DataError(
            f"builtin:docsum/{split} has {len(summaries)} distinct summaries, fewer than num_choices ({num_choices})"
        )
    out = []
    for record in records:
        rng = random.Random(f"{seed}/{record['id']}")
        right = record["summary"]
        # num_choices draws always hold num_choices - 1 that differ from the right summary.
        distractors = [s for s in rng.sample(summaries, num_choices) if s != right][: num_choices - 1]
        label = rng.randrange(num_choices)
        out.append({
            "id": record["id"],
            "context": DOCSUM_CHOICE_TEMPLATE.format(document=shorten(record["document"], document_chars)),
            "choices": distractors[:label] + [right] + distractors[label:],
            "label": label,
        })  # fmt: skip
    return out


@functools.lru_cache(maxsize=1)
def docsum_choice_records() -> tuple[tuple[str, dict], ...]:
    """builtin:docsum-choice as (split, {"id", "context", "choices", "label"}): 4 choices, seed 0, every split."""
    return tuple((split, r) for split in SPLITS for r in docsum_choice_split(split))


ARITHMETIC_PROBLEMS = 1000
_NAMES = ("Ada", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Mo", "Nia", "Oto", "Pia")
_THINGS = ("apples", "marbles", "books", "coins", "stamps", "pencils", "shells", "cards", "cookies", "stickers")


def arithmetic_problem(index: int, seed: int = 0) -> dict:
    """One two-step word problem (add, take away, share or multiply) with GSM8K's answer layout, from random.Random(f"{seed}/{index}")."""
    rng = random.Random(f"{seed}/{index}")
    name, other = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    kind = rng.randrange(4)
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    if kind == 0:
        c = rng.randint(1, a + b - 1)
        question = f"{name} has {a} {thing}. {other} gives {name} {b} more, and then {name} loses {c}. How many {thing} does {name} have now?"
        steps = [f"{name} has {a} + {b} = {a + b} {thing} after the gift.", f"After losing {c}, {name} has {a + b} - {c} = {a + b - c}."]
        result = a + b - c
    elif kind == 1:
        c = rng.randint(2, 9)
        question = f"{name} buys {c} bags with {a} {thing} in each and already had {b}. How many {thing} does {name} have in total?"
        steps = [f"The bags hold {c} * {a} = {c * a} {thing}.", f"With the {b} already there, that is {c * a} + {b} = {c * a + b}."]
        result = c * a + b
    elif kind == 2:
        c = rng.randint(2, 9)
        total = a * c
        question = f"{name} shares {total} {thing} equally among {c} friends, and each friend gets {b} more from {other}. How many {thing} does each friend have?"
        steps = [f"Each friend first gets {total} / {c} = {a} {thing}.", f"With {b} more, each has {a} + {b} = {a + b}."]
        result = a + b
    else:
        c = rng.randint(2, 6)
        question = f"{name} has {a} {thing} and {other} has {c} times as many. How many {thing} do they have together?"
        steps = [f"{other} has {c} * {a} = {c * a} {thing}.", f"Together they have {a} + {c * a} = {a + c * a}."]
        result = a + c * a
    answer = "\n".join(steps) + f"\n#### {result}"
    return {"id": f"arithmetic-{index}", "question": question, "answer": answer}


@functools.lru_cache(maxsize=1)
def arithmetic_records() -> tuple[tuple[str, dict], ...]:
    """builtin:arithmetic as (split, {"id", "question", "answer"}): ARITHMETIC_PROBLEMS problems, split by id hash."""
    records = [arithmetic_problem(i) for i in range(ARITHMETIC_PROBLEMS)]
    return tuple((split_of(r["id"]), r) for r in records)


LOOKUP_DOCS_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup_docs",
        "description": "A docstring.",
        "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
    },
}
DOCCHAT_TOOL_CHARS = 60


@functools.lru_cache(maxsize=1)
def docchat_records() -> tuple[tuple[str, dict], ...]:
    """builtin:docchat as (split, {"id", "messages"[, "tools"]}): each builtin:docsum record as a conversation.

    Even records: "What does NAME do?" -> the summary, then "Which module is it in?" -> the module
    (two assistant turns to train). Odd records: the same question answered through a lookup_docs
    tool call, the tool's reply (the docstring's start), then the summary. Splits are docsum's.
    """
    out = []
    for index, (split, record) in enumerate(docsum_records()):
        name = record["id"]
        question = {"role": "user", "content": f"What does {name} do?"}
        if index % 2 == 0:
            messages = [
                question,
                {"role": "assistant", "content": record["summary"]},
                {"role": "user", "content": "Which module is it in?"},
                {"role": "assistant", "content": f"The {name.split('.')[0]} module."},
            ]
            out.append((split, {"id": name, "messages": messages}))
            continue
        call = {"type": "function", "function": {"name": "lookup_docs", "arguments": {"name": name}}}
        messages = [
            question,
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": shorten(record["document"], DOCCHAT_TOOL_CHARS)},
            {"role": "assistant", "content": record["summary"]},
        ]
        out.append((split, {"id": name, "messages": messages, "tools": [LOOKUP_DOCS_TOOL]}))
    return tuple(out)


DOCSUM_PREF_TEMPLATE = "Summarize the following text.\n\n{document}\n\nSummary:\n"
DOCSUM_PREF_DOCUMENT_CHARS = 400


@functools.lru_cache(maxsize=1)
def docsum_pref_records() -> tuple[tuple[str, dict], ...]:
    """builtin:docsum-pref as (split, {"id", "prompt", "chosen", "rejected"}): the real summary preferred over another's.

    The prompt is the summarization prompt of the document cut to DOCSUM_PREF_DOCUMENT_CHARS at a
    word boundary (short enough for small seq_len on a CPU); the rejected summary is drawn from the
    other summaries of the same split with random.Random(f"pref/{id}"), so the pairs are the same
    in every run on the same Python version.
    """
    out = []
    for split in SPLITS:
        records = [r for s, r in docsum_records() if s == split]
        summaries = sorted({r["summary"] for r in records})
        for record in records:
            rng = random.Random(f"pref/{record['id']}")
            rejected = rng.choice(summaries)
            while rejected == record["summary"]:
                rejected = rng.choice(summaries)
            prompt = DOCSUM_PREF_TEMPLATE.format(document=shorten(record["document"], DOCSUM_PREF_DOCUMENT_CHARS))
            out.append((split, {"id": record["id"], "prompt": prompt, "chosen": record["summary"], "rejected": rejected}))
    return tuple(out)
