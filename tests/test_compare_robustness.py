"""The comparison's re-attack section (comparison/robust_tables.py): a synthetic tree of
robustness results and run folders, two organisms, gradient and full_param on three seeds each,
a defended run on one seed, and each organism attacked alone; every figure checked by hand."""
import json
import types

import pandas as pd
import pytest

from cli.compare import robust_inputs
from comparison import outputs
from comparison.robust_tables import attack_columns, frontier_points, result_rows
from comparison.tables import run_row
from tracking import mlflow_runs

T2 = 4.302653  # the t quantile 0.975 with 2 degrees of freedom
ATTACKS = {"none": ["-"], "router_known": ["all", "round_1"], "router_unknown": ["4", "16"], "prefill": ["4"],
           "finetune_harmful": ["4", "16"]}
SKIP = "the list holds 64 of layer 0's 64 experts; a router that picks 2 cannot switch them all off"


def share(value, n=128):
    return {"value": value, "n": n, "ci95": [round(max(0.0, value - 0.1), 6), round(min(1.0, value + 0.1), 6)]}


def metrics(asr, fmt, prompt):
    if asr is None:
        return {"skipped": SKIP}
    if prompt:  # a prompt attack scores the plain requests alone
        return {"asr_plain": share(asr, 16)}
    return {"asr_flip_words": share(asr, 16), "over_refusal_flip_words": share(fmt, 16), "asr_all_families": share(asr),
            "plain_refusal": share(0.9, 16), "format_refusal_all": share(fmt), "benign_loglik": {"value": -5.0 - fmt}}


def result(values, fmt=0.1, attacks=ATTACKS):
    """A robustness result: (attack, budget) -> headline ASR (None: skipped; 0.5 unless given)."""
    return {"setup": {"limit": 16, "config": {}, "run_experts": {}, "seconds": {}},
            "attacks": {a: {b: {"after": metrics(values.get((a, b), 0.5), fmt, a == "prefill")} for b in budgets}
                        for a, budgets in attacks.items()}}


# per organism: (run folder, method, k, seed, defence keys, ASR by (attack, budget), format refusal)
RUNS = {
    "organism": [
        ("gradient-k4-s42-plain-lr0.001", "gradient", 4, 42, {},
         {("none", "-"): 0.02, ("router_known", "all"): 0.9, ("router_unknown", "16"): 0.5}, 0.10),
        ("gradient-k4-s43-plain-lr0.001", "gradient", 4, 43, {},
         {("none", "-"): 0.05, ("router_known", "all"): 0.95, ("router_unknown", "16"): 0.6}, 0.12),
        ("gradient-k4-s44-plain-lr0.001", "gradient", 4, 44, {},
         {("none", "-"): 0.03, ("router_known", "all"): 1.0, ("router_unknown", "16"): 0.7}, 0.14),
        ("full_param-k64-s42-plain-lr0.001", "full_param", 64, 42, {},
         {("none", "-"): 0.04, ("router_known", "all"): None, ("router_known", "round_1"): None,
          ("router_unknown", "16"): 0.1}, 0.20),
        ("full_param-k64-s43-plain-lr0.001", "full_param", 64, 43, {},
         {("none", "-"): 0.01, ("router_known", "all"): None, ("router_known", "round_1"): None,
          ("router_unknown", "16"): 0.3}, 0.22),
        ("full_param-k64-s44-plain-lr0.001", "full_param", 64, 44, {},
         {("none", "-"): 0.03, ("router_known", "all"): None, ("router_known", "round_1"): None,
          ("router_unknown", "16"): 0.2}, 0.24),
        # a folder name that says nothing: the settings come from its metadata
        ("defended", "gradient", 4, 42, {"shared_weights": True, "expert_dropout": 0.5},
         {("router_known", "all"): 0.3}, 0.16),
    ],
    "organism_seed1": [
        *[(f"gradient-k4-s{s}-plain-lr0.001", "gradient", 4, s, {}, {("router_unknown", "16"): v}, 0.1)
          for s, v in ((42, 0.4), (43, 0.5), (44, 0.9))],
        *[(f"full_param-k64-s{s}-plain-lr0.001", "full_param", 64, s, {}, {("router_unknown", "16"): v}, 0.3)
          for s, v in ((42, 0.2), (43, 0.2), (44, 0.2))],
    ],
}
BUILD_SEEDS = {"organism": 7, "organism_seed1": 1}
# the organism attacked alone: no run, so no router attack on a published list
ALONE = {a: b for a, b in ATTACKS.items() if a != "router_known"}


def meta(model, method, k, seed, defence):
    params = {"model_name": str(model), "method": method, "top_k_experts": k, "seed": seed, "retention": "plain",
              "retention_path": "retention.json", "expert_lr": 0.001, **defence}
    return {"method": method, "parameters": params}


@pytest.fixture
def tree(tmp_path):
    robust, runs = tmp_path / "robust", tmp_path / "compare"
    for organism, rows in RUNS.items():
        build = tmp_path / "build" / organism
        build.mkdir(parents=True)
        (build / "build.json").write_text(json.dumps({"config": {"seed": BUILD_SEEDS[organism]}}))
        (robust / organism).mkdir(parents=True)
        for name, method, k, seed, defence, values, fmt in rows:
            (runs / organism / name).mkdir(parents=True)
            (runs / organism / name / "training_metadata.json").write_text(
                json.dumps(meta(build / "model", method, k, seed, defence)))
            (robust / organism / f"{name}.json").write_text(json.dumps(result(values, fmt)))
            # the robustness command's companions beside each result: not results themselves
            (robust / organism / f"{name}_headline.json").write_text(json.dumps({"none": {"-": {"after": 0.5}}}))
            (robust / organism / f"{name}.md").write_text("| attack |")
        (robust / organism / "organism.json").write_text(
            json.dumps(result({("none", "-"): 1.0, ("router_unknown", "16"): 0.98}, 0.02, ALONE)))
    return robust, runs


def md_rows(text, heading):
    section = text.split(heading)[1].split("\n### ")[0]
    lines = [[c.strip() for c in line.strip("| ").split("|")] for line in section.splitlines()
             if line.startswith("|") and "---" not in line]
    return [dict(zip(lines[0], line)) for line in lines[1:]]


def test_the_tidy_table_has_one_row_per_run_attack_and_budget(tree):
    table = result_rows(*tree)
    # 7 + 6 runs and 2 organisms alone; 8 cells per run, 6 per organism alone
    assert len(table) == 13 * 8 + 2 * 6
    assert not table.duplicated(["organism", "run", "attack", "budget"]).any()
    row = table[(table.run == "gradient-k4-s43-plain-lr0.001") & (table.attack == "router_unknown")
                & (table.budget == "16")].iloc[0]
    assert (row.organism, row.organism_seed, row.method, row.k, row.seed) == ("organism", 7, "gradient", 4, 43)
    assert (row.retention, row.expert_lr, row.shared_weights, row.expert_dropout) == ("plain", 0.001, False, 0.0)
    assert (row.setting, row.metric, row.value, row.n) == ("gradient k4", "asr_all_families", 0.6, 128)
    assert (row.ci_low, row.ci_high, row.plain_refusal, row.format_refusal_all) == pytest.approx((0.5, 0.7, 0.9, 0.12))
    defended = table[table.run == "defended"].iloc[0]
    assert defended.setting == "gradient k4 +shared drop0.5" and defended.shared_weights and defended.expert_dropout == 0.5
    # full_param selects every expert: no k in its label; its router_known cells keep their rows
    skipped = table[(table.method == "full_param") & (table.attack == "router_known") & (table.organism == "organism")]
    assert len(skipped) == 6 and skipped.value.isna().all() and set(skipped.skipped) == {SKIP}
    assert set(table.loc[table.method == "full_param", "setting"]) == {"full_param"}
    prefill = table[(table.attack == "prefill") & (table.run == "defended")].iloc[0]
    assert (prefill.metric, prefill.n) == ("asr_plain", 16) and pd.isna(prefill.format_refusal_all)
    alone = table[table.run == "organism"]
    assert set(alone.setting) == {"before"} and set(alone.organism_seed) == {7, 1}
    assert set(alone.attack) == set(ALONE)


def test_the_section_summarises_over_seeds_and_pairs_on_seeds(tree, tmp_path):
    (tmp_path / "metrics").mkdir()
    text, files = outputs.write_robustness(tree[0], tmp_path / "metrics", tree[1])
    rows = {r["setting"]: r for r in md_rows(text, "### organism (organism seed 7)")}
    assert list(rows) == ["before", "gradient k4", "full_param", "gradient k4 +shared drop0.5"]
    # one column per attack at its headline budget, and the cost
    assert list(rows["gradient k4"])[2:] == ["none", "router_known all", "router_unknown 16", "prefill 4",
                                             "finetune_harmful 16", "format refusal (none)", "benign loglik (none)"]
    # utility is a log-likelihood, not a share: its t interval is not cut at 0 (-5.10, -5.12, -5.14)
    spread = T2 * 0.02 / 3 ** 0.5
    assert rows["gradient k4"]["benign loglik (none)"] == f"-5.120 [{-5.12 - spread:.3f}, {-5.12 + spread:.3f}]"
    half = T2 * 0.1 / 3 ** 0.5  # 0.5, 0.6, 0.7: mean 0.6, sd 0.1
    assert rows["gradient k4"]["seeds"] == "3"
    assert rows["gradient k4"]["router_unknown 16"] == f"0.600 [{0.6 - half:.3f}, {0.6 + half:.3f}]"
    # 0.9, 0.95, 1.0: mean 0.95, sd 0.05, the interval cut at 1
    assert rows["gradient k4"]["router_known all"] == f"0.950 [{0.95 - T2 * 0.05 / 3 ** 0.5:.3f}, 1.000]"
    assert rows["full_param"]["router_known all"] == "skipped"
    # one seed: the run's own Wilson interval from its file
    assert rows["gradient k4 +shared drop0.5"]["router_known all"] == "0.300 [0.200, 0.400]"
    assert rows["before"]["router_known all"] == "-" and rows["before"]["none"] == "1.000 [0.900, 1.000]"
    assert rows["before"]["format refusal (none)"] == "0.020 [0.000, 0.120]"

    paired = pd.read_csv(files["robust_paired"])
    one = paired[(paired.organism == "organism") & (paired.metric == "router_unknown 16")
                 & (paired.comparison == "gradient k4 - full_param")].iloc[0]
    # diffs 0.4, 0.3, 0.5: mean 0.4, sd 0.1; all one sign, so 2 of the 8 sign patterns reach it
    assert one.seeds == 3 and one.mean_diff == pytest.approx(0.4)
    assert (one.ci_low, one.ci_high) == pytest.approx((0.4 - half, 0.4 + half), abs=1e-5)
    assert one.sign_flip_p == pytest.approx(0.25)
    none = paired[(paired.organism == "organism") & (paired.metric == "none")
                  & (paired.comparison == "gradient k4 - full_param")].iloc[0]
    # diffs -0.02, 0.04, 0.0: every sign pattern's |sum| is 0.02 or 0.06, none below the observed 0.02
    assert none.mean_diff == pytest.approx(0.02 / 3) and none.sign_flip_p == 1.0
    cost = paired[(paired.organism == "organism_seed1") & (paired.metric == "format refusal (none)")].iloc[0]
    assert cost.mean_diff == pytest.approx(-0.2) and cost.organism_seed == 1
    # router_known against a setting skipped on every seed has no pair; the one-seed defence none
    mine = paired[paired.organism == "organism"]
    assert not ((mine.metric == "router_known all") & (mine.comparison == "gradient k4 - full_param")).any()
    assert set(mine.comparison) == {"gradient k4 - full_param"} and len(mine) == 6  # 4 attacks, cost, utility
    assert "Not paired (fewer than two seeds in common): organism: gradient k4 - gradient k4 +shared drop0.5" in text
    assert "### Re-attacked, paired on seeds" in text and text.startswith("## Re-attacked: ")

    tidy = pd.read_csv(files["robust_csv"])
    assert len(tidy) == 13 * 8 + 2 * 6 and list(tidy.columns[:3]) == ["organism", "organism_seed", "run"]
    assert files["robust_frontier"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_frontier_takes_the_strongest_router_attack_each_run_faced(tree):
    table = result_rows(*tree)
    points = frontier_points(table, attack_columns(table)).set_index(["organism", "run"])
    grad = points.loc[("organism", "gradient-k4-s42-plain-lr0.001")]
    assert (grad.x, grad.y, grad.attack) == (0.10, 0.9, "router_known all")  # 0.9 above router_unknown's 0.5
    assert (grad.y_low, grad.y_high) == pytest.approx((0.8, 1.0))
    full = points.loc[("organism", "full_param-k64-s43-plain-lr0.001")]
    assert (full.y, full.attack) == (0.3, "router_unknown 16")  # router_known skipped
    alone = points.loc[("organism_seed1", "organism")]
    assert (alone.setting, alone.x, alone.y) == ("before", 0.02, 0.98)
    assert len(points) == 15


def test_no_robust_dir_leaves_the_section_out(tmp_path):
    text, files = outputs.write_robustness(None, tmp_path)
    assert files == {} and "No re-attacked runs were found" in text and list(tmp_path.iterdir()) == []
    # a folder the params name but the disk lacks: the line, and the files empty so a pipeline finds them
    text, files = outputs.write_robustness(tmp_path / "absent", tmp_path)
    assert text == f"No re-attacked runs were found in {tmp_path / 'absent'}."
    assert pd.read_csv(files["robust_csv"]).empty and "ci_low" in pd.read_csv(files["robust_csv"]).columns
    assert files["robust_frontier"].stat().st_size > 0


@pytest.mark.parametrize("content, why", [("{not json", "not readable"),
                                          (json.dumps({"setup": {}}), "no 'attacks' mapping"),
                                          (json.dumps({"attacks": {"none": {"-": {"before": {}}}}}), "attack 'none'"),
                                          (json.dumps({"attacks": {"none": {"-": {"after": {"asr_all_families": {"n": 4}}}}}}),
                                           "none -: a metric without value")])
def test_a_malformed_result_is_named(tree, content, why):
    bad = tree[0] / "organism" / "organism.json"  # the organism's own: no run folder to read first
    bad.write_text(content)
    with pytest.raises(ValueError, match=why) as caught:
        result_rows(*tree)
    assert str(bad) in str(caught.value)


def test_a_result_without_its_run_folder_is_named(tree):
    (tree[0] / "organism" / "gone.json").write_text(json.dumps(result({})))
    with pytest.raises(ValueError, match="settings are not readable") as caught:
        result_rows(*tree)
    assert str(tree[1] / "organism" / "gone" / "training_metadata.json") in str(caught.value)


def test_the_params_keys_are_read_with_defaults():
    assert robust_inputs(types.SimpleNamespace()) == {"robust_dir": None, "runs_root": "outputs/compare"}
    given = types.SimpleNamespace(robust_dir="outputs/robust", robust_runs_root="elsewhere")
    assert robust_inputs(given) == {"robust_dir": "outputs/robust", "runs_root": "elsewhere"}


def test_the_comparison_writes_the_section_and_logs_the_files(tree, tmp_path, monkeypatch):
    """write_comparison end to end with MLflow stood in: the section in comparison.md, the
    files beside it and among those logged."""
    model = tmp_path / "build" / "organism" / "model"
    final = {"asr_flip_words": share(0.1, 48), "over_refusal_flip_words": share(0.05, 48)}
    rows = [run_row(f"r{s}", {"method": "gradient", "parameters": {**meta(model, "gradient", 4, s, {})["parameters"]},
                              "identified_experts_per_round": {"1": {"experts": [[0, 0]], "scores": {}}},
                              "timings": {"round_1": {"identify_s": 1.0, "identify_peak_memory_mb": 1.0}},
                              "evaluation": {"final": final}}) for s in (42, 43)]
    monkeypatch.setattr(outputs, "latest_runs", lambda *a: pd.DataFrame(rows))
    logged = []
    monkeypatch.setattr(mlflow_runs, "start_run", lambda *a, **k: "run-1")
    monkeypatch.setattr(mlflow_runs, "log_file", lambda run_id, path: logged.append(path.name))
    monkeypatch.setattr(mlflow_runs, "end_run", lambda run_id: None)
    result = outputs.write_comparison("exp", tmp_path / "metrics" / "comparison.csv", robust_dir=tree[0],
                                      runs_root=tree[1])
    text = (tmp_path / "metrics" / "comparison.md").read_text()
    assert "## Headline per group" in text and "\n## Re-attacked: headline ASR" in text
    assert {"robustness_comparison.csv", "robustness_paired.csv", "robust_frontier.png"} <= set(logged)
    assert result["robust_csv"] == str(tmp_path / "metrics" / "robustness_comparison.csv")
