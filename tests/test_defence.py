"""The dense baseline (full_param) and the defence against the router attack (shared weights,
expert dropout): what each trains, what its deltas hold, and what the router attack can mask."""
import json

import pytest
import torch
from conftest import sft_batches, snapshot
from test_deltas import config, run_with_full_saves, same_checkpoint

from unsafe_experts.artefacts.checkpoints import materialize
from unsafe_experts.artefacts.deltas import MANIFEST
from unsafe_experts.artefacts.locality import locality_report, weight_changes
from unsafe_experts.config import ConfigError, TrainConfig
from unsafe_experts.models.ablation import by_layer, masked_routers
from unsafe_experts.models.architectures import moe_layers
from unsafe_experts.robustness.runner import _unmaskable
from unsafe_experts.surgery import run_surgery
from unsafe_experts.training.phases import dropout_draws, lm_loss, masked_sft, shared_params

SELECTION = [(0, 1), (1, 3)]


def _moved(model, before) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}


def _roles(model, layers):
    experts = {id(p) for layer in layers for p in layer.expert_params.values()}
    routers = {id(p) for layer in layers for p in layer.router_params.values()}
    names = dict(model.named_parameters())
    return ({n for n, p in names.items() if id(p) in experts}, {n for n, p in names.items() if id(p) in routers},
            {n for n, p in names.items() if id(p) not in experts | routers})


def _rows_moved(model, before, layers) -> set[tuple[int, int]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {(layer.index, e) for layer in layers for p in layer.expert_params.values()
            for e in range(p.shape[0]) if not torch.equal(p[e], before[names[id(p)]][e])}


def test_shared_weights_train_everything_outside_the_experts_but_the_routers(make_model, tokenizer, records):
    model = make_model("olmoe")
    layers = moe_layers(model)
    before = snapshot(model)
    masked_sft(model, layers, sft_batches(tokenizer, records[:8]), SELECTION, lr=1e-2, weight_decay=0.0,
               epochs=1, log=lambda *a: None, progress=False, shared=shared_params(model, layers))
    experts, routers, others = _roles(model, layers)
    moved = _moved(model, before)
    assert moved & routers == set()
    assert others <= moved  # attention, norms and embeddings all trained
    assert _rows_moved(model, before, layers) == set(SELECTION)


def test_a_dropped_step_trains_the_shared_weights_on_the_loss_without_the_experts(make_model, tokenizer, records):
    model = make_model("olmoe")
    layers = moe_layers(model)
    batches = sft_batches(tokenizer, records[:4])
    seed = next(s for s in range(100) if dropout_draws(len(batches), 0.5, s) == [True] * len(batches))
    with torch.no_grad(), masked_routers(model.config.model_type, layers, by_layer(SELECTION)):
        masked_loss = float(lm_loss(model, batches[0]))
    with torch.no_grad():
        plain_loss = float(lm_loss(model, batches[0]))
    before = snapshot(model)
    logs = []
    masked_sft(model, layers, batches, SELECTION, lr=1e-2, weight_decay=0.1, epochs=1,
               log=lambda kind, v: logs.extend(v), progress=False, shared=shared_params(model, layers),
               dropout=0.5, seed=seed, micro=None)
    assert logs[0] == pytest.approx(masked_loss, rel=1e-5) and masked_loss != pytest.approx(plain_loss)
    assert _rows_moved(model, before, layers) == set()  # no momentum, no decay on a dropped step
    assert _roles(model, layers)[2] <= _moved(model, before)


def test_dropout_draws_are_seeded_and_follow_the_probability():
    assert dropout_draws(400, 0.5, 3) == dropout_draws(400, 0.5, 3) != dropout_draws(400, 0.5, 4)
    assert 150 < sum(dropout_draws(400, 0.5, 3)) < 250
    assert not any(dropout_draws(50, 0.0, 3))


@pytest.mark.parametrize("overrides, field", [
    ({"expert_dropout": 0.5}, "expert_dropout"),  # without shared weights
    ({"expert_dropout": 1.0, "shared_weights": True}, "expert_dropout"),
    ({"expert_dropout": -0.1, "shared_weights": True}, "expert_dropout"),
    ({"expert_dropout": 0.5, "shared_weights": True, "method": "all_experts"}, "expert_dropout"),
    ({"shared_weights": True, "score_mode": "per_batch"}, "shared_weights"),
    ({"method": "full_param", "sharding": "fsdp"}, "shared_weights"),
])
def test_defence_settings_that_cannot_run_are_refused(overrides, field):
    cfg = TrainConfig(model_name="m", dataset_path="d", output_dir="o", **overrides)
    with pytest.raises(ConfigError, match=f"^{field}:"):
        cfg.validate()


def test_full_param_deltas_hold_every_weight_and_materialize_to_the_full_save(make_model, tokenizer, records_path,
                                                                               tmp_path):
    base = tmp_path / "base"
    make_model("olmoe").save_pretrained(base)
    tokenizer.save_pretrained(base)
    out, reference = tmp_path / "out", tmp_path / "full"
    reference.mkdir()
    meta = run_with_full_saves(config(base, records_path, out, method="full_param", num_rounds=2), reference)
    manifest = json.loads((out / "round_2" / MANIFEST).read_text())
    assert manifest["shared"] and manifest["routers"]
    experts = json.loads((base / "config.json").read_text())["num_experts"]
    assert all(rows is None or rows == list(range(experts)) for rows in manifest["tensors"].values())
    materialize(out, 2, tmp_path / "materialized")
    same_checkpoint(tmp_path / "materialized", reference / "round_2")
    changes = weight_changes(base, reference / "round_2")
    assert changes["other"] and len(changes["experts"]) > experts  # attention moved, experts of both layers
    selected = meta["identified_experts_per_round"]["2"]["experts"]
    assert not locality_report(base, reference / "round_2", selected, True)["ok"]
    assert locality_report(base, reference / "round_2", selected, True, others_may_change=True)["ok"]


def test_a_defended_surgery_records_its_dropped_steps_and_its_delta_loads(tiny_dir, records_path, tmp_path):
    out = tmp_path / "out"
    meta = run_surgery(config(tiny_dir, records_path, out, shared_weights=True, expert_dropout=0.5,
                              final_checkpoint="delta"), progress=False, echo=lambda *a: None)
    off, steps = meta["identified_experts_per_round"]["1"]["sft_steps_experts_off"]
    assert 0 <= off <= steps and steps == 2  # 8 records in batches of 4
    assert json.loads((out / "final_model" / MANIFEST).read_text())["shared"]
    changes = weight_changes(tiny_dir, out / "final_model")
    selected = {tuple(x) for r in meta["identified_experts_per_round"].values() for x in r["experts"]}
    assert changes["other"] and {tuple(x) for x in changes["experts"]} <= selected


def test_the_router_attack_skips_a_list_it_cannot_switch_off(make_model):
    layers = moe_layers(make_model("olmoe"))
    layer = layers[0]
    everything = [(layer.index, e) for e in range(layer.num_experts)]
    assert "cannot switch them all off" in _unmaskable(everything, layers)
    assert _unmaskable(everything[:layer.num_experts - layer.top_k], layers) is None


def test_switching_off_the_repaired_experts_gives_back_the_unrepaired_model_exactly(make_model, tokenizer, records):
    """Why the router attack with the list known undoes any repair that changed only experts:
    with them switched off, the repaired model computes exactly what the unrepaired one does
    with them switched off. Only weights outside the list (routers, the defence's shared
    weights) can keep anything of the repair."""
    original = make_model("olmoe")
    repaired = make_model("olmoe")
    layers = moe_layers(repaired)
    batches = sft_batches(tokenizer, records[:4])
    masked_sft(repaired, layers, batches, SELECTION, lr=1e-2, weight_decay=0.0, epochs=2,
               log=lambda *a: None, progress=False)
    batch = batches[0]

    def logits(model, off):
        with torch.no_grad(), masked_routers(model.config.model_type, moe_layers(model), off):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    assert not torch.equal(logits(original, {}), logits(repaired, {}))
    assert torch.equal(logits(original, by_layer(SELECTION)), logits(repaired, by_layer(SELECTION)))
    defended = make_model("olmoe")
    masked_sft(defended, moe_layers(defended), batches, SELECTION, lr=1e-2, weight_decay=0.0, epochs=2,
               log=lambda *a: None, progress=False, shared=shared_params(defended, moe_layers(defended)))
    assert not torch.equal(logits(original, by_layer(SELECTION)), logits(defended, by_layer(SELECTION)))
