"""The MLflow Model Registry on a local store (SQLite in tmp_path): a finished run's final model
becomes a version with its tags, `models:/NAME/VERSION` loads back the same weights, whether
the run logged the model or not, a final model that changed after its run is refused, and a
registry that fails costs seconds and never the run. Against a real `mlflow server` (slow): a
run made without --log_model is uploaded, a delta final model materialized, and the version
downloads and loads."""
import http.server
import shutil
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import free_port, mlflow_server, one_error_line, stop_server
from mlflow.artifacts import download_artifacts
from transformers import AutoModelForCausalLM

from cli.main import main
from tracking import mlflow_runs, registry
from tracking.digests import dvc_md5
from unsafe_experts.artefacts.checkpoints import load_checkpoint
from unsafe_experts.artefacts.deltas import MANIFEST
from unsafe_experts.config import TrainConfig
from unsafe_experts.surgery import run_surgery


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


def finished_run(final_model, log_model=False, digest=True, experiment="registry") -> str:
    """A parent run as the surgery flow leaves it: params, digests, experts, the evaluation's
    figures with the rounds as steps and `<figure>_before` beside them (`digest=False`: a run
    from before final_model_dvc_md5 was logged)."""
    run_id = mlflow_runs.start_run(experiment, "gradient-k2-s42",
                                {"method": "gradient", "top_k_experts": 2, "num_rounds": 1,
                                 "model_name": "tiny-olmoe"}, {"data_dvc_md5": "d" * 32})
    mlflow_runs.log_tags(run_id, {"final_model": str(final_model), "experts_round_1": "L0_E3,L1_E5",
                               "mlflow.note.content": "repaired"})
    if digest:
        mlflow_runs.log_tags(run_id, {"final_model_dvc_md5": dvc_md5(final_model)})
    mlflow_runs.log_metrics(run_id, {"asr_flip_chars": 0.95, "over_refusal": 0.0}, step=0)
    mlflow_runs.log_metrics(run_id, {"asr_flip_chars": 0.10, "over_refusal": 0.125}, step=1)
    mlflow_runs.log_metrics(run_id, {"asr_flip_chars_before": 0.95, "over_refusal_before": 0.0,
                                  "rounds": 1, "benign_loglik_change": -0.2})
    if log_model:
        mlflow_runs.log_dir(run_id, final_model, "final_model")
    mlflow_runs.end_run(run_id)
    return run_id


def run_tags(final_model) -> dict:
    """The version tags of a run finished_run made."""
    return {"method": "gradient", "k": "2", "rounds": "1", "base_model": "tiny-olmoe",
            "data_dvc_md5": "d" * 32, "final_model_dvc_md5": dvc_md5(final_model),
            "experts_round_1": "L0_E3,L1_E5",
            "asr_flip_chars_before": "0.95", "asr_flip_chars_after": "0.1",
            "over_refusal_before": "0", "over_refusal_after": "0.125"}


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
    assert version.tags == run_tags(tiny_dir)
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


def test_a_final_model_changed_after_its_run_is_refused(store, tiny_dir, capsys):
    """A later run (`dvc exp run`) overwrote the folder: its weights are not the run's, and
    registering them under the run's tags would mislabel them."""
    folder = store / "changed-run" / "final_model"
    shutil.copytree(tiny_dir, folder)
    run_id = finished_run(folder)
    recorded = dvc_md5(folder)
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")
    capsys.readouterr()
    assert main(["register", run_id, "--name", "changed"]) == 2
    err = one_error_line(capsys, f"{folder}: ")
    assert recorded in err and dvc_md5(folder) in err and "changed after run" in err
    assert not mlflow_runs.client().search_registered_models("name = 'changed'")
    assert "registered_model" not in mlflow_runs.client().get_run(run_id).data.tags


def test_a_run_without_a_recorded_digest_is_registered_with_a_warning(store, tiny_dir):
    run_id = finished_run(tiny_dir, digest=False)
    with pytest.warns(UserWarning, match=f"recorded no final_model_dvc_md5.*{dvc_md5(tiny_dir)}"):
        done = registry.register_run("undigested", run_id)
    version = mlflow_runs.client().get_model_version("undigested", str(done["version"]))
    assert version.run_id == run_id and "final_model_dvc_md5" not in version.tags


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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on loopback (SQLite store, artifacts proxied to a folder of its
    own), as a team runs it."""
    path = tmp_path_factory.mktemp("registry-server")
    port = free_port()
    process = mlflow_server(port, f"sqlite:///{path / 'server.db'}",
                            "--artifacts-destination", str(path / "artifacts"))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)


def delta_run(tiny_dir, records_path, out):
    """A surgery whose final_model/ is a delta against tiny_dir."""
    cfg = TrainConfig(model_name=str(tiny_dir), dataset_path=str(records_path), output_dir=str(out),
                      num_rounds=1, top_k_experts=2, batch_size=4, max_samples=4, retention="none",
                      final_checkpoint="delta")
    run_surgery(cfg, progress=False, echo=lambda *a: None)
    return out / "final_model"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "delta"])
@pytest.mark.parametrize("artifacts", ["server", "local"])
def test_a_run_without_log_model_is_uploaded_to_a_server_and_loads_back(
        server, tiny_dir, records_path, tmp_path, monkeypatch, capsys, kind, artifacts):
    """`register` against a tracking server, for a run made without --log_model: the server
    refuses a local path as a version's source, so the final model becomes the run's
    `final_model` artifact (materialized first when it is a delta) and the version points
    there. `artifacts`: the experiment's artifact root is the server's (mlflow-artifacts:/, an
    experiment someone created on the server) or the project's (mlruns/ where the run ran)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.chdir(tmp_path)
    experiment = f"registry-{kind}-{artifacts}"
    if artifacts == "server":
        mlflow_runs.client().create_experiment(experiment)
    final = tiny_dir if kind == "full" else delta_run(tiny_dir, records_path, tmp_path / "out")
    run_id = finished_run(final, experiment=experiment)
    name = f"uploaded-{kind}-{artifacts}"
    capsys.readouterr()
    assert main(["register", run_id, "--name", name]) == 0, capsys.readouterr().err
    assert f"registered model {name} version 1: models:/{name}/1" in capsys.readouterr().out
    client = mlflow_runs.client()
    version = client.get_model_version(name, "1")
    run = client.get_run(run_id)
    expected = {**run_tags(final), **({"materialized_from_delta": "true"} if kind == "delta" else {})}
    assert version.run_id == run_id and version.tags == expected and version.description == "repaired"
    assert version.source == f"{run.info.artifact_uri}/final_model"
    assert client.get_run(run_id).data.tags["registered_model"] == f"{name}/1"
    if artifacts == "server":
        assert version.source.startswith("mlflow-artifacts:")
    # as a teammate's process does: `models:/` resolves through mlflow's process-wide URI (its
    # registry_uri argument is not passed on to the registry lookup in MLflow 3.17)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server)
    try:
        loaded = download_artifacts(artifact_uri=f"models:/{name}/1", dst_path=str(tmp_path / "pulled"))
    finally:
        mlflow.set_tracking_uri(previous)
    assert not (Path(loaded) / MANIFEST).exists()  # a full checkpoint either way
    model, _ = load_checkpoint(loaded)
    reference, _ = load_checkpoint(final)
    want = reference.state_dict()
    assert model.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    if kind == "delta":  # the surgery changed something: the base's weights are not what loaded
        assert not same_weights(loaded, tiny_dir)


@pytest.mark.slow
def test_an_upload_cut_short_is_redone_and_a_moved_base_is_named(server, tiny_dir, records_path,
                                                                 tmp_path, monkeypatch, capsys):
    """A run whose upload stopped half way (its tag says started) is uploaded again, not
    registered half; a delta whose base moved is one error line until --base names it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.chdir(tmp_path)
    half = finished_run(tiny_dir, experiment="registry-half")
    client = mlflow_runs.client()
    client.log_artifact(half, str(tiny_dir / "config.json"), "final_model")
    mlflow_runs.log_tags(half, {registry.UPLOAD_TAG: "started"})
    done = registry.register_run("half", half)
    assert client.get_run(half).data.tags[registry.UPLOAD_TAG] == "done"
    names = {Path(f.path).name for f in client.list_artifacts(half, "final_model")}
    assert names == {p.name for p in tiny_dir.iterdir()}
    assert registry.register_run("half", half)["source"] == done["source"]  # no second upload

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    final = delta_run(base, records_path, tmp_path / "out")
    run_id = finished_run(final, experiment="registry-half")
    base.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["register", run_id, "--name", "moved"]) == 2
    one_error_line(capsys, "register --base BASE")
    assert not client.search_registered_models("name = 'moved'")
    assert main(["register", run_id, "--name", "moved", "--base", str(tmp_path / "moved")]) == 0
    assert client.get_model_version("moved", "1").tags["materialized_from_delta"] == "true"


@pytest.mark.slow
def test_train_register_model_without_log_model_registers_on_a_server(server, tiny_dir, tmp_path,
                                                                       monkeypatch, recwarn):
    """What `train --register_model NAME` (no --log_model) runs at the end of a pipeline run,
    against a server: register_after_run, through the same upload as `register`, so the run's
    own registration succeeds, and the recovery its warning would suggest is the command the
    test above shows working. Both used to fail: the server refuses a local path as a source."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.chdir(tmp_path)
    run_id = finished_run(tiny_dir, experiment="registry-after-run")
    done = registry.register_after_run("after-run", run_id)
    assert "error" not in done and done["version"] == 1, done
    assert not [w for w in recwarn if "registering the final model" in str(w.message)]
    client = mlflow_runs.client()
    assert client.get_run(run_id).data.tags["registered_model"] == "after-run/1"
    assert client.get_model_version("after-run", "1").source.endswith("/final_model")
