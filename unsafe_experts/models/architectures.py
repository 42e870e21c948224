"""Where each MoE family keeps its routers and experts (transformers 5.x layouts).

Every supported family fuses its routed experts into 3-D parameters whose first dimension is
the expert index (`experts.gate_up_proj`, `experts.down_proj`, plus `*_bias` on GPT-OSS), so
one reduction or one row-index addresses expert e of a layer whatever the inner layout is.
Always-on shared experts (Qwen2-MoE, DeepSeek-V3) live outside `experts` and are never ranked.
"""
from __future__ import annotations

from ..errors import UnsupportedModelError

from dataclasses import dataclass

from torch import nn

# model_type -> (MoE block attribute on the decoder layer, router attribute on the block)
FAMILIES: dict[str, tuple[str, str]] = {
    "olmoe": ("mlp", "gate"),
    "qwen3_moe": ("mlp", "gate"),
    "qwen2_moe": ("mlp", "gate"),
    "mixtral": ("mlp", "gate"),
    "deepseek_v3": ("mlp", "gate"),
    "phimoe": ("mlp", "router"),
    "gpt_oss": ("mlp", "router"),
    "granitemoe": ("block_sparse_moe", "router"),
}


@dataclass
class MoELayer:
    index: int  # decoder layer index in the model (dense layers are skipped, not renumbered)
    router: nn.Module  # forward returns (router_logits [tokens, E], weights, indices)
    experts: nn.Module
    num_experts: int
    top_k: int

    @property
    def expert_params(self) -> dict[str, nn.Parameter]:
        """Fused per-expert tensors, expert index on dim 0."""
        return {n: p for n, p in self.experts.named_parameters(recurse=False)}

    @property
    def router_params(self) -> dict[str, nn.Parameter]:
        return dict(self.router.named_parameters(recurse=False))


def _supported() -> str:
    return ", ".join(sorted(FAMILIES))


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of a causal LM, or a clear error naming the model class."""
    name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{name} (model_type={model_type!r}) is not a supported MoE family; "
            f"supported: {_supported()}"
        )
    block_attr, router_attr = FAMILIES[model_type]
    decoder_layers = getattr(getattr(model, "model", None), "layers", None)
    if decoder_layers is None:
        raise UnsupportedModelError(f"{name} has no `model.layers`; supported: {_supported()}")
    layers = []
    for i, layer in enumerate(decoder_layers):
        block = getattr(layer, block_attr, None)
        experts = getattr(block, "experts", None)
        if experts is None:
            continue  # a dense layer (DeepSeek-V3's first_k_dense_replace, Qwen2-MoE mlp_only_layers)
        if isinstance(experts, nn.ModuleList):
            raise UnsupportedModelError(
                f"{name} layer {i} keeps experts in a per-expert ModuleList; this tool expects the "
                "fused 3-D expert tensors of transformers>=5"
            )
        params = dict(experts.named_parameters(recurse=False))
        num_experts = next(iter(params.values())).shape[0]
        if any(p.shape[0] != num_experts for p in params.values()):
            raise UnsupportedModelError(f"{name} layer {i}: expert tensors disagree on expert count")
        router = getattr(block, router_attr)
        top_k = getattr(router, "top_k", None) or model.config.num_experts_per_tok
        layers.append(MoELayer(i, router, experts, int(num_experts), int(top_k)))
    if not layers:
        raise UnsupportedModelError(f"{name} has no MoE layers; supported: {_supported()}")
    return layers
