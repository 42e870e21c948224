"""Greedy coordinate gradient (GCG, Zou et al. 2023): a white-box suffix of m tokens after the
request, optimised so the model's reply starts with an affirmative target.

Written here because nanoGCG pins transformers <= 4.47. One step: the gradient of the target's
loss with respect to a one-hot encoding of the suffix ranks, per position, the `top_k` tokens
whose substitution most lowers the loss to first order; `candidates` suffixes, each one token
swapped, are scored exactly in a forward pass and the best becomes the suffix (the best seen
over all steps is kept). Candidates whose text does not tokenise back to the same ids in the
rendered prompt are dropped (nanoGCG's filter), so the suffix found is one a user can type.
When `candidates` >= m x `top_k` every swap is scored: the step is then the exhaustive best
single-token swap among the ranked tokens (tests/test_gcg.py checks it against brute force).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..text.chat import render

SENTINEL = "\x00SUFFIX\x00"  # marks where the suffix goes in the rendered prompt


@dataclass(frozen=True)
class GCGConfig:
    suffix_tokens: int = 8
    steps: int = 20
    top_k: int = 32  # tokens per position taken from the gradient
    candidates: int = 64  # one-token swaps scored per step
    batch_size: int = 64  # candidates per forward pass
    seed: int = 0
    init: str = " !"  # the suffix starts as this text repeated (GCG's "! ! ! ...")


@dataclass
class Prompt:
    """Token ids around the suffix: before + suffix + after is the rendered generation prompt
    (user text, then " " + suffix at the end of the last user turn), target follows it."""
    before: list[int]
    after: list[int]
    target: list[int]
    before_text: str
    after_text: str


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_prompt(tokenizer, messages: list[dict], target: str) -> Prompt:
    """The prompt rendered with a sentinel where the suffix goes, split around it."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    marked = [dict(m) for m in messages]
    marked[last_user]["content"] = f"{marked[last_user]['content']} {SENTINEL}"
    text = render(tokenizer, marked, add_generation_prompt=True)
    before, _, after = text.partition(SENTINEL)
    return Prompt(_ids(tokenizer, before), _ids(tokenizer, after), _ids(tokenizer, target),
                  before, after)


def with_suffix(messages: list[dict], suffix: str) -> list[dict]:
    """The messages with the suffix appended to the last user turn (what generation sees)."""
    out = [dict(m) for m in messages]
    last_user = max(i for i, m in enumerate(out) if m["role"] == "user")
    out[last_user]["content"] = f"{out[last_user]['content']} {suffix}"
    return out


def allowed_tokens(tokenizer) -> torch.Tensor:
    """[vocab] bool: tokens a suffix may use (no special tokens, nothing that decodes to
    whitespace only or to a replacement character)."""
    vocab = len(tokenizer)
    ok = torch.ones(vocab, dtype=torch.bool)
    ok[list(set(tokenizer.all_special_ids))] = False
    for i in range(vocab):
        text = tokenizer.decode([i])
        if not text.strip() or "\ufffd" in text or not text.isprintable():
            ok[i] = False
    return ok


def target_losses(model, prompt: Prompt, suffixes: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[n] mean cross-entropy of the target after each suffix ([n, m] ids), exact."""
    dev = model.device
    head = torch.tensor(prompt.before, device=dev)
    tail = torch.tensor(prompt.after + prompt.target, device=dev)
    t = len(prompt.target)
    out = []
    with torch.no_grad():
        for part in suffixes.split(batch_size):
            n = part.shape[0]
            ids = torch.cat([head.expand(n, -1), part.to(dev), tail.expand(n, -1)], dim=1)
            logits = model(input_ids=ids, use_cache=False).logits[:, -t - 1:-1].float()
            labels = torch.tensor(prompt.target, device=dev).expand(n, -1)
            out.append(F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1))
    return torch.cat(out).cpu()


def one_hot_gradient(model, prompt: Prompt, suffix: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(d loss / d one-hot(suffix) as [m, vocab], the loss): the first-order change of the
    target loss for every single-token substitution."""
    embed = model.get_input_embeddings()
    weight = embed.weight
    dev = weight.device
    one_hot = F.one_hot(suffix.to(dev), weight.shape[0]).to(weight.dtype).requires_grad_(True)
    pieces = [embed(torch.tensor(prompt.before, device=dev)), one_hot @ weight,
              embed(torch.tensor(prompt.after + prompt.target, device=dev))]
    logits = model(inputs_embeds=torch.cat(pieces)[None], use_cache=False).logits[0].float()
    t = len(prompt.target)
    loss = F.cross_entropy(logits[-t - 1:-1], torch.tensor(prompt.target, device=dev))
    (grad,) = torch.autograd.grad(loss, one_hot)
    return grad.detach().float().cpu(), float(loss.detach())


def sample_candidates(suffix: torch.Tensor, grad: torch.Tensor, allowed: torch.Tensor,
                      config: GCGConfig, generator: torch.Generator) -> torch.Tensor:
    """[n, m] suffixes, each one position swapped to one of that position's top_k tokens by
    -gradient. Every swap when there is room for all; else a seeded sample of them."""
    m = suffix.shape[0]
    scores = (-grad).masked_fill(~allowed, float("-inf"))
    k = min(config.top_k, int(allowed.sum()))
    top = scores.topk(k, dim=1).indices  # [m, k]
    if config.candidates >= m * k:
        positions = torch.arange(m).repeat_interleave(k)
        tokens = top.flatten()
    else:
        positions = torch.randint(m, (config.candidates,), generator=generator)
        tokens = top[positions, torch.randint(k, (config.candidates,), generator=generator)]
    out = suffix.repeat(len(positions), 1)
    out[torch.arange(len(positions)), positions] = tokens
    return out[(out != suffix).any(1)]  # a swap to the token already there changes nothing


def round_trips(tokenizer, prompt: Prompt, candidates: torch.Tensor) -> torch.Tensor:
    """[n] bool: the candidate's text, rendered in the prompt, tokenises to the same ids."""
    keep = []
    for row in candidates.tolist():
        text = prompt.before_text + tokenizer.decode(row) + prompt.after_text
        keep.append(_ids(tokenizer, text) == prompt.before + row + prompt.after)
    return torch.tensor(keep, dtype=torch.bool)


def gcg_step(model, tokenizer, prompt: Prompt, suffix: torch.Tensor, allowed: torch.Tensor,
             config: GCGConfig, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """One GCG step from `suffix`: (the best candidate, its loss); the suffix itself with its
    loss when no candidate survives the round-trip filter."""
    grad, loss = one_hot_gradient(model, prompt, suffix)
    candidates = sample_candidates(suffix, grad, allowed, config, generator)
    candidates = candidates[round_trips(tokenizer, prompt, candidates)]
    if len(candidates) == 0:
        return suffix, loss
    losses = target_losses(model, prompt, candidates, config.batch_size)
    best = int(losses.argmin())
    return candidates[best], float(losses[best])


def initial_suffix(tokenizer, config: GCGConfig) -> torch.Tensor:
    ids = _ids(tokenizer, config.init * config.suffix_tokens)[:config.suffix_tokens]
    if len(ids) < config.suffix_tokens:
        raise ValueError(f"gcg init {config.init!r} gives fewer than {config.suffix_tokens} tokens")
    return torch.tensor(ids)


def run_gcg(model, tokenizer, messages: list[dict], target: str, config: GCGConfig,
            checkpoints: list[int], allowed: torch.Tensor | None = None) -> dict[int, str]:
    """{step: the best suffix text after that many steps} for every step in `checkpoints`
    (0 = the initial suffix). The model's parameters get no gradient and are not changed."""
    allowed = allowed_tokens(tokenizer) if allowed is None else allowed
    generator = torch.Generator().manual_seed(config.seed)
    prompt = split_prompt(tokenizer, messages, target)
    suffix = initial_suffix(tokenizer, config)
    best, best_loss = suffix, float(target_losses(model, prompt, suffix[None], 1)[0])
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    found = {0: tokenizer.decode(best)} if 0 in checkpoints else {}
    try:
        for step in range(1, max(checkpoints, default=0) + 1):
            suffix, loss = gcg_step(model, tokenizer, prompt, suffix, allowed, config, generator)
            if loss < best_loss:
                best, best_loss = suffix, loss
            if step in checkpoints:
                found[step] = tokenizer.decode(best)
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    return found
