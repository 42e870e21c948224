import math

import pytest
import torch
from conftest import ARCHITECTURES, router_batches, snapshot

from unsafe_experts.models.architectures import moe_layers
from unsafe_experts.training.phases import align_router
from unsafe_experts.training.router_kl import kl, router_kl, routing_distribution


def test_kl_types_against_hand_computed_values():
    safe = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    unsafe = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    f0 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    f1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    r0 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    r1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(router_kl(safe, unsafe, "forward")) == pytest.approx((f0 + f1) / 2, rel=1e-6)
    assert float(router_kl(safe, unsafe, "reverse")) == pytest.approx((r0 + r1) / 2, rel=1e-6)
    assert float(router_kl(safe, unsafe, "symmetric")) == pytest.approx((f0 + f1 + r0 + r1) / 4, rel=1e-6)
    assert float(kl(safe[0], safe[0])) == 0.0
    with pytest.raises(ValueError, match="kl_type"):
        router_kl(safe, unsafe, "both")


def test_routing_distribution_ignores_masked_tokens():
    logits = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [50.0, -50.0]],
                           [[0.0, 2.0], [-7.0, 7.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    dist = routing_distribution({0: (logits.view(6, 2),)}, mask)
    first = torch.tensor([2.0, 0.0]).softmax(-1)
    second = torch.tensor([0.0, 2.0]).softmax(-1)
    torch.testing.assert_close(dist[0], (first + second) / 2)
    changed = logits.clone()
    changed[0, 2] = torch.tensor([-9.0, 9.0])
    torch.testing.assert_close(routing_distribution({0: (changed.view(6, 2),)}, mask), dist)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_alignment_lowers_kl_and_trains_only_routers(arch, make_model, tokenizer, records):
    model = make_model(arch)
    layers = moe_layers(model)
    safe, unsafe = router_batches(tokenizer, records[:8])
    before = snapshot(model)
    steps = []
    kl_before, kl_after = align_router(model, layers, safe, unsafe, "symmetric", lr=1e-3,
                                       weight_decay=0.0, epochs=5, log=lambda k, v: steps.extend(v),
                                       progress=False)
    assert kl_after < kl_before and len(steps) == 10
    router_ids = {id(p) for layer in layers for p in layer.router_params.values()}
    for name, p in model.named_parameters():
        if id(p) in router_ids:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name
    assert all(not layer.router._forward_hooks for layer in layers)


def test_sigmoid_routers_are_aligned_on_what_they_route_by():
    logits = torch.tensor([[[0.0, 2.0, -1.0], [4.0, 0.0, 0.0]]])  # one prompt, two tokens
    mask = torch.tensor([[1, 1]])
    bias = torch.tensor([0.5, 0.0, -0.2])
    dist = routing_distribution({0: (logits.view(2, 3),)}, mask, {0: bias})
    choice = (logits[0].sigmoid() + bias).mean(0)
    torch.testing.assert_close(dist[0], choice / choice.sum())
    softmax = routing_distribution({0: (logits.view(2, 3),)}, mask)  # what it would be without
    assert not torch.allclose(dist[0], softmax[0], atol=1e-3)


def test_deepseek_layers_carry_their_correction_bias(make_model):
    from unsafe_experts.training.router_kl import choice_biases

    assert set(choice_biases(moe_layers(make_model("deepseek_v3")))) == {0, 1}
    assert choice_biases(moe_layers(make_model("olmoe"))) == {}
