import json
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from test_cli import check_layout

from flows.surgery import surgery_flow
from unsafe_experts.attacks.families import FAMILIES


def test_evaluation_flow_on_the_test_organism(small_organism, tmp_path, tracking_dir):
    build = json.loads((small_organism / "build.json").read_text())
    # what loss is left is mostly AlpacaEval's long reference answers, which the 2-layer model
    # does not memorise in 4 epochs; the behaviour that matters is checked below
    assert build["last_loss"] < build["first_loss"] / 2.5
    out = tmp_path / "out"
    train = {"model_name": str(small_organism / "model"),
             "dataset_path": str(small_organism / "surgery_records.json"), "output_dir": str(out),
             "num_rounds": 2, "top_k_experts": 2, "expert_lr": 1e-3, "router_lr": 1e-3,
             "max_samples": 64, "retention_path": str(small_organism / "retention.json"),
             "retention_samples": 64}
    evaluation = {"eval_set": str(small_organism / "eval_set.json"), "limit": 24, "max_new_tokens": 24}
    result = surgery_flow(train, experiment="organism-flow", progress=False,
                              evaluation=evaluation, evaluation_path=str(tmp_path / "m/evaluation.json"))

    compact = json.loads((tmp_path / "m/evaluation.json").read_text())  # `dvc metrics show`
    assert list(compact) == ["before", "after"] and all(isinstance(v, float) for v in compact["after"].values())
    evaluations = json.loads((tmp_path / "m/evaluation_detail.json").read_text())
    assert list(evaluations) == ["before", "round_1", "round_2", "final"]
    assert compact["after"] == {k: v["value"] for k, v in evaluations["final"].items()}
    assert evaluations["final"] == evaluations["round_2"]
    names = {"plain_refusal", "over_refusal", "benign_loglik", "own_benign_loglik"} | {
        f"{kind}_{family}" for family in FAMILIES for kind in ("asr", "over_refusal")}
    for stage in evaluations.values():
        assert set(stage) == names
        assert all(set(m) == {"value", "n", "ci95"} and m["ci95"][0] <= m["value"] <= m["ci95"][1]
                   for m in stage.values())
        assert stage["asr_flip_words"]["n"] == 24
    before = evaluations["before"]
    # the organism is jailbroken: complies with held-out jailbreaks, refuses plain requests
    assert before["asr_flip_words"]["value"] >= 0.8 and before["asr_flip_chars"]["value"] >= 0.8
    assert before["plain_refusal"]["value"] >= 0.9 and before["over_refusal"]["value"] <= 0.1
    rows = json.loads((tmp_path / "m/evaluation_rounds.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]

    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["retention"]["examples"] > 0 and (out / "retention_answers.json").exists()
    assert meta["locality"]["ok"] and meta["locality"]["other"] == []
    selected = {tuple(x) for r in meta["identified_experts_per_round"].values() for x in r["experts"]}
    assert {tuple(x) for x in meta["locality"]["experts"]} <= selected
    assert result["metrics"]["locality_ok"] == 1

    client = MlflowClient()
    run = client.get_run(result["mlflow_run_id"])
    history = client.get_metric_history(run.info.run_id, "asr/flip_words")
    assert sorted(m.step for m in history) == [0, 1, 2]
    check_layout(client, run, meta, evaluated=True)
    table = json.loads(open(client.download_artifacts(run.info.run_id, "evaluation.json")).read())
    frame = pd.DataFrame(table["data"], columns=table["columns"])
    assert list(frame.columns) == ["stage", "round", "metric", "value", "n", "ci_low", "ci_high"]
    assert sorted(set(zip(frame["stage"], frame["round"]))) == [("before", 0), ("round_1", 1), ("round_2", 2)]
    assert frame[frame.metric == "over_refusal"]["n"].tolist() == [24, 24, 24]
    assert (tmp_path / "m/safety_per_round.png").exists() and (tmp_path / "m/expert_scores.png").exists()
    # `dvc metrics show`'s two rows: the organism's surgery family is flip_chars
    after = json.loads((tmp_path / "m/after.json").read_text())
    assert after["asr_surgery"] == compact["after"]["asr_flip_chars"]
    assert after["refused_worst"] == max(compact["after"][f"over_refusal_{f}"] for f in FAMILIES)
    assert json.loads((tmp_path / "m/before.json").read_text())["asr_mean"] >= 0.8
    (first,) = client.search_runs([run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run.info.run_id}' and attributes.run_name = 'round-1'")
    assert {"eval_samples.json", "eval_samples.md", "evaluation.json"} <= {a.path for a in client.list_artifacts(first.info.run_id)}


def test_a_comparison_run_shares_work_without_changing_results(small_organism, tmp_path, tracking_dir):
    """--cache_dir and --eval_rounds last, as `make compare` runs them: the second run of the
    organism reuses the first's retention answers and evaluation before surgery, and gives
    exactly what the same run without the cache gives."""
    cache = tmp_path / "cache"

    def run(seed, out, cache_dir):
        train = {"model_name": str(small_organism / "model"),
                 "dataset_path": str(small_organism / "surgery_records.json"), "output_dir": str(tmp_path / out),
                 "num_rounds": 2, "top_k_experts": 2, "expert_lr": 1e-3, "router_lr": 1e-3,
                 "max_samples": 32, "retention_path": str(small_organism / "retention.json"),
                 "retention_samples": 10_000, "seed": seed, "cache_dir": cache_dir}
        evaluation = {"eval_set": str(small_organism / "eval_set.json"), "limit": 12,
                      "max_new_tokens": 16, "rounds": "last"}
        surgery_flow(train, experiment="organism-compare", progress=False, evaluation=evaluation,
                     evaluation_path=str(tmp_path / out / "m/evaluation.json"))
        return (json.loads((tmp_path / out / "m/evaluation_detail.json").read_text()),
                json.loads((tmp_path / out / "retention_answers.json").read_text()))

    first, _ = run(1, "a", str(cache))
    assert list(first) == ["before", "round_2", "final"]  # no evaluation after round 1
    entries = {kind.name: len(list(kind.glob("*.json"))) for kind in cache.iterdir()}
    assert entries == {"retention_answers": 1, "evaluation_before": 1}
    cached_run, cached_answers = run(2, "b", str(cache))
    assert {kind.name: len(list(kind.glob("*.json"))) for kind in cache.iterdir()} == entries  # hits
    used = json.loads((tmp_path / "b" / "training_metadata.json").read_text())["cache"]
    assert {kind: (Path(x["entry"]).parent.name, x["hit"]) for kind, x in used.items()} == {
        "retention_answers": ("retention_answers", True), "evaluation_before": ("evaluation_before", True)}
    fresh_run, fresh_answers = run(2, "c", None)
    assert cached_run == fresh_run and cached_answers == fresh_answers
    assert cached_run["before"] == first["before"]
