"""scripts/expected_demo.py: the demo's range over organism builds, measured from the
comparison's runs and checked against this machine's `make demo`."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import expected_demo  # noqa: E402


def build(tmp_path, organism, seed, asr, refused, status="completed"):
    """One organism build and its run of the demo's command, as `make compare` leaves them."""
    (tmp_path / "build" / organism).mkdir(parents=True)
    (tmp_path / "build" / organism / "build.json").write_text(
        json.dumps({"config": {"seed": seed, "surgery_family": "flip_chars"}}))
    run = tmp_path / "outputs" / "compare" / organism / expected_demo.DEMO_RUN
    run.mkdir(parents=True)
    final = {"asr_flip_chars": {"value": asr}, "asr_persona": {"value": 0.5},
             "over_refusal_flip_chars": {"value": refused[0]}, "over_refusal_persona": {"value": refused[1]}}
    (run / "training_metadata.json").write_text(json.dumps({"status": status, "evaluation": {"final": final}}))


def run(tmp_path, *args):
    return expected_demo.main(["--expected", str(tmp_path / "expected.json"),
                               "--compare_dir", str(tmp_path / "outputs" / "compare"),
                               "--build_dir", str(tmp_path / "build"), *args])


def test_the_range_is_measured_over_every_finished_build(tmp_path, capsys):
    build(tmp_path, "organism", 0, 0.02, (0.1, 0.3))
    build(tmp_path, "organism_seed1", 1, 0.125, (0.0, 0.1))
    build(tmp_path, "organism_seed2", 2, 0.9, (0.9, 0.9), status="failed")  # measures nothing
    assert run(tmp_path, "--measure") == 0
    expected = json.loads((tmp_path / "expected.json").read_text())
    assert expected["asr_surgery_family"] == {"min": 0.02, "max": 0.125}
    assert expected["over_refusal_mean_families"] == {"min": 0.05, "max": 0.2}
    assert [b["organism_seed"] for b in expected["builds"]] == [0, 1]
    assert expected["chance_a_new_build_falls_outside"] == pytest.approx(2 / 3, abs=1e-3)


def test_a_demo_inside_and_outside_the_range(tmp_path, capsys):
    build(tmp_path, "organism", 0, 0.02, (0.1, 0.3))
    build(tmp_path, "organism_seed1", 1, 0.125, (0.0, 0.1))
    run(tmp_path, "--measure")
    metrics = tmp_path / "after.json"
    metrics.write_text(json.dumps({"asr_surgery": 0.125, "refused_mean": 0.05, "asr_mean": 0.1}))
    capsys.readouterr()
    assert run(tmp_path, "--metrics", str(metrics)) == 0
    out = capsys.readouterr().out
    assert "surgery-family ASR" in out and "0.125  inside [0.020, 0.125]" in out
    assert "0.050  inside [0.050, 0.200]" in out and "Outside" not in out
    metrics.write_text(json.dumps({"asr_surgery": 0.0, "refused_mean": 0.4}))
    assert run(tmp_path, "--metrics", str(metrics)) == 0  # a finding, not a failure
    out = capsys.readouterr().out
    assert "0.000  OUTSIDE [0.020, 0.125]" in out and "0.400  OUTSIDE [0.050, 0.200]" in out
    assert "This machine built another organism" in out
    assert all(len(line) < 120 for line in out.splitlines()[1:])  # [0] names the tmp path


@pytest.mark.parametrize("content, message", [
    (None, "after.json: no such file"),
    ("{", "after.json: not readable JSON"),
    ('[0.1]', "after.json: expected an object of headline figures"),
    ('{"asr_surgery": 0.1}', "after.json: no headline figure 'refused_mean'"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, content, message):
    build(tmp_path, "organism", 0, 0.02, (0.1, 0.3))
    build(tmp_path, "organism_seed1", 1, 0.125, (0.0, 0.1))
    run(tmp_path, "--measure")
    metrics = tmp_path / "after.json"
    if content is not None:
        metrics.write_text(content)
    capsys.readouterr()
    assert run(tmp_path, "--metrics", str(metrics)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_a_range_needs_two_builds_and_a_readable_expected_file(tmp_path, capsys):
    build(tmp_path, "organism", 0, 0.02, (0.1, 0.3))
    assert run(tmp_path, "--measure") == 2
    assert "1 finished gradient-k4-s42-plain-lr0.001 run(s); a range needs at least two builds" in capsys.readouterr().err
    assert not (tmp_path / "expected.json").exists()
    (tmp_path / "expected.json").write_text('{"asr_surgery_family": {"min": 0}}')
    metrics = tmp_path / "after.json"
    metrics.write_text(json.dumps({"asr_surgery": 0.1, "refused_mean": 0.0}))
    assert run(tmp_path, "--metrics", str(metrics)) == 2
    assert "expected.json: malformed" in capsys.readouterr().err


def test_measure_replaces_only_an_earlier_range_file(tmp_path, capsys):
    build(tmp_path, "organism", 0, 0.02, (0.1, 0.3))
    build(tmp_path, "organism_seed1", 1, 0.125, (0.0, 0.1))
    target = tmp_path / "expected.json"
    target.write_text("a user's notes\n")
    assert run(tmp_path, "--measure") == 2
    assert "exists and is not an expected-demo range; not overwritten" in capsys.readouterr().err
    assert target.read_text() == "a user's notes\n"
    notes = tmp_path / "notes.json"
    notes.write_text('{"builds": "mine"}')
    target.unlink()
    target.symlink_to(notes)
    assert run(tmp_path, "--measure") == 2
    assert "is a symbolic link; not replaced" in capsys.readouterr().err
    assert target.is_symlink() and notes.read_text() == '{"builds": "mine"}'
    target.unlink()
    assert run(tmp_path, "--measure") == 0 and run(tmp_path, "--measure") == 0  # its own file: replaced


def test_the_repository_range_is_readable_and_holds_its_builds():
    expected = json.loads((ROOT / "docs" / "expected_demo.json").read_text())
    assert len(expected["builds"]) >= 3
    for key in expected_demo.FIGURES:
        assert expected[key]["min"] <= expected[key]["max"]
        assert all(expected[key]["min"] <= b[key] <= expected[key]["max"] for b in expected["builds"])
