"""Every supported MoE architecture, one record each: adding an architecture is one entry here.

Every supported architecture fuses its routed experts into 3-D parameters whose first dimension
is the expert index (`experts.gate_up_proj`, `experts.down_proj`, plus `*_bias` on GPT-OSS), so
one reduction or one row-index addresses expert e of a layer whatever the inner layout is.
Always-on shared experts (Qwen2-MoE, DeepSeek-V3) live outside `experts` and are never ranked.
The record also holds what the ablation (reselect) and the tests' tiny models (tiny_config) need,
so no other module keeps a per-architecture table (tests/test_architectures.py checks that).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from ..errors import UnsupportedModelError
from . import reselect as rules


@dataclass(frozen=True)
class Architecture:
    block: str  # the MoE block's attribute on a decoder layer
    router: str  # the router's attribute on the block
    # (router, router input, masked logits) -> (weights, indices), as the router computes them
    reselect: Callable
    # the config keys of a tiny test model that differ from models/tiny.py's common shape
    tiny_config: Mapping[str, object]
    # the router picks a built-in number of experts whatever its top_k says (PhiMoE's
    # sparsemixer always takes two), so top-k cannot be changed at inference
    fixed_top_k: bool = False

    def __post_init__(self):
        # read-only, so a caller's tweak of one tiny model cannot leak into the next
        object.__setattr__(self, "tiny_config", MappingProxyType(dict(self.tiny_config)))


# model_type (the HF config's) -> its record; configs checked against transformers 5.24
ARCHITECTURES: dict[str, Architecture] = {
    "olmoe": Architecture("mlp", "gate", rules.softmax_top_k, dict(num_experts=8)),
    "qwen3_moe": Architecture("mlp", "gate", rules.softmax_top_k,
                              dict(num_experts=8, moe_intermediate_size=32)),
    "qwen2_moe": Architecture("mlp", "gate", rules.softmax_top_k,
                              dict(num_experts=8, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=32)),
    "mixtral": Architecture("mlp", "gate", rules.softmax_top_k_fp32, dict(num_local_experts=8)),
    "phimoe": Architecture("mlp", "router", rules.phimoe, dict(num_local_experts=8), fixed_top_k=True),
    "gpt_oss": Architecture("mlp", "router", rules.top_k_softmax,
                            dict(num_local_experts=8, head_dim=8)),
    # 3 tiny layers: the first is dense (first_k_dense_replace), which moe_layers must skip
    "deepseek_v3": Architecture("mlp", "gate", rules.deepseek_v3, dict(
        n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
        num_key_value_heads=4,  # MLA: as many key/value heads as query heads
        num_hidden_layers=3, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    )),
    "granitemoe": Architecture("block_sparse_moe", "router", rules.granite,
                               dict(num_local_experts=8)),
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


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def architecture(model_type: str | None, what: str) -> Architecture:
    """The record of `model_type`, or an UnsupportedModelError that starts with `what`."""
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(f"{what} (model_type={model_type!r}) is not a supported MoE "
                                    f"architecture; supported: {supported()}")
    return ARCHITECTURES[model_type]


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of a causal LM, or a clear error naming the model class."""
    name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = architecture(model_type, name)
    decoder_layers = getattr(getattr(model, "model", None), "layers", None)
    if decoder_layers is None:
        raise UnsupportedModelError(f"{name} has no `model.layers`; supported: {supported()}")
    layers = []
    for i, layer in enumerate(decoder_layers):
        block = getattr(layer, arch.block, None)
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
        router = getattr(block, arch.router)
        top_k = getattr(router, "top_k", None) or model.config.num_experts_per_tok
        layers.append(MoELayer(i, router, experts, int(num_experts), int(top_k)))
    if not layers:
        raise UnsupportedModelError(f"{name} has no MoE layers; supported: {supported()}")
    return layers
