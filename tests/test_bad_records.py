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


def test_a_record_over_the_text_bound_is_named_before_anything_is_tokenised(tmp_path, tiny_dir, capsys, monkeypatch):
    """A goal, or a prompt's messages together, over MAX_TEXT_CHARS (1 M characters; one 50 MB
    prompt took 6-8 GB to tokenise): `validate` names the record and field, `train` stops on
    it before the flow, the model or the tokenizer, with or without Prefect."""
    from cli.main import main
    from unsafe_experts import records as records_module
    from unsafe_experts import surgery

    bound = records_module.MAX_TEXT_CHARS
    half = "x" * (bound // 2 + 1)
    path = write(tmp_path, json.dumps([
        {**GOOD, "goal": "y" * bound},  # at the bound: fine
        {**GOOD, "goal": "y" * (bound + 1)},
        {**GOOD, "all_prompt": [{"role": "system", "content": half}, {"role": "user", "content": half}]},
    ]))
    lines = validate_file(path).lines()
    assert [line.split(": ", 1)[1].split(":")[0] for line in lines] == [
        "record 1, field `goal`", "record 2, field `all_prompt`"]
    assert f"holds {bound + 1:,} characters, over the bound of {bound:,}" in lines[0]
    assert f"its messages hold {2 * len(half):,} characters, over the bound" in lines[1]
    assert main(["validate", str(path)]) == 1
    capsys.readouterr()
    monkeypatch.setattr(surgery, "_load_model", lambda *a, **k: pytest.fail("the model loaded"))
    for extra in ([], ["--engine_only"]):
        out = tmp_path / f"run{len(extra)}"
        assert main(["train", "--model_name", str(tiny_dir), "--dataset_path", str(path), "--output_dir",
                     str(out), "--num_rounds", "1", "--top_k_experts", "2", "--quiet", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert "record 1" in err and "`goal`" in err and "over the bound of 1,000,000" in err, err
        assert not out.exists() or not any(out.iterdir())
    with pytest.raises(DatasetError, match="record 1: field `goal` holds 1,000,001 characters"):
        load_records(path)  # the engine's own reading: the same verdict
