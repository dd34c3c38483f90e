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

import json
import signal
import string
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.errors import DataError, ModelError, RecipeError, did_you_mean
from llmkit.recipes import TaskSpec, load_recipe
from llmkit.rundir import run_dir_of

SUMMARIZATION_TEMPLATE = "Summarize the following text.\n\n{document}\n\nSummary:\n"
CLASSIFICATION_TEMPLATE = "Classify the text as one of: {labels}.\n\n{text}\n\nLabel:\n"
INSTRUCTION_TEMPLATE = "{prompt}"

# (prompt_template, target_field) per task when the recipe leaves them null.
_DEFAULTS: dict[str, tuple[str | None, str | None]] = {
    "summarization": (SUMMARIZATION_TEMPLATE, "summary"),
    "instruction": (INSTRUCTION_TEMPLATE, "response"),
    "classification": (CLASSIFICATION_TEMPLATE, "label"),
    "text": (None, None),
    "preference": ("{prompt}", None),  # records {prompt | messages, chosen, rejected}: llmkit/data/preference.py
}

# Placeholders filled by llmkit rather than from the record.
_RESERVED = {"labels"}

# A plain, readable chat format for tokenizers trained without one. Every assistant turn ends
# with the EOS token, its end-of-turn token, so a model trained on it learns to stop after its
# reply. Tools are listed in a system block; tool calls are JSON in <tool_call> tags.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% set first = 0 %}"
    "{% if tools %}{{ '<|system|>\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% set first = 1 %}{% endif %}"
    "{{ 'Tools you can call (JSON schema):\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}{% endif %}"
    "{% for message in messages[first:] %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>' }}{{ call['function'] | tojson }}{{ '</tool_call>' }}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CHAT_MARKERS = ("<|im_start|>", "<|im_end|>")
"""The turn markers of `chatml_template`: special tokens of a tokenizer trained with `chat_template: default`."""


def chatml_template(bos: bool) -> str:
    """llmkit's ChatML chat template for trained tokenizers: <|im_end|> ends every turn; tools and tool calls included.

    apply_chat_template tokenizes without special tokens, so the template writes BOS itself (`bos`).
    """
    start, end = CHAT_MARKERS
    return (
        ("{{ bos_token }}" if bos else "")
        + "{% set first = 0 %}"
        + f"{{% if tools %}}{{{{ '{start}system\\n' }}}}"
        + "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% set first = 1 %}{% endif %}"
        + "{{ 'Tools you can call (JSON schema):\\n' }}"
        + "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
        + f"{{{{ '{end}\\n' }}}}{{% endif %}}"
        + "{% for message in messages[first:] %}"
        + f"{{{{ '{start}' + message['role'] + '\\n' }}}}"
        + "{% if message['content'] %}{{ message['content'] }}{% endif %}"
        + "{% if message['tool_calls'] is defined and message['tool_calls'] %}{% for call in message['tool_calls'] %}"
        + "{{ '<tool_call>' }}{{ call['function'] | tojson }}{{ '</tool_call>' }}{% endfor %}{% endif %}"
        + f"{{{{ '{end}\\n' }}}}"
        + "{% endfor %}"
        + f"{{% if add_generation_prompt %}}{{{{ '{start}assistant\\n' }}}}{{% endif %}}"
    )


TRAIN_ON_ALL = "all_assistant_turns"

class PromptTooLong(DataError):
    """The prompt cannot be shortened enough to fit the token budget (the example does not fit)."""


@dataclass
class Formatted:
    """One formatted record: prompt and target text, and how many prompt tokens truncation removed."""

    prompt: str
    target: str
    truncated_tokens: int = 0
    completion: str | None = None
    """The trained text after the prompt when a chat template renders it (the reply and its end-of-turn
    token); None means target + EOS."""


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


def is_chat_record(task: TaskSpec, record: Any) -> bool:
    """Whether an instruction record is a conversation (its messages go through the chat template)."""
    return (
        task.type == "instruction"
        and task.record_format != "template"
        and isinstance(record, dict)
        and task.messages_field in record
    )


def required_fields(task: TaskSpec, record: dict | None = None) -> list[str]:
    """Fields a record must carry for `task` (after task_defaults); a chat record needs only its messages."""
    task = task_defaults(task)
    if task.type == "text":
        return [task.target_field]
    if is_chat_record(task, record):
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
            role = ("target_field" if field == task.target_field else "a prompt_template placeholder") + f" of the {task.type} task"
            fix = (
                did_you_mean(field, record.keys())
                or f"; the record has: {', '.join(map(str, record)) or 'no fields'}"
            )
            raise DataError(f"{where}: record lacks field '{field}' ({role}){fix}")
    if is_chat_record(task, record):
        check_messages(record[task.messages_field], where, task.messages_field)
        check_tools(record.get("tools"), where)
        return
    target = record[task.target_field]
    if target is None or not str(target).strip():
        raise DataError(
            f"{where}: empty target in field '{task.target_field}'; remove the record or fill the field"
        )


def check_messages(messages: Any, where: str, field: str = "messages") -> None:
    """DataError naming the record and message for a conversation that cannot be trained or rendered.

    A conversation is a list of {role, content} mappings; assistant messages may carry `tool_calls`
    (a list of {"type": "function", "function": {"name", "arguments"}}) instead of or beside content,
    `tool` messages answer them. It must end with an assistant reply and open with something else.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{field}' must be a non-empty list of {{role, content}} messages")
    for i, message in enumerate(messages):
        at = f"{where}: {field}[{i}]"
        if not isinstance(message, dict) or "role" not in message or ("content" not in message and "tool_calls" not in message):
            raise DataError(f"{at} must be a mapping with 'role' and 'content'")
        if not isinstance(message["role"], str) or not message["role"]:
            raise DataError(f"{at}: 'role' must be a non-empty string such as user, assistant, system or tool")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise DataError(f"{at}: 'content' must be a string, got {type(content).__name__}")
        calls = message.get("tool_calls")
        if calls is not None:
            if message["role"] != "assistant":
                raise DataError(f"{at}: only assistant messages carry 'tool_calls' (this one is '{message['role']}')")
            _check_tool_calls(calls, at)
        elif not (content or "").strip() and message["role"] == "assistant":
            raise DataError(f"{at}: empty assistant reply; give it content or tool_calls, or remove the record")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: '{field}' has no assistant turn to train on; add the assistant's reply")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: {field}[0] is an assistant reply with nothing before it; start with a system or user message")
    last = messages[-1]
    if last["role"] != "assistant":
        raise DataError(
            f"{where}: the last message of '{field}' must be the assistant's reply (the target), got role '{last['role']}'"
        )


def _check_tool_calls(calls: Any, at: str) -> None:
    """DataError for tool_calls that are not a list of {"type": "function", "function": {name, arguments}}."""
    shape = 'a list of {"type": "function", "function": {"name": ..., "arguments": {...}}}'
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{at}: 'tool_calls' must be {shape}")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(f"{at}.tool_calls[{j}]: expected {{\"type\": \"function\", \"function\": {{\"name\": ..., \"arguments\": ...}}}}")
        if call.get("type", "function") != "function":
            raise DataError(f"{at}.tool_calls[{j}]: 'type' must be 'function', got {call.get('type')!r}")
        if not isinstance(function.get("arguments", {}), (dict, str)):
            raise DataError(f"{at}.tool_calls[{j}]: 'arguments' must be a JSON object (or its JSON text)")


def check_tools(tools: Any, where: str) -> None:
    """DataError unless `tools` is absent or a list of JSON-schema function definitions."""
    if tools is None:
        return
    example = '{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}'
    if not isinstance(tools, list) or not tools:
        raise DataError(f"{where}: 'tools' must be a non-empty list of function schemas such as {example}")
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(f"{where}: tools[{i}] must be a function schema such as {example}")


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


def conversation(task: TaskSpec, record: dict) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) of a chat record as training renders them: task.system_prompt first when it has none."""
    task = task_defaults(task)
    messages = [dict(m) for m in record[task.messages_field]]
    if task.system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": task.system_prompt})
    return messages, record.get("tools")


def _system(task: TaskSpec) -> list[dict]:
    return [] if task.system_prompt is None else [{"role": "system", "content": task.system_prompt}]


def format_record(
    task: TaskSpec, record: dict, tokenizer, max_prompt_tokens: int | None = None, where: str = "record"
) -> Formatted:
    """Format one record, truncating the prompt's longest field to `max_prompt_tokens` when given.

    For a chat record the prompt is the conversation before its last assistant reply, and the
    target that reply's content.
    """
    task = task_defaults(task)
    check_record(task, record, where)
    if task.type == "text":
        return Formatted(prompt="", target=str(record[task.target_field]))
    if is_chat_record(task, record):
        messages, tools = conversation(task, record)
        return _format_chat(messages, tools, tokenizer, max_prompt_tokens, where)
    target = (
        str(record[task.target_field]).strip()
        if task.type == "classification"
        else str(record[task.target_field])
    )
    prompt, cut = _render_prompt(task, record, tokenizer, max_prompt_tokens)
    completion = None
    if task.type == "instruction":
        user = task.prompt_template.format(**{name: str(record[name]) for name in template_fields(task.prompt_template)})
        turn = [*_system(task), {"role": "user", "content": user}, {"role": "assistant", "content": target}]
        completion = reply_text(tokenizer, turn, None, len(turn) - 1, where).text
    return Formatted(prompt, target, cut, completion)


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
            return render_chat(tokenizer, [*_system(task), {"role": "user", "content": user}])

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
    """The prompt a model fine-tuned on `task` with template records was trained with, for a user's text.

    A plain text fills the template's one field ({document} for summarization: the text to
    summarize); a template that names several fields needs a record holding them. There is no
    target, so nothing else about the record is checked. The text task has no template: the text
    is the prompt. (A run trained on chat records is prompted through `RunPrompt`, as a conversation.)
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


def _format_chat(messages: list[dict], tools, tokenizer, max_prompt_tokens: int | None, where: str) -> Formatted:
    """The conversation up to the final assistant reply with a generation prompt; that reply is the target."""
    ensure_chat_template(tokenizer)
    check_template_can_render(tokenizer, messages, tools, where)
    context, last = messages[:-1], messages[-1]
    target = str(last.get("content") or "") or json.dumps([c["function"] for c in last["tool_calls"]], ensure_ascii=False)
    completion = reply_text(tokenizer, messages, tools, len(messages) - 1, where).text
    values = {str(i): str(m.get("content") or "") for i, m in enumerate(context)}

    def render(vals: dict[str, str]) -> str:
        convo = [dict(m, content=vals[str(i)]) if m.get("content") is not None else m for i, m in enumerate(context)]
        return render_chat(tokenizer, convo, tools)

    prompt, cut = _fit(render, values, tokenizer, max_prompt_tokens)
    return Formatted(prompt, target, cut, completion)


# ----------------------------------------------------------------------------------------------
# Chat templates: rendering, assistant spans, end-of-turn tokens
# ----------------------------------------------------------------------------------------------


RENDER_SECONDS = 10.0
"""A chat template gets this long to render one conversation (real templates take milliseconds)."""


class _RenderTimeout(Exception):
    """Raised inside a chat template's rendering when it overruns RENDER_SECONDS."""


@contextmanager
def _time_limit(seconds: float):
    """Raise _RenderTimeout in this thread after `seconds` (main thread only; elsewhere no limit).

    The template is code from a model directory. jinja2's sandbox refuses attribute walks and huge
    ranges but not nested loops, so an adversarial or broken template could otherwise run forever.
    A SIGALRM timer interrupts the Python bytecode of the rendering; an enclosing timer is restored.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def overrun(signum, frame):
        raise _RenderTimeout

    previous = signal.signal(signal.SIGALRM, overrun)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, outer)


def _given_chars(messages: list[dict], tools: list[dict] | None) -> int:
    """Characters of a conversation and its tools as JSON: what a template has to write out, roughly."""
    return len(json.dumps(messages, ensure_ascii=False, default=str)) + len(json.dumps(tools or [], ensure_ascii=False, default=str))


def _render_limit(given_chars: int) -> int:
    """Most characters a template may write: 16x what it was given, plus 1 MB of its own text."""
    return 16 * given_chars + 1_000_000


def _render(tokenizer, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
    """The conversation through the chat template, the template's own BOS removed when encoding adds one.

    Rendering is bounded in time (RENDER_SECONDS) and in output size (`_render_limit`): a template
    over either is a ModelError naming it, before anything is tokenized.
    """
    try:
        with _time_limit(RENDER_SECONDS):
            text = tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
            )
    except _RenderTimeout:
        raise ModelError(
            f"{chat_template_source(tokenizer)}: the chat template did not finish rendering one conversation in "
            f"{RENDER_SECONDS:.0f} s (a loop that never ends?); fix the template"
        ) from None
    except Exception as exc:  # the template is code from the model directory: jinja2 errors, or its own raise_exception
        where = f" at line {exc.lineno}" if isinstance(getattr(exc, "lineno", None), int) else ""
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise ModelError(
            f"{chat_template_source(tokenizer)}: the chat template fails{where} ({type(exc).__name__}: {reason}); "
            "fix the template"
        ) from None
    given = _given_chars(messages, tools)
    if isinstance(text, str) and len(text) > _render_limit(given):
        raise ModelError(
            f"{chat_template_source(tokenizer)}: the chat template wrote {len(text):,} characters for a conversation "
            f"of {given:,}, more than the {_render_limit(given):,} allowed; fix the template"
        )
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The conversation through the chat template with a generation prompt, as plain prompt text.

    Templates often write the BOS token themselves; when the tokenizer also adds BOS on encoding,
    the template's is removed here so that every prompt is encoded one way,
    `tokenizer(prompt)` with special tokens, and carries exactly one BOS.
    """
    return _render(tokenizer, messages, tools, add_generation_prompt=True)


@dataclass(frozen=True)
class TurnEnd:
    """How the chat template closes an assistant turn: the text up to and including its special token(s)."""

    text: str
    tokens: tuple[str, ...]


_PROBE_REPLY = "llmkit probe reply 7f3a"
_TURN_ENDS: dict[tuple, TurnEnd | None] = {}
_CAPABILITIES: dict[tuple, tuple[bool, bool]] = {}


def _template_key(tokenizer) -> tuple:
    return (getattr(tokenizer, "chat_template", None), getattr(tokenizer, "name_or_path", None), len(tokenizer),
            getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None))


def _special_strings(tokenizer) -> list[str]:
    """The special tokens' texts, longest first (so '<|im_end|>' wins over a shorter token inside it)."""
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(token, "special", False):
            names.add(str(token.content if hasattr(token, "content") else token))
    return sorted((n for n in names if n), key=len, reverse=True)


def turn_end(tokenizer) -> TurnEnd | None:
    """The end-of-turn of the tokenizer's chat template, found by rendering a probe reply; None without one.

    The text the template writes after a reply's content, up to and including the last special
    token in it: '<|im_end|>' for ChatML, '<|eot_id|>' for Llama 3, EOS for llmkit's default. A
    template that ends turns with plain text only (no special token) has none.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    key = _template_key(tokenizer)
    if key in _TURN_ENDS:
        return _TURN_ENDS[key]
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    rendered = _render(tokenizer, probe, None, False)
    found = rendered.rfind(_PROBE_REPLY)
    result = None
    if found >= 0:
        suffix = rendered[found + len(_PROBE_REPLY) :]
        specials = _special_strings(tokenizer)
        hits: list[tuple[int, str]] = []
        pos = 0
        while pos < len(suffix):
            token = next((t for t in specials if suffix.startswith(t, pos)), None)
            if token is None:
                pos += 1
                continue
            hits.append((pos, token))
            pos += len(token)
        if hits:
            end = hits[-1][0] + len(hits[-1][1])
            result = TurnEnd(text=suffix[:end], tokens=tuple(dict.fromkeys(t for _, t in hits)))
    _TURN_ENDS[key] = result
    return result


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids generation stops at: the tokenizer's EOS and the chat template's end-of-turn token(s)."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for value in eos if isinstance(eos, list) else [eos]:
        if value is not None:
            ids.append(int(value))
    end = turn_end(tokenizer)
    for token in end.tokens if end else ():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
            ids.append(token_id)
    return list(dict.fromkeys(ids))


def _capabilities(tokenizer) -> tuple[bool, bool]:
    """(renders tools, renders tool_calls) for the tokenizer's chat template, found with probe conversations."""
    key = _template_key(tokenizer)
    if key not in _CAPABILITIES:
        name = "llmkit_probe_fn"
        tools = [{"type": "function", "function": {"name": name, "description": "probe", "parameters": {"type": "object", "properties": {}}}}]
        user = [{"role": "user", "content": "Hi"}]
        try:
            renders_tools = name in _render(tokenizer, user, tools, True)
        except ModelError:
            renders_tools = False
        call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {}}}]}
        try:
            renders_calls = name in _render(tokenizer, [*user, call], None, False)
        except ModelError:
            renders_calls = False
        _CAPABILITIES[key] = (renders_tools, renders_calls)
    return _CAPABILITIES[key]


def check_template_can_render(tokenizer, messages: list[dict], tools: list[dict] | None, where: str) -> None:
    """DataError when a record has tools or tool calls that the chat template would silently drop."""
    needs_calls = any(m.get("tool_calls") for m in messages)
    if not tools and not needs_calls:
        return
    renders_tools, renders_calls = _capabilities(tokenizer)
    source = chat_template_source(tokenizer)
    if tools and not renders_tools:
        raise DataError(
            f"{where}: the record has 'tools' but {source} does not render them (the template never writes `tools`); "
            "use a chat template that supports tools, or drop the field"
        )
    if needs_calls and not renders_calls:
        raise DataError(
            f"{where}: the record has tool_calls but {source} does not render them; "
            "use a chat template that writes message.tool_calls, or drop them"
        )


@dataclass(frozen=True)
class Reply:
    """One assistant reply as the template renders it: the text before it, and the trained text."""

    prefix: str
    text: str
    rendered: int
    """How many characters of `text` the template itself wrote (the rest is an EOS llmkit appends when the
    template has no end-of-turn token)."""


def reply_text(tokenizer, messages: list[dict], tools, index: int, where: str) -> Reply:
    """The assistant reply messages[index] as the model must produce it when served, with the prompt before it.

    The prompt is the conversation before the reply rendered with a generation prompt; the reply
    is what the template writes after it for the message, through its end-of-turn token. Raises
    ModelError when the template renders the turn differently from its generation prompt, or does
    not close it.
    """
    prefix = _render(tokenizer, messages[:index], tools, True)
    through = _render(tokenizer, messages[: index + 1], tools, False)
    source = chat_template_source(tokenizer)
    if not through.startswith(prefix):
        raise ModelError(
            f"{where}: {source} renders messages[{index}] (assistant) differently from its generation prompt "
            "(the text before the reply is not the prompt generation starts from), so the reply cannot be "
            "separated from the prompt; fix the template"
        )
    reply = through[len(prefix) :]
    end = turn_end(tokenizer)
    if end is None:
        # No end-of-turn token: EOS after the reply is what makes the model stop when served.
        return Reply(prefix, reply + (tokenizer.eos_token or ""), len(reply))
    cut = reply.rfind(end.text)
    if cut < 0:
        raise ModelError(
            f"{where}: {source} does not close messages[{index}] (assistant) with its end-of-turn {end.text!r}; "
            "fix the template"
        )
    cut += len(end.text)
    return Reply(prefix, reply[:cut], cut)


def chat_segments(tokenizer, messages: list[dict], tools=None, train_on: str = TRAIN_ON_ALL, where: str = "record") -> list[tuple[str, bool]]:
    """The conversation as (text, trained) pieces: the template's rendering, cut after the last trained reply.

    Every assistant reply (or only the last, `train_on: last_assistant_turn`) is a trained piece:
    its content and the template's end-of-turn token; everything else (system, user, tool messages,
    role headers, the text after the end-of-turn) is context. Each reply's span comes from rendering
    the conversation up to it with a generation prompt, so it is exactly what the model generates
    when served; the template must be prefix-stable (rendering a conversation's first messages is
    the start of rendering all of it), else a ModelError names the message.
    """
    ensure_chat_template(tokenizer)
    check_template_can_render(tokenizer, messages, tools, where)
    full = _render(tokenizer, messages, tools, False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on != TRAIN_ON_ALL:
        turns = turns[-1:]
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for i in turns:
        reply = reply_text(tokenizer, messages, tools, i, where)
        start = len(reply.prefix)
        if start < pos or not full.startswith(reply.prefix + reply.text[: reply.rendered]):
            raise ModelError(
                f"{where}: {chat_template_source(tokenizer)} is not prefix-stable at messages[{i}]: the conversation "
                "rendered up to this reply is not the start of the whole conversation rendered (templates that "
                "rewrite earlier turns, e.g. drop their reasoning, do this); set task.train_on: last_assistant_turn"
            )
        pieces.append((full[pos:start], False))
        pieces.append((reply.text, True))
        pos = start + reply.rendered
    return [(text, trained) for text, trained in pieces if text]


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation ready for the assistant's reply, exactly as chat training encodes its prompts."""
    ensure_chat_template(tokenizer)
    return prompt_token_ids(tokenizer, render_chat(tokenizer, messages, tools))


def encode_pieces(tokenizer, pieces: Sequence[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Token ids of (text, trained) pieces and which ids are trained, each piece tokenized on its own.

    The first piece is encoded as every prompt is (`encode_prompts`: BOS once); later pieces
    without special tokens added. Tokenizing piece by piece puts every mask boundary exactly on a
    token boundary, and the tokens before the first reply are exactly the prompt `generate` sends.
    """
    ids: list[int] = []
    trained: list[bool] = []
    for k, (text, is_trained) in enumerate(pieces):
        piece = prompt_token_ids(tokenizer, text) if k == 0 else list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.extend(piece)
        trained.extend([is_trained] * len(piece))
    return ids, trained


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


# ----------------------------------------------------------------------------------------------
# The prompt a run was trained with
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPrompt:
    """How to prompt a model as its fine-tuning run was trained; read from the run by `run_prompt`.

    kind: 'chat' (the user's text is a user message through the chat template, after the task's
    system prompt), 'template' (it fills task.prompt_template; instruction templates then go
    through the chat template as the user message), or 'raw' (sent as it is: pretrained models,
    hub models, text-task fine-tunes; `reason` says why).
    """

    kind: str
    task: TaskSpec | None = None
    source: str = ""
    reason: str = ""

    @property
    def system_prompt(self) -> str | None:
        """The system message training put before every conversation, if any."""
        return getattr(self.task, "system_prompt", None) if self.task is not None else None

    def messages(self, text: str) -> list[dict]:
        """A one-turn conversation for `text`, as chat training rendered its prompts."""
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return [*system, {"role": "user", "content": text}]

    def prompt_ids(self, tokenizer, value: str | dict, max_prompt_tokens: int | None = None, where: str = "prompt") -> list[int]:
        """Token ids of the prompt for a user's text (or, for a template, a record of its fields)."""
        if self.kind == "chat":
            text = value if isinstance(value, str) else str(value.get("prompt", ""))
            return chat_prompt_ids(tokenizer, self.messages(text))
        if self.kind == "template":
            return prompt_token_ids(tokenizer, format_prompt(self.task, value, tokenizer, max_prompt_tokens, where))
        return prompt_token_ids(tokenizer, value if isinstance(value, str) else str(value.get("prompt", "")))

    def describe(self) -> str:
        """One line for stderr: how prompts are built, and where that was read."""
        if self.kind == "chat":
            system = f", after the system prompt {self.system_prompt!r}" if self.system_prompt else ""
            return f"prompts go through the chat template as a user message{system}, as in training ({self.source}: chat records)"
        if self.kind == "template":
            template = task_defaults(self.task).prompt_template
            chat = " and then the chat template" if self.task.type == "instruction" else ""
            return f"prompts go through the {self.task.type} prompt template {template!r}{chat}, as in training ({self.source})"
        return f"prompts are sent as they are ({self.reason})"


def run_prompt(model: str | Path) -> RunPrompt:
    """How to prompt the model at `model` (a run directory, one of its checkpoints, or any model directory).

    The one reader of "the prompt a run was trained with": the run's recipe.yaml (an intermediate
    checkpoint's is its run's) gives the task, and its resolved `task.record_format` says whether the
    training records were conversations. Anything that is not a fine-tuning run is prompted raw.
    """
    path = run_dir_of(model) / "recipe.yaml"
    if not path.is_file():
        return RunPrompt("raw", reason=f"{model} has no recipe.yaml: not an llmkit fine-tuning run")
    try:
        recipe = load_recipe(path, run_recipe=True)  # a run written before train.evals still reads
    except RecipeError as exc:
        return RunPrompt("raw", source=str(path), reason=f"{path} does not load ({exc})")
    task = getattr(recipe, "task", None)
    if recipe.stage != "finetune" or task is None:
        return RunPrompt("raw", source=str(path), reason=f"{path} is a {recipe.stage} recipe, not a fine-tuning one")
    if task.type == "text":
        return RunPrompt("raw", task=task, source=str(path), reason=f"{path} fine-tuned on raw text (task.type: text)")
    if task.type in ("instruction", "preference") and task.record_format == "chat":
        return RunPrompt("chat", task=task, source=str(path))
    if task.type in _DEFAULTS:
        return RunPrompt("template", task=task, source=str(path))
    # Other task types (e.g. preference pairs) prompt with their records' prompt or conversation.
    kind = "chat" if getattr(task, "record_format", "auto") == "chat" else "raw"
    return RunPrompt(kind, task=task, source=str(path), reason=f"{path}: a {task.type} run is prompted with the prompt text as is")


def describe_chat_training(task: TaskSpec, tokenizer) -> str:
    """One line on how instruction records are trained: which replies, and the end-of-turn they learn to emit."""
    task = task_defaults(task)
    end = turn_end(tokenizer)
    closing = (
        f"each reply ends with the template's end-of-turn {end.text!r} (trained; generation stops there)"
        if end
        else "the chat template has no end-of-turn token, so each reply ends with EOS (trained)"
    )
    if task.record_format == "chat":
        which = "every assistant reply" if task.train_on == TRAIN_ON_ALL else "the last assistant reply"
        return f"chat records through {chat_template_source(tokenizer)}: {which} trained (task.train_on: {task.train_on}); {closing}"
    return f"template records through task.prompt_template, then {chat_template_source(tokenizer)}; {closing}"
