"""`llmkit generate`: sample text from any checkpoint, streamed to the terminal.

    llmkit generate runs/quickstart/finetune "Summarize the following text." --max-new-tokens 32
    echo "def add(a, b):" | llmkit generate runs/quickstart/pretrain --temperature 0
    llmkit generate runs/chat --chat          # interactive; the conversation is kept

Prompts are encoded exactly as training encoded them (llmkit/data/sft.py: `encode_prompts`, and
`chat_prompt_ids` for --chat), so a fine-tuned model sees the prompt shape it learned.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from llmkit.data.sft import chat_prompt_ids, encode_prompts
from llmkit.errors import DataError, ModelError, RecipeError
from llmkit.generation import cut_at_stop, decode_continuation, generate_ids, generation_config, stop_criteria
from llmkit.models import check_model_dir, load_model
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


def read_prompts(prompt: str | None, file: Path | None, stdin=None) -> list[str] | None:
    """Prompts from the argument, a file (one per line; .jsonl: the 'prompt' field) or piped stdin (one per line).

    None means stdin is a terminal with no prompt given: the caller runs an interactive session.
    """
    if prompt is not None and prompt != "-":
        if file is not None:
            raise RecipeError("give either a PROMPT argument or --file, not both")
        return [prompt]
    if file is not None:
        if not file.is_file():
            raise DataError(f"--file: {file}: no such file")
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".jsonl":
            prompts = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{file}:{n}: invalid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or "prompt" not in record:
                    raise DataError(f"{file}:{n}: expected a record with a 'prompt' field")
                prompts.append(str(record["prompt"]))
        else:
            prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise DataError(f"--file: {file}: holds no prompts")
        return prompts
    stdin = stdin or sys.stdin
    if stdin.isatty():
        return None
    prompts = [line.rstrip("\n") for line in stdin if line.strip()]
    if not prompts:
        raise DataError("stdin held no prompts")
    return prompts


def _stream_one(lm, tokenizer, ids: list[int], spec: GenerationSpec) -> str:
    """Generate one continuation, printing it to stdout as it comes; returns it cut at EOS / stop."""
    import torch
    import typer

    device = next(lm.parameters()).device
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


def _interactive(lm, tokenizer, spec: GenerationSpec, chat: bool) -> list[str]:
    """A terminal session: read a prompt, stream the reply; in chat mode the conversation is kept."""
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
        if not line.strip():
            continue
        if chat:
            messages.append({"role": "user", "content": line})
            reply = _stream_one(lm, tokenizer, chat_prompt_ids(tokenizer, messages), spec)
            messages.append({"role": "assistant", "content": reply})
        else:
            reply = _stream_one(lm, tokenizer, encode_prompts(tokenizer, [line])[0], spec)
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
) -> list[str]:
    """`llmkit generate`: sample continuations of prompts from a checkpoint, streaming them to stdout."""
    import torch
    import typer

    # 1. Validate every option before loading anything.
    if temperature < 0:
        raise RecipeError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if max_new_tokens < 1:
        raise RecipeError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise RecipeError(f"--num-samples must be >= 1, got {num_samples}")
    if num_samples > 1 and temperature == 0:
        raise RecipeError(
            "--num-samples > 1 with --temperature 0 repeats one greedy answer; set --temperature > 0"
        )
    if not 0 < top_p <= 1:
        raise RecipeError(f"--top-p must be in (0, 1], got {top_p}")
    check_model_dir(model, "MODEL")
    prompts = read_prompts(prompt, file)
    spec = GenerationSpec(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        stop=list(stop or []),
        seed=seed,
    )

    # 2. Load, and render prompts through the chat template when asked.
    lm, tokenizer = load_model(model, where="MODEL")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ModelError(f"MODEL: {model}: the tokenizer has no chat template; drop --chat")
    if has_template and not chat:
        typer.echo("(the tokenizer has a chat template; pass --chat to use it)", err=True)
    torch.manual_seed(seed)
    if prompts is None:
        return _interactive(lm, tokenizer, spec, chat)
    if chat:
        prompt_ids = [chat_prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    else:
        prompt_ids = encode_prompts(tokenizer, prompts)

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
