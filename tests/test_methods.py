import pytest
import torch

from conftest import FAMILIES, router_batches
from unsafe_experts.adapters import moe_layers
from unsafe_experts.config import TrainConfig
from unsafe_experts.locality import weight_changes
from unsafe_experts.routing import routing_scores, routing_stats
from unsafe_experts.surgery import run_surgery


def force_expert(layer, expert: int, when):
    """A router hook that sends every token to `expert` (plus its usual first choice) while
    `when()` is true."""
    def hook(module, inputs, output):
        if not when():
            return output
        indices = output[2].clone()
        indices[:, -1] = expert
        indices[:, 0] = torch.where(indices[:, 0] == expert, (expert + 1) % 8, indices[:, 0])
        return output[0], output[1], indices
    return layer.router.register_forward_hook(hook)


def test_routing_score_finds_an_expert_forced_on_jailbreaks(make_model, tokenizer, records):
    model = make_model("olmoe")
    layers = moe_layers(model)
    safe, unsafe = router_batches(tokenizer, records[:8])
    state = {"jailbreak": False}
    handle = force_expert(layers[1], 6, lambda: state["jailbreak"])
    try:
        plain_freq, _ = routing_stats(model, layers, safe)
        state["jailbreak"] = True
        jail_freq, _ = routing_stats(model, layers, unsafe)
    finally:
        handle.remove()
    assert torch.allclose(plain_freq.sum(1), torch.tensor([2.0, 2.0]))  # top-2: two picks a token
    assert jail_freq[1, 6] == 1.0
    score = jail_freq - plain_freq
    assert int(score[1].argmax()) == 6 and score[1, 6] == 1.0 - plain_freq[1, 6]


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_stats_on_every_family(family, make_model, tokenizer, records):
    model = make_model(family)
    layers = moe_layers(model)
    safe, unsafe = router_batches(tokenizer, records[:4])
    parts = routing_scores(model, layers, safe, unsafe)
    assert parts["score"].shape == (len(layers), 8)
    torch.testing.assert_close(parts["freq_plain"].sum(1), torch.full((len(layers),), 2.0))
    torch.testing.assert_close(parts["weight_jailbreak"].sum(1), torch.ones(len(layers)))


def run(tiny_dir, records_path, out, **kw):
    cfg = TrainConfig(model_name=str(tiny_dir), dataset_path=str(records_path), output_dir=str(out),
                      num_rounds=2, top_k_experts=3, batch_size=4, max_samples=8, expert_lr=1e-3,
                      router_lr=1e-3, **kw)
    return run_surgery(cfg, progress=False, echo=lambda *a: None)


def test_controls_bookkeeping(tiny_dir, records_path, tmp_path):
    random_a = run(tiny_dir, records_path, tmp_path / "ra", method="random", seed=1, skip_router_training=True)
    random_a2 = run(tiny_dir, records_path, tmp_path / "ra2", method="random", seed=1, skip_router_training=True)
    random_b = run(tiny_dir, records_path, tmp_path / "rb", method="random", seed=2, skip_router_training=True)
    picks = lambda meta: [r["experts"] for r in meta["identified_experts_per_round"].values()]
    assert picks(random_a) == picks(random_a2) != picks(random_b)
    assert all(len(p) == 3 for p in picks(random_a)) and picks(random_a)[0] != picks(random_a)[1]
    assert random_a["method"] == "random" and "gradients" not in random_a["identified_experts_per_round"]["1"]

    everything = run(tiny_dir, records_path, tmp_path / "all", method="all_experts", skip_router_training=True)
    assert all(len(p) == 16 for p in picks(everything))
    assert len(weight_changes(tiny_dir, tmp_path / "all" / "final_model")["experts"]) == 16

    router_only = run(tiny_dir, records_path, tmp_path / "router", method="router_only")
    assert picks(router_only) == [[], []]
    changes = weight_changes(tiny_dir, tmp_path / "router" / "final_model")
    assert changes == {"experts": [], "routers": [0, 1], "other": []}
    kinds = {x["kind"] for x in router_only["training_logs"]}
    assert kinds == {"router"}
    for meta in (random_a, everything, router_only):
        assert all("identify_s" in t and "identify_peak_memory_mb" in t
                   for k, t in meta["timings"].items() if k.startswith("round_"))


def test_routing_method_end_to_end(tiny_dir, records_path, tmp_path):
    meta = run(tiny_dir, records_path, tmp_path / "routing", method="routing")
    first = meta["identified_experts_per_round"]["1"]
    assert len(first["scores"]) == 16 and len(first["experts"]) == 3
    assert [f"L{l}_E{e}" for l, e in first["experts"]] == list(first["scores"])[:3]
    for part in ("freq_plain", "freq_jailbreak", "weight_plain", "weight_jailbreak"):
        assert len(first[f"routing_{part}"]) == 16
    name = list(first["scores"])[0]
    assert first["scores"][name] == pytest.approx(
        first["routing_freq_jailbreak"][name] - first["routing_freq_plain"][name], abs=1e-6)
