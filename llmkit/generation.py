"""Text generation: the batched helper used for scoring, and the `llmkit generate` command.

    llmkit generate runs/quickstart/finetune "Summarize the following text." --max-new-tokens 32
    echo "def add(a, b):" | llmkit generate runs/quickstart/pretrain --temperature 0

`generate_texts` is what evaluation and fine-tuning's task metric call: prompts are left-padded
into batches (sorted by length so little padding is wasted), decoded with the KV cache by
`model.generate`, and cut at EOS and at the first stop string; only the continuation comes back.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmkit.errors import DataError, ModelError, RecipeError
from llmkit.modeling import max_positions
from llmkit.recipes import GenerationSpec

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
ADAPTER_FILES = ("adapter_config.json",)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def where_failed(path: str, exc: BaseException) -> str:
    """Why a model or config could not be loaded, saying so when the path is no local directory."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not Path(path).expanduser().exists():
        return f"{path}: no such directory, and no Hub model of that name could be loaded ({reason})"
    return f"cannot load from {path} ({reason})"


def check_model_dir(path: str, where: str = "model.path", tokenizer: str | None = None) -> None:
    """ModelError naming `where` when a checkpoint directory is missing, or lacks config, weights or tokenizer."""
    from llmkit.modeling import local_model_path

    local = local_model_path(path, where)
    if local is None:
        return  # a hub id: from_pretrained reports what is wrong with it
    if not local.is_dir():
        raise ModelError(f"{where}: {path}: is a file; give the checkpoint directory that holds config.json")
    names = {p.name for p in local.iterdir()}
    if "adapter_config.json" in names and "config.json" not in names:
        return  # a LoRA adapter directory: peft loads the base model it names
    if "config.json" not in names:
        hint = (
            " (it holds checkpoints/; the final model is written when training finishes)"
            if "checkpoints" in names
            else ""
        )
        raise ModelError(
            f"{where}: {path}: no config.json, so this is not a Hugging Face model directory{hint}"
        )
    if not names.intersection(WEIGHT_FILES):
        raise ModelError(f"{where}: {path}: no model weights (model.safetensors or pytorch_model.bin)")
    tok_dir = Path(tokenizer).expanduser() if tokenizer else local
    if tok_dir.is_dir() and not {p.name for p in tok_dir.iterdir()}.intersection(TOKENIZER_FILES):
        key = "tokenizer" if tokenizer else where
        raise ModelError(
            f"{key}: {tok_dir}: no tokenizer files (tokenizer.json); set `tokenizer:` to the tokenizer directory"
        )


def default_device() -> str:
    """cuda when a GPU is visible, else mps on Apple silicon, else cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_tokenizer(path: str, where: str = "tokenizer"):
    """AutoTokenizer from a directory, with a pad token (EOS when the tokenizer defines none)."""
    from llmkit.modeling import load_tokenizer as load

    return load(path, where, require_eos=False)


def load_model(
    path: str,
    tokenizer: str | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = "sdpa",
    device: str | None = None,
    where: str = "model.path",
):
    """(model, tokenizer) of a checkpoint directory (or LoRA adapter directory), in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    check_model_dir(path, where, tokenizer)
    hf_logging.disable_progress_bar()  # a progress bar per checkpoint drowns the report
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    is_adapter = (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file()
    try:
        if is_adapter:
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path, **kwargs).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{where}: {where_failed(path, exc)}") from None
    model.to(device or default_device()).eval()
    tok = load_tokenizer(tokenizer or path, "tokenizer" if tokenizer else where)
    return model, tok


# ----------------------------------------------------------------------------------------------
# Batched generation
# ----------------------------------------------------------------------------------------------


def generation_config(spec: GenerationSpec, tokenizer, num_return_sequences: int = 1):
    """A transformers GenerationConfig built only from `spec`, so a checkpoint's own defaults never leak in."""
    from transformers import GenerationConfig

    settings: dict[str, Any] = {
        "max_new_tokens": spec.max_new_tokens,
        "do_sample": spec.do_sample,
        "num_beams": spec.num_beams,
        "repetition_penalty": spec.repetition_penalty,
        "num_return_sequences": num_return_sequences,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "use_cache": True,
    }
    if spec.do_sample:
        settings.update(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k)
    else:
        # Explicit neutral values: otherwise transformers warns that sampling knobs are ignored.
        settings.update(temperature=1.0, top_p=1.0, top_k=50)
    if spec.num_beams > 1:
        settings["early_stopping"] = True
    return GenerationConfig(**settings)


def stop_criteria(tokenizer, stop: Sequence[str], prompt_width: int):
    """StoppingCriteriaList ending a row once its continuation (never the prompt) contains a stop string.

    transformers' own `stop_strings` also matches a stop string that straddles the end of the
    prompt (prompt "f(a):" + generated ":" stops on "::"), so it could end a generation that
    does not contain the stop string at all.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    stops = [s for s in stop if s]
    # A stop string of n characters lies within the last n + 8 tokens (byte-level pieces may be partial characters).
    tail = max((len(s) for s in stops), default=0) + 8

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids[:, prompt_width:]
            window = new[:, -tail:].tolist()
            texts = tokenizer.batch_decode(window, skip_special_tokens=True)
            return torch.tensor(
                [any(s in t for s in stops) for t in texts], dtype=torch.bool, device=input_ids.device
            )

    return StoppingCriteriaList([StopOnStrings()]) if stops else None


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string."""
    end = len(text)
    for s in stop:
        if s:
            found = text.find(s)
            if found != -1:
                end = min(end, found)
    return text[:end]


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of plain prompts with the tokenizer's special tokens, never a doubled BOS.

    A prompt rendered by a chat template usually starts with the BOS text already; adding the
    tokenizer's BOS again would show the model a sequence it never saw in training.
    """
    out = []
    bos = tokenizer.bos_token_id
    for ids in tokenizer(list(prompts), add_special_tokens=True, verbose=False)["input_ids"]:
        ids = list(ids)
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        out.append(ids)
    return out


def generate_ids(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    spec: GenerationSpec,
    batch_size: int = 8,
    num_return_sequences: int = 1,
) -> list[list[str]]:
    """Continuations of pre-tokenized prompts: `num_return_sequences` texts per prompt, in prompt order."""
    import torch

    if not prompt_ids:
        return []
    config = generation_config(spec, tokenizer, num_return_sequences)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    limit = max_positions(model.config)
    device = next(model.parameters()).device
    # Longest first: similar lengths share a batch (little padding) and memory peaks at once.
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    results: list[list[str]] = [[] for _ in prompt_ids]
    generator_seed = spec.seed
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = []
        for i in chunk:
            ids = list(prompt_ids[i])
            if limit is not None and len(ids) + spec.max_new_tokens > limit:
                # Keep the end of an over-long prompt: it holds the cue ("Summary:") the model answers.
                ids = ids[len(ids) + spec.max_new_tokens - limit :]
            if not ids:
                ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id]
            rows.append(ids)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ids in enumerate(rows):
            # Left padding: every prompt ends at the same column, so new tokens line up.
            input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, width - len(ids) :] = 1
        if spec.do_sample:
            torch.manual_seed(generator_seed)
            generator_seed += 1
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                stopping_criteria=stop_criteria(tokenizer, spec.stop, width),
            )
        new_tokens = output[:, width:].tolist()
        for k, ids in enumerate(new_tokens):
            results[chunk[k // num_return_sequences]].append(_decode(tokenizer, ids, spec.stop))
    return results


def _decode(tokenizer, ids: list[int], stop: Sequence[str]) -> str:
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    for j, t in enumerate(ids):
        if t in eos_ids:
            ids = ids[:j]
            break
    return cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)


def generate_texts(
    model, tokenizer, prompts: list[str], spec: GenerationSpec, batch_size: int = 8
) -> list[str]:
    """Continuations of `prompts` (batched, left-padded, KV cache, cut at EOS and stop strings), in order."""
    return [
        texts[0]
        for texts in generate_ids(model, tokenizer, encode_prompts(tokenizer, prompts), spec, batch_size)
    ]


# ----------------------------------------------------------------------------------------------
# `llmkit generate`
# ----------------------------------------------------------------------------------------------


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


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered by the chat template, ready for the assistant's reply."""
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template writes its own BOS; the tokenizer must not add a second one.
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


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
    return _decode(tokenizer, out[0, len(ids) :].tolist(), spec.stop)


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
            reply = _stream_one(lm, tokenizer, _chat_ids(tokenizer, messages), spec)
            messages.append({"role": "assistant", "content": reply})
        else:
            reply = _stream_one(lm, tokenizer, encode_prompts(tokenizer, [line])[0], spec)
        outputs.append(reply)


def generate_command(
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
        prompt_ids = [_chat_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
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
