"""The prompt protocol of question-answer tasks: few-shot draw, chat template on or off, few-shot as text or turns.

    python -c "from llmkit.evals.prompting import draw_fewshot; print(draw_fewshot(10, 3, 1234, 0, True))"

The protocol moves published scores more than models do (open-instruct PR #259: MMLU 0.674 -> 0.407
from the chat format alone), so every task records the one it used in metrics.json.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from llmkit import prompts
from llmkit.recipes import PromptSpec


def draw_fewshot(pool_size: int, k: int, seed: int | None, index: int, same_split: bool) -> list[int]:
    """Pool indices of question `index`'s k solved examples: the first k (seed None) or random.Random(seed + index).sample.

    same_split leaves the question out of its own prompt. The same draw as llmkit/metrics/choice.py's few-shot prefix.
    """
    if k == 0:
        return []
    candidates = [i for i in range(pool_size) if not (same_split and i == index)]
    return candidates[:k] if seed is None else random.Random(seed + index).sample(candidates, k)


def is_plain(spec: PromptSpec) -> bool:
    """Whether the prompt is plain text with no system prompt (lm-eval's default protocol)."""
    return not spec.chat_template and spec.system_prompt is None


def render(
    spec: PromptSpec,
    tokenizer,
    question: str,
    solved: Sequence[tuple[str, str]] = (),
    *,
    description: str = "",
    target_delimiter: str = " ",
    fewshot_delimiter: str = "\n\n",
) -> str:
    """The model's input for `question` after the solved (question, answer) examples, under the protocol `spec`."""
    shots = "".join(q + target_delimiter + a + fewshot_delimiter for q, a in solved)
    if not spec.chat_template:
        system = spec.system_prompt + fewshot_delimiter if spec.system_prompt else ""
        return system + description + shots + question
    messages: list[dict[str, str]] = []
    if spec.system_prompt:
        messages.append({"role": "system", "content": spec.system_prompt})
    if spec.fewshot_as == "turns":
        for n, (q, a) in enumerate(solved):
            messages.append({"role": "user", "content": (description if n == 0 else "") + q})
            messages.append({"role": "assistant", "content": a})
        head = description if not solved else ""
        messages.append({"role": "user", "content": head + question})
    else:
        messages.append({"role": "user", "content": description + shots + question})
    prompts.ensure_chat_template(tokenizer)
    return prompts.render_chat(tokenizer, messages)


def protocol(spec: PromptSpec, num_fewshot: int, *, target_delimiter: str, fewshot_delimiter: str) -> dict[str, Any]:
    """The prompt protocol as recorded in metrics.json."""
    return {
        "chat_template": spec.chat_template,
        "fewshot_as": spec.fewshot_as if num_fewshot else None,
        "num_fewshot": num_fewshot,
        "system_prompt": spec.system_prompt,
        "target_delimiter": target_delimiter,
        "fewshot_delimiter": fewshot_delimiter,
        "format": (
            "the tokenizer's chat template with a generation prompt; the answer follows the assistant header"
            if spec.chat_template
            else "plain text: [system prompt + fewshot_delimiter] + solved examples (question + target_delimiter + answer + "
            "fewshot_delimiter) + question"
        ),
    }
