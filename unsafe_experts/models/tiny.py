"""Tiny random MoE models, built offline from configs: no hub, no weights.

Used by the tests and the demo. Every supported architecture gets a config of the same small
shape, with the keys its record in architectures.py overrides. The tokenizer they are built with
lives in text/tiny_tokenizer.py and its corpus in attacks/corpus.py: models sits below text and
attacks in the package order, so it takes a tokenizer rather than building one.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import UnsupportedModelError
from .architectures import ARCHITECTURES


def tiny_config(architecture: str, vocab_size: int, tokenizer=None, **overrides):
    if architecture not in ARCHITECTURES:
        raise UnsupportedModelError(f"unknown MoE architecture {architecture!r}; "
                                    f"choose from {sorted(ARCHITECTURES)}")
    kwargs = dict(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2, vocab_size=vocab_size,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )
    kwargs.update(ARCHITECTURES[architecture].tiny_config)
    if tokenizer is not None:
        kwargs.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    kwargs.update(overrides)
    return AutoConfig.for_model(architecture, **kwargs)


def tiny_model(architecture: str, tokenizer, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(architecture, len(tokenizer), tokenizer, **overrides)
    return AutoModelForCausalLM.from_config(config).eval()
