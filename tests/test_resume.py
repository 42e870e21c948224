"""A run killed mid-way and started again with the same command resumes after its last
completed round and ends exactly where an uninterrupted run ends."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cli.main import main

pytestmark = pytest.mark.slow  # runs killed in a subprocess and resumed


def command(tiny_dir, records_path, out):
    return ["train", "--model_name", str(tiny_dir), "--dataset_path", str(records_path),
            "--output_dir", str(out), "--num_rounds", "3", "--top_k_experts", "3", "--batch_size", "4",
            "--max_samples", "12", "--expert_lr", "1e-3", "--router_lr", "1e-3", "--sft_epochs", "2",
            "--quiet", "--engine_only"]


@pytest.fixture(scope="module")
def reference(tiny_dir, records_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert main(command(tiny_dir, records_path, out)) == 0
    return out


def wait_for(predicate, process, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.02)


def rounds_recorded(out):
    try:
        return len(json.loads((out / "training_metadata.json").read_text())["identified_experts_per_round"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("sig, when", [(signal.SIGKILL, "inside round 2"),
                                       (signal.SIGKILL, "after round 2"),
                                       (signal.SIGTERM, "as round 1's checkpoint lands")])
def test_killed_run_resumes_to_the_same_result(sig, when, tiny_dir, records_path, tmp_path, reference):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "cli", *command(tiny_dir, records_path, out)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if when == "inside round 2":
        wait_for(lambda: rounds_recorded(out) >= 1, process)
    elif when == "after round 2":  # round 3 then starts from the base and two deltas
        wait_for(lambda: rounds_recorded(out) >= 2, process)
    else:
        wait_for(lambda: (out / "round_1").exists(), process)
    process.send_signal(sig)
    process.wait(timeout=60)
    assert not (out / "final_model").exists()

    assert main(command(tiny_dir, records_path, out)) == 0  # the same command again
    meta = json.loads((out / "training_metadata.json").read_text())
    expected = json.loads((reference / "training_metadata.json").read_text())
    assert meta["status"] == "completed" and meta["resumed"][0]["after_round"] in (0, 1, 2)
    if when == "after round 2":
        assert meta["resumed"][0]["after_round"] == 2
        assert sorted(p.name for p in (out / "round_2").iterdir()) == ["delta.json", "delta.safetensors"]
    assert ({r: v["experts"] for r, v in meta["identified_experts_per_round"].items()}
            == {r: v["experts"] for r, v in expected["identified_experts_per_round"].items()})
    ours = load_file(out / "final_model" / "model.safetensors")
    theirs = load_file(reference / "final_model" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [x for x in meta["training_logs"] if x["round"] == 3] == \
        [x for x in expected["training_logs"] if x["round"] == 3]


def _children(pid: int) -> set[int]:
    found = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found |= {int(x) for x in f.read().split()}
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _tracked_run(tiny_dir, records_path, tmp_path):
    """`train` through the pipeline in a subprocess, with the temporary Prefect server the CLI
    starts (no PREFECT_API_URL) and its own MLflow store; returns the process and output_dir."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(tmp_path / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    args = [a for a in command(tiny_dir, records_path, out) if a != "--engine_only"]
    process = subprocess.Popen([sys.executable, "-m", "cli", *args], env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, out


def test_sigterm_stops_the_temporary_prefect_server_and_records_the_failure(tiny_dir, records_path, tmp_path):
    process, out = _tracked_run(tiny_dir, records_path, tmp_path)
    wait_for(lambda: rounds_recorded(out) >= 1, process, timeout=300)  # the flow is running
    servers = _children(process.pid)
    assert servers, "no temporary server process was found"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.time() + 30
    while any(_alive(p) for p in servers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in servers), "the temporary Prefect server outlived the run"
    assert json.loads((out / "training_metadata.json").read_text())["status"] == "failed"


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode() for a in f.read().split(b"\0") if a]
    except FileNotFoundError:
        return []


def _server_port(pid: int) -> int | None:
    """The port of Prefect's API server among this process's children, once it answers /health."""
    import urllib.request

    for child in _children(pid):
        args = _cmdline(child)
        if "uvicorn" in args and "--port" in args:
            port = int(args[args.index("--port") + 1])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    return port if r.status == 200 else None
            except OSError:
                return None
    return None


def test_sigkill_takes_the_temporary_prefect_server_with_it(tiny_dir, records_path, tmp_path):
    # a process killed outright runs no `finally` and no atexit: only the kernel can stop the
    # server it started, so the server must have asked it to
    process, out = _tracked_run(tiny_dir, records_path, tmp_path)
    servers = set()
    try:
        wait_for(lambda: _server_port(process.pid), process, timeout=300)  # the server answers
        servers = {p for p in _children(process.pid) if "uvicorn" in _cmdline(p)}
        assert servers
        process.kill()
        process.wait(timeout=60)
        deadline = time.time() + 10
        while any(_alive(p) for p in servers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in servers), "the temporary Prefect server outlived the killed run"
    finally:
        process.kill()
        for p in servers:  # on a failure, do not leave the server behind for the next test
            if _alive(p):
                os.kill(p, signal.SIGKILL)
