"""scripts/repro_parallel.py: foreach stages run several at a time and end up in dvc.lock as
`dvc repro` would have left them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def sh(cwd, *cmd, check=True):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=check)


def test_parallel_stages_are_committed_as_repro_would(tmp_path):
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "dvc", "init", "-q")
    (tmp_path / "params.yaml").write_text("runs:\n  - {name: a, value: 1}\n  - {name: b, value: 2}\n"
                                          "  - {name: c, value: 3}\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  work:\n    foreach: ${runs}\n    do:\n"
        "      cmd: mkdir -p out/${item.name} && sleep 1 && echo ${item.value} > out/${item.name}/v.txt\n"
        "      params: [runs]\n      outs:\n        - out/${item.name}\n")
    script = str(ROOT / "scripts" / "repro_parallel.py")
    done = sh(tmp_path, sys.executable, script, "work@", "--jobs", "2")
    assert "3 done, 0 failed" in done.stdout
    assert [(tmp_path / f"out/{n}/v.txt").read_text() for n in "abc"] == ["1\n", "2\n", "3\n"]
    status = json.loads(sh(tmp_path, "dvc", "status", "--json").stdout)
    assert status == {}  # every stage recorded: nothing for `dvc repro` to do
    again = sh(tmp_path, sys.executable, script, "work@", "--jobs", "2")
    assert "0 stage(s) of work@ to run" in again.stdout

    (tmp_path / "params.yaml").write_text("runs:\n  - {name: a, value: 1}\n  - {name: b, value: 2}\n"
                                          "  - {name: c, value: 'x; exit 3'}\n")
    failed = sh(tmp_path, sys.executable, script, "work@", "--jobs", "2", check=False)
    assert failed.returncode == 1 and "work@2: FAILED (exit 3)" in failed.stdout
    assert "error: failed stages: work@2" in failed.stderr
    unknown = sh(tmp_path, sys.executable, script, "nothing@", check=False)
    assert unknown.returncode != 0 and "error: no DVC stage starts with 'nothing@'" in unknown.stderr


def test_a_stage_waits_for_the_chosen_stage_it_depends_on(tmp_path):
    """As `make compare` runs it: the second organism (`base`) builds beside the stages that do
    not need it, the ones that read it start after it, and a downstream stage (`table@`) of a
    rerun stage reruns too."""
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "dvc", "init", "-q")
    (tmp_path / "params.yaml").write_text("runs:\n  - {name: a, src: in}\n  - {name: b, src: base}\n"
                                          "  - {name: c, src: in}\n")
    (tmp_path / "in").mkdir()
    (tmp_path / "in/x.txt").write_text("plain\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  base:\n    cmd: sleep 2 && mkdir -p base && echo built > base/x.txt\n    outs: [base]\n"
        "  work:\n    foreach: ${runs}\n    do:\n"
        "      cmd: mkdir -p out/${item.name} && cp ${item.src}/x.txt out/${item.name}/v.txt\n"
        "      deps: ['${item.src}']\n      outs:\n        - out/${item.name}\n"
        "  table:\n    foreach: ${runs}\n    do:\n"
        "      cmd: mkdir -p table && cp out/${item.name}/v.txt table/${item.name}.txt\n"
        "      deps: ['out/${item.name}']\n      outs:\n        - table/${item.name}.txt\n")
    script = str(ROOT / "scripts" / "repro_parallel.py")
    done = sh(tmp_path, sys.executable, script, "base", "work@", "table@", "--jobs", "2")
    assert "7 done, 0 failed" in done.stdout, done.stdout + done.stderr
    assert (tmp_path / "table/b.txt").read_text() == "built\n"  # b read base after it was built
    assert [(tmp_path / f"table/{n}.txt").read_text() for n in "ac"] == ["plain\n", "plain\n"]
    lines = done.stdout.splitlines()
    # a and c did not wait for base: they finished before it
    assert min(i for i, l in enumerate(lines) if "work@0: done" in l or "work@2: done" in l) < \
        next(i for i, l in enumerate(lines) if "base: done" in l)
    assert json.loads(sh(tmp_path, "dvc", "status", "--json").stdout) == {}

    # a changed input reruns its stage and the table stage downstream of it, nothing else;
    # a prefix that overlaps an earlier one (work@0 after work@) names no stage twice
    (tmp_path / "in/x.txt").write_text("changed\n")
    again = sh(tmp_path, sys.executable, script, "base", "work@", "work@0", "table@", "--jobs", "2")
    assert "4 done, 0 failed" in again.stdout, again.stdout
    assert (tmp_path / "table/a.txt").read_text() == "changed\n"
    # no chosen stage makes a missing dependency: skipped, named, with whatever waits on it
    (tmp_path / "in/x.txt").unlink()
    (tmp_path / "in").rmdir()
    missing = sh(tmp_path, sys.executable, script, "work@", "table@", "--jobs", "2", check=False)
    assert missing.returncode == 1
    assert "work@0: skipped, missing" in missing.stdout and "table@0: skipped, an upstream stage is skipped" in missing.stdout


def test_a_whole_stage_name_chooses_that_stage_alone():
    """compare_run@5 must not also rerun compare_run@50 to @59 (prefixes name groups)."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("repro_parallel", ROOT / "scripts" / "repro_parallel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stages = [SimpleNamespace(addressing=name) for name in
              ("organism", "organism_builds@1", "run@5", "run@50", "run@51", "table")]
    repo = SimpleNamespace(index=SimpleNamespace(stages=stages))
    names = lambda prefixes: [s.addressing for s in module.chosen(repo, prefixes)]
    assert names(["run@5"]) == ["run@5"]
    assert names(["run@"]) == ["run@5", "run@50", "run@51"]
    assert names(["organism", "organism_builds@"]) == ["organism", "organism_builds@1"]
    assert names(["organism_b", "run@5", "run@5"]) == ["organism_builds@1", "run@5"]
    with pytest.raises(SystemExit, match="no DVC stage starts with 'runs'"):
        module.chosen(repo, ["runs"])
