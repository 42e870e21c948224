"""Router steering on every architecture: forced experts are chosen for every token, switched-off
ones never, the rest of the choice is the architecture's own, and nothing is left hooked."""
import pytest
import torch
from conftest import ARCHITECTURES

from unsafe_experts.errors import ExpertSetError
from unsafe_experts.models.ablation import steered
from unsafe_experts.models.architectures import moe_layers
from unsafe_experts.training.router_kl import captured_router_outputs


def ids(tokenizer):
    return torch.tensor([tokenizer("How do I bake bread at home with a simple oven", add_special_tokens=False)["input_ids"]])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forced_experts_are_chosen_for_every_token_and_masked_ones_never(make_model, tokenizer, arch):
    model = make_model(arch)
    layers = moe_layers(model)
    first, last = layers[0], layers[-1]
    x = ids(tokenizer)
    with torch.no_grad(), captured_router_outputs(layers) as plain:
        before = model(input_ids=x).logits
    # force the expert each layer uses least, so forcing has something to change
    least = {i: int(torch.bincount(plain[i][-1].flatten(), minlength=layer.num_experts).argmin())
             for i, layer in enumerate(layers)}
    on = [(first.index, least[0]), (last.index, least[len(layers) - 1])]
    off = [(last.index, (least[len(layers) - 1] + 1) % last.num_experts)]
    with torch.no_grad(), steered(model, layers, off=off, on=on) as forced, \
            captured_router_outputs(layers) as seen:
        changed = model(input_ids=x).logits
    assert forced == sorted(on)
    assert (seen[0][-1] == least[0]).any(-1).all()
    assert (seen[len(layers) - 1][-1] == least[len(layers) - 1]).any(-1).all()
    assert not (seen[len(layers) - 1][-1] == off[0][1]).any()
    assert not torch.equal(before, changed)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)  # hooks removed


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_steering_with_nothing_changes_nothing(make_model, tokenizer, arch):
    model = make_model(arch)
    x = ids(tokenizer)
    with torch.no_grad():
        before = model(input_ids=x).logits
        with steered(model, None) as forced:
            same = model(input_ids=x).logits
    assert forced == [] and torch.equal(before, same)


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3", "phimoe"])
def test_a_forced_expert_whose_logit_was_already_the_largest_leaves_the_choice(make_model, tokenizer, arch):
    # forcing the expert a token already ranks first must not change which experts it takes
    model = make_model(arch)
    layers = moe_layers(model)
    x = ids(tokenizer)[:, :1]
    with torch.no_grad(), captured_router_outputs(layers) as plain:
        model(input_ids=x)
    logits, indices = plain[0][0], plain[0][-1]
    best = int(logits[0].argmax())
    if best not in indices[0].tolist():
        pytest.skip("the top logit is not chosen by this architecture's rule (bias-corrected)")
    with torch.no_grad(), steered(model, layers, on=[(layers[0].index, best)]), \
            captured_router_outputs(layers) as seen:
        model(input_ids=x)
    assert sorted(seen[0][-1][0].tolist()) == sorted(indices[0].tolist())


def test_a_layer_takes_at_most_its_top_k_forced_experts(make_model):
    model = make_model("olmoe")
    layers = moe_layers(model)
    i = layers[0].index
    with steered(model, layers, on=[(i, 5), (i, 6), (i, 7)]) as forced:
        assert forced == [(i, 5), (i, 6)]  # top_k = 2: the first two asked for


def test_steering_names_a_pair_the_model_lacks(make_model):
    with pytest.raises(ExpertSetError, match="steering"):
        with steered(make_model("olmoe"), None, on=[(0, 99)]):
            pass
