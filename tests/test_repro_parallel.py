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
