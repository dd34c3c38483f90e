"""`llmkit generate`: sample text from any checkpoint, streamed to the terminal.

    llmkit generate runs/quickstart/finetune --file document.txt --max-new-tokens 32   # summarizes it
    echo "def add(a, b):" | llmkit generate runs/quickstart/pretrain --temperature 0
    llmkit generate runs/quickstart/pretrain/checkpoints/step-00000250 "The os module"
    llmkit generate runs/chat --chat          # interactive; the conversation is kept

Prompts are encoded exactly as training encoded them: `llmkit/prompts.py` `run_prompt` reads from
the run how it was trained (a chat fine-tune: the chat template, with the task's system prompt; a
template fine-tune: its prompt template), so a fine-tuned model sees the prompt shape it learned;
--raw sends the text as it is. Generation stops at EOS and at the chat template's end-of-turn
token. A file or stdin is one prompt (a document spans lines); --one-per-line makes each line a prompt.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from llmkit.data.sources import decode_utf8, read_text_file
from llmkit.errors import DataError, ModelError, RecipeError
from llmkit.generation import (
    check_new_tokens,
    cut_at_stop,
    decode_continuation,
    fit_prompt,
    generate_ids,
    generation_config,
    option_spec,
    stop_criteria,
)
from llmkit.models import check_causal, check_model_dir, checkpoint_config, load_model, max_positions
from llmkit.prompts import (
    RunPrompt,
    chat_prompt_ids,
    encode_prompts,
    run_prompt,
    task_defaults,
    template_fields,
)
from llmkit.recipes import GenerationSpec


def _stop_aware_streamer(tokenizer, stop: Sequence[str], out):
    """A TextStreamer that prints the continuation and never prints a stop string or what follows it."""
    from transformers import TextStreamer

    class StopAwareStreamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.pending = ""
            self.stopped = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if self.stopped:
                return
            self.pending += text
            cut = cut_at_stop(self.pending, stop)
            if len(cut) < len(self.pending):
                out.write(cut)
                self.stopped = True
                self.pending = ""
            elif stream_end:
                out.write(self.pending)
                self.pending = ""
            else:
                # Hold back a tail that may be the start of a stop string.
                hold = max(
                    (n for s in stop for n in range(len(s) - 1, 0, -1) if self.pending.endswith(s[:n])),
                    default=0,
                )
                ready = len(self.pending) - hold
                out.write(self.pending[:ready])
                self.pending = self.pending[ready:]
            out.flush()

    return StopAwareStreamer()


def _split_prompts(text: str, one_per_line: bool) -> list[str]:
    """The whole text as one prompt (its final newline dropped), or each non-empty line with --one-per-line."""
    if one_per_line:
        return [line for line in text.splitlines() if line.strip()]
    text = text.rstrip("\r\n")
    return [text] if text.strip() else []


def read_prompts(
    prompt: str | None, file: Path | None, stdin=None, one_per_line: bool = False, fields: list[str] | None = None
) -> list[str | dict] | None:
    """Prompts from the argument, a file or piped stdin.

    A text file or stdin is one prompt, newlines and all (a document to summarize spans lines);
    `one_per_line` makes each non-empty line a prompt. A .jsonl file holds one record per line:
    its 'prompt' field, or (for a fine-tune's template, `fields`) a record with the template's fields.
    None means stdin is a terminal with no prompt given: the caller runs an interactive session.
    """
    if prompt is not None and prompt != "-":
        if file is not None:
            raise RecipeError("give either a PROMPT argument or --file, not both")
        return [prompt]
    if file is not None:
        text = read_text_file(file, "--file")
        if file.suffix == ".jsonl":
            prompts: list[str | dict] = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{file}:{n}: invalid JSON ({exc.msg})") from None
                if isinstance(record, dict) and "prompt" in record:
                    prompts.append(str(record["prompt"]))
                elif isinstance(record, dict) and fields and all(f in record for f in fields):
                    prompts.append({f: str(record[f]) for f in fields})
                else:
                    wanted = "'prompt'" + (f" or the template's fields ({', '.join(fields)})" if fields else "")
                    raise DataError(f"{file}:{n}: expected a record with a {wanted} field")
        else:
            prompts = list(_split_prompts(text, one_per_line))
        if not prompts:
            raise DataError(f"--file: {file}: holds no prompts")
        return prompts
    stdin = stdin or sys.stdin
    if stdin.isatty():
        return None
    # Bytes, decoded strictly: Python's stdin would turn bytes that are not UTF-8 into surrogates, which the tokenizer rejects.
    piped = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8", "surrogateescape")
    prompts = list(_split_prompts(decode_utf8(piped, "stdin"), one_per_line))
    if not prompts:
        raise DataError("stdin held no prompts")
    return prompts


def _stream_one(lm, tokenizer, ids: list[int], spec: GenerationSpec) -> str:
    """Generate one continuation, printing it to stdout as it comes; returns it cut at EOS / stop."""
    import torch
    import typer

    device = next(lm.parameters()).device
    ids = fit_prompt(ids, spec.max_new_tokens, max_positions(lm.config))  # as generate_ids does when not streaming
    streamer = _stop_aware_streamer(tokenizer, spec.stop, sys.stdout)
    with torch.inference_mode():
        out = lm.generate(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
            generation_config=generation_config(spec, tokenizer),
            streamer=streamer,
            stopping_criteria=stop_criteria(tokenizer, spec.stop, len(ids)),
        )
    typer.echo("")
    return decode_continuation(tokenizer, out[0, len(ids) :].tolist(), spec.stop)


def _interactive(lm, tokenizer, spec: GenerationSpec, chat: bool, to_ids=None, system: list[dict] | None = None) -> list[str]:
    """A terminal session: read a prompt, stream the reply; in chat mode the conversation is kept.

    `to_ids` turns a typed line into the model's prompt ids (as the run was trained), when given;
    `system` opens every chat (the run's system prompt).
    """
    import typer

    messages: list[dict] = []
    outputs: list[str] = []
    typer.echo(
        "interactive: type a prompt and press Enter; Ctrl-D or /exit quits"
        + ("; /reset clears the chat" if chat else ""),
        err=True,
    )
    while True:
        try:
            line = input("> ")
        except EOFError:
            typer.echo("", err=True)
            return outputs
        if line.strip() in ("/exit", "/quit"):
            return outputs
        if chat and line.strip() == "/reset":
            messages.clear()
            continue
        if chat and not messages:
            messages.extend(system or [])
        if not line.strip():
            continue
        if chat:
            messages.append({"role": "user", "content": line})
            reply = _stream_one(lm, tokenizer, chat_prompt_ids(tokenizer, messages), spec)
            messages.append({"role": "assistant", "content": reply})
        else:
            ids = to_ids(line) if to_ids else encode_prompts(tokenizer, [line])[0]
            reply = _stream_one(lm, tokenizer, ids, spec)
        outputs.append(reply)


def run(
    model: str,
    prompt: str | None = None,
    file: Path | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    num_samples: int = 1,
    seed: int = 1234,
    chat: bool = False,
    stop: list[str] | None = None,
    stream: bool = True,
    raw: bool = False,
    one_per_line: bool = False,
) -> list[str]:
    """`llmkit generate`: sample continuations of prompts from a checkpoint, streaming them to stdout.

    A fine-tuned model (its directory holds the finetune recipe.yaml) gets each prompt as the run was
    trained (`run_prompt`: the chat template for chat records, else the prompt template), unless
    `raw`; `one_per_line` splits a file or stdin into one prompt per line (by default the whole
    text is one prompt).
    """
    import torch
    import typer

    # 1. Validate every option before loading anything.
    spec = option_spec(max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop or [], seed)
    if num_samples < 1:
        raise RecipeError(f"--num-samples must be >= 1, got {num_samples}")
    if num_samples > 1 and temperature == 0:
        raise RecipeError(
            "--num-samples > 1 with --temperature 0 repeats one greedy answer; set --temperature > 0"
        )
    check_model_dir(model, "MODEL", tokenizer_key=None)  # generate has no tokenizer option
    config = checkpoint_config(model, "MODEL")
    check_causal(config, "MODEL", model)  # an encoder is refused for what it is, before its positions are weighed
    check_new_tokens(max_new_tokens, config, "--max-new-tokens", "MODEL")
    trained = RunPrompt("raw", reason="--raw") if raw else run_prompt(model)
    if chat and trained.kind == "template":
        trained = RunPrompt("raw", reason="--chat: the chat template, not the run's prompt template")
    fields = template_fields(task_defaults(trained.task).prompt_template) if trained.kind == "template" else None
    prompts = read_prompts(prompt, file, one_per_line=one_per_line, fields=fields)
    if fields is not None and len(fields) != 1 and (prompts is None or any(isinstance(p, str) for p in prompts)):
        raise DataError(
            f"MODEL: the prompt template of {trained.source} names {len(fields)} fields ({', '.join(fields) or 'none'}), so a "
            "plain prompt cannot fill it; give --file records.jsonl with those fields, or pass --raw"
        )

    # 2. Load, and build prompts as the run was trained (chat template, prompt template) or as asked.
    lm, tokenizer = load_model(model, where="MODEL")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ModelError(f"MODEL: {model}: the tokenizer has no chat template; drop --chat")
    chat = chat or trained.kind == "chat"
    system = trained.messages("")[:-1] if trained.kind == "chat" else []
    limit = max_positions(lm.config)
    budget = None if limit is None else max(1, limit - max_new_tokens)  # long documents are cut, as in eval

    def to_ids(value: str | dict) -> list[int]:
        return trained.prompt_ids(tokenizer, value, max_prompt_tokens=budget)

    if trained.kind != "raw":
        typer.echo(f"({trained.describe()}; --raw sends them as they are)", err=True)
    elif has_template and not chat and not raw:
        typer.echo("(the tokenizer has a chat template; pass --chat to use it)", err=True)
    torch.manual_seed(seed)
    if prompts is None:
        return _interactive(lm, tokenizer, spec, chat, None if chat else to_ids, system)
    if chat:
        prompt_ids = [chat_prompt_ids(tokenizer, [*system, {"role": "user", "content": p}]) for p in prompts]
    else:
        prompt_ids = [to_ids(p) for p in prompts]

    for i, ids in enumerate(prompt_ids):
        if limit is not None and len(ids) + max_new_tokens > limit:
            typer.echo(
                f"(prompt {i + 1} is {len(ids):,} tokens: only its last {limit - max_new_tokens:,} fit before "
                f"--max-new-tokens {max_new_tokens:,} in the model's {limit:,} positions)",
                err=True,
            )

    # 3. Generate: token by token to the terminal, or batched when not streaming.
    many = len(prompts) > 1 or num_samples > 1
    outputs: list[str] = []
    if stream:
        for i, ids in enumerate(prompt_ids):
            for j in range(num_samples):
                if many:
                    typer.echo(f"### prompt {i + 1}" + (f", sample {j + 1}" if num_samples > 1 else ""))
                outputs.append(_stream_one(lm, tokenizer, ids, spec))
        return outputs
    for i, texts in enumerate(
        generate_ids(lm, tokenizer, prompt_ids, spec, num_return_sequences=num_samples)
    ):
        for j, text in enumerate(texts):
            if many:
                typer.echo(f"### prompt {i + 1}" + (f", sample {j + 1}" if num_samples > 1 else ""))
            typer.echo(text)
            outputs.append(text)
    return outputs
