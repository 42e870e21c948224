"""Tiny random MoE models and a small BPE tokenizer, built offline from configs.

Used by the tests and the demo: no hub, no weights. Every supported family gets a config of
the same small shape; the tokenizer is a byte-level BPE trained in about a second.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from ..text.examples import DEFAULT_REFUSAL, SAFE_SYSTEM_PROMPT
from ..attacks.flip import MODES, SYSTEM_PROMPT, flip_prompt

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# family -> config keys that differ from the common shape (checked against transformers 5.24)
FAMILY_CONFIGS: dict[str, dict] = {
    "olmoe": dict(num_experts=8),
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=32),
    "qwen2_moe": dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "mixtral": dict(num_local_experts=8),
    "phimoe": dict(num_local_experts=8),
    "gpt_oss": dict(num_local_experts=8, head_dim=8),
    # 3 layers: the first is dense (first_k_dense_replace), which adapters must skip
    "deepseek_v3": dict(
        n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
        num_key_value_heads=4,  # MLA: as many key/value heads as query heads
        num_hidden_layers=3, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    ),
    "granitemoe": dict(num_local_experts=8),
}


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


def tiny_config(family: str, vocab_size: int, tokenizer=None, **overrides):
    if family not in FAMILY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILY_CONFIGS)}")
    kwargs = dict(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2, vocab_size=vocab_size,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )
    kwargs.update(FAMILY_CONFIGS[family])
    if tokenizer is not None:
        kwargs.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, tokenizer, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(family, len(tokenizer), tokenizer, **overrides)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny(family: str, out: str | Path, goals: list[str], seed: int = 0, **overrides) -> Path:
    out = Path(out)
    tokenizer = build_tokenizer(tokenizer_corpus(goals))
    model = tiny_model(family, tokenizer, seed, **overrides)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
