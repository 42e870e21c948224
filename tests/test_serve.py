"""Scheduled and triggered runs against a real `prefect server` on 127.0.0.1."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(url + path, data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"},
                                     method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-server")),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)

    def healthy():
        try:
            return api(url, "/health")
        except OSError:
            return False
    try:
        wait_for(healthy, 120, "prefect server")
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_served_pipeline_runs_on_schedule_and_on_new_datasets(prefect_server, tiny_dir,
                                                              records_path, tmp_path):
    params = {"train": {"model_name": str(tiny_dir), "dataset_path": str(records_path),
                        "output_dir": str(tmp_path / "out"), "num_rounds": 1, "top_k_experts": 2,
                        "max_samples": 4, "batch_size": 4, "overwrite": True},
              "schedule": {"cron": "0 3 * * *"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "ph"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    served = subprocess.Popen([str(BIN / "unsafe-experts"), "serve", "--params", "params.yaml"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deployment = wait_for(lambda: _deployment(prefect_server), 120, "the deployment")
        assert deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        assert deployment["global_concurrency_limit"]["limit"] == 1
        # the schedule: the scheduler service creates upcoming runs
        scheduled = wait_for(lambda: [r for r in _runs(prefect_server, deployment["id"])
                                      if r["state_type"] == "SCHEDULED"], 90, "scheduled runs")
        assert all(r["expected_start_time"][11:16] == "03:00" for r in scheduled)

        # the trigger: validating a dataset announces it, and a run on it follows
        new = tmp_path / "new.json"
        new.write_text(records_path.read_text())
        out = subprocess.run([str(BIN / "unsafe-experts"), "validate", str(new)], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "announced to Prefect" in out.stdout
        done = wait_for(lambda: [r for r in _runs(prefect_server, deployment["id"])
                                 if r["state_type"] == "COMPLETED"], 240, "the triggered run")
        assert done[0]["parameters"]["dataset_path"] == str(new.resolve())
        outputs = list(tmp_path.glob("out-*"))
        assert len(outputs) == 1 and (outputs[0] / "final_model").is_dir()
    finally:
        os.killpg(served.pid, 15)
        served.wait(timeout=30)


def _deployment(url):
    try:
        return api(url, "/deployments/name/pipeline-run/unsafe-experts")
    except OSError:
        return None


def _runs(url, deployment_id):
    return api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})


def test_prefect_yaml_deploys_to_a_process_work_pool(prefect_server, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "ph")}
    for args in (["work-pool", "create", "unsafe-experts", "--type", "process"],
                 ["--no-prompt", "deploy", "--all"]):
        done = subprocess.run([str(BIN / "prefect"), *args], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
    deployment = _deployment(prefect_server)
    assert deployment["entrypoint"] == "flows/serve.py:pipeline_run"
    assert deployment["parameters"] == {"params_path": "params.yaml"}
    assert deployment["global_concurrency_limit"]["limit"] == 1
