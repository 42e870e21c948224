import json

import pytest
import torch
from conftest import ARCHITECTURES, router_batches

from unsafe_experts.artefacts.locality import weight_changes
from unsafe_experts.config import TrainConfig
from unsafe_experts.models.architectures import moe_layers
from unsafe_experts.records import DatasetError
from unsafe_experts.selection.routing import generated_routing_scores, keep_pairs, routing_scores, routing_stats
from unsafe_experts.surgery import run_surgery
from unsafe_experts.training.router_kl import captured_router_outputs


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


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_routing_stats_on_every_architecture(arch, make_model, tokenizer, records):
    model = make_model(arch)
    layers = moe_layers(model)
    safe, unsafe = router_batches(tokenizer, records[:4])
    parts = routing_scores(model, layers, safe, unsafe)
    assert parts["score"].shape == (len(layers), 8)
    torch.testing.assert_close(parts["freq_plain"].sum(1), torch.full((len(layers),), 2.0))
    torch.testing.assert_close(parts["weight_jailbreak"].sum(1), torch.ones(len(layers)))


def run(tiny_dir, records_path, out, **kw):
    kw = {"num_rounds": 2, **kw}
    cfg = TrainConfig(model_name=str(tiny_dir), dataset_path=str(records_path), output_dir=str(out),
                      top_k_experts=3, batch_size=4, max_samples=8, expert_lr=1e-3,
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


def test_routing_prompt_method_end_to_end(tiny_dir, records_path, tmp_path):
    meta = run(tiny_dir, records_path, tmp_path / "routing", method="routing_prompt")
    first = meta["identified_experts_per_round"]["1"]
    assert len(first["scores"]) == 16 and len(first["experts"]) == 3
    assert [f"L{l}_E{e}" for l, e in first["experts"]] == list(first["scores"])[:3]
    for part in ("freq_plain", "freq_jailbreak", "weight_plain", "weight_jailbreak"):
        assert len(first[f"routing_{part}"]) == 16
    name = list(first["scores"])[0]
    assert first["scores"][name] == pytest.approx(
        first["routing_freq_jailbreak"][name] - first["routing_freq_plain"][name], abs=1e-6)


def test_pairs_are_kept_only_for_a_complied_jailbreak_and_a_refused_plain_request():
    jailbreak = ["Sure, step 1: ...", "I'm sorry, I can't.", "Here you go", "Okay: first"]
    plain = ["I cannot assist with that.", "I cannot help with that.", "Sure, here", "Sorry, no."]
    kept, summary = keep_pairs(jailbreak, plain)
    assert kept == [True, False, False, True]
    assert summary == {"total": 4, "kept": 2, "dropped": 2, "jailbreak_refused": 1,
                       "plain_not_refused": 1}
    with pytest.raises(DatasetError, match=r"none of the 2 \(jailbreak, plain\) pairs .* \(1 jailbreak "
                       r"responses were refusals, 1 plain responses were not"):
        keep_pairs(jailbreak[1:3], plain[1:3])


def test_generated_routing_matches_a_per_sequence_reference(make_model, tokenizer):
    """Batched, right-padded routing over generated tokens only equals routing each sequence
    alone and counting its generated positions by hand; per-batch risk differences averaged."""
    model = make_model("qwen3_moe")
    layers = moe_layers(model)
    g = torch.Generator().manual_seed(0)
    def seq(prompt_len, gen_len):
        ids = torch.randint(4, len(tokenizer), (prompt_len + gen_len,), generator=g).tolist()
        return ids[:prompt_len], ids[prompt_len:]
    jailbreak = [seq(9, 5), seq(4, 7), seq(12, 3), seq(6, 6), seq(5, 2)]
    plain = [seq(7, 4), seq(3, 8), seq(5, 5), seq(8, 2), seq(4, 4)]
    kept = [True, False, True, True, False]
    parts, counted = generated_routing_scores(model, layers, jailbreak, plain, kept, batch_size=2,
                                              pad_id=tokenizer.pad_token_id)

    def shares(seqs):  # pooled over the generated tokens of the given sequences
        counts, tokens = torch.zeros(len(layers), 8), 0
        for prompt, gen in seqs:
            with torch.no_grad(), captured_router_outputs(layers) as captured:
                model(input_ids=torch.tensor([prompt + gen]))
            for i in range(len(layers)):
                for row in captured[i][-1][len(prompt):].tolist():
                    for e in row:
                        counts[i, e] += 1
            tokens += len(gen)
        return counts / tokens

    batches = [[0], [2, 3]]  # [0, 1] keeps 0; [2, 3] keeps both; [4] keeps none and is skipped
    diffs = [shares([jailbreak[i] for i in b]) - shares([plain[i] for i in b]) for b in batches]
    torch.testing.assert_close(parts["score"], torch.stack(diffs).mean(0))
    assert counted == {"batches": 2, "generated_tokens": {"jailbreak": 5 + 3 + 6, "plain": 4 + 5 + 2}}
    torch.testing.assert_close(parts["freq_plain"].sum(1), torch.full((len(layers),), 2.0))


def test_routing_method_on_the_organism(small_organism, tmp_path):
    """The research method end to end on a model that complies with flipped prompts and refuses
    plain ones: the pairs are filtered, the responses saved and reused in the next round."""
    cfg = TrainConfig(model_name=str(small_organism / "model"),
                      dataset_path=str(small_organism / "surgery_records.json"),
                      output_dir=str(tmp_path / "out"), method="routing", num_rounds=2,
                      top_k_experts=2, batch_size=4, max_samples=8, routing_max_new_tokens=12,
                      skip_router_training=True, expert_lr=1e-3)
    meta = run_surgery(cfg, progress=False, echo=lambda *a: None)
    first = meta["identified_experts_per_round"]["1"]
    pairs = first["routing_pairs"]
    assert pairs["total"] == 8 and pairs["kept"] > 0 and pairs["kept"] + pairs["dropped"] == 8
    assert pairs["batches"] >= 1 and pairs["generated_tokens"]["jailbreak"] > 0
    name = list(first["scores"])[0]
    assert first["scores"][name] == pytest.approx(
        first["routing_freq_jailbreak"][name] - first["routing_freq_plain"][name], abs=1e-6)
    saved = json.loads((tmp_path / "out" / "routing_responses.json").read_text())
    assert len(saved) == 8 and all(len(x["jailbreak_ids"]) <= 12 for x in saved)
    assert meta["identified_experts_per_round"]["2"]["routing_pairs"]["kept"] == pairs["kept"]


def test_the_method_table_drives_validation():
    from unsafe_experts.config import METHODS, ConfigError
    from unsafe_experts.selection.methods import METHODS as TABLE

    assert METHODS == tuple(TABLE) and {m.kind for m in TABLE.values()} == {"gradient", "routing", "control"}
    base = dict(model_name="m", dataset_path="d", output_dir="o")
    TrainConfig(**base, method="gradient", score_mode="per_batch").validate()
    for method in ("fisher", "routing", "random"):
        with pytest.raises(ConfigError, match=f"score_mode: per_batch exists for gradient only, not {method}"):
            TrainConfig(**base, method=method, score_mode="per_batch").validate()
    with pytest.raises(ConfigError, match="method: must be one of gradient, gradient_per_token, fisher"):
        TrainConfig(**base, method="grad").validate()
    with pytest.raises(ConfigError, match="routing_max_new_tokens: must be at least 1"):
        TrainConfig(**base, method="routing", routing_max_new_tokens=0).validate()


@pytest.mark.parametrize("method", ["fisher", "snip"])
def test_gradient_variants_end_to_end(method, tiny_dir, records_path, tmp_path):
    meta = run(tiny_dir, records_path, tmp_path / method, method=method, num_rounds=1,
               skip_router_training=True, score_memory="streamed")
    first = meta["identified_experts_per_round"]["1"]
    assert first["method"] == method and len(first["experts"]) == 3
    assert [f"L{l}_E{e}" for l, e in first["experts"]] == list(first["scores"])[:3]
    assert first["gradients"] == first["scores"]
    changed = weight_changes(tiny_dir, tmp_path / method / "final_model")["experts"]
    assert sorted(map(tuple, changed)) == sorted(map(tuple, first["experts"]))
