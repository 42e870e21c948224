"""bench/score_agreement.py: the agreement of streamed and offloaded scores with exact ones."""
import pytest
import torch
from conftest import one_error_line, sft_batches

from bench.score_agreement import agreement, figures, main, mode_scores
from unsafe_experts.models.architectures import moe_layers


def test_agreement_of_the_same_and_of_reversed_scores(make_model):
    layers = moe_layers(make_model("olmoe"))
    scores = torch.arange(1.0, 1 + len(layers) * layers[0].num_experts).reshape(len(layers), -1)
    same = agreement(scores, scores * 3, layers, ks=(2, 4))
    assert same["spearman"] == pytest.approx(1.0)
    assert same["top_k_overlap"] == {2: 1.0, 4: 1.0}
    assert same["ratio_min"] == same["ratio_median"] == same["ratio_max"] == pytest.approx(3.0)
    reversed_ = agreement(scores, scores.flip(0, 1), layers, ks=(2, 4))
    assert reversed_["spearman"] == pytest.approx(-1.0)
    assert reversed_["top_k_overlap"] == {2: 0.0, 4: 0.0}


def test_an_expert_no_token_reached_is_left_out_of_the_ratios(make_model):
    layers = moe_layers(make_model("olmoe"))
    scores = torch.ones(len(layers), layers[0].num_experts)
    scores[0, 0] = 0.0
    result = agreement(scores, scores * 2, layers)
    assert result["ratio_n"] == scores.numel() - 1 and result["ratio_max"] == pytest.approx(2.0)


def test_one_batch_agrees_exactly_and_several_batches_bound_exact(make_model, tokenizer, records):
    model = make_model("olmoe")
    layers = moe_layers(model)
    one = mode_scores(model, layers, sft_batches(tokenizer, records[:4]))
    for mode in ("streamed", "offload"):
        a = agreement(one["exact"], one[mode], layers)
        assert a["spearman"] > 0.999
        assert a["ratio_min"] == pytest.approx(1.0, rel=1e-5)
        assert a["ratio_max"] == pytest.approx(1.0, rel=1e-5)
    three = mode_scores(model, layers, sft_batches(tokenizer, records[:12]))
    streamed = agreement(three["exact"], three["streamed"], layers)
    assert streamed["ratio_min"] >= 1 - 1e-6 and streamed["ratio_max"] > 1.0
    offload = agreement(three["exact"], three["offload"], layers)
    assert offload["ratio_min"] == pytest.approx(1.0, rel=1e-6)
    assert offload["ratio_max"] == pytest.approx(1.0, rel=1e-6)


def test_the_command_prints_a_row_per_seed_and_mode_and_the_figures(tiny_dir, records_path, capsys):
    main(["--model", str(tiny_dir), "--records", str(records_path), "--seeds", "1", "2",
          "--batch_size", "4", "--max_samples", "12"])
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if line.split()[:1] in (["1"], ["2"])]
    assert [r[:2] for r in rows] == [["1", "streamed"], ["1", "offload"],
                                     ["2", "streamed"], ["2", "offload"]]
    values = dict(line.split() for line in out if line.startswith(("streamed_", "offload_")))
    assert float(values["streamed_ratio_min"]) >= 1 - 1e-6
    assert float(values["offload_ratio_max"]) == pytest.approx(1.0, abs=1e-5)


def test_figures_take_the_mean_and_the_worst_over_seeds():
    def row(rho, top2):
        a = {"spearman": rho, "top_k_overlap": {2: top2}, "ratio_min": 1.0, "ratio_median": 1.2,
             "ratio_max": 1.5}
        return {"streamed": a, "offload": a}

    out = figures([row(0.9, 1.0), row(0.7, 0.5)], ks=(2,))
    assert out["streamed_spearman_mean"] == pytest.approx(0.8)
    assert out["streamed_spearman_min"] == pytest.approx(0.7)
    assert out["streamed_top2_overlap_min"] == pytest.approx(0.5)


def test_a_missing_model_is_one_error_line(tmp_path, records_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--model", str(tmp_path / "nope"), "--records", str(records_path)])
    assert stop.value.code == 2
    one_error_line(capsys, "--model")
