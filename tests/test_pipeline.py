import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from comparison.tables import recipe_label
from flows.surgery import surgery_flow
from tasks.surgery import DatasetValidationError

pytestmark = pytest.mark.slow  # DVC repro in a fresh clone, whole flows

REPO = Path(__file__).resolve().parents[1]


def test_failed_validation_stops_the_flow_and_keeps_earlier_outputs(tiny_dir, records, tmp_path,
                                                                    tracking_dir):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([records[0], {"goal": "x", "all_prompt": "flip this"},
                                {"all_prompt": [{"role": "user"}]}]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "round_1").mkdir()
    (out / "round_1" / "model.safetensors").write_bytes(b"earlier round")
    train = {"model_name": str(tiny_dir), "dataset_path": str(data), "output_dir": str(out),
             "top_k_experts": 2, "overwrite": True}
    with pytest.raises(DatasetValidationError, match="3 problems in the dataset") as err:
        surgery_flow(train, experiment="validation-failures", progress=False)
    assert "record 2, field `goal`: missing" in str(err.value)
    assert sorted(p.name for p in out.rglob("*")) == ["model.safetensors", "round_1"]
    assert (out / "round_1" / "model.safetensors").read_bytes() == b"earlier round"
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("validation-failures").experiment_id])
    assert run.info.status == "FAILED"
    csv = client.download_artifacts(run.info.run_id, "validation/validation_failures.csv")
    lines = Path(csv).read_text().splitlines()
    assert lines[0] == "record,field,problem" and len(lines) == 4


def dvc(args, cwd, env):
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_dvc_repro_in_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    params = yaml.safe_load((clone / "params.yaml").read_text())  # a fast, small variant
    params["organism"].update(layers=1, experts=4, hidden=32, expert_hidden=32, vocab_size=512,
                              benign_train=20, epochs=1)
    params["evaluation"].update(limit=8, max_new_tokens=8)
    params["train"].update(num_rounds=1, top_k_experts=2, max_samples=16, retention_samples=16)
    run = {"organism": "organism", "retention": "plain", "lr": 0.001, "flags": "--expert_dropout 0.0", "tag": "",
           "data": ""}
    params["comparison"].update(organism_seeds=[1], robust_organisms=["organism", "organism_seed1"])
    # another recipe (more experts per layer), one build, one surgery on it
    params["comparison"].update(recipes={"wide": {"experts": 6}}, recipe_builds=[{"recipe": "wide", "seed": 0}])
    params["comparison"].update(eval_limit=4, runs=[{**run, "method": "gradient", "k": 2, "seed": 42},
                                                    {**run, "method": "random", "k": 2, "seed": 1},
                                                    {**run, "organism": "wide_seed0", "method": "gradient", "k": 2,
                                                     "seed": 42}],
                                ablations=[{"run": "organism/gradient-k2-s42-plain-lr0.001", "round": 1}],
                                random_ablations=[{"run": "organism/gradient-k2-s42-plain-lr0.001",
                                                   "round": 1, "seed": 1}],
                                robust_runs=[{"organism": "organism", "run": "gradient-k2-s42-plain-lr0.001"}],
                                surgery_data=[], validation_organisms=["organism"],
                                validation_runs=[{"organism": "organism", "run": "gradient-k2-s42-plain-lr0.001"},
                                                 {"organism": "organism", "run": "random-k2-s1-plain-lr0.001"}])
    params["comparison"]["robustness"].update(limit=4, router_budgets=[1], rank_prompts=4, prefill_budgets=[1],
                                              harmful_examples=[1], harmful_steps=2)
    params["robustness"].update(attacks=["none", "router_known", "prefill"], limit=4, router_budgets=[1])
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "small"],
                   cwd=clone, check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)  # the CLI starts its own ephemeral server

    first = dvc(["repro"], clone, env)
    for stage in ("organism", "organism_builds@1", "recipe_builds@0", "compare_run@2", "validate", "train",
                  "robustness", "compare_run@0",
                  "compare_run@1", "compare_ablate@0", "compare_ablate_random@0", "compare_robust@0",
                  "compare_robust_organism@organism", "compare_robust_organism@organism_seed1",
                  "compare_validate@0", "compare_validate@1", "compare_validate_organism@organism", "compare"):
        assert f"Running stage '{stage}'" in first
    robustness = json.loads((clone / "metrics/robustness.json").read_text())
    assert list(robustness["attacks"]) == ["none", "router_known", "prefill"]
    assert set(robustness["attacks"]["router_known"]["all"]) == {"after", "before"}
    table = (clone / "metrics/comparison.csv").read_text().splitlines()
    header = table[0].split(",")
    assert header[:12] == ["method", "k", "seed", "recipe", "organism_seed", "retention", "expert_lr", "defence",
                           "setting", "data", "ablated", "rounds"]
    assert {"asr_flip_chars", "over_refusal_flip_chars", "plain_refusal", "benign_loglik"} <= set(header)
    assert header[-1] == "identify_s"
    # the recipes' labels: the wide build is its own row
    small, wide = (recipe_label(json.loads((clone / f"build/{b}/build.json").read_text())["config"])
                   for b in ("organism", "wide_seed0"))
    assert small.startswith("1Lx4E-w32-") and wide.startswith("1Lx6E-w32-")
    assert [row.split(",")[:11] for row in table[1:]] == [
        ["gradient", "2", "42", small, "0", "plain", "0.001", "none", "", "flip_chars", "False"],
        ["gradient", "2", "42", small, "0", "", "", "none", "", "", "True"],
        ["gradient", "2", "42", wide, "0", "plain", "0.001", "none", "", "flip_chars", "False"],
        ["random", "2", "1", small, "0", "plain", "0.001", "none", "", "flip_chars", "False"],
        ["random", "2", "1", small, "0", "", "", "none", "", "", "True"]]
    # each method tuned on the validation split (one setting each here), reported on test
    tuned = (clone / "metrics/tuned.csv").read_text().splitlines()
    assert [row.split(",")[:5] for row in tuned[1:]] == [["gradient", small, "0", "k2 plain lr0.001", "1"],
                                                        ["random", small, "0", "k2 plain lr0.001", "1"]]
    assert "## Tuned on validation" in (clone / "metrics/comparison.md").read_text()
    # the re-attacked run and both organisms alone, in the comparison's own section
    attacked = (clone / "metrics/robustness_comparison.csv").read_text()
    assert "gradient-k2-s42-plain-lr0.001" in attacked and attacked.count(",organism,") >= 1
    assert "## Re-attacked" in (clone / "metrics/comparison.md").read_text()
    assert (clone / "outputs/gradient/final_model/model.safetensors").exists()
    assert "Running stage" not in dvc(["repro"], clone, env)

    rerun = dvc(["exp", "run", "train", "-S", "train.top_k_experts=3"], clone, env)
    assert "Running stage 'train'" in rerun
    assert not any(f"Running stage '{s}'" in rerun for s in ("organism", "validate"))
    meta = json.loads((clone / "outputs/gradient/training_metadata.json").read_text())
    assert len(meta["identified_experts_per_round"]["1"]["experts"]) == 3
    shown = dvc(["metrics", "show"], clone, env)
    # the headline only (issue #26): before and after surgery, one row each, under 120 columns
    assert "metrics/before.json" in shown and "metrics/after.json" in shown and "asr_mean" in shown
    assert all(len(line) < 120 for line in shown.splitlines()), shown
    assert "metrics/validation.json" not in shown and "final_sft_loss" not in shown
    text = dvc(["metrics", "show", "--json"], clone, env)
    data = json.JSONDecoder().raw_decode(text[text.index("{"):])[0]
    files = next(iter(data.values()))["data"]
    assert set(files) == {"metrics/before.json", "metrics/after.json"}
    assert set(files["metrics/after.json"]["data"]) == {"asr_mean", "asr_surgery", "refused_mean",
                                                        "refused_worst", "plain_refusal", "benign_loglik"}
    # the rest stay plain outputs, listed on request
    assert "after.asr_flip_words" in dvc(["metrics", "show", "metrics/evaluation.json"], clone, env)
    # a team shares data and outputs through a DVC remote (a local folder here)
    remote = tmp_path / "remote"
    dvc(["remote", "add", "-d", "team", str(remote)], clone, env)
    dvc(["push"], clone, env)
    weights = (clone / "outputs/gradient/final_model/model.safetensors").read_bytes()
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "pushed"],
                   cwd=clone, check=True)  # dvc.lock of what was pushed
    other = tmp_path / "other"
    subprocess.run(["git", "clone", "-q", str(clone), str(other)], check=True)
    (other / ".dvc/config").write_text((clone / ".dvc/config").read_text())
    dvc(["pull"], other, {**env, "DVC_SITE_CACHE_DIR": str(tmp_path / "site2")})
    assert (other / "build/organism/model/model.safetensors").exists()
    assert (other / "outputs/gradient/final_model/model.safetensors").read_bytes() == weights
    plots = dvc(["plots", "show", "--json"], clone, env)
    assert "safety_per_round.png" in plots and "expert_scores.png" in plots


def test_flow_resumes_an_interrupted_run(tiny_dir, records_path, tmp_path, tracking_dir):
    from unsafe_experts.config import TrainConfig
    from unsafe_experts.surgery import Surgery

    out = tmp_path / "out"
    train = {"model_name": str(tiny_dir), "dataset_path": str(records_path), "output_dir": str(out),
             "num_rounds": 2, "top_k_experts": 2, "batch_size": 4, "max_samples": 8}
    interrupted = Surgery(TrainConfig(**train), progress=False, echo=lambda *a: None)
    interrupted.start()
    for phase in (interrupted.identify, interrupted.repair, interrupted.align, interrupted.checkpoint):
        phase(1)
    interrupted.fail(KeyboardInterrupt())  # as if the run had been stopped during round 2
    round_1 = (out / "round_1" / "delta.safetensors").read_bytes()

    result = surgery_flow(train, experiment="resumed-runs", progress=False)
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["status"] == "completed" and meta["resumed"][0]["after_round"] == 1
    assert list(meta["identified_experts_per_round"]) == ["1", "2"]
    assert (out / "round_1" / "delta.safetensors").read_bytes() == round_1  # kept, not redone
    assert result["metrics"]["rounds"] == 2
    client = MlflowClient()
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["resumed_after_round"] == "1"
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert [c.info.run_name for c in children] == ["round-2"]
