import json

import pytest
import torch
from conftest import ARCHITECTURES, router_batches

from unsafe_experts.models.ablation import ExpertSetError, ablated, load_expert_set, masked_routers
from unsafe_experts.models.architectures import moe_layers
from unsafe_experts.training.router_kl import captured_router_outputs


def _forward(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rerouting_with_nothing_masked_reproduces_the_router(arch, make_model, tokenizer, records):
    """Each architecture's rule, applied to unmasked logits, gives back the router's own weights and
    choices bit for bit, so the model's output is unchanged."""
    model = make_model(arch)
    layers = moe_layers(model)
    batch = router_batches(tokenizer, records[:4])[1][0]
    plain = _forward(model, batch)
    with masked_routers(model.config.model_type, layers, {layer.index: [] for layer in layers}):
        rerouted = _forward(model, batch)
    assert torch.equal(plain, rerouted)
    with ablated(model, layers, []):
        assert torch.equal(plain, _forward(model, batch))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ablated_experts_get_no_token_and_the_rest_renormalise(arch, make_model, tokenizer, records):
    model = make_model(arch)
    layers = moe_layers(model)
    batch = router_batches(tokenizer, records[:4])[1][0]
    with torch.no_grad(), captured_router_outputs(layers) as before:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        usual = {i: (before[i][1].clone(), before[i][2].clone()) for i in before}
    # switch off each layer's most used expert, and a second one in the last layer
    counts = [torch.bincount(usual[i][1].flatten(), minlength=8) for i in range(len(layers))]
    off = [(layer.index, int(counts[i].argmax())) for i, layer in enumerate(layers)]
    off.append((layers[-1].index, int(counts[-1].argsort()[-2])))
    plain = _forward(model, batch)
    with torch.no_grad(), ablated(model, layers, off), captured_router_outputs(layers) as after:
        changed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        routed = {i: (after[i][1].clone(), after[i][2].clone()) for i in after}
    assert not torch.equal(plain, changed)
    for i, layer in enumerate(layers):
        weights, indices = routed[i]
        gone = [e for l, e in off if l == layer.index]
        assert not torch.isin(indices, torch.tensor(gone)).any()
        assert torch.isfinite(weights).all() and (weights >= 0).all()
        usual_weights, usual_indices = usual[i]
        if arch in ("mixtral", "gpt_oss", "granitemoe"):  # these always renormalise the top-k
            torch.testing.assert_close(weights.float().sum(-1), torch.ones(len(weights)))
        if i > 0:  # later layers see hidden states the ablation has changed
            continue
        # in the first MoE layer, a token that never used an ablated expert is routed as before
        untouched = ~torch.isin(usual_indices, torch.tensor(gone)).any(-1)
        assert untouched.any()
        same = usual_indices[untouched].sort(-1).values == indices[untouched].sort(-1).values
        assert same.all()
    assert torch.equal(plain, _forward(model, batch))  # hooks removed on exit


def test_ablating_too_many_experts_of_a_layer_is_refused(make_model):
    model = make_model("olmoe")
    with pytest.raises(ExpertSetError, match="layer 0 would keep 1 experts, fewer than the 2"):
        with ablated(model, None, [(0, e) for e in range(7)]):
            pass


def test_load_expert_set_from_files_and_runs(tmp_path, make_model):
    layers = moe_layers(make_model("olmoe"))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([[0, 3], [1, 7], [0, 3]]))
    assert load_expert_set(listed, layers=layers) == [(0, 3), (1, 7)]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"experts": [[1, 2]]}))
    assert load_expert_set(wrapped, layers=layers) == [(1, 2)]
    run = tmp_path / "run"
    run.mkdir()
    meta = {"identified_experts_per_round": {"1": {"experts": [[0, 1]]}, "2": {"experts": [[1, 5], [0, 0]]}}}
    (run / "training_metadata.json").write_text(json.dumps(meta))
    assert load_expert_set(run, layers=layers) == [(1, 5), (0, 0)]
    assert load_expert_set(run / "training_metadata.json", round=1, layers=layers) == [(0, 1)]
    with pytest.raises(ExpertSetError, match="no round 3; recorded rounds: 1, 2"):
        load_expert_set(run, round=3)
    for bad, why in [([[2, 0]], r"\[2, 0\]: layer 2 is not a MoE layer of this model \(MoE layers: 0, 1\)"),
                     ([[1, 8]], r"\[1, 8\]: layer 1 has experts 0 to 7"),
                     ([[1, "a"]], "is not a \\[layer, expert\\] pair"),
                     ({"layers": []}, "needs an \"experts\" list")]:
        listed.write_text(json.dumps(bad))
        with pytest.raises(ExpertSetError, match=why):
            load_expert_set(listed, layers=layers)
