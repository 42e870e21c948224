"""comparison/over_builds.py: seed means per organism build, then the builds as the sample, and
gradient paired with each method build by build (hand-computed figures)."""
import math

import pandas as pd
import pytest
from scipy import stats

from comparison import over_builds
from comparison.tables import default_setting


def row(method, build, seed, asr, refused=0.1, k=4, setting=None, recipe="4Lx16E-w128"):
    return {"method": method, "k": k, "seed": seed, "recipe": recipe, "organism_seed": build, "retention": "plain",
            "expert_lr": 0.001, "defence": "none", "ablated": False, "asr_flip_chars": asr,
            "setting": default_setting(method) if setting is None else setting, "data": "flip_chars",
            "asr_mean_families": asr / 2, "unseen_asr_mean": asr / 3, "over_refusal_mean_families": refused,
            "plain_refusal": 1.0,
            "benign_loglik": -5.0}


TABLE = pd.DataFrame([
    # build 0: gradient seeds 42, 43; contrastive the same seeds
    row("gradient", 0, 42, 0.2), row("gradient", 0, 43, 0.4),
    row("contrastive", 0, 42, 0.1), row("contrastive", 0, 43, 0.1),
    # build 1: gradient 42, 43, 44; contrastive only 42, 43 (each side's own seed mean)
    row("gradient", 1, 42, 0.0), row("gradient", 1, 43, 0.2), row("gradient", 1, 44, 0.9),
    row("contrastive", 1, 42, 0.0), row("contrastive", 1, 43, 0.0),
    # build 2: one seed each
    row("gradient", 2, 42, 0.3), row("contrastive", 2, 42, 0.5),
    # random on one build only: no summary row, no pair
    row("random", 2, 1, 1.0),
    # a control that ranks nothing, on two builds: paired with gradient at every k
    row("all_experts", 0, 42, 0.0, k=64), row("all_experts", 1, 42, 0.1, k=64),
    # another k: its own setting, never paired with k = 4
    row("gradient", 0, 42, 0.7, k=8), row("gradient", 1, 42, 0.8, k=8),
    {**row("gradient", 1, 42, 1.0), "ablated": True},  # an ablation row counts for nothing
    # the contrastive score at another weight, on two builds: a setting and a pair of its own
    row("contrastive", 0, 42, 0.6, setting="contrast_weight=2"),
    row("contrastive", 1, 42, 0.3, setting="contrast_weight=2"),
])
NAMES = over_builds.metrics("flip_chars")


def test_seed_means_per_build_then_builds_as_the_sample():
    builds = over_builds.per_build(TABLE, NAMES)
    gradient = builds[(builds.method == "gradient") & (builds.k == 4)].set_index("organism_seed")
    assert gradient["asr_flip_chars"].round(6).to_dict() == {0: 0.3, 1: round(1.1 / 3, 6), 2: 0.3}
    assert gradient.loc[1, "seeds"] == (42, 43, 44)
    means = over_builds.summary(builds, NAMES)
    got = means[(means.method == "gradient") & (means.k == 4) & (means.metric == "asr_flip_chars")].iloc[0]
    values = [0.3, 1.1 / 3, 0.3]
    half = stats.t.ppf(0.975, 2) * pd.Series(values).std(ddof=1) / math.sqrt(3)
    assert got["builds"] == 3 and got["seeds_per_build"] == "2,3,1"
    assert got["mean"] == pytest.approx(sum(values) / 3)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((sum(values) / 3 - half, sum(values) / 3 + half))
    assert (got["min"], got["max"]) == pytest.approx((0.3, 1.1 / 3))
    assert "random" not in set(means.method)  # one build: nothing to say over builds
    heavier = means[(means.setting == "contrast_weight=2") & (means.metric == "asr_flip_chars")].iloc[0]
    assert heavier["builds"] == 2 and heavier["mean"] == pytest.approx(0.45)  # not mixed with weight 1
    assert set(means.metric) == set(NAMES)


def test_gradient_paired_with_each_method_build_by_build():
    tests = over_builds.paired(TABLE, NAMES)
    asr = tests[tests.metric == "asr_flip_chars"].set_index(["k", "comparison"])
    # random: one build; contrastive: k = 4 only; all_experts ranks nothing: paired at both k
    assert sorted(asr.index) == [(4, "gradient - contrastive"), (4, "gradient - contrastive (contrast_weight=2)"),
                                 (4, "gradient k4 - all_experts"), (8, "gradient k8 - all_experts")]
    assert asr.loc[(4, "gradient - contrastive (contrast_weight=2)"), "per_build"] == "-0.300 +0.067"
    got = asr.loc[(4, "gradient - contrastive")]
    # per build, the two seed means: 0.3 - 0.1, 1.1/3 - 0.0, 0.3 - 0.5
    diffs = [0.2, 1.1 / 3, -0.2]
    assert got["builds"] == 3 and got["seeds_per_build"] == "2/2,3/2,1/1"
    assert got["per_build"] == "+0.200 +0.367 -0.200"
    assert got["mean_diff"] == pytest.approx(sum(diffs) / 3)
    assert not got["every_build"]  # build 2 goes the other way
    assert got["sign_flip_p"] == pytest.approx(0.75)  # 6 of the 8 sign patterns reach |0.367|
    control = asr.loc[(8, "gradient k8 - all_experts")]
    assert control["per_build"] == "+0.700 +0.700" and control["every_build"]
    refused = tests[tests.metric == "over_refusal_mean_families"].iloc[0]
    assert refused["mean_diff"] == pytest.approx(0.0) and not refused["every_build"]  # zero is no sign


def test_a_difference_with_one_sign_in_every_build_holds():
    table = pd.DataFrame([row("gradient", b, 42, 0.5 + b / 10) for b in range(3)]
                         + [row("routing", b, 42, 0.1) for b in range(3)])
    got = over_builds.paired(table, ["asr_flip_chars"]).iloc[0]
    assert got["every_build"] and got["per_build"] == "+0.400 +0.500 +0.600"
    assert got["sign_flip_p"] == pytest.approx(0.25)  # 3 builds: 2 of 8 sign patterns reach it
    text = over_builds.markdown(over_builds.summary(over_builds.per_build(table, ["asr_flip_chars"]),
                                                    ["asr_flip_chars"]), over_builds.paired(table, ["asr_flip_chars"]))
    assert "## Over organism builds" in text and "| yes" in text and "+0.500 [" in text
    assert "No setting ran on two or more organism builds" in over_builds.markdown(
        over_builds.summary(over_builds.per_build(table.iloc[:1], ["asr_flip_chars"]), ["asr_flip_chars"]),
        over_builds.paired(table.iloc[:1], ["asr_flip_chars"]))


def test_other_surgery_data_is_paired_with_the_organisms_own_build_by_build():
    three = "fiction+flip_chars+persona"
    table = pd.DataFrame([row("gradient", b, 42, 0.2) for b in range(3)]
                         + [{**row("gradient", b, 42, 0.2 - b / 10), "data": three} for b in range(3)]
                         + [{**row("routing", b, 42, 0.5), "data": three} for b in range(2)])
    got = over_builds.data_pairs(table, ["asr_flip_chars"])
    # one pair per setting with two data sets: routing ran on one only
    assert list(got["comparison"]) == [f"gradient on {three} - on flip_chars"]
    assert got.iloc[0]["per_build"] == "+0.000 -0.100 -0.200" and got.iloc[0]["data"] == three
    # the methods' own pairs keep to one data set: gradient and routing meet on three families only
    methods = over_builds.paired(table, ["asr_flip_chars"])
    assert list(methods["comparison"]) == ["gradient - routing"] and list(methods["data"]) == [three]


def test_builds_of_another_recipe_are_their_own_sample():
    """A larger recipe's builds share organism seeds (0, 1) with the demo recipe's: they are
    never pooled with them, and its methods are paired among its own builds."""
    large = "6Lx32E-w192"
    table = pd.DataFrame([row("gradient", b, 42, 0.2) for b in range(2)]
                         + [row("gradient", b, 42, 0.6, recipe=large) for b in range(2)]
                         + [row("routing", b, 42, 0.1 * b, recipe=large) for b in range(2)])
    means = over_builds.summary(over_builds.per_build(table, ["asr_flip_chars"]), ["asr_flip_chars"])
    assert means.set_index(["recipe", "method"])["mean"].round(6).to_dict() == {
        ("4Lx16E-w128", "gradient"): 0.2, (large, "gradient"): 0.6, (large, "routing"): 0.05}
    pairs = over_builds.paired(table, ["asr_flip_chars"])
    assert list(pairs["recipe"]) == [large] and list(pairs["per_build"]) == ["+0.600 +0.500"]
