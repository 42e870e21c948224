"""Every user YAML (params.yaml, suites, judge specs) is read by unsafe_experts/safe_yaml.py: a
key given twice and an alias bomb are refused with one error; suites read only files under
their own folder."""
import os
import subprocess
import sys

import pytest
from conftest import one_error_line

from cli.main import main
from schemas.params import load_params
from unsafe_experts.errors import ConfigError, YamlRefused
from unsafe_experts.evaluation.judges import JudgeError, judge_from_text
from unsafe_experts.evaluation.suites import SuiteError, load_suite
from unsafe_experts.safe_yaml import load_yaml

# 9 levels of 9 aliases each: 9**9 (387 million) leaves in under 400 bytes
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def test_the_loader_refuses_duplicate_keys_and_bounds_aliases():
    assert len(BOMB) < 411
    with pytest.raises(YamlRefused, match="expands to over 100,000 nodes"):
        load_yaml(BOMB)
    with pytest.raises(YamlRefused, match=r"key 'kind' given twice in one mapping \(lines 2 and 3\)"):
        load_yaml("name: x\nkind: harmful\nkind: benign\n")
    with pytest.raises(YamlRefused, match="nested too deeply"):
        load_yaml("[" * 3000 + "]" * 3000)
    # anchors and merge keys as params.yaml uses them still work, and a merged key overridden
    # by the mapping itself is YAML's merge, not a duplicate
    assert load_yaml("d: &d {a: 1, b: 2}\nruns:\n  - {<<: *d, b: 3}\n") == {
        "d": {"a": 1, "b": 2}, "runs": [{"a": 1, "b": 3}]}
    assert load_yaml("1: a\n'1': b\n") == {1: "a", "1": "b"}  # two keys: an int and a string


def test_a_bomb_suite_is_one_error_in_bounded_memory(tmp_path):
    """Loaded in a child capped at 1 GiB of address space: the bomb used to exhaust memory."""
    (tmp_path / "bomb.yaml").write_text("name: b\n" + BOMB.replace("a: &a", "sets: &a", 1)
                                        .replace("i: &i", "description: &i"))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30));"
            "from cli.main import main; sys.exit(main(['evaluate', '--model', 'm', '--suite', sys.argv[1]]))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bomb.yaml")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 2, done.stderr[-2000:]
    # under the cap: running out of it would be a MemoryError traceback, exit status 1
    assert "error:" in done.stderr and "expands to over 100,000 nodes" in done.stderr


def test_a_set_whose_kind_is_given_twice_is_refused(tmp_path, capsys):
    """The last value used to win: a harmful set listed as benign was scored as over-refusal."""
    (tmp_path / "goals.txt").write_text("Hack a bank\n")
    (tmp_path / "s.yaml").write_text("name: s\nsets:\n  - name: g\n    kind: harmful\n"
                                     "    path: goals.txt\n    kind: benign\n")
    with pytest.raises(SuiteError, match=r"not a suite \(key 'kind' given twice in one mapping \(lines 4 and 6\)"):
        load_suite(tmp_path / "s.yaml")
    out = tmp_path / "m.json"
    assert main(["evaluate", "--model", "m", "--suite", str(tmp_path / "s.yaml"), "--out", str(out)]) == 2
    one_error_line(capsys, "key 'kind' given twice")
    assert not out.exists()


def test_params_and_judges_read_through_the_same_loader(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  model_name: m\n  dataset_path: d.json\n  output_dir: o\n"
                      "  expert_lr: 0.1\n  expert_lr: 0.0001\n")
    with pytest.raises(ConfigError, match="key 'expert_lr' given twice"):
        load_params(params)
    params.write_text("train: {model_name: m, dataset_path: d.json, output_dir: o}\n" + BOMB)
    with pytest.raises(ConfigError, match="expands to over"):
        load_params(params)
    judge = tmp_path / "judge.yaml"
    judge.write_text("classifier: c\nlabels: {unsafe: complied, unsafe: refused}\n")
    with pytest.raises(JudgeError, match="key 'unsafe' given twice"):
        judge_from_text(str(judge))
    with pytest.raises(JudgeError, match="key 'unsafe' given twice"):
        judge_from_text("{classifier: c, labels: {unsafe: complied, unsafe: refused}}")


@pytest.fixture
def outside(tmp_path):
    """A suite folder, and a file of prompts outside it."""
    (tmp_path / "secret.txt").write_text("the password is hunter2\n")
    (tmp_path / "suite").mkdir()
    return tmp_path / "suite"


@pytest.mark.parametrize("where", ["../secret.txt", "ABSOLUTE", "link.txt"])
def test_a_suite_reads_no_file_outside_its_folder(outside, where):
    os.symlink(outside.parent / "secret.txt", outside / "link.txt")
    path = str(outside.parent / "secret.txt") if where == "ABSOLUTE" else where
    (outside / "s.yaml").write_text(f"name: s\nsets:\n  - {{name: g, kind: harmful, path: '{path}'}}\n")
    with pytest.raises(SuiteError, match=r"set 'g': field `path`: .* is .*secret.txt, outside .*suite: "
                                         "a suite reads files under its own folder only"):
        load_suite(outside / "s.yaml")


def test_a_suite_reads_files_in_its_subfolders(outside):
    (outside / "data").mkdir()
    (outside / "data" / "goals.txt").write_text("Hack a bank\n")
    (outside / "s.yaml").write_text("name: s\nsets:\n  - {name: g, kind: harmful, path: data/goals.txt}\n")
    assert load_suite(outside / "s.yaml").sets[0].items[0].request == "Hack a bank"
