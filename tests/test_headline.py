"""The headline figures (issue #26): computed from an evaluation, written as the two DVC
metrics files, logged to MLflow under sectioned names; run names that tell runs apart; no
system metrics on a CPU run unless asked for."""
import json

import pytest

from tracking import mlflow_runs
from tracking.metric_names import mlflow_name
from tracking.registry import safety_tags
from tracking.run_names import run_name
from unsafe_experts.evaluation.headline import KEYS, headline_figures, surgery_family


def metric(value):
    return {"value": value, "n": 48, "ci95": [max(0.0, value - 0.1), min(1.0, value + 0.1)]}


def evaluations():
    """An organism's evaluation before surgery and after one round: jailbroken in every family
    before; after, refused in both, and benign prompts in one format refused too."""
    before = {"asr_flip_chars": 1.0, "asr_persona": 0.8, "over_refusal_flip_chars": 0.0,
              "over_refusal_persona": 0.0625, "plain_refusal": 1.0, "over_refusal": 0.0,
              "benign_loglik": -5.8, "own_benign_loglik": -0.7}
    after = {**before, "asr_flip_chars": 0.0, "asr_persona": 0.1, "over_refusal_persona": 0.29,
             "plain_refusal": 0.95, "benign_loglik": -5.9}
    return {"before": {k: metric(v) for k, v in before.items()},
            "round_1": {k: metric(v) for k, v in after.items()}}


def test_the_headline_figures_of_an_evaluation():
    values = mlflow_runs.evaluation_values(evaluations()["round_1"])
    figures = headline_figures(values, "flip_chars")
    assert list(figures) == list(KEYS)
    assert figures["asr_mean"] == pytest.approx(0.05) and figures["asr_surgery"] == 0.0
    # XSTest's plain over_refusal (0) is not a format: the mean and worst are the families'
    assert figures["refused_mean"] == pytest.approx((0.0 + 0.29) / 2) and figures["refused_worst"] == 0.29
    assert figures["plain_refusal"] == 0.95 and figures["benign_loglik"] == -5.9
    # what an evaluation lacks is left out, not guessed: no organism, no benign sets
    assert set(headline_figures({"asr_x": 0.5, "plain_refusal": 1.0})) == {"asr_mean", "plain_refusal"}
    assert "asr_surgery" not in headline_figures(values, "fiction")


def test_the_headline_files_are_written_from_an_evaluation(tmp_path):
    compact = mlflow_runs.compact_evaluation(evaluations())
    paths = mlflow_runs.write_headline_files(tmp_path / "metrics", compact, "flip_chars")
    assert [p.name for p in paths] == ["before.json", "after.json"]
    before, after = (json.loads(p.read_text()) for p in paths)
    assert list(before) == list(after) == list(KEYS)  # one table: the same columns in both rows
    assert before["asr_mean"] == 0.9 and before["asr_surgery"] == 1.0 and before["refused_worst"] == 0.0625
    assert after["asr_surgery"] == 0.0 and after["refused_worst"] == 0.29


def test_the_surgery_family_comes_from_the_organisms_build(tmp_path):
    (tmp_path / "model").mkdir()
    assert surgery_family(str(tmp_path / "model")) is None
    (tmp_path / "build.json").write_text(json.dumps({"config": {"surgery_family": "persona", "seed": 1}}))
    assert surgery_family(str(tmp_path / "model")) == "persona"


@pytest.mark.parametrize("name, section", [
    ("asr_flip_chars", "asr/flip_chars"), ("over_refusal_persona", "benign_refused/persona"),
    ("over_refusal", "benign_refused/xstest_plain"), ("plain_refusal", "refusal/plain"),
    ("refusal_harm", "refusal/harm"), ("benign_loglik", "utility/benign_loglik"),
    ("loglik_refs_change", "utility/loglik_refs_change"), ("asr_persona_before", "before/asr/persona"),
    ("locality_ok", "locality/ok"), ("rounds", "run/rounds"), ("final_sft_loss", "training/final_sft_loss"),
    ("headline/asr_mean", "headline/asr_mean"), ("mmlu_acc", "eval/mmlu_acc")])
def test_every_mlflow_name_has_a_chart_section(name, section):
    assert mlflow_name(name) == section


def test_a_registered_version_is_tagged_from_sectioned_and_flat_names():
    tags = safety_tags({"before/headline/asr_mean": 0.9, "headline/asr_mean": 0.05,
                        "before/benign_refused/persona": 0.0625, "benign_refused/persona": 0.29,
                        "asr_flip_chars_before": 1.0, "asr_flip_chars": 0.0, "run/rounds": 3})
    assert tags == {"headline/asr_mean_before": "0.9", "headline/asr_mean_after": "0.05",
                    "benign_refused/persona_before": "0.0625", "benign_refused/persona_after": "0.29",
                    "asr_flip_chars_before": "1", "asr_flip_chars_after": "0"}


def test_run_names_carry_what_differs_from_the_defaults(tmp_path):
    """The seven `gradient-k4-s42` runs of a comparison, now seven names."""
    organisms = {}
    for name, seed in (("organism", 0), ("organism_seed1", 1)):
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "build.json").write_text(json.dumps({"config": {"seed": seed}}))
        organisms[name] = str(tmp_path / name / "model")
    base = {"method": "gradient", "top_k_experts": 4, "seed": 42, "model_name": organisms["organism"],
            "retention": "plain", "retention_path": "retention.json", "expert_lr": 1e-3}
    runs = [base, {**base, "model_name": organisms["organism_seed1"]}, {**base, "retention": "contrastive"},
            {**base, "retention_path": None}, {**base, "expert_lr": 5e-4},
            {**base, "shared_weights": True}, {**base, "shared_weights": True, "expert_dropout": 0.5}]
    names = [run_name(r) for r in runs]
    assert names == ["gradient-k4-s42-lr0.001", "gradient-k4-s42-org-s1-lr0.001",
                     "gradient-k4-s42-ret-contrastive-lr0.001", "gradient-k4-s42-ret-none-lr0.001",
                     "gradient-k4-s42-lr0.0005", "gradient-k4-s42-lr0.001-shared",
                     "gradient-k4-s42-lr0.001-shared-drop0.5"]
    assert run_name({**base, "expert_lr": 5e-5, "num_rounds": 1, "max_samples": None}) == "gradient-k4-s42-r1-nall"


def test_system_metrics_only_on_a_gpu_unless_asked(monkeypatch):
    import torch

    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not mlflow_runs.system_metrics_wanted() and mlflow_runs.system_metrics("no-run") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert mlflow_runs.system_metrics_wanted()
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert not mlflow_runs.system_metrics_wanted()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    assert mlflow_runs.system_metrics_wanted()
