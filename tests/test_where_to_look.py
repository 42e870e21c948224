"""The last lines of `make demo`: where each result opens, with this store's MLflow address."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import where_to_look  # noqa: E402


def test_the_mlflow_address_opens_this_stores_surgery_view(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from tracking import mlflow_runs

    assert "no MLflow experiment 'unsafe-experts'" in "\n".join(where_to_look.lines("unsafe-experts"))
    mlflow_runs.client().create_experiment("other")
    exp_id = mlflow_runs.client().create_experiment("unsafe-experts")
    text = "\n".join(where_to_look.lines("unsafe-experts"))
    assert (f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey=surgery-summary") in text
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in text
    assert "prefect server start" in text and "unsafe-experts report outputs/gradient" in text
