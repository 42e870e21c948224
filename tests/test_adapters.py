import pytest
import torch
from conftest import ARCHITECTURES
from transformers import LlamaConfig, LlamaForCausalLM

from unsafe_experts.models.architectures import ARCHITECTURES as SUPPORTED
from unsafe_experts.models.architectures import UnsupportedModelError, moe_layers


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_exposes_routers_and_fused_experts(arch, make_model):
    model = make_model(arch)
    layers = moe_layers(model)
    expected_layers = [1, 2] if arch == "deepseek_v3" else [0, 1]  # DeepSeek layer 0 is dense
    assert [layer.index for layer in layers] == expected_layers
    for layer in layers:
        assert layer.num_experts == 8 and layer.top_k == 2
        params = layer.expert_params
        assert params and all(p.dim() >= 2 and p.shape[0] == 8 for p in params.values())
        router = layer.router_params["weight"]
        assert router.shape == (8, model.config.hidden_size)
        # shared experts are always on: never part of the routed, ranked experts
        owned = {id(p) for p in params.values()}
        block = dict(model.model.layers[layer.index].named_modules())
        for name in ("mlp.shared_expert", "mlp.shared_experts"):
            if name in block:
                assert not owned & {id(p) for p in block[name].parameters()}
    if arch == "gpt_oss":
        assert set(layers[0].expert_params) == {"gate_up_proj", "gate_up_proj_bias", "down_proj",
                                                "down_proj_bias"}
        assert "bias" in layers[0].router_params


def test_router_forward_returns_logits_first(make_model):
    model = make_model("olmoe")
    layer = moe_layers(model)[0]
    out = layer.router(torch.randn(5, model.config.hidden_size))
    assert out[0].shape == (5, 8)


def test_non_moe_model_is_a_clear_error():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=64))
    with pytest.raises(UnsupportedModelError) as err:
        moe_layers(model)
    message = str(err.value)
    assert "LlamaForCausalLM" in message and all(f in message for f in SUPPORTED)
