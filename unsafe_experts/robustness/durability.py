"""Durability: does a repair survive what users do to a model after it ships? A changed top-k
at inference (llama.cpp users do this), bf16 and int8 weights, and fine-tuning of all weights
on benign instructions or on a few harmful (goal, compliance) pairs (SafeMoE's setting).

Every function here works on a copy or restores what it changed: the model passed in (and
the files it was loaded from) are never altered.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, ExampleError
from ..models.architectures import ARCHITECTURES, moe_layers
from ..text.examples import batches, collate, sft_example
from ..training.phases import lm_backward


def top_k_range(layers) -> range:
    """The experts per token a router can be asked for: 1 to the smallest layer's count."""
    return range(1, min(layer.num_experts for layer in layers) + 1)


@contextmanager
def changed_top_k(model, top_k: int):
    """Every router picks `top_k` experts per token inside the block (the blocks that keep
    their own copy of top_k, Mixtral's and PhiMoE's, too), then what it picked before."""
    layers = moe_layers(model)
    if ARCHITECTURES[model.config.model_type].fixed_top_k:
        raise ConfigError(f"top_k {top_k}: {model.config.model_type}'s router picks a built-in "
                          "number of experts; top-k cannot change at inference")
    if top_k not in top_k_range(layers):
        raise ConfigError(f"top_k {top_k}: a router can pick 1 to {top_k_range(layers)[-1]} experts")
    owners = [layer.router for layer in layers]
    owners += [b for b in (_block(model, layer.index) for layer in layers) if hasattr(b, "top_k")]
    saved = [o.top_k for o in owners]
    for o in owners:
        o.top_k = top_k
    try:
        yield
    finally:
        for o, k in zip(owners, saved):
            o.top_k = k


def _block(model, index: int):
    layer = model.model.layers[index]
    return next(m for m in layer.children() if hasattr(m, "experts"))


def int8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8 quantisation and back (absmax over the last dimension): what
    int8 weight-only formats keep of a weight, fused expert tensors included."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
    return ((w / scale).round().clamp(-127, 127) * scale).to(weight.dtype)


def _int8_weights(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.dtype.is_floating_point:
                p.copy_(int8_round_trip(p))
    return model


def _int8_dynamic(model):
    """torch's own dynamic quantisation: nn.Linear layers only (attention, lm_head, shared
    experts); the fused 3-D routed experts and the routers are not nn.Linear and stay fp32."""
    with warnings.catch_warnings():
        # torch marks its eager quantisation deprecated (torchao replaces it); it is what the
        # issue names as "torch's own", and it still runs, so the notice is not repeated per call
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(model.cpu(), {nn.Linear}, dtype=torch.qint8)


# kind -> what a copy of the model goes through
QUANTISATIONS = {
    "bf16": lambda model: model.to(torch.bfloat16),
    "int8_dynamic": _int8_dynamic,
    "int8_weights": _int8_weights,
}


def quantised(model, kind: str):
    """A quantised copy of the model (on the CPU for int8_dynamic, which has no GPU kernels)."""
    if kind not in QUANTISATIONS:
        raise ConfigError(f"quantisation {kind!r}: choose from {', '.join(QUANTISATIONS)}")
    return QUANTISATIONS[kind](copy.deepcopy(model)).eval()


def fine_tuning(model, tokenizer, pairs: list[tuple[list[dict], str]], checkpoints: list[int],
                lr: float = 1e-4, batch_size: int = 8, max_length: int = 512, seed: int = 0,
                progress: bool = False):
    """Yields (steps, copy) at every checkpoint: one copy of the model trained on, with AdamW
    on every weight (attention, routers and experts alike), over (messages, response) pairs
    cycled in a seeded order; loss on the response tokens only, as the surgery's SFT. The copy
    is in eval mode when yielded and trains on after (checkpoint 0: the untouched copy)."""
    if not pairs:
        raise ConfigError("fine-tuning attack: no (prompt, response) pairs to train on")
    examples = []
    for i, (messages, response) in enumerate(pairs):
        try:
            examples.append(sft_example(tokenizer, messages, response, max_length, index=i))
        except ExampleError:
            continue  # an answer longer than max_length: the attacker trains on those that fit
    if not examples:
        raise ConfigError(f"fine-tuning attack: none of the {len(pairs)} pairs fits max_length={max_length}")
    twin = copy.deepcopy(model)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    chunks = batches([examples[i] for i in order], batch_size)
    trainable = [p for p in twin.parameters() if p.dtype.is_floating_point]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    done = 0
    for checkpoint in sorted(set(checkpoints)):
        twin.train()
        for step in tqdm(range(done, checkpoint), desc="fine-tuning attack", leave=False, disable=not progress):
            batch = {k: v.to(twin.device)
                     for k, v in collate(chunks[step % len(chunks)], tokenizer.pad_token_id).items()}
            optimizer.zero_grad(set_to_none=True)
            lm_backward(twin, batch, None, "fine-tuning attack", step, len(chunks))
            optimizer.step()
        done = checkpoint
        twin.eval()
        yield checkpoint, twin


def fine_tuned(model, tokenizer, pairs: list[tuple[list[dict], str]], steps: int, **kwargs):
    """A copy of the model after `steps` fine-tuning steps (fine_tuning's last checkpoint)."""
    *_, (_, twin) = fine_tuning(model, tokenizer, pairs, [steps], **kwargs)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin
