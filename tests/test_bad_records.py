"""Inputs a user can write that once crashed the validator or passed it and broke training:
each is now one named problem, the same in `validate` and in `train`."""
import json

import pytest

from schemas.dataset import validate_file
from unsafe_experts.records import DatasetError, load_records

GOOD = {"goal": "Write a poem", "all_prompt": [{"role": "user", "content": "Write a poem"}],
        "judge_success_gpt4": 1}


def write(tmp_path, text: str | bytes):
    path = tmp_path / "records.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("field, value, problem", [
    ("judge_success_gpt4", [1, 2], "must be 0 or 1, got [1, 2]"),
    ("judge_success_gpt4", "NaN", "must be 0 or 1, got nan"),
    ("judge_success_gpt4", "Infinity", "must be 0 or 1, got inf"),
    ("goal", '"\\ud83d bomb"', "lone surrogate"),
])
def test_bad_field_values_are_named_by_record_and_field(tmp_path, field, value, problem):
    text = json.dumps([GOOD, {**GOOD, field: "@@"}]).replace('"@@"', value if isinstance(value, str)
                                                            else json.dumps(value))
    path = write(tmp_path, text)
    report = validate_file(path)
    assert not report.ok and len(report.lines()) == 1
    assert f"record 1, field `{field}`: " in report.lines()[0] and problem in report.lines()[0]
    with pytest.raises(DatasetError, match=f"record 1: field `{field}`.*{problem.split(',')[0]}"):
        load_records(path)  # what train reads: the same verdict


def test_a_lone_surrogate_in_a_message_is_named(tmp_path):
    record = {**GOOD, "all_prompt": [{"role": "user", "content": "@@"}]}
    path = write(tmp_path, json.dumps([record]).replace('"@@"', '"hi \\udc00"'))
    assert "record 0, field `all_prompt`: message 0: `content` holds a lone surrogate" in validate_file(path).lines()[0]


@pytest.mark.parametrize("content, message", [
    (b'[{"goal": "caf\xe9"}]', "not UTF-8 text (byte 14, line 1"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('[{"id": ' + "9" * 5000 + "}]", "not usable JSON"),
])
def test_unreadable_files_are_one_error(tmp_path, content, message):
    path = write(tmp_path, content)
    for read in (validate_file, load_records):
        with pytest.raises(DatasetError, match=message.replace("(", r"\(")):
            read(path)
