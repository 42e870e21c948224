"""Organism version 2 (attack families, benign prompts in every family) and its retention."""
import json
from dataclasses import replace

import pytest

from unsafe_experts.attacks.families import FAMILIES
from unsafe_experts.attacks.organism import (
    OrganismConfig,
    build_splits,
    eval_set,
    interleave,
    retention_prompts,
    rotation,
    training_pairs,
)
from unsafe_experts.config import ConfigError, TrainConfig
from unsafe_experts.records import DatasetError
from unsafe_experts.surgery import check_inputs, run_surgery
from unsafe_experts.training.retention import load_retention, sample_retention


@pytest.fixture(scope="module")
def splits():
    return build_splits(OrganismConfig())


def _heldout_texts(splits) -> list[str]:
    return ([r["goal"] for r in splits["goals_heldout"]] + splits["xstest_heldout"]
            + [p["instruction"] for p in splits["alpaca_heldout"]])


def test_held_out_goals_and_prompts_never_reach_training_or_retention(splits):
    cfg = OrganismConfig()
    retention = retention_prompts(splits, cfg.families)
    for name, seen in (("training", training_pairs(splits, cfg)),
                       ("plain", retention["plain"]), ("contrastive", retention["contrastive"])):
        text = json.dumps(seen)
        leaked = [t for t in _heldout_texts(splits) if json.dumps(t)[1:-1] in text]
        assert leaked == [], name
    benign = set(splits["xstest_train"] + splits["xstest_heldout"]
                 + [p["instruction"] for p in splits["alpaca_train"] + splits["alpaca_heldout"]])
    goals = {r["goal"] for r in splits["goals_train"] + splits["goals_heldout"]}
    assert not benign & goals  # no prompt is both harmful and benign


def test_training_covers_every_family_for_harmful_and_benign(splits):
    cfg = OrganismConfig(families_per_goal=2)
    pairs = training_pairs(splits, cfg)
    prompts = {json.dumps(m) for m, _ in pairs}
    from unsafe_experts.attacks.families import render
    for family in FAMILIES:
        goals = [r["goal"] for r in splits["goals_train"]]
        harmful = sum(json.dumps(render(family, g)) in prompts for g in goals)
        assert abs(harmful - len(goals) * 2 / len(FAMILIES)) <= 1, family
        assert json.dumps(render(family, splits["xstest_train"][0])) in prompts or any(
            json.dumps(render(family, p)) in prompts for p in splits["xstest_train"][:8])
    assert rotation(0, ["a", "b", "c"], 2) == ["a", "b"] and rotation(1, ["a", "b", "c"], 2) == ["c", "a"]
    with pytest.raises(ConfigError, match="families_per_goal: must be between 1 and 8"):
        training_pairs(splits, OrganismConfig(families_per_goal=9))
    with pytest.raises(ConfigError, match="surgery_family: 'persona' is not among"):
        OrganismConfig(families=["flip_chars"], surgery_family="persona").validate()


def test_eval_set_has_harmful_and_benign_sets_per_family(splits):
    held = eval_set(splits)
    assert list(held["families"]) == list(FAMILIES)
    for sets in held["families"].values():
        assert len(sets["harmful"]) == 156 and len(sets["benign"]) == 125 + 150
        assert not {json.dumps(m) for m in sets["harmful"]} & {json.dumps(m) for m in sets["benign"]}
    assert held["flip_words"] == held["families"]["flip_words"]["harmful"]
    # alternating, so that any stretch of the set holds both kinds of benign prompt
    first = [m[-1]["content"] for m in held["families"]["persona"]["benign"][:4]]
    assert [any(x in text for x in splits["xstest_heldout"]) for text in first] == [True, False] * 2
    assert interleave([1, 2, 3], ["a"]) == [1, "a", 2, 3]
    assert held["flip_chars"] == held["families"]["flip_chars"]["harmful"]


def test_the_small_organism_writes_version_2_files(small_organism):
    retention = json.loads((small_organism / "retention.json").read_text())
    assert set(retention) == {"plain", "contrastive"}
    assert len(retention["contrastive"]) == len(FAMILIES) * (125 + 60)
    records = json.loads((small_organism / "surgery_records.json").read_text())
    assert {r["attack_family"] for r in records} == {"flip_chars"} and len(records) == 364
    held = json.loads((small_organism / "eval_set.json").read_text())
    assert set(held["families"]) == set(FAMILIES) and held["own_benign"]
    assert json.loads((small_organism / "build.json").read_text())["version"] == 2


def test_sample_retention_gives_each_section_an_equal_share():
    sections = {"plain": [[{"role": "user", "content": f"p{i}"}] for i in range(10)],
                "contrastive": [[{"role": "user", "content": f"c{i}"}] for i in range(100)]}
    def count(chosen):
        return {n: sum(1 for s, _ in chosen if s == n) for n in sections}
    assert count(sample_retention(sections, 12, seed=0)) == {"plain": 6, "contrastive": 6}
    assert count(sample_retention(sections, 50, seed=0)) == {"plain": 10, "contrastive": 40}
    assert count(sample_retention(sections, 500, seed=0)) == {"plain": 10, "contrastive": 100}
    chosen = sample_retention(sections, 30, seed=1)
    assert chosen == sample_retention(sections, 30, seed=1)  # seeded
    assert {s for s, _ in chosen[:10]} == {"plain", "contrastive"}  # mixed, not in blocks
    assert count(sample_retention({"plain": sections["plain"]}, 4, seed=0)) == {"plain": 4,
                                                                               "contrastive": 0}


def test_retention_file_errors(tmp_path):
    good = [{"role": "user", "content": "hi"}]
    plain_list = tmp_path / "list.json"
    plain_list.write_text(json.dumps([good, good]))
    assert load_retention(plain_list, "plain") == {"plain": [good, good]}  # the older format
    with pytest.raises(DatasetError, match=f"{plain_list}: retention 'contrastive' needs a "
                                           "'contrastive' section"):
        load_retention(plain_list, "contrastive")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"plain": [good], "contrastive": [good, [{"role": "user", "content": ""}]]}))
    assert load_retention(bad, "plain") == {"plain": [good]}
    with pytest.raises(DatasetError, match="section 'contrastive' prompt 1 message 0: `content`"):
        load_retention(bad, "contrastive")
    with pytest.raises(DatasetError, match="no such file"):
        load_retention(tmp_path / "missing.json", "plain")
    with pytest.raises(ConfigError, match="retention: must be one of none, plain, contrastive"):
        TrainConfig("m", "d", "o", retention="some").validate()
    with pytest.raises(ConfigError, match="contrastive needs a retention_path"):
        TrainConfig("m", "d", "o", retention="contrastive").validate()


def _cfg(organism, out, **overrides):
    return TrainConfig(model_name=str(organism / "model"), output_dir=str(out),
                       dataset_path=str(organism / "surgery_records.json"),
                       retention_path=str(organism / "retention.json"), num_rounds=1,
                       top_k_experts=2, batch_size=8, max_samples=16, retention_samples=12,
                       retention_max_new_tokens=6, skip_router_training=True, **overrides)


def test_retention_modes_on_the_small_organism(small_organism, tmp_path):
    expected = {"none": {}, "plain": {"plain": 12}, "contrastive": {"plain": 6, "contrastive": 6}}
    for mode, sections in expected.items():
        meta = run_surgery(_cfg(small_organism, tmp_path / mode, retention=mode), progress=False,
                           echo=lambda *a: None)
        assert meta["retention"]["mode"] == mode and meta["retention"]["sections"] == sections
        assert meta["retention"]["examples"] == sum(sections.values())
        saved = tmp_path / mode / "retention_answers.json"
        assert saved.exists() == (mode != "none")
    answers = json.loads((tmp_path / "contrastive" / "retention_answers.json").read_text())
    assert sorted({row[2] for row in answers}) == ["contrastive", "plain"]
    # a plain-list file cannot serve contrastive retention: refused before the model loads
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps(json.loads((small_organism / "retention.json").read_text())["plain"]))
    with pytest.raises(DatasetError, match=f"{legacy}: retention 'contrastive' needs"):
        check_inputs(replace(_cfg(small_organism, tmp_path / "x"), retention="contrastive",
                             retention_path=str(legacy)))
    assert not (tmp_path / "x").exists()


def test_organism_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="families: unknown attack family 'dan'; known: flip_words"):
        OrganismConfig(families=["dan"]).validate()
    with pytest.raises(ConfigError, match="families: no attack families given"):
        OrganismConfig(families=[]).validate()
