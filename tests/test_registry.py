"""The MLflow Model Registry on a local store (SQLite in tmp_path): a finished run's final model
becomes a version with its tags, `models:/NAME/VERSION` loads back the same weights, whether
the run logged the model or not, and a registry that fails costs seconds and never the run."""
import http.server
import threading
import time

import mlflow
import pytest
import torch
from conftest import one_error_line
from mlflow.artifacts import download_artifacts
from transformers import AutoModelForCausalLM

from cli.main import main
from tracking import mlflow_runs, registry
from tracking.digests import dvc_md5


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module (creating an MLflow database takes seconds); each test
    registers its own model name."""
    path = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    # also mlflow's process-wide URI, which `models:/` downloads read and which an earlier test
    # in this process may have set (comparison/tables.py sets it)
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", uri)
            patch.chdir(path)  # the experiment's artifacts (mlruns/) land here
            yield path
    finally:
        mlflow.set_tracking_uri(previous)


def finished_run(final_model, log_model=False) -> str:
    """A parent run as the surgery flow leaves it: params, digests, experts, the evaluation's
    figures with the rounds as steps and `<figure>_before` beside them."""
    run_id = mlflow_runs.start_run("registry", "gradient-k2-s42",
                                {"method": "gradient", "top_k_experts": 2, "num_rounds": 1,
                                 "model_name": "tiny-olmoe"}, {"data_dvc_md5": "d" * 32})
    mlflow_runs.log_tags(run_id, {"final_model": str(final_model), "final_model_dvc_md5": dvc_md5(final_model),
                               "experts_round_1": "L0_E3,L1_E5", "mlflow.note.content": "repaired"})
    mlflow_runs.log_metrics(run_id, {"asr_flip_chars": 0.95, "over_refusal": 0.0}, step=0)
    mlflow_runs.log_metrics(run_id, {"asr_flip_chars": 0.10, "over_refusal": 0.125}, step=1)
    mlflow_runs.log_metrics(run_id, {"asr_flip_chars_before": 0.95, "over_refusal_before": 0.0,
                                  "rounds": 1, "benign_loglik_change": -0.2})
    if log_model:
        mlflow_runs.log_dir(run_id, final_model, "final_model")
    mlflow_runs.end_run(run_id)
    return run_id


def same_weights(a, b) -> bool:
    left = AutoModelForCausalLM.from_pretrained(a).state_dict()
    right = AutoModelForCausalLM.from_pretrained(b).state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("log_model", [False, True])
def test_a_run_becomes_a_version_that_loads_back(store, tiny_dir, log_model):
    name = f"repaired-olmoe-{log_model}"
    run_id = finished_run(tiny_dir, log_model)
    done = registry.register_after_run(name, run_id)
    assert done["version"] == 1
    client = mlflow_runs.client()  # the store of this module, whatever URI another test set globally
    version = client.get_model_version(name, "1")
    assert version.run_id == run_id and version.description == "repaired"
    assert version.tags == {
        "method": "gradient", "k": "2", "rounds": "1", "base_model": "tiny-olmoe",
        "data_dvc_md5": "d" * 32, "final_model_dvc_md5": dvc_md5(tiny_dir),
        "experts_round_1": "L0_E3,L1_E5",
        "asr_flip_chars_before": "0.95", "asr_flip_chars_after": "0.1",
        "over_refusal_before": "0", "over_refusal_after": "0.125"}
    # no copy: the logged artifact itself, or the run's own directory
    artifacts = client.get_run(run_id).info.artifact_uri
    assert version.source == (f"{artifacts}/final_model" if log_model else tiny_dir.resolve().as_uri())
    assert client.get_run(run_id).data.tags["registered_model"] == f"{name}/1"
    client.set_registered_model_alias(name, "approved", "1")  # as docs/operations.md shows
    uri = f"models:/{name}@approved" if log_model else f"models:/{name}/1"
    loaded = download_artifacts(artifact_uri=uri, dst_path=str(store / f"pulled-{log_model}"))
    assert same_weights(loaded, tiny_dir)


def test_a_second_run_is_the_next_version(store, tiny_dir, capsys):
    registry.register_run("repaired", finished_run(tiny_dir))
    run_id = finished_run(tiny_dir)
    assert main(["register", run_id, "--name", "repaired"]) == 0
    assert "registered model repaired version 2: models:/repaired/2" in capsys.readouterr().out
    assert sorted(int(v.version) for v in mlflow_runs.client().search_model_versions("name = 'repaired'")) == [1, 2]


def test_what_cannot_be_registered_is_one_error_line(store, tiny_dir, capsys):
    unfinished = mlflow_runs.start_run("registry", "running", {"method": "gradient"}, {})
    finished = finished_run(tiny_dir)
    capsys.readouterr()  # MLflow's own log lines on creating the store
    assert main(["register", "0" * 32, "--name", "repaired"]) == 2
    one_error_line(capsys, "no MLflow run " + "0" * 32)
    assert main(["register", unfinished, "--name", "repaired"]) == 2
    one_error_line(capsys, "has no final model")
    assert main(["register", finished, "--name", "team/repaired"]) == 2
    one_error_line(capsys, "contain no '/' or ':'")
    assert not mlflow_runs.client().search_registered_models("name LIKE '%/%'")


class Unavailable(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503)
        self.end_headers()

    do_POST = do_PATCH = do_GET

    def log_message(self, *args):
        pass


def test_a_registry_that_fails_is_reported_in_seconds_and_raises_nothing(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_port}")
    started = time.time()
    try:
        with pytest.warns(UserWarning, match="the run is intact"):
            done = registry.register_after_run("repaired", "a" * 32)
    finally:
        server.shutdown()
    assert done["name"] == "repaired" and "error" in done and "version" not in done
    assert time.time() - started < 60
