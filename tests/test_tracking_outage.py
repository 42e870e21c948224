"""A tracking server that answers its health check but fails every API call: the run ends in
seconds with one error line, not after minutes of retries."""
import http.server
import threading
import time

import pytest
from conftest import free_port, mlflow_server, stop_server

from cli.main import main

pytestmark = pytest.mark.slow  # a whole flow against a failing server


class Failing(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        healthy = self.path.rstrip("/").endswith("/health")
        self.send_response(200 if healthy else 503)
        self.end_headers()
        self.wfile.write(b"OK" if healthy else b"unavailable")

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, *args):
        pass


def test_a_failing_tracking_server_is_one_error_in_seconds(tiny_dir, records_path, tmp_path,
                                                           monkeypatch, capsys, prefect_harness):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_port}")
    started = time.time()
    try:
        code = main(["train", "--model_name", str(tiny_dir), "--dataset_path", str(records_path),
                     "--output_dir", str(tmp_path / "out"), "--num_rounds", "1", "--top_k_experts", "2",
                     "--max_samples", "4", "--batch_size", "4", "--quiet"])
    finally:
        server.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: MLflow tracking failed")
    assert time.time() - started < 120


def test_a_tracking_server_lost_mid_run_fails_it_in_seconds_and_it_resumes_when_back(
        tiny_dir, records_path, tmp_path, monkeypatch, capsys, prefect_harness):
    import json

    from unsafe_experts import surgery as surgery_module

    port = free_port()
    store = f"sqlite:///{tmp_path / 'tracking.db'}"
    server = mlflow_server(port, store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)  # the experiment's artifacts (mlruns/) land here
    checkpoint, lost = surgery_module.Surgery.checkpoint, {}

    def checkpoint_then_lose_the_server(self, r):
        path = checkpoint(self, r)
        if r == 1:  # round 1 is on disk and in the metadata: the server goes away
            stop_server(server)
            lost["at"] = time.time()
        return path

    monkeypatch.setattr(surgery_module.Surgery, "checkpoint", checkpoint_then_lose_the_server)
    out = tmp_path / "out"
    args = ["train", "--model_name", str(tiny_dir), "--dataset_path", str(records_path),
            "--output_dir", str(out), "--num_rounds", "2", "--top_k_experts", "2",
            "--max_samples", "4", "--batch_size", "4", "--quiet"]
    try:
        assert main(args) == 2
        failed_after = time.time() - lost["at"]
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: MLflow tracking failed")
        meta = json.loads((out / "training_metadata.json").read_text())
        assert meta["status"] == "failed" and list(meta["identified_experts_per_round"]) == ["1"]
        assert failed_after < 120, f"the run took {failed_after:.0f} s to give up"

        monkeypatch.setattr(surgery_module.Surgery, "checkpoint", checkpoint)
        server = mlflow_server(port, store)  # tracking is back: the same command resumes
        assert main(args) == 0
        meta = json.loads((out / "training_metadata.json").read_text())
        assert meta["status"] == "completed" and meta["resumed"][0]["after_round"] == 1
    finally:
        stop_server(server)
