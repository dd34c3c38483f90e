"""Train a BPE, Unigram or WordPiece tokenizer on a corpus and save it for `AutoTokenizer`.

    llmkit tokenizer train tokenizer/tiny --set output_dir=runs/tok

The corpus is streamed from llmkit/data/sources.py into `tokenizers.Tokenizer.train_from_iterator` in
batches, so a corpus larger than memory is never held at once. The result, written at the top of
`output_dir`, is a `PreTrainedTokenizerFast` (tokenizer.json, tokenizer_config.json with the
special tokens, chat template and model_max_length), plus `report.json` and `recipe.yaml`.

The three models and what round-trips:

- bpe: byte-level BPE (GPT-2 style, no prefix space). Every string is bytes, so decode(encode(x))
  == x for any Unicode text when normalization is 'none' and lowercase is off.
- unigram: SentencePiece-style Metaspace pieces plus 256 byte-fallback pieces, so characters never
  seen in training still round-trip; spaces, tabs, newlines and runs of them are kept. Only a literal
  U+2581 ('▁') in the input comes back as a space. tokenizers' Unigram trainer has no
  min_frequency, so that key does not apply to it.
- wordpiece: BERT-style; splitting on whitespace and punctuation loses the exact spacing by design.

The report measures all of this on a held-out sample and on a fixed mixed-script string.
A run is written to a temporary directory beside `output_dir` and renamed into place when complete,
so a failure never leaves half a tokenizer. Running the same recipe again on the same data finds
the finished tokenizer and returns its report without retraining; a different tokenizer already
in `output_dir` is refused unless `overwrite=True` (`--overwrite`).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmkit import __version__, rundir
from llmkit.data.sources import check_sources, decoding_settings, fingerprint, iter_texts
from llmkit.data.splits import builtin_validation_warning, held_out
from llmkit.errors import RecipeError, RunDirError
from llmkit.prompts import CHAT_MARKERS, chatml_template
from llmkit.recipes import TokenizerRecipe, TokenizerSpec

MIXED_SCRIPT = (
    "Hello, world!  Two  spaces,\tone tab, and a new line:\n"
    "中文分词测试，日本語のテキスト，한국어 문장.\n"
    "Emoji: 🙂🚀 👩‍👩‍👧 (family ZWJ), flags 🇫🇷.\n"
    "Accents: café, naïve, Ångström, e\u0301 (decomposed), ß.\n"
    "    indented code:\n\tif x  ==  1:\r\n\t\treturn 'ok'   \n\n\n"
)
"""Round-trip probe: English, CJK, emoji (with ZWJ sequences), composed and decomposed accents, whitespace runs."""

HELDOUT_EVERY = 20
"""Without data.validation, 1 in 20 training documents is held out for the report (up to data.heldout_docs)."""
HELDOUT_MAX_CHARS = 2_000_000
REPORT_DOC_CHARS = 100_000
"""The report measures at most 2 M characters, each document cut (at a line end) to its first 100 k:
the cost stays bounded on huge corpora, and encode_batch spreads many pieces over all cores where
one 1 MB document would encode on a single core."""
BATCH_DOCS = 1000
BATCH_CHARS = 8_000_000
"""Documents go to the trainer in batches of at most this many documents / characters."""
PROGRESS_SECONDS = 10.0
"""While the corpus is read, a progress line every this many seconds."""


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def run(recipe: TokenizerRecipe, overwrite: bool = False) -> dict:
    """Train the recipe's tokenizer, save it at the top of output_dir with report.json; return the report."""
    spec = recipe.tokenizer
    special = special_token_list(spec)
    _check_spec(spec, special)
    output_dir = Path(recipe.output_dir)
    sources = list(recipe.data.train) + list(recipe.data.validation or [])
    check_sources(sources)  # missing files and unknown built-ins fail here, before any work
    warning = builtin_validation_warning(recipe.data)
    if warning:
        print(warning, file=sys.stderr)
    data_fingerprint = fingerprint(
        sources, text_field=recipe.data.text_field, max_samples=recipe.data.max_samples,
        **decoding_settings(recipe.data.encoding_errors),
    )
    finished = _finished_report(recipe, data_fingerprint, overwrite)
    if finished is not None:
        print(f"tokenizer already trained in {output_dir} with this recipe and data; pass --overwrite to retrain")
        return finished

    # The whole output_dir is replaced at the end, so its lock sits beside it, where the temporary
    # directory goes too (taking the lock proves that place writable before training starts).
    with rundir.locked(output_dir, beside=True):
        tmp_dir = rundir.temp_path(output_dir.parent, output_dir.name)  # also removes those of killed runs
        tmp_dir.mkdir()
        try:
            report = _train_into(recipe, special, tmp_dir)
            report["data_fingerprint"] = data_fingerprint
            (tmp_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            rundir.write_resolved(recipe, tmp_dir)
            rundir.publish_dir(tmp_dir, output_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    print(format_report(report, output_dir))
    return report


def special_token_list(spec: TokenizerSpec) -> list[str]:
    """The special tokens in id order (bos, eos, pad, unk, extra, chat markers), without duplicates."""
    named = [spec.special_tokens.bos, spec.special_tokens.eos, spec.special_tokens.pad, spec.special_tokens.unk]
    extra = list(spec.special_tokens.extra)
    if spec.chat_template == "default":
        extra += [m for m in CHAT_MARKERS if m not in extra]
    return list(dict.fromkeys(t for t in named + extra if t))


def _check_spec(spec: TokenizerSpec, special: list[str]) -> None:
    """Reject settings that cannot train, naming the key and the fix."""
    if spec.type in ("unigram", "wordpiece") and not spec.special_tokens.unk:
        raise RecipeError(f"tokenizer.special_tokens.unk: {spec.type} needs an unknown token; set it, e.g. '<|unk|>'")
    base = 256 if spec.type in ("bpe", "unigram") else 0  # byte alphabet / byte-fallback pieces
    needed = base + len(special) + 64
    if spec.vocab_size < needed:
        what = "the 256 byte tokens, " if base else ""
        raise RecipeError(
            f"tokenizer.vocab_size ({spec.vocab_size}) is too small for {spec.type}: {what}{len(special)} special "
            f"tokens and at least 64 learned tokens need {needed}; raise it"
        )
    if spec.chat_template not in (None, "default"):
        import jinja2
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            jinja2.Environment().parse(spec.chat_template)
        except jinja2.TemplateSyntaxError as exc:
            raise RecipeError(f"tokenizer.chat_template: not a valid Jinja template (line {exc.lineno}: {exc.message})") from None
        # Parsing misses unknown filters, sandbox violations and the template's own raise_exception:
        # render it once, in transformers' sandbox, the way `llmkit generate --chat` will.
        try:
            render_jinja_template(
                conversations=[[{"role": "user", "content": "Hello"}]], chat_template=spec.chat_template,
                add_generation_prompt=True, bos_token=spec.special_tokens.bos or "", eos_token=spec.special_tokens.eos or "",
            )
        except Exception as exc:
            reason = (str(exc).splitlines() or [""])[0][:200]
            raise RecipeError(
                f"tokenizer.chat_template: the template fails on a one-message conversation ({type(exc).__name__}: {reason}); fix it"
            ) from None


def _finished_report(recipe: TokenizerRecipe, data_fingerprint: str, overwrite: bool) -> dict | None:
    """The report of an identical finished run in output_dir, None when it is free; RunDirError when it holds another run."""
    run = rundir.claim(recipe, overwrite, what="tokenizer")
    if run.state != "same":
        return None
    report_file = run.path / "report.json"
    try:
        report = json.loads(report_file.read_text(encoding="utf-8")) if (run.path / "tokenizer.json").is_file() else {}
    except (OSError, ValueError):
        report = {}
    if report.get("data_fingerprint") == data_fingerprint:
        return report
    raise RunDirError(
        f"output_dir {run.path}: holds a tokenizer trained on different data (or an unfinished one); "
        "pass --overwrite to replace it or choose another output_dir"
    )


# --------------------------------------------------------------------------------------------
# Building and training
# --------------------------------------------------------------------------------------------


def build_tokenizer(spec: TokenizerSpec, special: list[str], show_progress: bool = False):
    """An untrained `tokenizers.Tokenizer` and its trainer for the spec (`show_progress`: the trainer's own bars)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    steps = {"none": [], "nfc": [normalizers.NFC()], "nfkc": [normalizers.NFKC()]}[spec.normalization]
    if spec.lowercase:
        steps.append(normalizers.Lowercase())
    if spec.type == "bpe":
        tokenizer = Tokenizer(models.BPE())
        # no prefix space and a byte-level decoder: decode(encode(x)) == x for any text
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=spec.vocab_size,
            min_frequency=spec.min_frequency,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
    elif spec.type == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        # prepend_scheme='never' keeps a leading space exact ('always' swallows one on decode)
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        tokenizer.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)]
        )
        trainer = trainers.UnigramTrainer(
            vocab_size=spec.vocab_size - 256,  # room for the byte-fallback pieces added after training
            special_tokens=special,
            unk_token=spec.special_tokens.unk,
            show_progress=show_progress,
        )
    else:
        tokenizer = Tokenizer(models.WordPiece(unk_token=spec.special_tokens.unk))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        trainer = trainers.WordPieceTrainer(
            vocab_size=spec.vocab_size,
            min_frequency=spec.min_frequency,
            special_tokens=special,
            continuing_subword_prefix="##",
            show_progress=show_progress,
        )
    if steps:
        tokenizer.normalizer = normalizers.Sequence(steps)
    return tokenizer, trainer


def _add_byte_fallback(tokenizer) -> None:
    """Give a trained Unigram model the 256 <0xNN> pieces so unseen characters encode as UTF-8 bytes."""
    from tokenizers import models

    model = json.loads(tokenizer.to_str())["model"]
    vocab = [(piece, score) for piece, score in model["vocab"]]
    lowest = min(score for _, score in vocab)
    known = {piece for piece, _ in vocab}
    # scored below every learned piece, so bytes are used only for characters nothing else covers
    vocab += [(f"<0x{b:02X}>", lowest - 1.0) for b in range(256) if f"<0x{b:02X}>" not in known]
    tokenizer.model = models.Unigram(vocab, unk_id=model["unk_id"], byte_fallback=True)


def _post_process(tokenizer, spec: TokenizerSpec) -> None:
    """BOS via a TemplateProcessing post-processor (and byte-level offsets for BPE)."""
    from tokenizers import processors

    steps = [processors.ByteLevel(trim_offsets=False)] if spec.type == "bpe" else []
    bos = spec.special_tokens.bos
    if spec.add_bos and bos:
        bos_id = tokenizer.token_to_id(bos)
        steps.append(
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
        )
    if steps:
        tokenizer.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)


def _pad_vocab(tokenizer, multiple: int) -> list[str]:
    """Add unused special tokens until the vocabulary size is a multiple of `multiple`; return them."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    existing = tokenizer.get_vocab(with_added_tokens=True)
    padding, index = [], 0
    while (size + len(padding)) % multiple:
        name = f"<|unused_{index}|>"
        index += 1
        if name not in existing:
            padding.append(name)
    if padding:
        tokenizer.add_special_tokens(padding)
    return padding


def chat_template_for(spec: TokenizerSpec) -> str | None:
    """The Jinja chat template to install: the recipe's own, llmkit's ChatML default (llmkit/prompts.py), or None."""
    if spec.chat_template != "default":
        return spec.chat_template
    return chatml_template(bos=bool(spec.add_bos and spec.special_tokens.bos))


class _Stream:
    """Feeds training batches from the corpus and keeps the held-out documents and the counts.

    Errors from the sources are stored and re-raised after training: an exception raised inside
    the iterator that `train_from_iterator` consumes would otherwise surface wrapped by tokenizers.
    """

    def __init__(self, recipe: TokenizerRecipe):
        self.recipe = recipe
        self.hold_out = recipe.data.validation is None
        self.heldout: list[str] = []
        self.heldout_chars = 0
        self.docs = 0
        self.bytes = 0
        self.error: BaseException | None = None
        self.started = self.reported = time.perf_counter()

    def batches(self) -> Iterator[list[str]]:
        """Lists of documents for the trainer; a 1/HELDOUT_EVERY share of documents held out when asked."""
        data = self.recipe.data
        batch: list[str] = []
        chars = 0
        try:
            for index, text in enumerate(iter_texts(data.train, data.text_field, data.max_samples, data.encoding_errors)):
                if self.hold_out and self._take_heldout(index, text):
                    continue
                self.docs += 1
                self.bytes += len(text.encode("utf-8"))
                batch.append(text)
                chars += len(text)
                if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
                    yield batch
                    batch, chars = [], 0
                    self._progress()
        except GeneratorExit:
            raise
        except BaseException as exc:  # re-raised as is by _train_into once the trainer has returned
            self.error = exc
            return
        if batch:
            yield batch
        # What follows is the trainer's own work (merges for BPE; EM rounds for unigram, often the longer part).
        spec = self.recipe.tokenizer
        print(
            f"tokenizer: read {self.docs:,} documents ({self.bytes / 1e6:,.1f} MB) in {time.perf_counter() - self.started:.0f} s; "
            f"training the {spec.type} model (vocab {spec.vocab_size:,}) on them...",
            file=sys.stderr,
            flush=True,
        )

    def _progress(self) -> None:
        """A line on stderr every PROGRESS_SECONDS while the corpus is read (none for a corpus read in less)."""
        now = time.perf_counter()
        if now - self.reported >= PROGRESS_SECONDS:
            self.reported = now
            print(f"tokenizer: reading the corpus: {self.docs:,} documents ({self.bytes / 1e6:,.1f} MB) so far...", file=sys.stderr, flush=True)

    def _take_heldout(self, index: int, text: str) -> bool:
        if not held_out(index, 1 / HELDOUT_EVERY):
            return False
        if len(self.heldout) >= self.recipe.data.heldout_docs or self.heldout_chars >= HELDOUT_MAX_CHARS:
            return False
        piece = _report_piece(text)  # the whole document leaves training; only its measured part is kept
        self.heldout.append(piece)
        self.heldout_chars += len(piece)
        return True


def _report_piece(text: str) -> str:
    """A document cut to REPORT_DOC_CHARS at a line end (or hard, for a very long line)."""
    if len(text) <= REPORT_DOC_CHARS:
        return text
    cut = text.rfind("\n", 0, REPORT_DOC_CHARS)
    return text[: cut + 1] if cut >= REPORT_DOC_CHARS // 2 else text[:REPORT_DOC_CHARS]


def _take_sample(texts: Iterator[str]) -> list[str]:
    """Report pieces of documents until HELDOUT_MAX_CHARS characters are collected."""
    docs, chars = [], 0
    for text in texts:
        docs.append(_report_piece(text))
        chars += len(docs[-1])
        if chars >= HELDOUT_MAX_CHARS:
            break
    return docs


def _report_sample(recipe: TokenizerRecipe, stream: _Stream) -> tuple[list[str], str]:
    """The documents the report measures on, and where they come from."""
    data = recipe.data
    if data.validation is not None:
        # heldout_docs = 0 cannot mean "measure nothing" here: fall back to 200 documents
        texts = iter_texts(data.validation, data.text_field, data.heldout_docs or 200, data.encoding_errors)
        return _take_sample(texts), "data.validation"
    if stream.heldout:
        return stream.heldout, f"1 in {HELDOUT_EVERY} training documents, held out (llmkit/data/splits.py)"
    # heldout_docs = 0 or a corpus too small to hold any out: say the numbers are in-sample
    texts = iter_texts(data.train, data.text_field, 200, data.encoding_errors)
    return _take_sample(texts), "training documents (in-sample: nothing was held out)"


def _train_into(recipe: TokenizerRecipe, special: list[str], out_dir: Path) -> dict:
    """Train, save the HF tokenizer into out_dir and return the report."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = recipe.tokenizer
    # The trainer's own progress bars only on a terminal (they are escape codes in a log file);
    # the corpus-reading lines of _Stream go everywhere, so a long run is never silent.
    tokenizer, trainer = build_tokenizer(spec, special, show_progress=sys.stderr.isatty())
    stream = _Stream(recipe)
    start = time.perf_counter()
    tokenizer.train_from_iterator(stream.batches(), trainer=trainer)
    if stream.error is not None:
        raise stream.error
    training_seconds = time.perf_counter() - start
    if spec.type == "unigram":
        _add_byte_fallback(tokenizer)
    trained_size = tokenizer.get_vocab_size(with_added_tokens=True)
    padding = _pad_vocab(tokenizer, spec.pad_vocab_to_multiple_of)
    _post_process(tokenizer, spec)

    names = {"bos_token": spec.special_tokens.bos, "eos_token": spec.special_tokens.eos,
             "pad_token": spec.special_tokens.pad, "unk_token": spec.special_tokens.unk}
    named = {k: v for k, v in names.items() if v}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=spec.model_max_length,
        clean_up_tokenization_spaces=False,  # it rewrites " ." and the like: decode must return the text as is
        extra_special_tokens=[t for t in special if t not in named.values()],
        **named,
    )
    template = chat_template_for(spec)
    if template:
        fast.chat_template = template
    fast.save_pretrained(out_dir)

    sample, sample_source = _report_sample(recipe, stream)
    report: dict[str, Any] = {
        "type": spec.type,
        "vocab_size": len(fast),
        "vocab_size_target": spec.vocab_size,
        "vocab_size_trained": trained_size,
        "padding_tokens": len(padding),
        "special_tokens": {t: tokenizer.token_to_id(t) for t in special},
        "training_seconds": round(training_seconds, 3),
        "train_docs": stream.docs,
        "train_bytes": stream.bytes,
        "heldout": measure(tokenizer, sample) | {"source": sample_source, "max_chars_per_doc": REPORT_DOC_CHARS},
        "mixed_script": _mixed_script(tokenizer),
        "llmkit_version": __version__,
        "tokenizers_version": tokenizers.__version__,
    }
    return report


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def measure(tokenizer, docs: list[str]) -> dict:
    """Tokens per byte and per word, and round-trip exactness, of a `tokenizers.Tokenizer` on documents."""
    if not docs:
        return {"docs": 0}
    # the _fast variant skips offsets, which the report does not need: about half the time on long documents
    encodings = tokenizer.encode_batch_fast(docs, add_special_tokens=False)
    decoded = tokenizer.decode_batch([e.ids for e in encodings], skip_special_tokens=False)
    normalizer = tokenizer.normalizer
    tokens = sum(len(e.ids) for e in encodings)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    words = sum(len(d.split()) for d in docs)
    exact = sum(out == doc for out, doc in zip(decoded, docs, strict=True))
    normalized = sum(out == (normalizer.normalize_str(doc) if normalizer else doc) for out, doc in zip(decoded, docs, strict=True))
    same_words = sum(out.split() == doc.split() for out, doc in zip(decoded, docs, strict=True))
    unk_id = tokenizer.model.unk_token if hasattr(tokenizer.model, "unk_token") else None
    unk = tokenizer.token_to_id(unk_id) if isinstance(unk_id, str) else None
    return {
        "docs": len(docs),
        "bytes": n_bytes,
        "tokens": tokens,
        "tokens_per_byte": round(tokens / n_bytes, 5),
        "bytes_per_token": round(n_bytes / tokens, 4) if tokens else None,
        "tokens_per_word": round(tokens / words, 4) if words else None,
        "roundtrip_exact": round(exact / len(docs), 5),
        "roundtrip_exact_after_normalization": round(normalized / len(docs), 5),
        "roundtrip_same_words": round(same_words / len(docs), 5),
        "unk_tokens": sum(e.ids.count(unk) for e in encodings) if unk is not None else 0,
    }


def _mixed_script(tokenizer) -> dict:
    ids = tokenizer.encode(MIXED_SCRIPT, add_special_tokens=False).ids
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    normalized = tokenizer.normalizer.normalize_str(MIXED_SCRIPT) if tokenizer.normalizer else MIXED_SCRIPT
    return {
        "exact": decoded == MIXED_SCRIPT,
        "exact_after_normalization": decoded == normalized,
        "tokens": len(ids),
        "decoded": decoded,
    }


def format_report(report: dict, output_dir: Path) -> str:
    """The short report printed after training."""
    held = report["heldout"]
    mixed = report["mixed_script"]
    lines = [
        f"tokenizer ({report['type']}) saved to {output_dir}",
        f"  vocab size        {report['vocab_size']:,} (target {report['vocab_size_target']:,}, "
        f"{report['padding_tokens']} padding tokens)",
        f"  trained on        {report['train_docs']:,} documents, {report['train_bytes'] / 1e6:,.2f} MB "
        f"in {report['training_seconds']:.1f} s",
    ]
    if held.get("docs"):
        lines += [
            f"  held-out sample   {held['docs']:,} documents, {held['bytes'] / 1e6:,.2f} MB ({held['source']})",
            f"  tokens per byte   {held['tokens_per_byte']:.4f}   tokens per word {held['tokens_per_word']}",
            f"  round-trip        {held['roundtrip_exact']:.1%} of held-out documents exact"
            f" ({held['roundtrip_exact_after_normalization']:.1%} after normalization,"
            f" {held['roundtrip_same_words']:.1%} with the same words)",
        ]
    verdict = "round-trips exactly" if mixed["exact"] else (
        "round-trips exactly after normalization" if mixed["exact_after_normalization"] else "does NOT round-trip"
    )
    lines.append(f"  mixed-script text {verdict}")
    lines.append(f"  report            {output_dir / 'report.json'}")
    return "\n".join(lines)
