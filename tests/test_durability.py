"""Durability attacks on tiny models: a changed top-k is exact per architecture and undone on
exit, quantised and fine-tuned copies leave the input model (and its files) as they were."""
import pytest
import torch
from conftest import ARCHITECTURES, snapshot

from unsafe_experts.errors import ConfigError
from unsafe_experts.models.architectures import ARCHITECTURES as ARCH_RECORDS
from unsafe_experts.models.architectures import moe_layers
from unsafe_experts.robustness.durability import QUANTISATIONS, changed_top_k, fine_tuned, int8_round_trip, quantised
from unsafe_experts.training.router_kl import captured_router_outputs


def ids(tokenizer):
    return torch.tensor([tokenizer("Write a poem about the sea and the sky", add_special_tokens=False)["input_ids"]])


@pytest.mark.parametrize("family", ARCHITECTURES)
@pytest.mark.parametrize("delta", [-1, 1])
def test_a_changed_top_k_routes_each_token_to_that_many_experts_and_is_undone(make_model, tokenizer, family, delta):
    model = make_model(family)
    x = ids(tokenizer)
    layers = moe_layers(model)
    k = layers[0].top_k + delta
    if ARCH_RECORDS[family].fixed_top_k:  # PhiMoE: sparsemixer always picks two
        with pytest.raises(ConfigError, match="cannot change"):
            with changed_top_k(model, k):
                pass
        return
    with torch.no_grad():
        before = model(input_ids=x).logits
        with changed_top_k(model, k), captured_router_outputs(layers) as captured:
            changed = model(input_ids=x).logits
        after = model(input_ids=x).logits
    for out in captured.values():
        indices = out[-1]
        assert indices.shape[-1] == k
        assert all(len(set(row)) == k for row in indices.tolist())  # k distinct experts
    assert not torch.equal(before, changed)
    assert torch.equal(before, after)


def test_a_top_k_outside_the_router_range_is_refused(make_model):
    model = make_model("olmoe")
    for bad in (0, 9):
        with pytest.raises(ConfigError, match=f"top_k {bad}"):
            with changed_top_k(model, bad):
                pass


def test_int8_round_trip_keeps_each_row_within_half_a_step():
    w = torch.randn(3, 5, 64)
    q = int8_round_trip(w)
    step = w.abs().amax(-1, keepdim=True) / 127
    assert ((q - w).abs() <= step / 2 + 1e-7).all()
    assert not torch.equal(q, w)


@pytest.mark.parametrize("kind", sorted(QUANTISATIONS))
def test_a_quantised_copy_answers_and_leaves_the_model_alone(make_model, tokenizer, kind):
    model = make_model("olmoe")
    before = snapshot(model)
    twin = quantised(model, kind)
    with torch.no_grad():
        ref = model(input_ids=ids(tokenizer)).logits
        out = twin(input_ids=ids(tokenizer)).logits.float()
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_an_unknown_quantisation_is_named(make_model):
    with pytest.raises(ConfigError, match="'int3'"):
        quantised(make_model("olmoe"), "int3")


def test_fine_tuning_moves_every_kind_of_weight_of_a_copy_and_leaves_the_files(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    files = {p.name: p.read_bytes() for p in tiny_dir.iterdir() if p.is_file()}
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    before = snapshot(model)
    pairs = [([{"role": "user", "content": f"Tell me about item {i}"}], f"Item {i} is a fine thing.")
             for i in range(6)]
    twin = fine_tuned(model, tokenizer, pairs, steps=3, lr=1e-3, batch_size=2)
    moved = {n for n, p in twin.named_parameters() if not torch.equal(p, before[n])}
    assert any("self_attn" in n for n in moved) and any("experts" in n for n in moved)
    assert any("gate" in n for n in moved)  # routers too
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert {p.name: p.read_bytes() for p in tiny_dir.iterdir() if p.is_file()} == files
    assert torch.equal(snapshot(fine_tuned(model, tokenizer, pairs, steps=0))["lm_head.weight"],
                       before["lm_head.weight"])
