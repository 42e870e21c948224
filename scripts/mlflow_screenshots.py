"""Screenshots of the MLflow UI for a store: the experiment's run table, the newest parent run
(overview, metrics, artifacts) and its first round run, taken with headless Chromium.

    python scripts/mlflow_screenshots.py --backend-store-uri sqlite:///mlflow.db \\
        --experiment unsafe-experts --out screenshots/

Starts `mlflow ui` on 127.0.0.1 on a free port, waits for it, and stops it at the end. Needs a
`chromium` (Debian: `apt-get install chromium`) or `google-chrome` on PATH; nothing else.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, seconds: float = 90) -> None:
    end = time.time() + seconds
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {seconds:.0f} s")


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    raise SystemExit("no chromium on PATH (apt-get install chromium)")


def shoot(url: str, path: Path, size: str, wait_ms: int) -> None:
    subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", f"--virtual-time-budget={wait_ms}",
                    f"--screenshot={path}", url], check=True, capture_output=True, timeout=120)
    print(f"{path}: {url}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend-store-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    p.add_argument("--experiment", default="unsafe-experts")
    p.add_argument("--out", default="screenshots")
    p.add_argument("--size", default="1400,1000")
    p.add_argument("--wait_ms", type=int, default=20000, help="virtual time the page gets to render")
    args = p.parse_args(argv)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=args.backend_store_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {args.backend_store_uri}")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    rounds = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                    key=lambda r: r.info.run_name)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                               args.backend_store_uri, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait(f"{base}/health")
        exp, run = experiment.experiment_id, parent.info.run_id
        pages = {"experiment": f"{base}/#/experiments/{exp}",
                 "parent_run": f"{base}/#/experiments/{exp}/runs/{run}",
                 "parent_metrics": f"{base}/#/experiments/{exp}/runs/{run}/model-metrics",
                 "parent_artifacts": f"{base}/#/experiments/{exp}/runs/{run}/artifacts/expert_scores.png"}
        if rounds:
            first = rounds[0].info.run_id
            pages["round_run"] = f"{base}/#/experiments/{exp}/runs/{first}"
            pages["round_metrics"] = f"{base}/#/experiments/{exp}/runs/{first}/model-metrics"
        for name, url in pages.items():
            # MLflow 3.17's UI takes the GenAI-or-model-training view from a global switch
            # (default GenAI), not from the experiment's mlflow.experimentKind tag; the URL sets it
            shoot(f"{url}?workflowType=machine_learning", out / f"{name}.png", args.size, args.wait_ms)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers, started above
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
