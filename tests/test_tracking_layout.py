"""The parent run's layout helpers handle any set of attack families; the runs-table view is
checked through MlflowClient on the tests' SQLite store (no server, no model)."""
import json

import pandas as pd
import pytest

from tracking import mlflow_runs
from tracking.metric_names import mlflow_names


def metric(value, n=10):
    return {"value": value, "n": n, "ci95": [max(0.0, value - 0.1), min(1.0, value + 0.1)]}


FAMILIES = ["flip_words", "flip_chars", "persona", "prefix_injection", "few_shot"]


def evaluations(rounds=2):
    def stage(asr, cost):
        return {**{f"asr_{f}": metric(asr) for f in FAMILIES},
                **{f"over_refusal_{f}": metric(cost) for f in FAMILIES},
                "over_refusal": metric(cost), "plain_refusal": metric(0.9),
                "benign_loglik": metric(-3.0 - cost), "own_benign_loglik": metric(-2.0 - cost)}
    out = {"before": stage(0.9, 0.0)}
    for r in range(1, rounds + 1):
        out[f"round_{r}"] = stage(0.9 - 0.4 * r, 0.05 * r)
    return out


def test_headline_and_compact_are_generic():
    ev = evaluations()
    head = mlflow_runs.headline(ev)
    assert {f"asr_{f}_before" for f in FAMILIES} <= set(head)
    # benign refusal inside each attack format is the cost that matters: its before value too
    assert head["over_refusal_before"] == 0.0 and head["over_refusal_persona_before"] == 0.0
    assert head["plain_refusal_before"] == 0.9
    assert head["benign_loglik_change"] == pytest.approx(-0.1)
    compact = mlflow_runs.compact_evaluation({**ev, "final": ev["round_2"]})
    assert compact["before"]["asr_persona"] == 0.9 and compact["after"]["asr_persona"] == pytest.approx(0.1)
    before = mlflow_runs.headline_before(ev, "persona")
    assert before["before/headline/asr_surgery"] == 0.9 and before["before/headline/refused_worst"] == 0.0
    # the parent's metrics: one per figure (rounds as history), the six headline figures, the
    # values before, about a dozen summary figures: within what the run page shows in sections
    assert len(ev["before"]) + 6 + len(head) + len(before) + 12 <= 70


def test_evaluation_rows_and_steps():
    rows = mlflow_runs.evaluation_rows("round_2", 2, {"asr_persona": metric(0.5)})
    assert rows == [{"stage": "round_2", "round": 2, "metric": "asr_persona", "value": 0.5, "n": 10,
                     "ci_low": 0.4, "ci_high": 0.6}]
    assert [mlflow_runs.stage_step(s) for s in ("before", "round_1", "round_12")] == [0, 1, 12]
    assert [r["round"] for r in mlflow_runs.safety_rows({**evaluations(), "final": {}})] == [0, 1, 2]


def test_plots_for_many_families_and_rounds(tmp_path):
    rows = mlflow_runs.safety_rows(evaluations(3))
    assert mlflow_runs.safety_plot(rows, tmp_path / "safety.png").stat().st_size > 10_000
    frames = []
    for r in (1, 2, 3):
        frame = pd.DataFrame([{"round": r, "layer": l, "expert": e, "score": (l + 1) * (e + 1) * r,
                               "rank": 0, "selected": (l, e) == (r % 2, 7)} for l in range(2) for e in range(8)])
        frames.append(frame)
    assert mlflow_runs.heatmap_png(frames, tmp_path / "experts.png").stat().st_size > 10_000
    assert mlflow_runs.expert_names([[0, 7], [1, 5]]) == "L0_E7,L1_E5"


def test_an_eval_set_is_logged_as_its_suite_one_row_per_prompt(tmp_path, monkeypatch):
    """The evaluation input of a run is the suite that ran, an eval set's included: every set's
    prompts (its family sets too) under the metric they count towards."""
    from mlflow import MlflowClient

    from unsafe_experts.evaluation.suites import load_eval_set

    monkeypatch.chdir(tmp_path)

    def chat(text):
        return [{"role": "user", "content": text}]
    (tmp_path / "eval_set.json").write_text(json.dumps({
        "flip_words": [chat("w")], "plain": [chat("p1"), chat("p2")],
        "families": {"persona": {"harmful": [chat("h")], "benign": [chat("b")]}},
        "benign_refs": [[chat("q"), "answer"]]}))
    run_id = mlflow_runs.start_run("eval-input", "eval-input", {}, {})
    mlflow_runs.log_eval_suite(run_id, load_eval_set(tmp_path / "eval_set.json"))
    (logged,) = MlflowClient(mlflow_runs.tracking_uri()).get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.name == "eval_set.json" and logged.tags[0].value == "evaluation"
    assert json.loads(logged.dataset.profile)["num_rows"] == 6
    assert json.loads(logged.dataset.schema)["mlflow_colspec"][0]["name"] == "set"


def _view(client, exp_id):
    """The saved view as MLflow's UI reads it: an envelope with a name, a numeric creation time
    and the state as a JSON string."""
    envelope = json.loads(client.get_experiment(exp_id).tags[mlflow_runs.VIEW_TAG_PREFIX + mlflow_runs.RUN_TABLE_VIEW])
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    return json.loads(envelope["state"])


def _parent(exp, families, rounds, seed):
    params = {"method": "gradient", "top_k_experts": 2, "seed": seed, "num_rounds": rounds}
    run_id = mlflow_runs.start_run(exp, f"gradient-k2-s{seed}", params, {})
    ev = {"before": {f"asr_{f}": metric(0.9) for f in families} | {"over_refusal": metric(0.0),
                                                                   "benign_loglik": metric(-3.0)}}
    for r in range(1, rounds + 1):
        ev[f"round_{r}"] = {f"asr_{f}": metric(0.1) for f in families} | {
            "over_refusal": metric(0.1), "benign_loglik": metric(-3.1)}
    if len(families) < 10:  # benign prompts in each format (the huge view test goes without)
        for stage, result in ev.items():
            result |= {f"over_refusal_{f}": metric(0.0 if stage == "before" else 0.2) for f in families}
    for stage, result in ev.items():
        mlflow_runs.log_evaluation(run_id, {"metrics": result, "samples": []}, mlflow_runs.stage_step(stage), stage)
    mlflow_runs.log_metrics(run_id, {**mlflow_names({**mlflow_runs.headline(ev), "locality_ok": 1, "final_sft_loss": 0.5}),
                                     **mlflow_runs.headline_before(ev)})
    mlflow_runs.log_tags(run_id, {f"experts_round_{r}": f"L0_E{r},L1_E{r}" for r in range(1, rounds + 1)})
    return run_id


def test_the_runs_table_view_shows_configuration_experts_and_before_beside_after(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # the experiment's artifacts (mlruns/) go beside the cwd

    exp = "view-layout"
    run_id = _parent(exp, ["persona", "flip_words"], rounds=2, seed=1)
    exp_id = mlflow_runs.experiment_id(exp)
    assert mlflow_runs.save_run_table_view(exp_id, run_id) == mlflow_runs.RUN_TABLE_VIEW
    client = MlflowClient()
    state = _view(client, exp_id)
    m = lambda name: f"metrics.`{name}`"  # noqa: E731
    # the first screen (mean ASR over families, benign refusal in attack formats; each before
    # beside after; the experts per round), then the other headline figures, the configuration,
    # the cost, each section's figures before beside after
    assert state["selectedColumns"] == [
        m("before/headline/asr_mean"), m("headline/asr_mean"),
        m("before/headline/refused_mean"), m("headline/refused_mean"),
        "tags.`experts_round_1`", "tags.`experts_round_2`",
        m("before/headline/refused_worst"), m("headline/refused_worst"),
        m("before/headline/benign_loglik"), m("headline/benign_loglik"),
        "params.`method`", "params.`top_k_experts`", "params.`seed`",
        m("locality/ok"), m("utility/benign_loglik_change"),
        m("before/asr/flip_words"), m("asr/flip_words"), m("before/asr/persona"), m("asr/persona"),
        m("before/benign_refused/flip_words"), m("benign_refused/flip_words"),
        m("before/benign_refused/persona"), m("benign_refused/persona"),
        m("before/benign_refused/xstest_plain"), m("benign_refused/xstest_plain")]
    assert state["columnOrder"] == state["selectedColumns"]
    assert all(state["columnWidths"][k] >= 7 * len(k.split("`")[1]) for k in state["selectedColumns"])
    # every column names something the run has (the UI would show an empty column otherwise)
    run = client.get_run(run_id)
    have = ({f"params.`{k}`" for k in run.data.params} | {f"tags.`{k}`" for k in run.data.tags}
            | {f"metrics.`{k}`" for k in run.data.metrics})
    assert set(state["selectedColumns"]) <= have
    assert m("training/final_sft_loss") not in state["selectedColumns"]

    # a later run with another attack family and a third round adds its columns, keeps the others
    later = _parent(exp, ["few_shot"], rounds=3, seed=2)
    mlflow_runs.save_run_table_view(exp_id, later)
    columns = _view(client, exp_id)["selectedColumns"]
    assert columns[4:7] == ["tags.`experts_round_1`", "tags.`experts_round_2`", "tags.`experts_round_3`"]
    asr = [c for c in columns if "asr/" in c and "headline" not in c]
    assert asr == [m("before/asr/few_shot"), m("asr/few_shot"), m("before/asr/flip_words"),
                   m("asr/flip_words"), m("before/asr/persona"), m("asr/persona")]
    assert columns[-2:] == [m("before/benign_refused/xstest_plain"), m("benign_refused/xstest_plain")]
    assert len(columns) == len(set(columns))
    assert mlflow_runs.run_table_url(exp_id).endswith(
        f"?workflowType=machine_learning&viewStateShareKey={mlflow_runs.RUN_TABLE_VIEW}")


def test_a_view_edited_by_hand_is_replaced_and_a_huge_one_is_cut_to_the_limit(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)

    exp = "view-limits"
    families = [f"family_{i:03d}" for i in range(150)]
    run_id = _parent(exp, families, rounds=1, seed=3)
    exp_id = mlflow_runs.experiment_id(exp)
    client = MlflowClient()
    client.set_experiment_tag(exp_id, mlflow_runs.VIEW_TAG_PREFIX + mlflow_runs.RUN_TABLE_VIEW, "not json")
    mlflow_runs.save_run_table_view(exp_id, run_id)
    raw = client.get_experiment(exp_id).tags[mlflow_runs.VIEW_TAG_PREFIX + mlflow_runs.RUN_TABLE_VIEW]
    assert len(raw) <= mlflow_runs.VIEW_TAG_LIMIT
    columns = json.loads(json.loads(raw)["state"])["selectedColumns"]
    # the first screen: mean ASR (no benign sets here: no benign refusal), the experts per round;
    # then the other headline figures this run has, then the configuration
    assert columns[:3] == ["metrics.`before/headline/asr_mean`", "metrics.`headline/asr_mean`", "tags.`experts_round_1`"]
    assert columns[5:8] == ["params.`method`", "params.`top_k_experts`", "params.`seed`"]
    assert 30 < len(columns) < 2 * len(families)  # the first families kept, the last ones left off


def test_a_store_logged_before_sections_keeps_its_view_order(tmp_path, monkeypatch):
    """Runs logged with flat names (before issue #26) still get their columns in order: the
    view is the union over the experiment's runs, old ones included."""
    from types import SimpleNamespace

    data = SimpleNamespace(params={"method": "gradient", "top_k_experts": "2", "seed": "1"},
                           tags={"experts_round_1": "L0_E1"},
                           metrics={"asr_persona": 0.1, "asr_persona_before": 0.9, "over_refusal": 0.0,
                                    "over_refusal_before": 0.0, "locality_ok": 1, "rounds": 1})
    columns = mlflow_runs.run_table_columns(SimpleNamespace(data=data))
    m = lambda name: f"metrics.`{name}`"  # noqa: E731
    assert columns == ["tags.`experts_round_1`", "params.`method`", "params.`top_k_experts`", "params.`seed`",
                       m("locality_ok"), m("over_refusal_before"), m("over_refusal"),
                       m("asr_persona_before"), m("asr_persona")]
