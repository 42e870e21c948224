import json
import pickle

import pytest
import torch
from conftest import one_error_line
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from cli.main import main
from tracking import mlflow_runs
from unsafe_experts.models.architectures import moe_layers


def train(tiny_dir, records_path, out, *extra):
    return main(["train", "--model_name", str(tiny_dir), "--dataset_path", str(records_path),
                 "--output_dir", str(out), "--num_rounds", "2", "--top_k_experts", "3",
                 "--batch_size", "4", "--max_samples", "8", "--expert_lr", "1e-3",
                 "--router_lr", "1e-3", "--quiet", *extra])


def test_train_end_to_end(tiny_dir, records_path, tmp_path, capsys, tracking_dir):
    out = tmp_path / "out"
    metrics_path = tmp_path / "metrics" / "train.json"
    assert train(tiny_dir, records_path, out, "--refusal", "No.", "--refusal", "I won't help.",
                 "--metrics", str(metrics_path), "--register_model", "e2e-repaired") == 0
    printed = capsys.readouterr().out
    assert "registered model e2e-repaired version" in printed
    assert "round 1: 3 experts" in printed and "round 2: 3 experts" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "expert_gradients.pkl", "final_model", "round_1", "round_2", "training_metadata.json"]
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["status"] == "completed" and meta["seed"] == 42
    assert meta["parameters"]["refusals"] == ["No.", "I won't help."]
    assert meta["dataset"]["records_loaded"] == 20 and meta["dataset"]["records_used"] == 8
    assert len(meta["dataset"]["sha256"]) == 64
    assert set(meta["versions"]) == {"python", "torch", "transformers"}
    for r in ("1", "2"):
        round_info = meta["identified_experts_per_round"][r]
        assert len(round_info["experts"]) == 3
        scores = round_info["gradients"]
        assert len(scores) == 16 and list(scores.values()) == sorted(scores.values(), reverse=True)
        assert [f"L{l}_E{e}" for l, e in round_info["experts"]] == list(scores)[:3]
        kl_before, kl_after = round_info["router_kl_before_after"]
        assert kl_after < kl_before
        assert {"identify_s", "sft_s", "router_s", "round_s", "peak_memory_mb"} <= set(meta["timings"][f"round_{r}"])
    kinds = {(log["round"], log["kind"]) for log in meta["training_logs"]}
    assert kinds == {(r, k) for r in (1, 2) for k in ("score", "sft", "router")}
    legacy = pickle.loads((out / "expert_gradients.pkl").read_bytes())
    assert legacy[1]["experts"] == meta["identified_experts_per_round"]["1"]["experts"]

    final = AutoModelForCausalLM.from_pretrained(out / "final_model")
    start = AutoModelForCausalLM.from_pretrained(tiny_dir)
    picked = {tuple(x) for r in ("1", "2") for x in meta["identified_experts_per_round"][r]["experts"]}
    for new, old in zip(moe_layers(final), moe_layers(start)):
        for name, p in new.expert_params.items():
            for e in range(new.num_experts):
                same = torch.equal(p[e], old.expert_params[name][e])
                assert same != ((new.index, e) in picked)
        assert not torch.equal(new.router.weight, old.router.weight)
    assert sorted(p.name for p in (out / "round_1").iterdir()) == ["delta.json", "delta.safetensors"]
    assert not list(out.glob(".*")), "temporary files left behind"
    check_mlflow_run(printed, meta, json.loads(metrics_path.read_text()), records_path, out)


def check_mlflow_run(printed, meta, metrics, records_path, out):
    from mlflow import MlflowClient

    from tracking.digests import dvc_md5

    client = MlflowClient()
    run_id = printed.split("MLflow run ")[1].split(";")[0]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["top_k_experts"] == "3" and run.data.params["kl_type"] == "forward"
    assert run.data.tags["data_dvc_md5"] == dvc_md5(records_path)
    assert run.data.tags["final_model_dvc_md5"] == dvc_md5(out / "final_model")
    assert run.data.tags["final_model_kind"] == "full"
    assert len(run.data.tags["git_commit"]) in (40, 7) and run.data.tags["prefect_flow_run_id"] != "none"
    assert run.data.tags["dataset_records_used"] == "8"
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "flip_records.json"
    assert json.loads(dataset_input.dataset.profile)["num_rows"] == 20  # the file; 8 used
    # MLflow's names have sections; metrics/train.json keeps the flat ones
    assert run.data.metrics["run/rounds"] == 2 == metrics["rounds"]
    assert metrics["final_router_kl"] == pytest.approx(run.data.metrics["training/final_router_kl"])
    check_layout(client, run, meta)
    assert {a.path for a in client.list_artifacts(run_id)} == {
        "training_metadata.json", "expert_scores.png", "expert_scores.csv"}

    children = client.search_runs([run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}'", order_by=["attributes.run_name"])
    assert [c.info.run_name for c in children] == ["round-1", "round-2"]
    second = children[1]
    expected = {tuple(x) for x in meta["identified_experts_per_round"]["2"]["experts"]}
    previous = {tuple(x) for x in meta["identified_experts_per_round"]["1"]["experts"]}
    assert second.data.metrics["jaccard_with_previous_round"] == pytest.approx(
        len(expected & previous) / len(expected | previous))
    assert {"score_mean", "score_max", "router_kl_after", "round_s", "peak_memory_mb"} <= set(second.data.metrics)
    sft_steps = client.get_metric_history(second.info.run_id, "sft_loss_per_batch")
    assert sorted(m.step for m in sft_steps) == [0, 1]
    assert len(client.get_metric_history(second.info.run_id, "router_kl_per_batch")) == 2
    names = {a.path for a in client.list_artifacts(second.info.run_id)}
    # the same names on every round, so MLflow's compare view lines the rounds up
    assert {"identified_experts.json", "expert_scores.csv", "expert_scores.json", "expert_scores.png"} <= names
    table = json.loads(open(client.download_artifacts(second.info.run_id, "identified_experts.json")).read())
    assert table["columns"] == ["round", "layer", "expert", "score", "rank"]
    assert {(row[1], row[2]) for row in table["data"]} == expected
    assert second.data.tags["checkpoint_dvc_md5"] == dvc_md5(out / "round_2")
    assert second.data.tags["checkpoint_kind"] == "delta"
    assert second.data.tags["checkpoint_base_sha256"] == meta["base"]["sha256"]
    assert int(second.data.tags["checkpoint_bytes"]) == sum(
        p.stat().st_size for p in (out / "round_2").iterdir())
    assert second.data.tags["experts"] == ",".join(f"L{l}_E{e}" for l, e in meta["identified_experts_per_round"]["2"]["experts"])
    check_prefect_run(run.data.tags["prefect_flow_run_id"], meta)
    name, version = run.data.tags["registered_model"].split("/")
    registered = client.get_model_version(name, version)
    assert registered.run_id == run_id and registered.source == (out / "final_model").resolve().as_uri()
    assert registered.tags["k"] == "3" and registered.tags["experts_round_2"] == run.data.tags["experts_round_2"]


def check_layout(client, run, meta, evaluated=False):
    """The rules that keep a parent run legible at a glance (issues #17 and #26)."""
    from tracking.run_names import run_name

    params, tags = meta["parameters"], run.data.tags
    assert run.info.run_name == run_name(params)
    assert run.info.run_name.startswith(f"{params['method']}-k{params['top_k_experts']}-s{params['seed']}")
    # a CPU run logs no system metrics unless asked to: their charts would open the compare page
    assert not [k for k in run.data.metrics if k.startswith("system/")]
    ours = list(run.data.metrics)
    assert len(ours) <= 70, sorted(ours)
    # every name in a chart section, none of the table's counts or intervals
    sections = {"headline", "before", "asr", "benign_refused", "refusal", "utility", "locality", "run", "training"}
    assert {k.split("/")[0] for k in ours} <= sections, sorted(ours)
    assert not [k for k in ours if k.endswith(("_n", "_ci_low", "_ci_high"))]
    for r, identified in meta["identified_experts_per_round"].items():
        assert tags[f"experts_round_{r}"] == ",".join(f"L{l}_E{e}" for l, e in identified["experts"])
        assert tags[f"experts_round_{r}"] in tags["mlflow.note.content"]
    assert tags["mlflow.source.name"] == "flows/surgery.py" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and len(tags["mlflow.source.git.commit"]) == 40
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "headline/" in experiment.tags["mlflow.note.content"]
    view = json.loads(json.loads(experiment.tags["mlflow.sharedViewState.surgery-summary"])["state"])
    columns = view["selectedColumns"]
    config = ["params.`method`", "params.`top_k_experts`", "params.`seed`"]
    experts = [f"tags.`experts_round_{r}`" for r in sorted(meta["identified_experts_per_round"], key=int)]
    # the first screen: mean ASR and mean benign refusal (each before beside after), the experts
    # per round; then the other headline figures, each before beside after; then the configuration
    headline = [k for k in ours if k.startswith("headline/")]
    first = [k for k in headline if k.removeprefix("headline/") in mlflow_runs.FIRST_SCREEN]
    if evaluated:
        assert {"headline/asr_mean", "headline/refused_worst", "headline/benign_loglik"} <= set(headline)
    heads = [c for name in first for c in (f"metrics.`before/{name}`", f"metrics.`{name}`")]
    assert columns[:len(heads) + len(experts)] == heads + experts
    columns = columns[len(heads) + len(experts):]
    n = 2 * (len(headline) - len(first))
    assert all(c.startswith("metrics.`before/headline/") for c in columns[:n:2])
    assert [c.replace("before/", "") for c in columns[:n:2]] == columns[1:n:2]
    assert columns[n:n + 3] == config
    if evaluated:
        for name in [k for k in ours if k.startswith(("asr/", "benign_refused/"))]:
            at = columns.index(f"metrics.`before/{name}`")
            assert columns[at + 1] == f"metrics.`{name}`"  # before beside after
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == ({"training", "evaluation"} if evaluated else {"training"})
    if evaluated:
        assert "Attack success (before -> after): asr_" in tags["mlflow.note.content"]
        for name in [k for k in ours if k.startswith(("asr/", "headline/"))]:
            history = client.get_metric_history(run.info.run_id, name)
            assert sorted(m.step for m in history) == list(range(len(meta["identified_experts_per_round"]) + 1))
            assert f"before/{name}" in ours
        assert "utility/benign_loglik_change" in ours
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"evaluation.json", "eval_samples.json", "safety_per_round.png"} <= artifacts
        assert not [a for a in artifacts if "round_" in a]  # one name for every round


def check_prefect_run(flow_run_id, meta):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    params = meta["parameters"]
    from tracking.run_names import run_name

    assert flow_run.name == run_name(params)  # the MLflow run's name
    names = {t.name for t in task_runs}
    assert {f"{step}-round-{r}" for step in ("score", "sft", "router", "checkpoint", "track")
            for r in (1, 2)} <= names
    tables = {a.key: json.loads(a.data) if isinstance(a.data, str) and a.type == "table" else a.data
              for a in artifacts}
    assert set(tables) == {"experts-round-1", "experts-round-2", "surgery-summary"}
    summary = tables["surgery-summary"]
    assert "## Experts repaired per round" in summary and "mlflow ui --backend-store-uri" in summary
    for r, identified in meta["identified_experts_per_round"].items():
        assert f"| {r} | " + ",".join(f"L{l}_E{e}" for l, e in identified["experts"]) in summary
    rows = tables["experts-round-2"]
    assert [[row["layer"], row["expert"]] for row in rows] == meta["identified_experts_per_round"]["2"]["experts"]


def test_per_batch_mode_without_router_training(tiny_dir, records_path, tmp_path):
    out = tmp_path / "out"
    assert train(tiny_dir, records_path, out, "--score_mode", "per_batch", "--skip_router_training",
                 "--engine_only") == 0
    meta = json.loads((out / "training_metadata.json").read_text())
    first = meta["identified_experts_per_round"]["1"]
    assert len(first["per_batch_experts"]) == 2 and "router_kl_before_after" not in first
    final = AutoModelForCausalLM.from_pretrained(out / "final_model")
    start = AutoModelForCausalLM.from_pretrained(tiny_dir)
    for new, old in zip(moe_layers(final), moe_layers(start)):
        assert torch.equal(new.router.weight, old.router.weight)


@pytest.fixture
def llama_dir(tmp_path, tokenizer):
    path = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("case, message", [
    ("non_moe", "LlamaForCausalLM (model_type='llama') is not a supported MoE architecture"),
    ("top_k", "top_k_experts: 17 is more than the 16 routed experts of OlmoeForCausalLM"),
    ("empty", "no records left after filtering"),
    ("lr", "expert_lr: must not be negative"),
    ("invalid", "2 problems in the dataset: "),
    ("fsdp_alone", "sharding: fsdp splits the model across processes; launch with `torchrun"),
    ("fsdp_per_batch", "sharding: fsdp needs score_mode accumulate"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(case, message, tiny_dir, llama_dir, records,
                                                        records_path, tmp_path, capsys, tracking_dir):
    out = tmp_path / "out"
    model, data, extra = tiny_dir, records_path, []
    if case == "non_moe":
        model = llama_dir
    elif case == "top_k":
        extra = ["--top_k_experts", "17"]
    elif case == "empty":
        data = tmp_path / "failed.json"
        data.write_text(json.dumps([dict(r, judge_success_gpt4=0) for r in records]))
    elif case == "lr":
        extra = ["--expert_lr", "-1"]
    elif case.startswith("fsdp"):
        extra = ["--sharding", "fsdp"] + (["--score_mode", "per_batch"] if case == "fsdp_per_batch" else [])
    elif case == "invalid":
        data = tmp_path / "invalid.json"
        data.write_text(json.dumps([records[0], {"goal": ""}]))
    assert train(model, data, out, *extra) == 2
    one_error_line(capsys, message)
    assert not out.exists()


def test_unreachable_tracking_server_fails_fast_or_falls_back(tiny_dir, records_path, tmp_path,
                                                              monkeypatch, capsys):
    import socket
    import time

    from tracking.mlflow_runs import DEFAULT_URI, ensure_reachable

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.time()
    assert train(tiny_dir, records_path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in err
    assert "--local_tracking" in err and time.time() - started < 30
    assert not (tmp_path / "out").exists()
    assert ensure_reachable(local_fallback=True, echo=lambda m: None) == DEFAULT_URI
    import os
    assert os.environ["MLFLOW_TRACKING_URI"] == DEFAULT_URI
