"""`dvc metrics show` of the surgery's headline reads at 120 columns, and an experiment's
headline figures reach `dvc exp show` and `dvc metrics diff` (issue #26): on a tiny DVC repo
whose stage declares the train stage's metrics as dvc.yaml does, with the project's
.gitignore, and writes them with the pipeline's own writer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # runs DVC and git

# the stage: an evaluation before and after surgery whose attack success after is a parameter,
# through tracking.mlflow_runs.write_headline_files as flows/surgery.py calls it
WRITER = """
import yaml
from tracking import mlflow_runs

asr = yaml.safe_load(open("params.yaml"))["train"]["asr_after"]
def stage(asr, refused):
    return {**{f"asr_{f}": {"value": asr} for f in ("flip_chars", "persona", "refusal_suppression")},
            **{f"over_refusal_{f}": {"value": refused} for f in ("flip_chars", "persona", "refusal_suppression")},
            "plain_refusal": {"value": 0.9583333333333334}, "over_refusal": {"value": 0.0},
            "benign_loglik": {"value": -5.954540401697159}}
evaluations = {"before": stage(1.0, 0.020833333333333332), "round_3": stage(asr, 0.4583333333333333)}
mlflow_runs.write_headline_files("metrics", mlflow_runs.compact_evaluation(evaluations), "flip_chars")
"""


def run(cwd, *cmd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_headline_reads_at_120_columns_and_experiments_compare(tmp_path):
    train = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    headline = [next(iter(m)) for m in train["metrics"]]
    assert headline == ["metrics/before.json", "metrics/after.json"]
    git = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
    run(tmp_path, "git", "init", "-q")
    run(tmp_path, "dvc", "init", "-q")
    (tmp_path / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    (tmp_path / "write.py").write_text(WRITER)
    (tmp_path / "params.yaml").write_text("train:\n  asr_after: 0.020833333333333332\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": f"{sys.executable} write.py", "deps": ["write.py"], "params": ["train"],
        "metrics": train["metrics"]}}}))
    run(tmp_path, "dvc", "repro", "-q")
    # git tracks the headline (the rest of metrics/ stays ignored), so commits carry it
    assert run(tmp_path, "git", "check-ignore", "-v", "--no-index", "metrics/train.json").strip()
    run(tmp_path, "git", "add", "-A")
    assert set(headline) <= set(run(tmp_path, "git", "diff", "--cached", "--name-only").split())
    run(tmp_path, *git, "commit", "-qm", "baseline")

    shown = run(tmp_path, "dvc", "metrics", "show")
    lines = shown.strip().splitlines()
    assert len(lines) == 3 and all(len(line) < 120 for line in lines), shown
    assert lines[0].split() == ["Path", "asr_mean", "asr_surgery", "benign_loglik", "plain_refusal",
                                "refused_mean", "refused_worst"]
    assert lines[1].split()[:3] == ["metrics/before.json", "1.0", "1.0"]

    run(tmp_path, "dvc", "exp", "run", "-q", "-S", "train.asr_after=0.25", "--name", "variant")
    table = json.loads(run(tmp_path, "dvc", "exp", "show", "--json"))
    # the workspace, the baseline commit, and the experiments under it
    rows = [r for top in table for r in [top] + [e for x in top.get("experiments") or [] for e in x["revs"]]]

    def after(row):
        return row["data"]["metrics"]["metrics/after.json"]["data"]["asr_mean"]
    values = {row.get("name") or row["rev"]: after(row) for row in rows if row["rev"] != "workspace"}
    assert len(values) == 2 and values.pop("variant") == 0.25, values
    assert list(values.values()) == [pytest.approx(0.020833333333333332)]  # the baseline's
    diff = json.loads(run(tmp_path, "dvc", "metrics", "diff", "HEAD", "variant", "--json"))
    change = diff["metrics/after.json"]["asr_mean"]
    assert change["old"] == pytest.approx(0.020833333333333332) and change["new"] == 0.25
