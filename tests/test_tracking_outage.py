"""A tracking server that answers its health check but fails every API call: the run ends in
seconds with one error line, not after minutes of retries."""
import http.server
import threading
import time

import pytest

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
