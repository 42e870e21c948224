"""The newcomer's path (issue #26): the MLflow address `make demo` prints opens the saved runs
view, and its first screen shows mean ASR and mean benign refusal in attack formats, before
beside after, and the experts of each round, without scrolling. Checked in headless Chromium
through Playwright when both are installed (`apt-get install chromium`, `pip install
playwright==1.65.2`; neither is a requirement of the project): skipped otherwise."""
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import mlflow_screenshots  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None or shutil.which("chromium") is None,
                       reason="needs Playwright and Chromium (apt-get install chromium)"),
]


def test_the_first_screen_of_the_saved_view_shows_what_a_newcomer_needs(small_organism, tmp_path, tracking_dir,
                                                                        capsys):
    from flows.surgery import surgery_flow

    train = {"model_name": str(small_organism / "model"),
             "dataset_path": str(small_organism / "surgery_records.json"), "output_dir": str(tmp_path / "out"),
             "num_rounds": 3, "top_k_experts": 4, "expert_lr": 1e-3, "router_lr": 1e-3, "max_samples": 16}
    evaluation = {"eval_set": str(small_organism / "eval_set.json"), "limit": 4, "max_new_tokens": 8}
    surgery_flow(train, experiment="newcomer-view", progress=False, evaluation=evaluation,
                 evaluation_path=str(tmp_path / "m/evaluation.json"))
    store = f"sqlite:///{tracking_dir / 'mlflow.db'}"
    args = ["--backend-store-uri", store, "--experiment", "newcomer-view", "--check_view", "--settle_s", "2"]
    assert mlflow_screenshots.main([*args, "--size", "1920,1080"]) == 0
    seen = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()
                if line.startswith(("metrics.", "tags.")))  # the check's lines, not the flow's
    assert set(seen) == {"metrics.`before/headline/asr_mean`", "metrics.`headline/asr_mean`",
                         "metrics.`before/headline/refused_mean`", "metrics.`headline/refused_mean`",
                         "tags.`experts_round_1`", "tags.`experts_round_2`", "tags.`experts_round_3`"}
    assert set(seen.values()) == {"visible"}
    # the check can fail: in a small window the experts are off screen, and it says where
    assert mlflow_screenshots.main([*args, "--size", "1000,700"]) == 1
    assert "off screen (x " in capsys.readouterr().out
