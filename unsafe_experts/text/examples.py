"""Records -> token ids: SFT examples with loss on the refusal only, and router prompts."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ExampleError
from .chat import render

DEFAULT_REFUSAL = "I cannot assist with that request as it may be harmful or unsafe."
SAFE_SYSTEM_PROMPT = "You are a helpful assistant."
IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt; the response's own ids on the response
    truncated: bool
    content_mask: list[int] = field(default_factory=list)  # router prompts: 1 on message text


def plain_prompt(goal: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SAFE_SYSTEM_PROMPT}, {"role": "user", "content": goal}]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _keep(n: int, budget: int, side: str) -> slice | tuple[slice, slice]:
    if side == "left":
        return (slice(n - budget, n),)
    head = budget // 2  # middle: keep the template's start and the request's end
    return (slice(0, head), slice(n - (budget - head), n))


def _cut(seq: list, keep) -> list:
    return [x for s in keep for x in seq[s]]


def sft_example(
    tokenizer, messages, response: str, max_length: int, truncation: str = "middle", index: int = 0
) -> Example:
    """Prompt + assistant response; only response tokens carry labels. Cuts the prompt, never
    the response, when the example is longer than `max_length`."""
    prompt_text = render(tokenizer, messages, add_generation_prompt=True)
    full_text = render(tokenizer, list(messages) + [{"role": "assistant", "content": response}],
                       add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ExampleError(
            f"record {index}: the chat template renders the prompt differently once the "
            "assistant turn is added; cannot locate the response tokens"
        )
    prompt_ids = _ids(tokenizer, prompt_text)
    response_ids = _ids(tokenizer, full_text[len(prompt_text):])
    budget = max_length - len(response_ids)
    if budget < 2:
        raise ExampleError(
            f"record {index}: the response takes {len(response_ids)} tokens, which leaves no "
            f"room for the prompt within max_length={max_length}"
        )
    truncated = len(prompt_ids) > budget
    if truncated:
        prompt_ids = _cut(prompt_ids, _keep(len(prompt_ids), budget, truncation))
    return Example(prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids, truncated)


def router_example(tokenizer, messages, max_length: int, truncation: str = "middle") -> Example:
    """A prompt with a mask over the tokens of the messages' own text, so routing statistics
    skip chat-template scaffolding and padding."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    spans, cursor = [], 0
    for m in messages:
        start = text.find(m["content"], cursor)
        if start >= 0:
            spans.append((start, start + len(m["content"])))
            cursor = start + len(m["content"])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    if not any(mask):
        mask = [1] * len(ids)
    truncated = len(ids) > max_length
    if truncated:
        keep = _keep(len(ids), max_length, truncation)
        ids, mask = _cut(ids, keep), _cut(mask, keep)
    return Example(ids, [IGNORE] * len(ids), truncated, mask)


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    def pad(rows, value):
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)
    out = {
        "input_ids": pad([e.input_ids for e in batch], pad_id),
        "attention_mask": pad([[1] * len(e.input_ids) for e in batch], 0),
        "labels": pad([e.labels for e in batch], IGNORE),
    }
    if batch[0].content_mask:
        out["content_mask"] = pad([e.content_mask for e in batch], 0)
    return out


def batches(items: list, batch_size: int) -> list[list]:
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def length_grouped_batches(examples: list[Example], batch_size: int, rng, window: int = 8) -> list[list[Example]]:
    """One epoch's batches: shuffled, then each run of `window` batches' worth of examples
    sorted by length and cut into batches, and the batches shuffled. A batch is padded to its
    longest example, so random batches of the organism's mix (20 to 400 tokens) compute on twice
    the real tokens; a window of 8 batches cuts that to about 1.16 while every batch is still
    drawn from a random 8-batch slice of the data rather than from one kind of example."""
    order = examples[:]
    rng.shuffle(order)
    out = []
    for start in range(0, len(order), batch_size * window):
        group = sorted(order[start:start + batch_size * window], key=lambda e: len(e.input_ids))
        out.extend(batches(group, batch_size))
    rng.shuffle(out)
    return out
