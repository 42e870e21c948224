"""Batched greedy generation and per-token log-likelihood of given responses."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..models.sharding import is_sharded
from .chat import end_token_ids, render
from .examples import IGNORE, batches, collate, sft_example


def _prompt_ids(tokenizer, messages, prefill: str = "") -> list[int]:
    """The generation prompt's ids; with `prefill`, the assistant turn already begins with it
    (the prefilling attack: the model continues an answer it did not choose to start)."""
    text = render(tokenizer, messages, add_generation_prompt=True) + prefill
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 48,
                 batch_size: int = 16, max_prompt_tokens: int = 512, desc: str = "generate",
                 progress: bool = False, prefill: str = "") -> list[tuple[list[int], list[int]]]:
    """Greedy continuations of chat prompts, left-padded in batches: per prompt, its (possibly
    left-truncated) token ids and the generated ids up to and including the first end token
    (after `prefill`, which is part of the prompt, not of the continuation)."""
    pad = tokenizer.pad_token_id
    ends = end_token_ids(tokenizer)
    out = []
    for chunk in tqdm(batches(prompts, batch_size), desc=desc, leave=False, disable=not progress):
        ids = [_prompt_ids(tokenizer, m, prefill)[-max_prompt_tokens:] for m in chunk]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=model.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=model.device)
        generated = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=ends,
                                   # sharded: every rank must run every forward, even when done
                                   synced_gpus=is_sharded(model))
        for prompt, row in zip(ids, generated[:, width:].tolist()):
            # a finished row is filled with padding, which may be the end token itself
            end = next((i for i, t in enumerate(row) if t in ends), None)
            out.append((prompt, row if end is None else row[:end + 1]))
    return out


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 48,
             batch_size: int = 16, max_prompt_tokens: int = 512, desc: str = "generate",
             progress: bool = False, endpoint=None, prefill: str = "") -> list[str]:
    """Greedy continuations of chat prompts as text; special tokens dropped. With an
    `endpoint` (endpoint.Endpoint) a server generates them and `model` may be None. With
    `prefill` the continuation is what follows that opening (a chat server cannot be
    prefilled, so the two do not go together)."""
    if endpoint is not None:
        if prefill:
            raise ConfigError("a prefilled answer needs the model in this process, not an endpoint")
        return endpoint.generate(tokenizer, prompts, max_new_tokens, desc, progress)
    return [tokenizer.decode(gen, skip_special_tokens=True).strip()
            for _, gen in generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size,
                                       max_prompt_tokens, desc, progress, prefill)]


@torch.no_grad()
def response_logliks(model, tokenizer, pairs: list[tuple[list[dict], str]], batch_size: int = 16,
                     max_length: int = 512) -> list[float]:
    """Mean log-probability per response token, one value per (prompt, response) pair."""
    examples = [sft_example(tokenizer, m, r, max_length, index=i) for i, (m, r) in enumerate(pairs)]
    values = []
    for chunk in batches(examples, batch_size):
        batch = {k: v.to(model.device) for k, v in collate(chunk, tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        logp = -F.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
        values.extend(((logp * mask).sum(1) / mask.sum(1)).tolist())
    return values
