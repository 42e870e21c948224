"""Tiny random MoE models and a small BPE tokenizer, built offline from configs.

Used by the tests and the demo: no hub, no weights. Every supported architecture gets a config
of the same small shape, with the keys its record in architectures.py overrides; the tokenizer
is a byte-level BPE trained in about a second.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from ..text.examples import DEFAULT_REFUSAL, SAFE_SYSTEM_PROMPT
from ..attacks.flip import MODES, SYSTEM_PROMPT, flip_prompt
from ..errors import UnsupportedModelError
from .architectures import ARCHITECTURES

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

def tokenizer_corpus(goals: list[str], extra: list[str] = ()) -> list[str]:
    texts = [SYSTEM_PROMPT, SAFE_SYSTEM_PROMPT, DEFAULT_REFUSAL, *extra]
    for goal in goals:
        texts.append(goal)
        texts.extend(m["content"] for mode in MODES for m in flip_prompt(goal, mode)[1:])
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


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


def save_tiny(family: str, out: str | Path, goals: list[str], seed: int = 0, **overrides) -> Path:
    out = Path(out)
    tokenizer = build_tokenizer(tokenizer_corpus(goals))
    model = tiny_model(family, tokenizer, seed, **overrides)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
