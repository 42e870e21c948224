import json

import pandas as pd
import pytest

from tasks import tracking
from tasks.compare import COLUMNS, spearman, write_comparison


def seed_run(experiment, tmp_path, method, k, seed, asr, meta=None, parent=None):
    params = {"top_k_experts": k, "seed": seed, "num_rounds": 2}
    run_id = tracking.start_run(experiment, f"{method}-{k}-{seed}", params, {"method": method}, parent)
    tracking.log_metrics(run_id, {"asr_flip_words": 1.0, "asr_flip_chars": 1.0}, step=0)  # before
    metrics = {"asr_flip_words": asr, "asr_flip_chars": asr / 2, "asr_flip_words_before": 1.0,
               "plain_refusal": 0.9, "over_refusal": 0.05, "benign_loglik": -5.0,
               "identify_s": 1.5, "identify_peak_memory_mb": 700.0}
    tracking.log_metrics(run_id, metrics, step=2)  # after the last round: the latest value
    if meta:
        path = tmp_path / f"{method}{k}" / "training_metadata.json"
        path.parent.mkdir()
        path.write_text(json.dumps(meta))
        tracking.log_file(run_id, path)
    tracking.end_run(run_id)
    return run_id


def meta(experts, scores):
    return {"identified_experts_per_round": {"1": {"experts": experts, "scores": scores}}}


def test_comparison_table_from_a_seeded_store(tmp_path, tracking_dir):
    exp = "seeded-comparison"
    scores_g = {"L0_E0": 0.9, "L0_E1": 0.5, "L1_E0": 0.1, "L1_E1": 0.3}
    scores_r = {"L0_E0": 0.2, "L0_E1": 0.8, "L1_E0": 0.1, "L1_E1": 0.4}
    seed_run(exp, tmp_path, "gradient", 2, 42, 0.9)  # older: superseded by the next one
    seed_run(exp, tmp_path, "gradient", 2, 42, 0.10, meta([[0, 0], [0, 1]], scores_g))
    seed_run(exp, tmp_path, "routing", 2, 42, 0.40, meta([[0, 1], [1, 1]], scores_r))
    for seed, asr in ((1, 0.6), (2, 0.8), (3, 1.0)):
        seed_run(exp, tmp_path, "random", 2, seed, asr)
    seed_run(exp, tmp_path, "router_only", 1, 42, 0.7)
    parent = seed_run(exp, tmp_path, "gradient", 8, 42, 0.0)
    seed_run(exp, tmp_path, "gradient", 8, 42, 0.5, parent=parent)  # a round run: not a row

    result = write_comparison(exp, tmp_path / "metrics" / "comparison.csv")
    table = pd.read_csv(tmp_path / "metrics" / "comparison.csv")
    assert list(table.columns) == COLUMNS and result["runs"] == 7
    rows = {(m, k, s): a for m, k, s, a in zip(table.method, table.k, table.seed, table.asr_flip_words)}
    assert rows == {("gradient", 2, 42): 0.10, ("gradient", 8, 42): 0.0, ("routing", 2, 42): 0.40,
                    ("random", 2, 1): 0.6, ("random", 2, 2): 0.8, ("random", 2, 3): 1.0,
                    ("router_only", 0, 42): 0.7}
    md = (tmp_path / "metrics" / "comparison.md").read_text()
    means = md.split("## Mean and spread over seeds")[1]
    random_row = next(line for line in means.splitlines() if line.startswith("| random"))
    assert "0.800" in random_row and "0.163" in random_row and random_row.rstrip(" |").endswith("3")
    overlap = pd.read_csv(tmp_path / "metrics" / "overlap.csv")
    assert overlap.to_dict("records") == [{"k": 2, "round": 1, "jaccard": pytest.approx(1 / 3),
                                           "spearman": pytest.approx(0.4)}]
    client = tracking.client()
    files = {a.path for a in client.list_artifacts(result["mlflow_run_id"])}
    assert files == {"comparison.csv", "comparison.md", "overlap.csv", "asr_vs_k.png"}


def test_spearman_by_hand():
    assert spearman({"a": 1, "b": 2, "c": 3}, {"a": 3, "b": 2, "c": 1}) == pytest.approx(-1.0)


def test_comparison_takes_any_attack_family(tmp_path, tracking_dir):
    exp = "seeded-families"
    for method, asr in (("gradient", 0.1), ("random", 0.7)):
        run_id = seed_run(exp, tmp_path, method, 2, 42, asr)
        client = tracking.client()
        client.log_metric(run_id, "asr_persona", asr / 4, step=2)
        client.log_metric(run_id, "asr_persona_before", 0.8, step=0)
        client.log_metric(run_id, "over_refusal_persona", 0.02, step=2)
    write_comparison(exp, tmp_path / "out" / "comparison.csv")
    table = pd.read_csv(tmp_path / "out" / "comparison.csv")
    assert list(table.columns) == COLUMNS[:-2] + ["asr_persona", "over_refusal_persona"] + COLUMNS[-2:]
    assert table.set_index("method").loc["gradient", "asr_persona"] == pytest.approx(0.025)
    assert "asr_persona 0.800" in (tmp_path / "out" / "comparison.md").read_text()
