"""`unsafe-experts grid` (flows/grid.py): out-of-date DVC stages run as Prefect tasks on a local
Dask cluster, in parallel, and end up in dvc.lock as `dvc repro` would have left them; a rerun
with nothing changed does no work; a failed stage loses no other stage's result."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def sh(cwd, *cmd, check=True, env=None):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def grid(cwd, *args, check=True):
    """The command's run, with `.out`: what it printed (Prefect's log lines go to stderr)."""
    done = sh(cwd, sys.executable, "-m", "cli", "grid", *args, check=False)
    done.out = done.stdout + done.stderr
    if check and done.returncode != 0:  # with the stages' own output, which names the cause
        logs = "\n".join(f"--- {log.name}:\n" + "\n".join(log.read_text().splitlines()[-40:])
                         for log in sorted(Path(cwd).glob(".dvc/tmp/grid-logs/*.log")))
        raise AssertionError(f"grid {args} exited {done.returncode}\n{done.out}\n{logs}")
    return done


def dvc_repo(tmp_path, params: str, dvc_yaml: str) -> Path:
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "dvc", "init", "-q")
    (tmp_path / "params.yaml").write_text(params)
    (tmp_path / "dvc.yaml").write_text(dvc_yaml)
    return tmp_path


# each stage notes when it started and ended, so the test can see two of them overlap
STAMPED = ("      cmd: mkdir -p out/${item.name} && date +%s.%N > out/${item.name}/start && sleep 2 && "
           "echo ${item.value} > out/${item.name}/v.txt && date +%s.%N > out/${item.name}/end\n")


def test_stages_run_in_parallel_are_recorded_and_a_rerun_does_nothing(tmp_path):
    repo = dvc_repo(tmp_path, "runs:\n  - {name: a, value: 1}\n  - {name: b, value: 2}\n",
                    "stages:\n  work:\n    foreach: ${runs}\n    do:\n" + STAMPED +
                    "      params: [runs]\n      outs:\n        - out/${item.name}\n")
    done = grid(repo, "work@", "--workers", "2")
    assert "2 done, 0 failed" in done.out, done.out
    assert [(repo / f"out/{n}/v.txt").read_text() for n in "ab"] == ["1\n", "2\n"]
    spans = [tuple(float((repo / f"out/{n}/{e}").read_text()) for e in ("start", "end")) for n in "ab"]
    assert max(s for s, _ in spans) < min(e for _, e in spans), f"the two stages did not overlap: {spans}"
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}  # as `dvc repro` left it
    started = (repo / "out/a/start").read_text()
    again = grid(repo, "work@", "--workers", "2")
    assert "0 stage(s) of work@ to run" in again.out and "0 done, 0 failed" in again.out
    assert (repo / "out/a/start").read_text() == started  # not rerun
    forced = grid(repo, "work@0", "--workers", "1", "--force")
    assert "1 done, 0 failed" in forced.out
    assert float((repo / "out/a/start").read_text()) > spans[0][0]


def test_a_failed_stage_loses_no_other_result_and_its_dependents_wait(tmp_path):
    """As `make compare` runs it: the second organism (`base`) builds beside the stages that do
    not need it, the ones that read it start after it, a stage that fails is named and what
    waits on it is not run, and every stage that finished is in dvc.lock."""
    repo = dvc_repo(
        tmp_path, "runs:\n  - {name: a, src: in}\n  - {name: b, src: base}\n  - {name: c, src: bad}\n",
        "stages:\n"
        "  base:\n    cmd: sleep 2 && mkdir -p base && echo built > base/x.txt\n    outs: [base]\n"
        "  bad:\n    cmd: echo 'something broke' && exit 3\n    outs: [bad]\n"
        "  work:\n    foreach: ${runs}\n    do:\n"
        "      cmd: mkdir -p out/${item.name} && cp ${item.src}/x.txt out/${item.name}/v.txt\n"
        "      deps: ['${item.src}']\n      outs:\n        - out/${item.name}\n")
    (repo / "in").mkdir()
    (repo / "in/x.txt").write_text("plain\n")
    (repo / "bad").mkdir()  # exists, so `work@2` is planned; `bad` reruns and fails
    failed = grid(repo, "base", "bad", "work@", "--workers", "2", check=False)
    out = failed.stdout + failed.stderr
    assert failed.returncode == 1, out
    assert "bad: FAILED, exit 3" in out and "something broke" in out
    # its whole output is kept where the message says, and so is a finished stage's
    assert "(its whole output: .dvc/tmp/grid-logs/bad.log)" in out
    assert (repo / ".dvc/tmp/grid-logs/bad.log").read_text() == "something broke\n"
    assert (repo / ".dvc/tmp/grid-logs/work@0.log").is_file()
    assert "work@2: not run, an upstream stage failed" in out
    assert "3 done, 2 failed" in out
    assert "error: failed: " in failed.stderr
    assert (repo / "out/b/v.txt").read_text() == "built\n"  # b read base after it was built
    assert (repo / "out/a/v.txt").read_text() == "plain\n"
    status = json.loads(sh(repo, "dvc", "status", "--json").stdout)
    assert set(status) == {"bad", "work@2"}, status  # the three that finished are recorded
    # a changed input reruns its stage only
    (repo / "in/x.txt").write_text("changed\n")
    again = grid(repo, "base", "work@0", "work@1", "--workers", "2")
    assert "1 done, 0 failed" in again.out, again.out
    assert (repo / "out/a/v.txt").read_text() == "changed\n"


def test_bad_requests_are_one_error_line(tmp_path):
    (tmp_path / "repo").mkdir()
    repo = dvc_repo(tmp_path / "repo", "x: 1\n", "stages:\n  s:\n    cmd: echo hi\n")
    for args, message in [(["nothing@"], "no DVC stage is named or starts with 'nothing@'"),
                          (["s", "--workers", "0"], "workers: must be at least 1, got 0"),
                          (["s", "--stage_resources", "GPU"],
                           "stage_resources: 'GPU' is not NAME=AMOUNT (e.g. GPU=1)")]:
        bad = grid(repo, *args, check=False)
        assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f"error: {message}"], bad.stderr
    assert not (repo / "dvc.lock").exists()  # nothing ran
    (repo / "grid.yaml").write_text((ROOT / "params.yaml").read_text().replace(
        "stage_resources: null", "stage_resources: GPU"))
    bad = grid(repo, "s", "--params", "grid.yaml", check=False)  # the params file's grid section
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: stage_resources: 'GPU' is not NAME=AMOUNT (e.g. GPU=1)"], bad.stderr
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    bad = sh(outside, sys.executable, "-m", "cli", "grid", "s", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: dvc: ") and len(bad.stderr.splitlines()) == 1


def test_stage_resources_are_parsed():
    from flows.grid import parse_resources

    assert parse_resources("GPU=1, MEM=4e10") == {"GPU": 1.0, "MEM": 4e10}
    assert parse_resources(None) == {} and parse_resources("") == {}
    for bad in ("GPU", "GPU=x", "=1", "GPU=0"):
        with pytest.raises(ValueError, match="stage_resources"):
            parse_resources(bad)


def test_two_tiny_surgeries_on_a_local_cluster_then_a_cached_rerun(tmp_path, tiny_dir, records_path):
    """Two real surgeries (the CLI's `train`, each with its own Prefect flow and MLflow run) as
    the grid's stages on two Dask workers; the second `grid` finds both recorded and runs none."""
    import shutil

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(tiny_dir, repo / "model")
    shutil.copy(records_path, repo / "records.json")
    dvc_repo(repo, "seeds: [1, 2]\n",
             "stages:\n  surgery:\n    foreach: ${seeds}\n    do:\n"
             "      cmd: mkdir -p stamps && date +%s.%N > stamps/s${item} && "
             "unsafe-experts train --model_name model --dataset_path records.json "
             "--output_dir out/s${item} --num_rounds 1 --top_k_experts 2 --batch_size 4 "
             "--max_samples 4 --retention none --seed ${item} --experiment grid-test --quiet\n"
             "      deps: [model, records.json]\n      outs:\n        - out/s${item}\n")
    done = grid(repo, "surgery@", "--workers", "2")
    assert "2 done, 0 failed" in done.out, done.out
    metas = [json.loads((repo / f"out/s{n}/training_metadata.json").read_text()) for n in (1, 2)]
    assert [m["status"] for m in metas] == ["completed", "completed"]
    assert [m["seed"] for m in metas] == [1, 2]
    # the two ran at once: each process ended after the other had started (the command's own
    # start, not the surgery's timings: a tiny surgery is a second of a process's ten or more)
    spans = [(float((repo / f"stamps/s{n}").read_text()), (repo / f"out/s{n}/training_metadata.json").stat().st_mtime)
             for n in (1, 2)]
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}
    written = [(repo / f"out/s{n}/training_metadata.json").stat().st_mtime_ns for n in (1, 2)]
    again = grid(repo, "surgery@", "--workers", "2")
    assert "0 stage(s) of surgery@ to run" in again.out and "0 done, 0 failed" in again.out
    assert [(repo / f"out/s{n}/training_metadata.json").stat().st_mtime_ns for n in (1, 2)] == written


def test_a_stage_runs_with_the_callers_environment_not_a_dask_nannys(tmp_path, monkeypatch):
    """A Dask nanny gives its worker MALLOC_TRIM_THRESHOLD_=65536, which made every surgery
    twice as slow; a stage's command does not inherit it (a value the user chose is kept)."""
    from tasks.stage_command import run_stage

    for value, kept in (("65536", False), ("131072", True)):
        monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", value)
        run_stage.fn("s", "env > env.txt", ["env.txt"], str(tmp_path), str(tmp_path / "homes"))
        env = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines() if "=" in line)
        assert ("MALLOC_TRIM_THRESHOLD_" in env) == kept
        assert env["PREFECT_HOME"].startswith(str(tmp_path / "homes"))


def test_a_stages_output_is_kept_but_never_through_a_link(tmp_path):
    from tasks.stage_command import LOGS, keep_output

    root = tmp_path / "repo"
    assert keep_output(str(root), "compare_run@3", "all of it\n") == f"its whole output: {LOGS}/compare_run@3.log"
    assert (root / LOGS / "compare_run@3.log").read_text() == "all of it\n"
    # a link at the log's own name is replaced, not written through
    target = tmp_path / "user.txt"
    target.write_text("mine\n")
    (root / LOGS / "sub_dvc.yaml_s.log").symlink_to(target)
    keep_output(str(root), "sub/dvc.yaml:s", "out\n")
    assert target.read_text() == "mine\n" and (root / LOGS / "sub_dvc.yaml_s.log").read_text() == "out\n"
    # a linked folder is not written into
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "repo2" / ".dvc" / "tmp").mkdir(parents=True)
    (tmp_path / "repo2" / LOGS).symlink_to(other)
    assert "not kept" in keep_output(str(tmp_path / "repo2"), "s", "x")
    assert list(other.iterdir()) == []
