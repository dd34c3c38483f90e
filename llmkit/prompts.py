"""Prompts: how a task record or a user's text becomes the token ids a model is prompted with.

    llmkit data inspect finetune/lora-instruction      # shows prompts as training encodes them

One module for training, evaluation and `llmkit generate` alike, so a prompt at evaluation or
generation time is token for token the prompt the model was trained on:

- `format_record`: a task record -> (prompt, target) text (training and eval); `format_prompt`: a
  user's text -> the prompt a fine-tune was trained with (generation, no target).
- summarization: `prompt_template` with {field} placeholders (default: the record's {document});
  target = the `summary` field. When the prompt is too long, the longest field in it is shortened
  (never the target).
- instruction: `prompt`/`response` records, or chat records (`messages`: a list of {role, content}),
  rendered with the tokenizer's chat template (`render_chat`; llmkit installs DEFAULT_CHAT_TEMPLATE
  when the tokenizer has none).
- classification: text -> label word; `{labels}` in the template names the choices.
- text: continued language modelling on raw text; the prompt is empty.
- `encode_prompts` / `prompt_token_ids` / `chat_prompt_ids`: prompt text -> token ids, one way.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.errors import DataError, ModelError, RecipeError, did_you_mean
from llmkit.recipes import TaskSpec

SUMMARIZATION_TEMPLATE = "Summarize the following text.\n\n{document}\n\nSummary:\n"
CLASSIFICATION_TEMPLATE = "Classify the text as one of: {labels}.\n\n{text}\n\nLabel:\n"
INSTRUCTION_TEMPLATE = "{prompt}"

# (prompt_template, target_field) per task when the recipe leaves them null.
_DEFAULTS: dict[str, tuple[str | None, str | None]] = {
    "summarization": (SUMMARIZATION_TEMPLATE, "summary"),
    "instruction": (INSTRUCTION_TEMPLATE, "response"),
    "classification": (CLASSIFICATION_TEMPLATE, "label"),
    "text": (None, None),
}

# Placeholders filled by llmkit rather than from the record.
_RESERVED = {"labels"}

# A plain, readable chat format for tokenizers trained without one. Every assistant turn ends
# with the EOS token so a model trained on it learns to stop after its reply.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class PromptTooLong(DataError):
    """The prompt cannot be shortened enough to fit the token budget (the example does not fit)."""


@dataclass
class Formatted:
    """One formatted record: prompt and target text, and how many prompt tokens truncation removed."""

    prompt: str
    target: str
    truncated_tokens: int = 0


def task_defaults(task: TaskSpec) -> TaskSpec:
    """A copy of `task` with the task's default prompt_template and target_field filled in."""
    template, target = _DEFAULTS[task.type]
    if task.type == "text":
        return task.model_copy(
            update={"prompt_template": None, "target_field": task.target_field or task.text_field}
        )
    return task.model_copy(
        update={
            "prompt_template": task.prompt_template if task.prompt_template is not None else template,
            "target_field": task.target_field or target,
        }
    )


def template_fields(template: str, key: str = "task.prompt_template") -> list[str]:
    """The record fields a prompt template names ({labels} excluded); RecipeError for a malformed template."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise RecipeError(f"{key}: {exc}; write literal braces as '{{{{' and '}}}}'") from None
    fields: list[str] = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise RecipeError(
                f"{key}: placeholders must name a record field, e.g. {{document}}; found '{{{name}}}'"
            )
        if any(ch in name for ch in ".[") or spec or conversion:
            written = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise RecipeError(
                f"{key}: placeholder '{{{written}}}' must be a plain field name, e.g. {{document}}"
            )
        if name not in _RESERVED and name not in fields:
            fields.append(name)
    return fields


def required_fields(task: TaskSpec, record: dict | None = None) -> list[str]:
    """Fields a record must carry for `task` (after task_defaults); a chat record needs only its messages."""
    task = task_defaults(task)
    if task.type == "text":
        return [task.target_field]
    if task.type == "instruction" and record is not None and task.messages_field in record:
        return [task.messages_field]
    return [*template_fields(task.prompt_template or ""), task.target_field]


def check_record(task: TaskSpec, record: Any, where: str) -> None:
    """DataError naming `where` (file:line) when a record lacks a field the task needs or has an empty target."""
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected a JSON object (a record with fields), got {type(record).__name__}"
        )
    task = task_defaults(task)
    for field in required_fields(task, record):
        if field not in record:
            role = "target_field" if field == task.target_field else "a prompt_template placeholder"
            fix = (
                did_you_mean(field, record.keys())
                or f"; the record has: {', '.join(map(str, record)) or 'no fields'}"
            )
            raise DataError(f"{where}: record lacks field '{field}' ({role} of the {task.type} task){fix}")
    if task.type == "instruction" and task.messages_field in record:
        _check_messages(record[task.messages_field], where, task.messages_field)
        return
    target = record[task.target_field]
    if target is None or not str(target).strip():
        raise DataError(
            f"{where}: empty target in field '{task.target_field}'; remove the record or fill the field"
        )


def _check_messages(messages: Any, where: str, field: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{field}' must be a non-empty list of {{role, content}} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: {field}[{i}] must be a mapping with 'role' and 'content'")
    last = messages[-1]
    if last["role"] != "assistant":
        raise DataError(
            f"{where}: the last message of '{field}' must be the assistant's reply (the target), got role '{last['role']}'"
        )
    if not str(last["content"] or "").strip():
        raise DataError(f"{where}: empty target: the final assistant message of '{field}' has no content")


def label_set(task: TaskSpec, records: Iterable[dict]) -> list[str]:
    """The classification labels: task.labels when given, else the sorted distinct target values."""
    if task.labels:
        return list(task.labels)
    field = task_defaults(task).target_field
    labels = sorted({str(r[field]).strip() for r in records if field in r and str(r[field]).strip()})
    if len(labels) < 2:
        raise DataError(
            f"classification needs at least 2 distinct labels in field '{field}', found {labels or 'none'}"
        )
    return labels


def ensure_chat_template(tokenizer) -> bool:
    """Install DEFAULT_CHAT_TEMPLATE on a tokenizer that has none; True when it did."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def format_example(
    task: TaskSpec, record: dict, tokenizer, max_prompt_tokens: int | None = None
) -> tuple[str, str]:
    """(prompt, target) text for one record exactly as training sees it (target without EOS).

    `max_prompt_tokens` shortens the longest prompt field so the tokenized prompt fits, like
    training does with data.seq_len minus the target length.
    """
    formatted = format_record(task, record, tokenizer, max_prompt_tokens=max_prompt_tokens)
    return formatted.prompt, formatted.target


def format_record(
    task: TaskSpec, record: dict, tokenizer, max_prompt_tokens: int | None = None, where: str = "record"
) -> Formatted:
    """Format one record, truncating the prompt's longest field to `max_prompt_tokens` when given."""
    task = task_defaults(task)
    check_record(task, record, where)
    if task.type == "text":
        return Formatted(prompt="", target=str(record[task.target_field]))
    if task.type == "instruction" and task.messages_field in record:
        return _format_chat(record[task.messages_field], tokenizer, max_prompt_tokens)
    target = (
        str(record[task.target_field]).strip()
        if task.type == "classification"
        else str(record[task.target_field])
    )
    prompt, cut = _render_prompt(task, record, tokenizer, max_prompt_tokens)
    return Formatted(prompt, target, cut)


def _render_prompt(task: TaskSpec, record: dict, tokenizer, max_prompt_tokens: int | None) -> tuple[str, int]:
    """The template filled from the record (through the chat template for instructions), fitted to the budget."""
    values = {name: str(record[name]) for name in template_fields(task.prompt_template)}
    if "labels" in {f for _, f, _, _ in string.Formatter().parse(task.prompt_template) if f}:
        if not task.labels:
            raise RecipeError(
                "task.labels: the prompt template uses {labels} but no label set is known; list the labels"
            )
        values["labels"] = ", ".join(task.labels)
    if task.type == "instruction":
        ensure_chat_template(tokenizer)

        def render(vals: dict[str, str]) -> str:
            user = task.prompt_template.format(**vals)
            return render_chat(tokenizer, [{"role": "user", "content": user}])

        return _fit(render, values, tokenizer, max_prompt_tokens, skip={"labels"})
    return _fit(
        lambda vals: task.prompt_template.format(**vals),
        values,
        tokenizer,
        max_prompt_tokens,
        skip={"labels"},
    )


def format_prompt(
    task: TaskSpec, value: str | dict, tokenizer, max_prompt_tokens: int | None = None, where: str = "prompt"
) -> str:
    """The prompt a model fine-tuned on `task` was trained with, for a user's text at generation time.

    A plain text fills the template's one field ({document} for summarization: the text to
    summarize); a template that names several fields needs a record holding them. There is no
    target, so nothing else about the record is checked. The text task has no template: the text
    is the prompt.
    """
    task = task_defaults(task)
    if task.type == "text":
        return value if isinstance(value, str) else str(value.get(task.text_field, ""))
    fields = template_fields(task.prompt_template)
    if isinstance(value, str):
        if len(fields) != 1:
            raise DataError(
                f"{where}: the fine-tune's prompt template names {len(fields)} fields ({', '.join(fields) or 'none'}), "
                "so a plain prompt cannot fill it; give a .jsonl file of records with those fields, or pass --raw"
            )
        value = {fields[0]: value}
    missing = [f for f in fields if f not in value]
    if missing:
        raise DataError(
            f"{where}: record lacks field '{missing[0]}' of the fine-tune's prompt template "
            f"(it names {', '.join(fields)}); add it, or pass --raw"
        )
    return _render_prompt(task, value, tokenizer, max_prompt_tokens)[0]


def _format_chat(messages: list[dict], tokenizer, max_prompt_tokens: int | None) -> Formatted:
    """Render the conversation up to the final assistant reply with a generation prompt."""
    ensure_chat_template(tokenizer)
    context = [{"role": m["role"], "content": str(m["content"])} for m in messages[:-1]]
    target = str(messages[-1]["content"])
    if not context:
        raise DataError("a chat record needs at least one message before the assistant's reply")
    values = {str(i): m["content"] for i, m in enumerate(context)}

    def render(vals: dict[str, str]) -> str:
        convo = [{"role": m["role"], "content": vals[str(i)]} for i, m in enumerate(context)]
        return render_chat(tokenizer, convo)

    prompt, cut = _fit(render, values, tokenizer, max_prompt_tokens)
    return Formatted(prompt, target, cut)


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The conversation through the chat template with a generation prompt, as plain prompt text.

    Templates often write the BOS token themselves; when the tokenizer also adds BOS on encoding,
    the template's is removed here so that every prompt is encoded one way,
    `tokenizer(prompt)` with special tokens, and carries exactly one BOS.
    """
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # the template is code from the model directory: jinja2 errors, or its own raise_exception
        where = f" at line {exc.lineno}" if isinstance(getattr(exc, "lineno", None), int) else ""
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise ModelError(
            f"{chat_template_source(tokenizer)}: the chat template fails{where} ({type(exc).__name__}: {reason}); "
            "fix the template"
        ) from None
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def chat_template_source(tokenizer) -> str:
    """Where a tokenizer's chat template came from, for error messages: a file of its directory, or llmkit's default."""
    if getattr(tokenizer, "chat_template", None) == DEFAULT_CHAT_TEMPLATE:
        return "llmkit's default chat template (llmkit/prompts.py)"
    directory = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            return str(directory / name)
    return f"the chat template of {getattr(tokenizer, 'name_or_path', None) or 'the tokenizer'}"


def _adds_bos(tokenizer) -> bool:
    bos_id = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos_id is not None and len(ids) > 0 and ids[0] == bos_id


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompts as training, evaluation and generation all encode them.

    `tokenizer(prompt)` with special tokens, and never a doubled BOS: a prompt rendered by a chat
    template may start with the BOS text already (`render_chat` strips it where it can), and
    adding the tokenizer's BOS again would show the model a sequence it never saw in training.
    """
    if not prompts:
        return []
    bos = getattr(tokenizer, "bos_token_id", None)
    out = []
    for ids in tokenizer(list(prompts), add_special_tokens=True, verbose=False)["input_ids"]:
        ids = list(ids)
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        out.append(ids)
    return out


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of one prompt (see `encode_prompts`)."""
    return encode_prompts(tokenizer, [prompt])[0]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation ready for the assistant's reply, exactly as chat training encodes its prompts."""
    ensure_chat_template(tokenizer)
    return prompt_token_ids(tokenizer, render_chat(tokenizer, messages))


def _fit(
    render: Callable[[dict[str, str]], str],
    values: dict[str, str],
    tokenizer,
    max_prompt_tokens: int | None,
    skip: set[str] = frozenset(),
) -> tuple[str, int]:
    """Render the prompt; when it is longer than max_prompt_tokens, cut the longest field from its end.

    Returns the prompt and the number of tokens removed from the field. Cutting a field rather
    than the prompt's tail keeps the instruction and the 'Summary:' cue that follow the document.
    """
    prompt = render(values)
    if max_prompt_tokens is None:
        return prompt, 0
    length = len(prompt_token_ids(tokenizer, prompt))
    if length <= max_prompt_tokens:
        return prompt, 0
    candidates = [k for k in values if k not in skip]
    if not candidates:
        raise PromptTooLong(
            f"the prompt ({length} tokens) does not fit in {max_prompt_tokens} tokens and has no field to shorten"
        )
    field = max(candidates, key=lambda k: len(values[k]))
    field_ids = tokenizer(values[field], add_special_tokens=False, verbose=False)["input_ids"]
    keep = max(0, len(field_ids) - (length - max_prompt_tokens))
    # Tokens merge differently across the cut and the template around it, so re-check and
    # shorten further by the remaining overflow (converges in one or two rounds).
    for _ in range(8):
        shortened = dict(values, **{field: tokenizer.decode(field_ids[:keep], skip_special_tokens=True)})
        prompt = render(shortened)
        length = len(prompt_token_ids(tokenizer, prompt))
        if length <= max_prompt_tokens or keep == 0:
            break
        keep = max(0, keep - (length - max_prompt_tokens))
    if length > max_prompt_tokens:
        raise PromptTooLong(
            f"the prompt without field '{field}' is still {length} tokens, more than the {max_prompt_tokens} that fit; "
            "raise data.seq_len or shorten the template"
        )
    return prompt, len(field_ids) - keep
