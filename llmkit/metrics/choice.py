"""Multiple-choice and cloze scoring of base checkpoints, the way lm-evaluation-harness scores them.

    python -c "from llmkit.metrics.choice import parse_choice_record as p; print(p({'goal': 'Open a jar.', 'sol1': 'Twist the lid.', 'sol2': 'Eat the lid.', 'label': 0}, 'piqa.jsonl:1'))"

Plain functions over a transformers causal LM and its tokenizer: parse records (`parse_choice_record`),
add few-shot examples (`with_fewshot`), score (`score_choices`, `score_cloze`), reduce
(`choice_metrics`, `metrics_by_subject`, `aggregate`) and write rows (`prediction_rows`).
"lm-eval" below is EleutherAI/lm-evaluation-harness 0.4; each convention names where it comes from.

What is scored (lm-eval's `HFLM.loglikelihood` and `_encode_pair`, lm_eval/models/huggingface.py):
  - a choice's score is the SUM of the log-probabilities of its continuation tokens given the
    context; context tokens are never scored. The continuation is " " + choice (lm-eval's default
    `target_delimiter`), or the bare choice when the context already ends with whitespace (lm-eval
    would add the delimiter anyway and score a double space). Then, as `_encode_pair` does, trailing
    whitespace of the context moves onto the continuation: "Answer: " + "A" is scored as
    "Answer:" + " A".
  - token ids: context = tokenizer(context).input_ids, so a BOS the tokenizer adds comes first;
    continuation = tokenizer(continuation, add_special_tokens=False).input_ids; the two are
    concatenated. lm-eval instead encodes context + continuation in one call and keeps what follows
    the context's length, with the tokenizer's default special tokens (lm-eval 0.4.13, add_bos_token
    unset; add_bos_token=False is add_special_tokens=False here); `pair_encoding="joint"` does that
    split (it is needed for SentencePiece tokenizers that prepend a dummy space: alone, " A" becomes
    "▁", "▁A"). With byte-level BPE both give the same ids whenever the continuation starts with a
    space, since the pre-tokenizer splits there. An empty context becomes the BOS token (else EOS),
    as lm-eval uses EOT.
  - too long for the window (`max_length`, else the config's max_position_embeddings / n_positions):
    as in lm-eval the model reads (context + continuation)[-(window + 1):][:-1], that is the context
    is cut from the left (its BOS goes too). The cut is made once per example, long enough for its
    longest choice, so every choice sees the same context (lm-eval cuts each pair alone; both agree
    whenever nothing is cut). Truncated examples are counted, not refused; a continuation longer
    than the window is a DataError.
  - is_greedy: every continuation token is the argmax of the logits that predict it (lm-eval's).

Speed: each context goes through the model once, however many choices it has. An example is one
row: its context, then each choice's tokens as a branch that attends to the context and to itself
only (a 4D additive attention mask and explicit position ids), so branch b's positions continue from
the context exactly as in a row of its own. Models that take no custom mask (flash-attention, no
position_ids, or a sliding window shorter than the scoring window) fall back to one row per
(context, choice) pair, right-padded with a 2D mask. Rows are sorted longest first, as lm-eval does.

Metrics (lm_eval/api/metrics.py and the multiple-choice metrics in lm_eval/api/_metrics/ll.py):
  acc        argmax of the summed log-probs; ties go to the first choice (numpy.argmax),
  acc_norm   argmax of log-prob / len(choice) in characters (lm-eval's acc_norm uses `char_len`,
             the choice text without the delimiter; the same as bytes for ASCII text),
  acc_bytes  argmax of log-prob / UTF-8 bytes of the choice (lm-eval's acc_bytes),
  *_stderr   lm-eval's mean_stderr: sample standard deviation (n - 1 denominator) / sqrt(n),
             which for 0/1 scores is sqrt(p (1 - p) / (n - 1)).
"""

from __future__ import annotations

import inspect
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from llmkit.errors import DataError
from llmkit.models import max_positions

TARGET_DELIMITER = " "  # lm-eval's default target_delimiter, between a context and its choice
FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default fewshot_delimiter, after every solved example
DEFAULT_WINDOW_TOKENS = 2048  # lm-eval's HFLM._DEFAULT_MAX_LENGTH, when neither config nor tokenizer says

PairEncoding = Literal["separate", "joint"]


@dataclass
class ChoiceExample:
    """One question: a context, its choices and the index of the right one."""

    context: str
    choices: list[str]
    label: int
    # Partial scoring (Winogrande): choice i completes the context, then this same text is scored.
    continuation: str | None = None
    # Task header before any few-shot examples, e.g. MMLU's "The following are multiple choice ...".
    description: str = ""
    subject: str | None = None  # MMLU subject, for per-subject averages
    where: str = ""  # the record it came from ("file.jsonl:12"), for error messages


@dataclass
class ChoiceScores:
    """Summed continuation log-probs of one example's choices, their token counts and is_greedy."""

    logprobs: list[float]
    is_greedy: list[bool]
    continuation_tokens: list[int]
    truncated_tokens: int = 0  # context tokens cut from the left to fit the window

    @property
    def truncated(self) -> bool:
        """Whether the context was cut to fit the model's window."""
        return self.truncated_tokens > 0


# ----------------------------------------------------------------------------------------------
# 1. Record layouts
# ----------------------------------------------------------------------------------------------

_CONTEXT_FIELDS = ("question", "context", "query")
_LABEL_FIELDS = ("label", "answer")
_FIELD_ROLES = ("context", "choices", "label")


def _problem(record: Mapping, where: str, text: str) -> DataError:
    fields = ", ".join(str(k) for k in record) or "none"
    return DataError(f"{where}: {text} (record fields: {fields})")


def _named_field(record: Mapping, names: Sequence[str], where: str, role: str) -> tuple[str, Any]:
    for name in names:
        if record.get(name) is not None:
            return name, record[name]
    raise _problem(record, where, f"no {role} field (expected {' or '.join(repr(n) for n in names)})")


def _text(record: Mapping, name: str, where: str) -> str:
    _, value = _named_field(record, (name,), where, repr(name))
    if not isinstance(value, str):
        raise _problem(record, where, f"'{name}' must be a string, got {type(value).__name__}")
    return value


def _choice_list(value: Any, record: Mapping, where: str, name: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise _problem(record, where, f"'{name}' must be a list of strings, got {type(value).__name__}")
    if any(not isinstance(c, str) for c in value):
        raise _problem(record, where, f"'{name}' must be a list of strings")
    if len(value) < 2:
        raise _problem(record, where, f"needs at least two choices, '{name}' has {len(value)}")
    return list(value)


def _label_index(value: Any, choices: Sequence[str], record: Mapping, where: str, name: str) -> int:
    """An index from an int, a digit string ("2"), a letter ("B") or a choice's text (which wins)."""
    index = None
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str):
        text = value.strip()
        if value in choices:
            index = choices.index(value)
        elif re.fullmatch(r"-?\d+", text):
            index = int(text)
        elif re.fullmatch(r"[A-Z]", text):
            index = ord(text) - ord("A")
    if index is None:
        raise _problem(
            record, where, f"label '{name}' = {value!r} is not an index, a letter or one of the choices"
        )
    if not 0 <= index < len(choices):
        raise _problem(
            record, where, f"label '{name}' = {value!r} is out of range for {len(choices)} choices"
        )
    return index


def _generic(record: Mapping, where: str, fields: Mapping[str, str]) -> ChoiceExample:
    unknown = sorted(set(fields) - set(_FIELD_ROLES))
    if unknown:
        raise DataError(
            f"{where}: fields names unknown role(s) {', '.join(unknown)}; the roles are {', '.join(_FIELD_ROLES)}"
        )
    context_names = (fields["context"],) if "context" in fields else _CONTEXT_FIELDS
    name, context = _named_field(record, context_names, where, "context")
    if not isinstance(context, str):
        raise _problem(record, where, f"'{name}' must be a string, got {type(context).__name__}")
    choices_name, value = _named_field(record, (fields.get("choices", "choices"),), where, "choices")
    choices = _choice_list(value, record, where, choices_name)
    label_name, label = _named_field(
        record, (fields["label"],) if "label" in fields else _LABEL_FIELDS, where, "label"
    )
    return ChoiceExample(
        context, choices, _label_index(label, choices, record, where, label_name), where=where
    )


def _winogrande(record: Mapping, where: str) -> ChoiceExample:
    # lm-eval's partial evaluation (tasks/winogrande/preprocess_winogrande.py): each option fills
    # the blank and ends the context; the rest of the sentence, " " + stripped, is the continuation
    # scored under both contexts, so only the words after the blank are compared.
    sentence = _text(record, "sentence", where)
    options = [_text(record, "option1", where), _text(record, "option2", where)]
    if "_" not in sentence:
        raise _problem(record, where, "'sentence' has no '_' blank")
    _, answer = _named_field(record, ("answer",), where, "label")
    if str(answer).strip() not in ("1", "2") or isinstance(answer, bool):
        raise _problem(
            record, where, f"label 'answer' = {answer!r} is out of range for 2 options ('1' or '2')"
        )
    blank = sentence.index("_")
    rest = " " + sentence[blank + 1 :].strip()
    return ChoiceExample(
        sentence[:blank], options, int(str(answer).strip()) - 1, continuation=rest, where=where
    )


def _piqa(record: Mapping, where: str) -> ChoiceExample:
    # lm-eval's piqa.yaml: "Question: {{goal}}\nAnswer:", choices [sol1, sol2].
    goal = _text(record, "goal", where)
    choices = [_text(record, "sol1", where), _text(record, "sol2", where)]
    name, label = _named_field(record, ("label",), where, "label")
    return ChoiceExample(
        f"Question: {goal}\nAnswer:", choices, _label_index(label, choices, record, where, name), where=where
    )


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag preprocess: strip, drop WikiHow's bracketed artifacts, collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(record: Mapping, where: str) -> ChoiceExample:
    # lm-eval's hellaswag process_docs: activity_label + ": " + ctx_a + " " + ctx_b.capitalize()
    # (str.capitalize also lowercases the rest of ctx_b, as lm-eval's output does).
    if "ctx_a" in record:
        context = _text(record, "ctx_a", where) + " " + _text(record, "ctx_b", where).capitalize()
    else:
        context = _text(record, "ctx", where)
    if record.get("activity_label"):
        context = f"{record['activity_label']}: {context}"
    choices = [_hellaswag_clean(e) for e in _choice_list(record["endings"], record, where, "endings")]
    name, label = _named_field(record, ("label",), where, "label")
    return ChoiceExample(
        _hellaswag_clean(context), choices, _label_index(label, choices, record, where, name), where=where
    )


def _arc_key_index(key: str, labels: list[str]) -> int | None:
    if key in labels:
        return labels.index(key)
    # A few ARC questions number their choices ("1".."4") where the others use letters.
    if key.isdigit():
        other = chr(ord("A") + int(key) - 1)
    elif len(key) == 1 and key.isalpha():
        other = str(ord(key.upper()) - ord("A") + 1)
    else:
        return None
    return labels.index(other) if other in labels else None


def _arc(record: Mapping, where: str) -> ChoiceExample:
    # lm-eval's arc_easy.yaml: "Question: {{question}}\nAnswer:", choices.text, gold choices.label.index(answerKey).
    question = _text(record, "question", where)
    _, value = _named_field(record, ("choices",), where, "choices")
    if not isinstance(value, Mapping) or "text" not in value:
        raise _problem(record, where, "'choices' must be {'text': [...], 'label': [...]}")
    choices = _choice_list(value["text"], record, where, "choices.text")
    labels = [str(x) for x in value.get("label") or [chr(ord("A") + i) for i in range(len(choices))]]
    if len(labels) != len(choices):
        raise _problem(record, where, f"'choices' has {len(choices)} texts but {len(labels)} labels")
    _, key = _named_field(record, ("answerKey",), where, "label")
    index = _arc_key_index(str(key).strip(), labels)
    if index is None:
        raise _problem(
            record,
            where,
            f"label 'answerKey' = {key!r} is out of range: not one of the choice labels {labels}",
        )
    return ChoiceExample(f"Question: {question}\nAnswer:", choices, index, where=where)


def _mmlu(record: Mapping, where: str) -> ChoiceExample:
    # lm-eval's mmlu/default/_default_template_yaml: the question, "A. <choice>" lines, "Answer:",
    # choices " A", " B", ... (delimiter + letter); each subject's yaml adds the description
    # "The following are multiple choice questions (with answers) about <subject>.\n\n".
    question = _text(record, "question", where)
    texts = _choice_list(record["choices"], record, where, "choices")
    letters = [chr(ord("A") + i) for i in range(len(texts))]
    lines = [
        question.strip(),
        *(f"{letter}. {text}" for letter, text in zip(letters, texts, strict=True)),
        "Answer:",
    ]
    name, label = _named_field(record, ("answer",), where, "label")
    subject = str(record["subject"])
    return ChoiceExample(
        "\n".join(lines), letters, _label_index(label, texts, record, where, name),
        description=f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n",
        subject=subject, where=where,
    )  # fmt: skip


# Checked in order; a record matching none is read as {question|context|query, choices, label|answer}.
_LAYOUTS = (
    (lambda r: "sentence" in r and "option1" in r, _winogrande),
    (lambda r: "goal" in r and "sol1" in r, _piqa),
    (lambda r: "endings" in r, _hellaswag),
    (lambda r: "answerKey" in r or isinstance(r.get("choices"), Mapping), _arc),
    (lambda r: "subject" in r and "choices" in r and "question" in r, _mmlu),
)


LAYOUT_PARSERS = {"arc": _arc, "hellaswag": _hellaswag, "piqa": _piqa, "winogrande": _winogrande, "mmlu": _mmlu}
Layout = Literal["auto", "generic", "arc", "hellaswag", "piqa", "winogrande", "mmlu"]


def parse_choice_record(
    record: Mapping, where: str, fields: Mapping[str, str] | None = None, layout: Layout = "auto"
) -> ChoiceExample:
    """A ChoiceExample from a generic, ARC, HellaSwag, PIQA, Winogrande or MMLU record.

    `fields` names the record's fields for the roles "context", "choices" and "label" (a generic
    record with other names); without it the layout is `layout`, or with "auto" recognised by the
    record's fields. Labels may be an index, a digit string, a letter or the right choice's text.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected an object with fields, got {type(record).__name__}")
    if fields or layout == "generic":
        return _generic(record, where, fields or {})
    if layout != "auto":
        try:
            return LAYOUT_PARSERS[layout](record, where)
        except KeyError as exc:  # a field the layout indexes directly (e.g. hellaswag's 'endings')
            raise _problem(record, where, f"no {exc.args[0]!r} field, which the {layout} layout needs") from None
    for matches, parse in _LAYOUTS:
        if matches(record):
            return parse(record, where)
    return _generic(record, where, {})


# ----------------------------------------------------------------------------------------------
# 2. Few-shot prompts
# ----------------------------------------------------------------------------------------------


def _join(context: str, choice: str, target_delimiter: str) -> str:
    return context + choice if context[-1:].isspace() else context + target_delimiter + choice


def _solved(example: ChoiceExample, target_delimiter: str) -> str:
    """An example as a few-shot prompt shows it: its context and its right answer."""
    if example.continuation is not None:  # Winogrande: the right option fills the blank
        return example.context + example.choices[example.label] + example.continuation
    return _join(example.context, example.choices[example.label], target_delimiter)


def fewshot_prefix(
    pool_examples: Sequence[ChoiceExample],
    k: int,
    seed: int | None,
    exclude_index: int | None = None,
    *,
    target_delimiter: str = TARGET_DELIMITER,
) -> str:
    """k solved pool examples (context + " " + right choice), each followed by "\\n\\n", to put before a context.

    seed=None takes the first k (lm-eval's `first_n` sampler, which MMLU uses with its dev split);
    otherwise random.Random(seed) draws k without replacement. exclude_index leaves one pool example
    out: the question itself, when questions and pool come from the same split. The separator is
    lm-eval's default fewshot_delimiter; descriptions (MMLU's header) are not repeated.
    """
    if k == 0:
        return ""
    candidates = [i for i in range(len(pool_examples)) if i != exclude_index]
    if not 0 < k <= len(candidates):
        raise DataError(
            f"few-shot k ({k}) must be between 0 and the pool's size ({len(candidates)} examples)"
        )
    chosen = candidates[:k] if seed is None else random.Random(seed).sample(candidates, k)
    return "".join(_solved(pool_examples[i], target_delimiter) + FEWSHOT_DELIMITER for i in chosen)


def with_fewshot(
    examples: Sequence[ChoiceExample],
    pool_examples: Sequence[ChoiceExample],
    k: int,
    seed: int | None,
    *,
    same_split: bool = False,
) -> list[ChoiceExample]:
    """`examples` with a few-shot prefix before each context; example i draws with seed + i.

    same_split=True leaves example i out of its own prefix (pool_examples is then `examples`).
    """
    return [
        replace(
            e,
            context=fewshot_prefix(
                pool_examples, k, None if seed is None else seed + i, i if same_split else None
            )
            + e.context,
        )
        for i, e in enumerate(examples)
    ]


# ----------------------------------------------------------------------------------------------
# 3. Token ids
# ----------------------------------------------------------------------------------------------


def _example_texts(example: ChoiceExample, target_delimiter: str) -> list[tuple[str, str]]:
    """(context, continuation) for each choice, trailing whitespace of the context moved onto the continuation."""
    head = example.description + example.context
    if example.continuation is not None:
        pairs = [(head + choice, example.continuation) for choice in example.choices]
    else:
        pairs = [
            (head, choice if head[-1:].isspace() else target_delimiter + choice) for choice in example.choices
        ]
    # lm-eval's _encode_pair: "Answer: " + "A" is scored as "Answer:" + " A".
    return [(c.rstrip(), c[len(c.rstrip()) :] + t) for c, t in pairs]


class _PairEncoder:
    """Token ids of (context, continuation) pairs; each distinct context is encoded once."""

    def __init__(self, tokenizer, pair_encoding: PairEncoding, add_special_tokens: bool = True):
        if pair_encoding not in ("separate", "joint"):
            raise DataError(f"pair_encoding must be 'separate' or 'joint', got {pair_encoding!r}")
        self.tokenizer, self.joint, self.contexts = tokenizer, pair_encoding == "joint", {}
        self.special = add_special_tokens  # False: no BOS before the context (lm-eval's HFLM default)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.empty_context = [] if prefix is None else [prefix]

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]

    def context(self, text: str, where: str) -> list[int]:
        if text not in self.contexts:
            ids = self._ids(text, self.special) if text else []
            if not ids:  # lm-eval scores an empty context after the EOT token
                if not self.empty_context:
                    raise DataError(
                        f"{where}: empty context, and the tokenizer has no BOS or EOS token to start from"
                    )
                ids = self.empty_context
            self.contexts[text] = ids
        return self.contexts[text]

    def __call__(self, context: str, continuation: str, where: str) -> tuple[list[int], list[int]]:
        context_ids = self.context(context, where)
        if self.joint and context:
            continuation_ids = self._ids(context + continuation, self.special)[len(context_ids) :]
        else:
            continuation_ids = self._ids(continuation, False)
        if not continuation_ids:
            raise DataError(f"{where}: choice {continuation!r} encodes to no tokens")
        return context_ids, continuation_ids


def _fit(pairs: list[tuple[list[int], list[int]]], window_tokens: int, where: str):
    """Cut the contexts from the left so the longest (context + continuation) has window + 1 tokens."""
    over = max(len(c) + len(t) for c, t in pairs) - (window_tokens + 1)
    if over <= 0:
        return pairs, 0
    for j, (context_ids, continuation_ids) in enumerate(pairs):
        if len(continuation_ids) > window_tokens or len(context_ids) <= over:
            raise DataError(
                f"{where}: choice {j} has {len(continuation_ids)} tokens, too long to score in the model's "
                f"window of {window_tokens} tokens"
            )
    return [(c[over:], t) for c, t in pairs], over


def _window_tokens(model, tokenizer, max_length: int | None) -> int:
    if max_length:
        return max_length
    limit = max_positions(model.config)
    if limit:
        return limit
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**9 else DEFAULT_WINDOW_TOKENS


# ----------------------------------------------------------------------------------------------
# 4. Scoring
# ----------------------------------------------------------------------------------------------


@dataclass
class _Row:
    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0 = shared context, b + 1 = branch b
    scored: list[tuple[int, list[int], list[int]]]  # (pair id, predicting row positions, target ids)


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _row(pairs: list[tuple[int, list[int], list[int]]]) -> _Row:
    """One model row: the contexts' common prefix, then each pair's remaining tokens as a branch.

    The last token of a branch is only a target, never an input (lm-eval's `[:-1]`), so positions
    never exceed window - 1. Token s of context + continuation is predicted at s - 1: in the shared
    prefix when s - 1 < shared, else inside its branch.
    """
    shared = _common_prefix([c for _, c, _ in pairs])
    first = pairs[0][1]
    row = _Row(list(first[:shared]), list(range(shared)), [0] * shared, [])
    for b, (pair_id, context_ids, continuation_ids) in enumerate(pairs):
        seq, offset = context_ids + continuation_ids, len(row.tokens)
        branch = seq[shared:-1]
        row.tokens += branch
        row.positions += range(shared, shared + len(branch))
        row.segments += [b + 1] * len(branch)
        at = [s - 1 if s - 1 < shared else offset + s - 1 - shared for s in range(len(context_ids), len(seq))]
        row.scored.append((pair_id, at, continuation_ids))
    return row


def _branch_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, T, T] mask: the shared context is causal; branch b sees it and itself, causally."""
    query, key = segments[:, :, None], segments[:, None, :]
    n = segments.size(1)
    causal = torch.ones(n, n, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    # Padding positions (segment -1) see themselves, so no softmax row is empty; nothing sees them.
    allowed |= torch.eye(n, dtype=torch.bool, device=segments.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _forward_accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _can_branch(model, window_tokens: int) -> bool:
    """Whether the model takes a custom 4D mask with position ids over the whole window."""
    config = model.config
    # Flash-attention kernels take no mask tensor and flex attention wants a BlockMask.
    if getattr(config, "_attn_implementation", None) not in ("eager", "sdpa", None):
        return False
    if not _forward_accepts(model, "position_ids"):
        return False
    # A custom 4D mask is used as given, so a sliding window would not be applied to it.
    sliding = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return not (isinstance(sliding, int) and sliding < window_tokens)


def _forward_batch(model, rows: list[_Row], pad_id: int, keep_logits: bool):
    """(log-prob, is_greedy) tensors of every scored token of `rows`, in row then pair order."""
    device, width = next(model.parameters()).device, max(len(r.tokens) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
        positions[i, : len(r.tokens)] = torch.tensor(r.positions, dtype=torch.long)
        segments[i, : len(r.tokens)] = torch.tensor(r.segments, dtype=torch.long)
    kwargs: dict[str, Any] = {"input_ids": tokens.to(device), "use_cache": False}
    if bool((segments > 1).any()):  # some row holds several branches
        kwargs["attention_mask"] = _branch_mask(segments.to(device), model.dtype)
        kwargs["position_ids"] = positions.to(device)
    elif bool((segments < 0).any()):  # one pair per row, right-padded: positions 0.. are already right
        kwargs["attention_mask"] = (segments >= 0).long().to(device)
    first = min(p for r in rows for _, at, _ in r.scored for p in at)
    keep = width - first
    if keep_logits:
        kwargs["logits_to_keep"] = keep
    logits = model(**kwargs).logits[:, -keep:]
    row_index = [i for i, r in enumerate(rows) for _, at, _ in r.scored for _ in at]
    column = [p - first for r in rows for _, at, _ in r.scored for p in at]
    targets = torch.tensor([t for r in rows for _, _, ts in r.scored for t in ts], device=device)
    picked = logits[torch.tensor(row_index, device=device), torch.tensor(column, device=device)]
    # Log-softmax in float64, over the scored positions only: a float32 log-prob near -6 is resolved
    # to ~5e-7, so sums over a few tokens would move by more than batching moves the logits. MPS has
    # no float64.
    precise = torch.float32 if device.type == "mps" else torch.float64
    logprobs = F.log_softmax(picked.to(precise), dim=-1).gather(1, targets[:, None])[:, 0]
    return logprobs.cpu(), (picked.argmax(dim=-1) == targets).cpu()


def _score_pairs(model, tokenizer, groups, batch_size: int, branch: bool) -> tuple[list[float], list[bool]]:
    """Summed log-prob and is_greedy of every pair; `groups` holds each example's (id, context, continuation)."""
    rows = [_row(g) for g in groups] if branch else [_row([p]) for g in groups for p in g]
    rows.sort(key=lambda r: len(r.tokens), reverse=True)  # lm-eval's order: longest first, least padding
    n_pairs = sum(len(g) for g in groups)
    sums, greedy = [0.0] * n_pairs, [False] * n_pairs
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    keep_logits = _forward_accepts(model, "logits_to_keep")
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        logprobs, is_greedy = _forward_batch(model, batch, pad_id, keep_logits)
        offset = 0
        for r in batch:
            for pair_id, at, _ in r.scored:
                sums[pair_id] = float(logprobs[offset : offset + len(at)].sum())
                greedy[pair_id] = bool(is_greedy[offset : offset + len(at)].all())
                offset += len(at)
    return sums, greedy


def _encoded_groups(tokenizer, texts, window_tokens: int, pair_encoding: PairEncoding, wheres, add_special_tokens=True):
    encode = _PairEncoder(tokenizer, pair_encoding, add_special_tokens)
    groups, cuts, pair_id = [], [], 0
    for pairs_text, where in zip(texts, wheres, strict=True):
        pairs, cut = _fit([encode(c, t, where) for c, t in pairs_text], window_tokens, where)
        groups.append([(pair_id + j, c, t) for j, (c, t) in enumerate(pairs)])
        cuts.append(cut)
        pair_id += len(pairs)
    return groups, cuts


def _score_texts(model, tokenizer, texts, wheres, batch_size, max_length, share_context, pair_encoding, add_special_tokens=True):
    """(groups, cuts, sums, greedy) for lists of (context, continuation) strings, one list per example."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    window_tokens = _window_tokens(model, tokenizer, max_length)
    groups, cuts = _encoded_groups(tokenizer, texts, window_tokens, pair_encoding, wheres, add_special_tokens)
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            branch = share_context and _can_branch(model, window_tokens)
            sums, greedy = _score_pairs(model, tokenizer, groups, batch_size, branch)
    finally:
        model.train(training)
    return groups, cuts, sums, greedy


def score_choices(
    model,
    tokenizer,
    examples: Sequence[ChoiceExample],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    share_context: bool = True,
    target_delimiter: str = TARGET_DELIMITER,
    pair_encoding: PairEncoding = "separate",
    add_special_tokens: bool = True,
) -> list[ChoiceScores]:
    """Summed continuation log-prob and is_greedy of every choice of every example (module docstring).

    batch_size counts rows per forward pass: examples (all choices in one row) with share_context,
    else (context, choice) pairs. max_length overrides the model's window in tokens.
    add_special_tokens=False encodes the context without the tokenizer's BOS (lm-eval's default).
    """
    texts = [_example_texts(e, target_delimiter) for e in examples]
    wheres = [e.where or f"example {i}" for i, e in enumerate(examples)]
    groups, cuts, sums, greedy = _score_texts(
        model, tokenizer, texts, wheres, batch_size, max_length, share_context, pair_encoding, add_special_tokens
    )
    return [
        ChoiceScores([sums[p] for p, _, _ in g], [greedy[p] for p, _, _ in g], [len(t) for _, _, t in g], cut)
        for g, cut in zip(groups, cuts, strict=True)
    ]


def cloze_split(text: str, where: str) -> tuple[str, str]:
    """LAMBADA's (context, target): the text before its last space, and " " + the last word."""
    # lm-eval's lambada_openai.yaml: text.split(' ')[:-1] joined by ' ', and ' ' + text.split(' ')[-1].
    context, space, word = text.rpartition(" ")
    if not space or not context or not word:
        raise DataError(
            f"{where}: a cloze text needs words before and after its last space, got {text[:60]!r}"
        )
    return context, " " + word


def score_cloze(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    pair_encoding: PairEncoding = "separate",
    add_special_tokens: bool = True,
) -> dict[str, Any]:
    """LAMBADA-style accuracy (the last word is the greedy continuation) and the targets' perplexity.

    Returns acc, acc_stderr, target_perplexity = exp(sum NLL / target tokens), example_perplexity =
    exp(-mean per-text log-prob) (lm-eval's `perplexity` aggregation), n, target_tokens, truncated,
    and `examples`: one {"logprob", "is_greedy", "target_tokens", "truncated"} per text.
    """
    pairs = [[cloze_split(t, f"text {i}")] for i, t in enumerate(texts)]
    wheres = [f"text {i}" for i in range(len(texts))]
    groups, cuts, sums, greedy = _score_texts(
        model, tokenizer, pairs, wheres, batch_size, max_length, False, pair_encoding, add_special_tokens
    )
    rows = [
        {"logprob": sums[p], "is_greedy": greedy[p], "target_tokens": len(t), "truncated": cut > 0}
        for g, cut in zip(groups, cuts, strict=True)
        for p, _, t in g
    ]
    return {**cloze_metrics(rows), "examples": rows}


def cloze_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """score_cloze's metrics (without `examples`) from its per-text rows, e.g. rows gathered from several processes."""
    hits = [float(r["is_greedy"]) for r in rows]
    n_tokens = sum(r["target_tokens"] for r in rows)
    total = sum(r["logprob"] for r in rows)
    return {
        "acc": _mean(hits),
        "acc_stderr": mean_stderr(hits),
        "target_perplexity": math.exp(-total / n_tokens) if n_tokens else float("nan"),
        "example_perplexity": math.exp(-total / len(rows)) if rows else float("nan"),
        "n": len(rows),
        "target_tokens": n_tokens,
        "truncated": sum(r["truncated"] for r in rows),
    }


# ----------------------------------------------------------------------------------------------
# 5. Metrics
# ----------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean as lm-eval computes it; nan below two values."""
    # lm_eval/api/metrics.py: mean_stderr(arr) = sample_stddev(arr) / sqrt(len(arr)), where
    # sample_stddev divides the squared deviations by len(arr) - 1.
    n = len(values)
    if n < 2:
        return float("nan")
    mu = _mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first on ties (numpy.argmax's rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _scored_texts(example: ChoiceExample) -> list[str]:
    # lm-eval normalises by the choice text (no delimiter); with partial scoring every choice scores
    # the same continuation, so its length is the same for all and acc_norm equals acc.
    if example.continuation is not None:
        return [example.continuation.strip()] * len(example.choices)
    return list(example.choices)


def _predictions(scores: ChoiceScores, example: ChoiceExample) -> dict[str, int]:
    texts = _scored_texts(example)
    chars = [max(len(t), 1) for t in texts]
    utf8_bytes = [max(len(t.encode("utf-8")), 1) for t in texts]
    return {
        "acc": _argmax(scores.logprobs),
        "acc_norm": _argmax([lp / c for lp, c in zip(scores.logprobs, chars, strict=True)]),
        "acc_bytes": _argmax([lp / b for lp, b in zip(scores.logprobs, utf8_bytes, strict=True)]),
    }


def _check_lengths(scores: Sequence[ChoiceScores], examples: Sequence[ChoiceExample]) -> None:
    if len(scores) != len(examples):
        raise DataError(f"{len(scores)} scores for {len(examples)} examples")
    for i, (s, e) in enumerate(zip(scores, examples, strict=True)):
        if len(s.logprobs) != len(e.choices):
            raise DataError(
                f"{e.where or f'example {i}'}: {len(s.logprobs)} scores for {len(e.choices)} choices"
            )


def choice_metrics(
    scores: Sequence[ChoiceScores], examples: Sequence[ChoiceExample]
) -> dict[str, float | int]:
    """acc, acc_norm, acc_bytes and their lm-eval standard errors, n and the number of truncated examples."""
    _check_lengths(scores, examples)
    predictions = [_predictions(s, e) for s, e in zip(scores, examples, strict=True)]
    out: dict[str, float | int] = {}
    for name in ("acc", "acc_norm", "acc_bytes"):
        hits = [float(p[name] == e.label) for p, e in zip(predictions, examples, strict=True)]
        out[name], out[f"{name}_stderr"] = _mean(hits), mean_stderr(hits)
    out["n"] = len(examples)
    out["truncated"] = sum(s.truncated for s in scores)
    return out


def metrics_by_subject(scores: Sequence[ChoiceScores], examples: Sequence[ChoiceExample]) -> dict[str, dict]:
    """choice_metrics of each subject (MMLU), in order of first appearance; no subject is "all"."""
    _check_lengths(scores, examples)
    subjects: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        subjects.setdefault(e.subject or "all", []).append(i)
    return {
        subject: choice_metrics([scores[i] for i in idx], [examples[i] for i in idx])
        for subject, idx in subjects.items()
    }


def aggregate(
    task_results: Mapping[str, Mapping[str, Any]], how: Literal["macro", "micro"] = "macro"
) -> dict:
    """One result from several tasks' (or MMLU subjects') choice_metrics.

    macro: the plain mean over tasks, each task counting once; its stderr is sqrt(sum se_t^2) / T.
    micro: tasks weighted by their n, i.e. the mean over all examples; stderr sqrt(sum (n_t se_t)^2) / N.
    Both treat the tasks' errors as independent. lm-eval's `mmlu` group is a micro average
    (weight_by_size: true); MMLU's usual macro number is aggregate(metrics_by_subject(...), "macro").
    """
    if how not in ("macro", "micro"):
        raise DataError(f"aggregate: how must be 'macro' or 'micro', got {how!r}")
    if not task_results:
        raise DataError("aggregate: no task results")
    results = list(task_results.values())
    sizes = [r["n"] for r in results]
    weights = [1 / len(results)] * len(results) if how == "macro" else [n / sum(sizes) for n in sizes]
    out: dict[str, Any] = {"n": sum(sizes), "tasks": len(results), "how": how}
    metrics = [k for k in results[0] if f"{k}_stderr" in results[0] and all(k in r for r in results)]
    for name in metrics:
        out[name] = sum(w * r[name] for w, r in zip(weights, results, strict=True))
        out[f"{name}_stderr"] = math.sqrt(
            sum((w * r[f"{name}_stderr"]) ** 2 for w, r in zip(weights, results, strict=True))
        )
    if all("truncated" in r for r in results):
        out["truncated"] = sum(r["truncated"] for r in results)
    return out


def prediction_rows(
    scores: Sequence[ChoiceScores], examples: Sequence[ChoiceExample]
) -> list[dict[str, Any]]:
    """One JSON-able row per example for predictions.jsonl: every choice's log-prob, the picks and the answer."""
    _check_lengths(scores, examples)
    rows = []
    for i, (s, e) in enumerate(zip(scores, examples, strict=True)):
        picks = _predictions(s, e)
        rows.append({
            "index": i,
            "where": e.where,
            "label": e.label,
            "pred": picks["acc"],
            "pred_norm": picks["acc_norm"],
            "pred_bytes": picks["acc_bytes"],
            "correct": picks["acc"] == e.label,
            "correct_norm": picks["acc_norm"] == e.label,
            "logprobs": [float(x) for x in s.logprobs],
            "is_greedy": [bool(x) for x in s.is_greedy],
            "continuation_tokens": list(s.continuation_tokens),
            "truncated": s.truncated,
            "truncated_tokens": s.truncated_tokens,
        })  # fmt: skip
    return rows
