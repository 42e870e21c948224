"""Bytes a round's checkpoint takes: a delta (the trained experts' rows and the routers) vs a
full save. Measured by writing both for the bench's scaled-down OLMoE; counted from the
config shapes for two real models, whose weights are never needed (the models are laid out
on the meta device).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from unsafe_experts.artefacts.deltas import changed_tensors, write_delta
from unsafe_experts.models.architectures import moe_layers

# The models' config.json on the Hugging Face hub (the values that set the weights' shapes):
# allenai/OLMoE-1B-7B-0924: 16 layers, 64 experts (top-8), hidden 2048, expert intermediate
# 1024, 16 heads with 16 key/value heads, vocabulary 50304, untied embeddings; 6.9 B parameters.
# Qwen/Qwen3-30B-A3B: 48 layers, every one MoE, 128 experts (top-8), hidden 2048,
# moe_intermediate 768, 32 heads with 4 key/value heads of 128, vocabulary 151936, untied
# embeddings; 30.5 B parameters. Both are published in bf16 (2 bytes a parameter).
FULL_SIZE = {
    "OLMoE-1B-7B": ("olmoe", dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                                  num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                                  num_experts_per_tok=8, vocab_size=50304, tie_word_embeddings=False)),
    "Qwen3-30B-A3B": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144,
                                        moe_intermediate_size=768, num_hidden_layers=48,
                                        num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                        num_experts=128, num_experts_per_tok=8, vocab_size=151936,
                                        tie_word_embeddings=False, decoder_sparse_step=1,
                                        mlp_only_layers=[])),
}
BYTES_PER_PARAMETER = 2  # bf16


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def spread(layers, k: int) -> list[tuple[int, int]]:
    """k experts spread over the layers in turn (a round's picks; all experts are one size, so
    which k does not change the bytes)."""
    pool = [(layer.index, e) for e in range(layers[0].num_experts) for layer in layers]
    return pool[:k]


def measured(model, k: int) -> dict:
    """Both checkpoints of one round written to disk: a full save_pretrained, and the delta of
    k experts' rows and every router."""
    from transformers.utils import logging as hf_logging

    layers = moe_layers(model)
    with tempfile.TemporaryDirectory() as tmp:
        full, delta = Path(tmp) / "full", Path(tmp) / "delta"
        hf_logging.disable_progress_bar()  # one line of figures, not a progress bar
        model.save_pretrained(full)
        hf_logging.enable_progress_bar()
        tensors, rows = changed_tensors(model, layers, spread(layers, k), routers=True)
        write_delta(delta, tensors, rows, {"round": 1, "base": {}, "previous": None,
                                           "experts": spread(layers, k), "routers": True})
        return {"full": _size(full), "delta": _size(delta)}


def counted(arch: str, shape: dict, k: int) -> dict:
    """Weight bytes of a full checkpoint and of a round's delta at k experts, from the shapes."""
    config = AutoConfig.for_model(arch, **shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = moe_layers(model)
    full = sum(p.numel() for p in model.parameters()) * BYTES_PER_PARAMETER
    per_expert = sum(p[0].numel() for p in layers[0].expert_params.values())
    routers = sum(p.numel() for layer in layers for p in layer.router_params.values())
    return {"full": full, "delta": (k * per_expert + routers) * BYTES_PER_PARAMETER,
            "experts": len(layers) * layers[0].num_experts}


def report(figures: dict, model, k_measured: int, k: int = 100, rounds: int = 3) -> None:
    m = measured(model, k_measured)
    print(f"\ncheckpoint per round, k = {k_measured} (measured, files written): full "
          f"{m['full'] / 2**20:.2f} MiB, delta {m['delta'] / 2**20:.3f} MiB")
    figures["checkpoint_bytes_ratio_delta_vs_full"] = m["delta"] / m["full"]
    print(f"at k = {k} in bf16, counted from the config shapes (a {rounds}-round run writes "
          f"{rounds} round checkpoints and final_model/, full by default):")
    for name, (arch, shape) in FULL_SIZE.items():
        c = counted(arch, shape, k)
        before = (rounds + 1) * c["full"]
        now = rounds * c["delta"] + c["full"]
        # a delta final_model holds every expert any round trained: at most rounds x k
        final = counted(arch, shape, rounds * k)["delta"]
        print(f"  {name} ({c['experts']} experts): full {c['full'] / 1e9:.2f} GB, delta "
              f"{c['delta'] / 1e9:.3f} GB per round; the run {before / 1e9:.1f} GB with full "
              f"rounds, {now / 1e9:.1f} GB with deltas, at most "
              f"{(rounds * c['delta'] + final) / 1e9:.1f} GB with a delta final_model too")
        key = name.lower().replace("-", "_")
        figures[f"checkpoint_bytes_per_round_{key}_full"] = c["full"]
        figures[f"checkpoint_bytes_per_round_{key}_delta_k{k}"] = c["delta"]
