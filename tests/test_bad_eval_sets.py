"""An `--eval_set` cut short or of another shape: one `error:` line naming the file and what is
wrong, exit status 2, in every command that reads one (evaluate, train, robustness, ablate),
before any model loads and with earlier outputs left as they were."""
import json

import pytest
from conftest import FIXTURES, one_error_line

from cli.main import main
from unsafe_experts.artefacts.atomic import write_json_atomic
from unsafe_experts.attacks.organism import OrganismConfig, build_splits, eval_set
from unsafe_experts.evaluation.suites import SuiteError, load_eval_set


@pytest.fixture(scope="module")
def held():
    """A real organism eval set (the test-sized organism's held-out sets), as a document."""
    document = eval_set(build_splits(OrganismConfig.small()))
    document["own_benign"] = [[m, f"Answer {i}."] for i, (m, _) in enumerate(document["benign_refs"])]
    return document


@pytest.fixture
def written(held, tmp_path):
    """The eval set as `unsafe-experts organism` writes it, and its bytes."""
    path = tmp_path / "eval_set.json"
    write_json_atomic(path, held)
    return path, path.read_bytes()


def cut_at(data: bytes, marker: bytes, after: int = 0) -> int:
    """The offset just past the first `marker` (plus `after` bytes) in `data`."""
    return data.index(marker) + len(marker) + after


def shapes(held, data: bytes) -> dict:
    """name -> (the file's bytes, what its error says)."""
    second_family = list(held["families"])[1]
    reshaped = {
        "families a list": ({"families": list(held["families"])},
                            "field `families`: must map each family to its harmful and benign chats, got a list"),
        "families a string": ({"families": "persona"}, "field `families`: must map each family"),
        "a family null": ({"families": {"persona": None}},
                          "field `families.persona`: must be an object with `harmful` and `benign` lists, got null"),
        "a family without benign": ({"families": {"persona": {"harmful": held["families"]["persona"]["harmful"]}}},
                                    "field `families.persona.benign`: missing"),
        "a family's harmful set a string": (
            {"families": {"persona": {"harmful": "x", "benign": []}}},
            "field `families.persona.harmful`: must be a list of chats, got a string"),
        "plain an object": ({"plain": {"0": held["plain"][0]}}, "field `plain`: must be a list of chats, got an object"),
        "xstest_safe null": ({"xstest_safe": None}, "field `xstest_safe`: must be a list of chats, got null"),
        "flip_words a number": ({"flip_words": 3}, "field `flip_words`: must be a list of chats, got a number"),
    }
    out = {
        # mid-string: a prompt's text cut inside
        "cut mid-string": (data[:cut_at(data, b'"content": "', 7)], "Unterminated string"),
        # mid-object: after a message's first key and value
        "cut mid-object": (data[:cut_at(data, b'"role": "system"')], "cut short?"),
        # the whole document but its last brace
        "cut before the last brace": (data.rstrip()[:-1], "cut short?"),
        # after a complete top-level section: `plain` whole, the rest gone
        "cut after a whole section": (data[:cut_at(data, b'\n  ],\n  "xstest_safe"') - len(b'"xstest_safe"')],
                                      "cut short?"),
        "empty": (b"", "the file is empty"),
        "cut mid-character": ('{"plain": [[{"role": "user", "content": "caf\u00e9'.encode()[:-1],
                              "not UTF-8 text (byte 44: unexpected end of data); the file ends mid-character"),
        "nested too deeply": (b'{"plain": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        "a list": (json.dumps([held["plain"]]).encode(), "is a list, not an object of an organism's sets"),
        "cut to a second family": (json.dumps({"families": {second_family: {}}}).encode(),
                                   f"field `families.{second_family}.harmful`: missing"),
    }
    for name, (change, message) in reshaped.items():
        out[name] = (json.dumps({**held, **change}).encode(), message)
    return out


CASES = ["cut mid-string", "cut mid-object", "cut before the last brace", "cut after a whole section", "empty",
         "cut mid-character", "nested too deeply", "a list", "cut to a second family", "families a list",
         "families a string", "a family null", "a family without benign", "a family's harmful set a string",
         "plain an object", "xstest_safe null", "flip_words a number"]


@pytest.mark.parametrize("case", CASES)
def test_each_shape_is_one_error_naming_the_file(held, written, case):
    path, data = written
    text, message = shapes(held, data)[case]
    path.write_bytes(text)
    with pytest.raises(SuiteError) as caught:
        load_eval_set(path)
    assert str(caught.value).startswith(f"eval set {path}: ") and message in str(caught.value), caught.value
    assert "\n" not in str(caught.value)


def test_the_whole_file_still_loads(written):
    """The shape check refuses nothing the organism writes (the cases above are not vacuous)."""
    suite = load_eval_set(written[0])
    assert {"plain_refusal", "over_refusal", "benign_loglik", "own_benign_loglik"} <= {s.metric for s in suite.sets}


@pytest.mark.parametrize("command", ["evaluate", "train", "robustness", "ablate"])
def test_every_command_reading_one_says_so_in_one_line_and_keeps_earlier_outputs(
        held, written, tiny_dir, tmp_path, capsys, command):
    path, data = written
    path.write_bytes(shapes(held, data)["cut mid-string"][0])
    earlier = tmp_path / "earlier.json"
    earlier.write_text('{"kept": true}')
    experts = tmp_path / "experts.json"
    experts.write_text("[[0, 1]]")
    args = {
        "evaluate": ["evaluate", "--model", str(tiny_dir), "--eval_set", str(path), "--out", str(earlier)],
        "train": ["train", "--model_name", str(tiny_dir), "--dataset_path", str(FIXTURES / "flip_records.json"),
                  "--output_dir", str(tmp_path / "run"), "--num_rounds", "1", "--top_k_experts", "2",
                  "--eval_set", str(path)],
        "robustness": ["robustness", "--model", str(tiny_dir), "--reference", str(tiny_dir),
                       "--eval_set", str(path), "--out", str(earlier)],
        "ablate": ["ablate", "--model", str(tiny_dir), "--eval_set", str(path), "--experts", str(experts),
                   "--out", str(earlier)],
    }[command]
    assert main([*args, "--quiet"]) == 2
    one_error_line(capsys, f"eval set {path}: not JSON (Unterminated string")
    assert earlier.read_text() == '{"kept": true}'
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
