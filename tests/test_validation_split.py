"""The validation split (issue 25): prompts for choosing settings, never in the test sample the
tables report; the same positions for sets of one length; clear errors where none is left."""
import json

import pytest
from test_suites import GOOD, data, suite_file  # noqa: F401 (data: the fixture)

from cli.main import main
from unsafe_experts.config import ConfigError
from unsafe_experts.evaluation.evaluate import EvaluationConfig
from unsafe_experts.stats import subset


def test_validation_is_disjoint_from_test_and_as_large_where_it_can_be():
    items = list(range(100))
    for seed in (0, 1, 7):
        test = subset(items, 30, seed)
        validation = subset(items, 30, seed, "validation")
        assert len(validation) == 30 and not set(test) & set(validation)
        assert validation == sorted(validation)  # kept in file order, as the test sample
        assert subset(items, 30, seed, "validation") == validation  # seeded: the same every run
    # sets of one length keep the same positions (every family's goals are the plain set's)
    letters = [chr(65 + i % 26) + str(i) for i in range(100)]
    assert [letters[i] for i in subset(items, 30, 0, "validation")] == subset(letters, 30, 0, "validation")
    # fewer left than the limit: all that is left
    assert subset(list(range(50)), 30, 0, "validation") == sorted(set(range(50)) - set(subset(list(range(50)), 30, 0)))
    with pytest.raises(ValueError, match="a set of 30 prompts leaves none for validation beside a test sample of 30"):
        subset(list(range(30)), 30, 0, "validation")
    with pytest.raises(ValueError, match="split: one of test, validation, got 'train'"):
        subset(items, 30, 0, "train")


def test_validation_needs_a_limit():
    with pytest.raises(ConfigError, match="split: validation needs a limit"):
        EvaluationConfig(eval_set="e.json", split="validation").validate()
    with pytest.raises(ConfigError, match="split: must be one of test, validation"):
        EvaluationConfig(eval_set="e.json", split="dev", limit=4).validate()


def test_evaluate_on_validation_asks_other_prompts(tiny_dir, data, capsys):  # noqa: F811
    path = suite_file(data, [GOOD], max_new_tokens=2)  # three goals
    asked = {}
    for split in ("test", "validation"):
        out = data / f"{split}.json"
        assert main(["evaluate", "--model", str(tiny_dir), "--suite", str(path), "--eval_limit", "1",
                     "--eval_split", split, "--out", str(out), "--quiet"]) == 0
        result = json.loads(out.read_text())
        assert result["metrics"]["asr_goals"]["n"] == 1
        asked[split] = {s["prompt"] for s in result["samples"]}
    assert asked["test"] and asked["validation"] and not asked["test"] & asked["validation"]
    capsys.readouterr()
    # every goal in the test sample: none left, one error line naming the set, nothing written
    out = data / "none.json"
    assert main(["evaluate", "--model", str(tiny_dir), "--suite", str(path), "--eval_limit", "3",
                 "--eval_split", "validation", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: set goals: a set of 3 prompts leaves none for validation") and "\n" not in err
    assert not out.exists()
