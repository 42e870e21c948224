"""scripts/contrast_weights.py: the contrastive score's picks at other weights, from a run's two
recorded score tables (hand-made tables)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import contrast_weights  # noqa: E402


def run_folder(tmp_path, harm, benign, picked=2):
    run = tmp_path / "organism" / "contrastive-k2"
    run.mkdir(parents=True)
    first = {"experts": [[0, 0]] * picked, "contrast_harm": harm, "contrast_benign": benign}
    (run / "training_metadata.json").write_text(json.dumps({"identified_experts_per_round": {"1": first}}))
    return run


def test_picks_per_weight_against_the_plain_gradient(tmp_path):
    # A carries harm and benign alike; B harm only; C a little of both; D nothing
    harm = {"A": 4.0, "B": 3.0, "C": 1.0, "D": 0.0}     # mean 2
    benign = {"A": 4.0, "B": 0.0, "C": 0.0, "D": 0.0}   # mean 1
    table = contrast_weights.weights_table(run_folder(tmp_path, harm, benign), weights=(0.0, 1.0, 2.0))
    rows = table.set_index("weight")
    # w 0: A 2, B 1.5 -> A B; w 1: A 2-4 = -2, B 1.5, C 0.5 -> B C; w 2: the same
    assert rows.loc[0.0, "picks"] == "A B" and rows.loc[1.0, "picks"] == "B C" and rows.loc[2.0, "picks"] == "B C"
    assert list(rows["shared_with_gradient"]) == [2, 1, 1]
    assert rows.loc[1.0, "harm_of_picks"] == pytest.approx((1.5 + 0.5) / 2)
    assert rows.loc[1.0, "benign_of_picks"] == pytest.approx(0.0)
    assert rows.loc[0.0, "run"] == "organism/contrastive-k2"


def test_a_run_without_the_tables_is_one_error_line(tmp_path, capsys):
    run = tmp_path / "organism" / "gradient"
    run.mkdir(parents=True)
    (run / "training_metadata.json").write_text(json.dumps({"identified_experts_per_round": {"1": {"experts": []}}}))
    assert contrast_weights.main([str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no contrast_harm table (not a contrastive run)" in err[0]
    assert contrast_weights.main([str(tmp_path / "missing")]) == 2
