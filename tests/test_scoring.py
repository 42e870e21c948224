import pytest
import torch
from conftest import ARCHITECTURES, sft_batches

from unsafe_experts.models.architectures import moe_layers
from unsafe_experts.selection.score_pass import score_pass
from unsafe_experts.selection.scoring import row_l1, row_l1_blocked, row_l1_per_row, score_table, top_k


def expert_gradients(model, layers, batches) -> None:
    """The mean batch loss's gradients of the expert parameters alone, from no gradient."""
    from unsafe_experts.training.phases import lm_loss

    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for layer in layers:
        for p in layer.expert_params.values():
            p.requires_grad_(True)
    for b in batches:
        (lm_loss(model, b) / len(batches)).backward()


def slow_reference(layers):
    """Per expert, per parameter, in Python: the definition, not the fast path."""
    table = {}
    for layer in layers:
        for e in range(layer.num_experts):
            grads = [p.grad[e].double().abs().flatten() for p in layer.expert_params.values()]
            table[(layer.index, e)] = float(torch.cat(grads).mean())
    return table


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scores_and_top_k_match_a_per_expert_reference(arch, make_model, tokenizer, records):
    model = make_model(arch)
    layers = moe_layers(model)
    batches = sft_batches(tokenizer, records[:8])
    logged = []
    scores = score_pass(model, layers, batches, lambda kind, v: logged.append((kind, v)), progress=False)
    assert scores.shape == (len(layers), 8)
    assert logged[0][0] == "score" and len(logged[0][1]) == len(batches)

    # recompute the same accumulated gradients and check against the slow definition
    expert_gradients(model, layers, batches)
    reference = slow_reference(layers)
    fast = {(layer.index, e): float(scores[i, e]) for i, layer in enumerate(layers) for e in range(8)}
    for key, value in reference.items():
        assert fast[key] == pytest.approx(value, rel=1e-4, abs=1e-12)
    k = 5
    expected = sorted(reference, key=lambda key: (-reference[key], key))[:k]
    assert top_k(scores, k, layers) == expected
    table = score_table(scores, layers)
    assert len(table) == len(layers) * 8
    assert list(table)[:k] == [f"L{l}_E{e}" for l, e in expected]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("way", [row_l1, row_l1_per_row, row_l1_blocked])
def test_row_l1_is_accurate_on_long_expert_rows(way, dtype):
    """A one-level reduction along 2^21-element rows drifts by ~3e-4 on a CPU; these do not."""
    grad = torch.randn(4, 2 ** 21, generator=torch.Generator().manual_seed(0)).to(dtype)
    exact = grad.double().abs().sum(1)
    assert ((way(grad).double() - exact).abs() / exact).max() < 1e-6
    odd = torch.randn(3, 5, 7)  # a row length with no power-of-two factor still works
    torch.testing.assert_close(way(odd.flatten(1)), odd.abs().sum((1, 2)))


def test_ties_break_by_layer_then_expert(make_model):
    layers = moe_layers(make_model("olmoe"))
    scores = torch.tensor([[1.0, 3.0, 3.0, 0, 0, 0, 0, 0], [3.0, 0, 0, 0, 0, 0, 0, 2.0]])
    assert top_k(scores, 4, layers) == [(0, 1), (0, 2), (1, 0), (1, 7)]


def test_an_expert_without_tokens_scores_zero(make_model, tokenizer, records):
    model = make_model("olmoe")
    layers = moe_layers(model)

    def never_route_to_expert_3(module, inputs, output):
        logits = output[0].clone()
        logits[:, 3] = float("-inf")
        weights, indices = logits.softmax(-1).topk(module.top_k, dim=-1)
        return output[0], weights.to(output[1].dtype), indices

    handle = layers[0].router.register_forward_hook(never_route_to_expert_3)
    try:
        scores = score_pass(model, layers, sft_batches(tokenizer, records[:4]), lambda *a: None,
                            progress=False)
    finally:
        handle.remove()
    assert scores[0, 3] == 0
    assert (scores[0] > 0).sum() == 7 and (scores[1] > 0).all()
    assert 3 not in [e for l, e in top_k(scores, 15, layers) if l == 0]


def test_training_loss_leaves_out_the_router_aux_loss(make_model, tokenizer, records):
    model = make_model("mixtral", output_router_logits=True, router_aux_loss_coef=0.5)
    batch = sft_batches(tokenizer, records[:4])[0]
    from unsafe_experts.training.phases import lm_loss
    with torch.no_grad():
        ours = lm_loss(model, batch)
        with_aux = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(ours, manual)
    assert not torch.isclose(ours, with_aux)


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss", "deepseek_v3"])
def test_streamed_scoring_equals_exact_on_one_batch_and_bounds_it_on_more(arch, make_model,
                                                                          tokenizer, records):
    model = make_model(arch)
    layers = moe_layers(model)
    one = sft_batches(tokenizer, records[:4])
    exact = score_pass(model, layers, one, lambda *a: None, progress=False)
    lean = score_pass(model, layers, one, lambda *a: None, progress=False, streamed=True)
    torch.testing.assert_close(lean, exact, rtol=1e-5, atol=1e-12)
    three = sft_batches(tokenizer, records[:12])
    exact = score_pass(model, layers, three, lambda *a: None, progress=False)
    lean = score_pass(model, layers, three, lambda *a: None, progress=False, streamed=True)
    assert (lean >= exact - 1e-9).all() and (lean > exact).any()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(not p._post_accumulate_grad_hooks for layer in layers
               for p in layer.expert_params.values())


def _expert_grads(layers):
    for layer in layers:
        for p in layer.expert_params.values():
            p.requires_grad_(True)
            p.grad = None


def slow_variant_reference(model, layers, batches, score):
    """The new scores by their definitions, one parameter row and one token at a time."""
    from unsafe_experts.training.phases import lm_loss

    for p in model.parameters():
        p.requires_grad_(False)
    _expert_grads(layers)
    keys = [(layer.index, e) for layer in layers for e in range(layer.num_experts)]
    if score == "fisher":
        squares = {key: 0.0 for key in keys}
        for b in batches:
            _expert_grads(layers)
            lm_loss(model, b).backward()
            for layer in layers:
                for e in range(layer.num_experts):
                    rows = [p.grad[e].double().flatten() for p in layer.expert_params.values()]
                    squares[(layer.index, e)] += float(torch.cat(rows).square().mean()) / len(batches)
        return squares
    routed = {key: 0 for key in keys}
    picks = {}
    handles = [layer.router.register_forward_hook(
        lambda m, i, out, n=n: picks.__setitem__(n, out[-1].tolist())) for n, layer in enumerate(layers)]
    for b in batches:
        (lm_loss(model, b) / len(batches)).backward()
        width = b["labels"].shape[1]
        for n, layer in enumerate(layers):
            for row in range(b["labels"].shape[0]):
                for t in range(width - 1):
                    if b["labels"][row, t + 1] != -100:
                        for e in picks[n][row * width + t]:
                            routed[(layer.index, e)] += 1
    for h in handles:
        h.remove()
    table = {}
    for layer in layers:
        for e in range(layer.num_experts):
            params = layer.expert_params.values()
            if score == "snip":
                value = torch.cat([(p.grad[e].double() * p[e].detach().double()).abs().flatten()
                                   for p in params]).mean()
            else:
                value = torch.cat([p.grad[e].double().abs().flatten() for p in params]).mean()
                value = value / max(routed[(layer.index, e)], 1)
            table[(layer.index, e)] = float(value)
    return table


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("score", ["gradient_per_token", "fisher", "snip"])
def test_score_variants_match_their_definitions(score, arch, make_model, tokenizer, records):
    model = make_model(arch)
    layers = moe_layers(model)
    batches = sft_batches(tokenizer, records[:8], batch_size=3)
    fast = score_pass(model, layers, batches, lambda *a: None, progress=False, score=score)
    gradient = score_pass(model, layers, batches, lambda *a: None, progress=False)
    assert not torch.allclose(fast, gradient)  # a different score, not the seed's under a new name
    reference = slow_variant_reference(model, layers, batches, score)
    for i, layer in enumerate(layers):
        for e in range(layer.num_experts):
            assert float(fast[i, e]) == pytest.approx(reference[(layer.index, e)], rel=1e-4, abs=1e-15)
    lean = score_pass(model, layers, batches, lambda *a: None, progress=False, score=score, streamed=True)
    if score == "fisher":  # per-batch squares either way
        torch.testing.assert_close(lean, fast, rtol=1e-5, atol=1e-15)
    else:  # per-batch magnitudes summed: an upper bound
        assert (lean >= fast * (1 - 1e-5)).all() and (lean > fast).any()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("score", ["gradient", "snip", "gradient_per_token"])
def test_offloaded_scoring_is_exact_and_frees_device_gradients(arch, score, make_model, tokenizer,
                                                               records):
    from unsafe_experts.selection.scoring import offloaded_rows

    model = make_model(arch)
    layers = moe_layers(model)
    three = sft_batches(tokenizer, records[:12])
    exact = score_pass(model, layers, three, lambda *a: None, progress=False, score=score)
    offload = score_pass(model, layers, three, lambda *a: None, progress=False, score=score,
                         offload=True)
    torch.testing.assert_close(offload, exact, rtol=1e-6, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())
    # during backward the hook frees each expert gradient as soon as it is added to the host sum
    held = []
    for p in layers[0].expert_params.values():
        p.requires_grad_(True)
    with offloaded_rows(layers[:1]):
        from unsafe_experts.training.phases import lm_loss
        lm_loss(model, three[0]).backward()
        held = [p.grad for p in layers[0].expert_params.values()]
    assert all(g is None for g in held)
    for p in model.parameters():
        p.requires_grad_(False)
