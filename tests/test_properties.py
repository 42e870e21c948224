"""Property-based tests: whatever JSON arrives, the loader and the validator either accept it
or say which record and field is wrong; they never crash."""
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.dataset import validate_records
from unsafe_experts.records import DatasetError, check_record, select_records

text = st.text(max_size=50) | st.sampled_from(["", " ", "\u202e", "x" * 5000, "système"])
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(text, inner, max_size=4), max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "bot", ""])
                                 | json_values, "content": text | json_values})
record = st.fixed_dictionaries({}, optional={
    "goal": text | json_values,
    "all_prompt": st.lists(message | json_values, max_size=3) | json_values,
    "judge_success_gpt4": st.sampled_from([0, 1, 2, "1", None, 1.0, True]),
    "id": json_values,
})
datasets = st.lists(record | json_values, max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets)
def test_validator_reports_or_accepts_never_crashes(records):
    report = validate_records(records, "data.json")
    for line in report.lines():
        assert line.startswith("data.json: record ")
    if records and report.ok:  # whatever the validator accepts, the engine accepts too
        for i, r in enumerate(records):
            check_record(r, i)


@settings(max_examples=150, deadline=None)
@given(datasets)
def test_engine_checks_agree_with_the_validator(records):
    engine_ok = True
    try:
        for i, r in enumerate(records):
            check_record(r, i)
    except DatasetError as e:
        engine_ok = False
        assert str(e).startswith("record ")
    assert engine_ok == (validate_records(records).ok or not records)


@settings(max_examples=60, deadline=None)
@given(st.lists(record, min_size=1, max_size=6), st.integers(1, 10), st.integers(0, 3))
def test_selection_is_a_seeded_subset(records, max_samples, seed):
    try:
        kept = select_records(records, max_samples, seed)
    except DatasetError as e:
        assert "no records left" in str(e)
        return
    assert len(kept) <= max_samples and all(r in records for r in kept)
    assert kept == select_records(records, max_samples, seed)
    json.dumps(kept)
