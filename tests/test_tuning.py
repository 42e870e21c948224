"""comparison/tuning.py: each method's setting chosen on the validation split by the budget, then
reported on test beside the untuned default (hand-made runs and figures, no model)."""
import json

import pandas as pd
import pytest

from comparison import tuning
from comparison.tables import GROUP, recipe_label
from unsafe_experts.config import ConfigError

FAMILIES = ["flip_chars", "persona"]


def metrics(asr, refused, plain=1.0, loglik=-5.0):
    m = lambda v: {"value": v, "n": 48, "ci95": [max(0.0, v - 0.1), min(1.0, v + 0.1)]}  # noqa: E731
    return {**{f"asr_{f}": m(asr) for f in FAMILIES}, **{f"over_refusal_{f}": m(refused) for f in FAMILIES},
            "plain_refusal": m(plain), "over_refusal": m(0.0), "benign_loglik": m(loglik)}


RECIPE = {"layers": 4, "experts": 16, "hidden": 128, "surgery_family": "flip_chars"}
LABEL = recipe_label(RECIPE)


def run(root, validation, method, k, seed, asr, refused, lr=1e-3, plain=1.0, organism="organism"):
    """A compared run's folder (its settings) and its validation result."""
    name = f"{method}-k{k}-s{seed}-plain-lr{lr}"
    folder = root / organism / name
    folder.mkdir(parents=True)
    folder.joinpath("training_metadata.json").write_text(json.dumps({
        "method": method, "parameters": {"seed": seed, "model_name": f"build/{organism}/model", "top_k_experts": k,
                                         "retention": "plain", "retention_path": "r.json", "expert_lr": lr},
        "identified_experts_per_round": {"1": {"experts": [[0, i] for i in range(k)]}},
        "timings": {"round_1": {"identify_s": 1.0, "identify_peak_memory_mb": 1.0}}}))
    (validation / organism).mkdir(parents=True, exist_ok=True)
    (validation / organism / f"{name}.json").write_text(json.dumps({"metrics": metrics(asr, refused, plain)}))


@pytest.fixture
def grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "build/organism").mkdir(parents=True)
    (tmp_path / "build/organism/build.json").write_text(json.dumps({"config": {"seed": 0, **RECIPE}}))
    root, validation = tmp_path / "outputs/compare", tmp_path / "outputs/validation"
    # gradient: k 4 meets the budget (format up 0.05) with ASR 0.10; k 8 lets fewer through
    # (0.02) but refuses 30% of benign requests in formats: k 4 is chosen, not the lowest ASR
    for seed in (42, 43):
        run(root, validation, "gradient", 4, seed, 0.10, 0.05)
        run(root, validation, "gradient", 8, seed, 0.02, 0.30)
    run(root, validation, "gradient", 4, 42, 0.05, 0.06, lr=2e-3)  # meets too, lower ASR: chosen
    # routing: nothing meets; k 2 fails two criteria, k 4 one: k 4 is chosen despite more ASR
    run(root, validation, "routing", 2, 42, 0.20, 0.30)
    run(root, validation, "routing", 4, 42, 0.60, 0.02)
    (validation / "organism.json").write_text(json.dumps({"metrics": metrics(1.0, 0.0)}))
    return root, validation


def test_the_budget_then_the_fewest_attacks_choose_each_methods_setting(grid):
    root, validation = grid
    validated = tuning.validation_runs(validation, root)
    assert len(validated) == 7 and set(validated["before_asr_flip_chars"]) == {1.0}
    assert set(validated["recipe"]) == {LABEL} and LABEL.startswith("4Lx16E-w128-")
    chosen = tuning.choose(validated, "flip_chars")
    picks = chosen[chosen["chosen"]].set_index("method")
    assert (picks.loc["gradient", "k"], picks.loc["gradient", "expert_lr"]) == (4, 2e-3)
    assert bool(picks.loc["gradient", "meets"])
    assert picks.loc["routing", "k"] == 4 and not picks.loc["routing", "meets"]
    assert picks.loc["routing", "fails"] == "surgery_asr"
    assert chosen[(chosen.method == "gradient") & (chosen.k == 4) & (chosen.expert_lr == 1e-3)]["seeds"].item() == 2

    # the test figures are the comparison's own groups (here made by hand), the default beside
    keys = [g for g in GROUP if g != "recipe"]
    test = pd.DataFrame([{**dict(zip(keys, key)), "recipe": LABEL, "seeds": n, "asr_mean_families_mean": a,
                          "asr_mean_families_ci_low": a - 0.1, "asr_mean_families_ci_high": a + 0.1,
                          "over_refusal_mean_families_mean": f, "over_refusal_mean_families_ci_low": f,
                          "over_refusal_mean_families_ci_high": f, "benign_loglik_mean": -5.2,
                          "benign_loglik_ci_low": -5.5, "benign_loglik_ci_high": -4.9}
                         for key, n, a, f in [
                             (("gradient", 4, 0, "plain", 2e-3, "none", "", "flip_chars", False), 1, 0.04, 0.07),
                             (("gradient", 4, 0, "plain", 1e-3, "none", "", "flip_chars", False), 3, 0.08, 0.20),
                             (("routing", 4, 0, "plain", 1e-3, "none", "", "flip_chars", False), 3, 0.5, 0.01)]])
    tuned = tuning.tuned_table(chosen, test, None).set_index("method")
    assert tuned.loc["gradient", "chosen"] == "k4 plain lr0.002" and tuned.loc["gradient", "test_seeds"] == 1
    assert tuned.loc["gradient", "test_asr_mean"] == "0.040 [0.000, 0.140]"  # a share's interval stops at 0
    assert tuned.loc["gradient", "test_benign_loglik"] == "-5.200 [-5.500, -4.900]"  # utility: not cut at 0
    assert tuned.loc["gradient", "default"] == "k4 plain lr0.001"
    assert tuned.loc["gradient", "default_test_asr_mean"].startswith("0.080")
    assert tuned.loc["routing", "chosen"] == tuned.loc["routing", "default"] == "k4 plain lr0.001"
    text = tuning.markdown(tuned.reset_index(), chosen)
    assert text.startswith("## Tuned on validation") and "k4 plain lr0.002" in text


def test_a_validated_run_needs_its_organism_before_surgery(grid):
    root, validation = grid
    (validation / "organism.json").unlink()
    with pytest.raises(ConfigError, match="organism.json: missing; the budget compares"):
        tuning.validation_runs(validation, root)
    (validation / "organism.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not an `unsafe-experts evaluate --out` result"):
        tuning.validation_runs(validation, root)


def test_nothing_validated_is_said_and_chooses_nothing(tmp_path):
    assert tuning.validation_runs(tmp_path / "absent", tmp_path).empty
    assert tuning.choose(pd.DataFrame(), "flip_chars").empty
    assert "No validation results were found" in tuning.markdown(pd.DataFrame(columns=tuning.COLUMNS), pd.DataFrame())


def test_one_setting_for_every_build_is_the_one_meeting_the_budget_in_most_builds(grid, tmp_path):
    """Build 0 alone picks gradient at lr 0.002; on build 1 that setting refuses 30% of benign
    requests in formats, so over builds lr 0.001 (meeting the budget on both) is chosen, and the
    table says the builds disagree. Routing's k 2 ran on one build only: not a candidate."""
    root, validation = grid
    (tmp_path / "build/organism_seed1").mkdir(parents=True)
    (tmp_path / "build/organism_seed1/build.json").write_text(json.dumps({"config": {"seed": 1, **RECIPE}}))
    run(root, validation, "gradient", 4, 42, 0.08, 0.04, organism="organism_seed1")
    run(root, validation, "gradient", 4, 42, 0.05, 0.30, lr=2e-3, organism="organism_seed1")
    run(root, validation, "routing", 4, 42, 0.70, 0.02, organism="organism_seed1")
    (validation / "organism_seed1.json").write_text(json.dumps({"metrics": metrics(1.0, 0.0)}))
    chosen = tuning.choose(tuning.validation_runs(validation, root), "flip_chars")
    assert set(zip(chosen.loc[chosen["chosen"], "method"], chosen.loc[chosen["chosen"], "organism_seed"])) == {
        ("gradient", 0), ("gradient", 1), ("routing", 0), ("routing", 1)}
    # the test figures per build (over_builds.per_build's shape), made by hand
    each = pd.DataFrame([{"recipe": LABEL, "method": m, "k": 4, "retention": "plain", "expert_lr": lr,
                          "defence": "none", "setting": "", "data": "flip_chars", "organism_seed": b, "seeds": (42,),
                          "asr_mean_families": a, "over_refusal_mean_families": 0.1, "asr_flip_chars": a / 2,
                          "unseen_asr_mean": a, "plain_refusal": 1.0, "benign_loglik": -5.0 - b / 10}
                         for m, lr, b, a in [("gradient", 1e-3, 0, 0.08), ("gradient", 1e-3, 1, 0.12),
                                             ("gradient", 2e-3, 0, 0.02), ("routing", 1e-3, 0, 0.5),
                                             ("routing", 1e-3, 1, 0.7)]])
    over = tuning.choose_over_builds(chosen, each, "flip_chars").set_index("method")
    assert over.loc["gradient", "chosen"] == "k4 plain lr0.001" and over.loc["gradient", "meets_on_validation_in"] == 2
    # on validation, the family no run saw (persona) lets 0.10 and 0.08 through: mean 0.09
    assert over.loc["gradient", "validation_unseen_asr"] == pytest.approx(0.09)
    assert over.loc["gradient", "chosen_per_build"] == "0: k4 plain lr0.002 | 1: k4 plain lr0.001"
    assert not over.loc["gradient", "same_every_build"]
    # mean 0.10 over two builds, t interval 0.10 +- 12.706 * 0.0283 / sqrt(2), cut at 0
    assert over.loc["gradient", "test_builds"] == 2
    assert over.loc["gradient", "test_asr_mean"] == "0.100 [0.000, 0.354]"
    assert over.loc["gradient", "test_surgery_asr"] == "0.050 [0.000, 0.177]"
    assert over.loc["gradient", "default_test_asr_mean"] == over.loc["gradient", "test_asr_mean"]
    assert over.loc["gradient", "test_benign_loglik"] == "-5.050 [-5.685, -4.415]"  # not cut to [0, 1]
    assert over.loc["routing", "chosen"] == "k4 plain lr0.001" and over.loc["routing", "builds"] == 2
    assert over.loc["routing", "meets_on_validation_in"] == 0 and over.loc["routing", "same_every_build"]
    text = tuning.markdown(tuning.tuned_table(chosen, pd.DataFrame(columns=[*GROUP, "seeds"]), "flip_chars"),
                           chosen, over.reset_index())
    assert "one setting for every build" in text and "0: k4 plain lr0.002 | 1: k4 plain lr0.001" in text


def test_a_setting_validated_on_one_build_is_not_chosen_over_builds(grid):
    root, validation = grid
    chosen = tuning.choose(tuning.validation_runs(validation, root), "flip_chars")
    assert tuning.choose_over_builds(chosen, pd.DataFrame(), "flip_chars").empty
    assert "(no setting was validated on two or more builds)" in tuning.markdown(
        tuning.tuned_table(chosen, pd.DataFrame(columns=[*GROUP, "seeds"]), None), chosen,
        tuning.choose_over_builds(chosen, pd.DataFrame(), None))
