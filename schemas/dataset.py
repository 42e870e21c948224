"""The jailbreak dataset schema (pandera), validated lazily so every bad record is reported."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors

from unsafe_experts.records import DatasetError, goal_problem, judge_problem, messages_problem, read_json_records

REQUIRED = ("all_prompt", "goal")


class JailbreakRecords(pa.DataFrameModel):
    """One row per record. Extra fields (id, flip_attack, output, judge_score_gpt4...) pass."""

    all_prompt: pa.typing.Series[object] = pa.Field(nullable=False)
    goal: pa.typing.Series[object] = pa.Field(nullable=False)
    judge_success_gpt4: pa.typing.Series[object] | None = pa.Field(nullable=True)

    @pa.check("all_prompt", element_wise=True, name="messages")
    def _messages(cls, messages) -> bool:
        return messages_problem(messages) is None

    @pa.check("goal", element_wise=True, name="non_empty_string")
    def _goal(cls, goal) -> bool:
        return goal_problem(goal) is None

    @pa.check("judge_success_gpt4", element_wise=True, name="zero_or_one")
    def _judge(cls, problem) -> bool:
        return problem is None  # the column holds judge_problem's verdict (see records_frame)

    class Config:
        strict = False  # extra fields pass
        coerce = False


WHY = {"all_prompt": messages_problem, "goal": goal_problem, "judge_success_gpt4": judge_problem}


@dataclass
class ValidationReport:
    path: str
    rows: int
    failures: pd.DataFrame  # record, field, problem: one row per fault

    @property
    def ok(self) -> bool:
        return self.failures.empty

    def lines(self) -> list[str]:
        return [f"{self.path}: record {r.record}, field `{r.field}`: {r.problem}"
                for r in self.failures.itertuples()]

    def error(self, shown: int = 20) -> DatasetError:
        """One line naming every problem (the first `shown` of them)."""
        lines = self.lines()
        more = f" (+{len(lines) - shown} more)" if len(lines) > shown else ""
        return DatasetError(f"{len(lines)} problems in the dataset: " + "; ".join(lines[:shown]) + more)


class _Unencodable:
    """Stands in the frame for a string with a lone surrogate: pandera prints failing values
    through Arrow strings, which reject them. Not a str, so the text checks fail on it; the
    reported problem is worked out from the original value."""

    def __init__(self, value: str):
        self.value = value

    def __str__(self) -> str:
        return ascii(self.value)


def _frame_value(value):
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return _Unencodable(value)
    return value


def records_frame(records: list) -> tuple[pd.DataFrame, list[dict]]:
    """Objects go into the frame (original index kept); anything else is a fault of its own."""
    faults = [{"record": i, "field": "(record)", "problem": f"expected an object, got {type(r).__name__}"}
              for i, r in enumerate(records) if not isinstance(r, dict)]
    rows = {i: {k: _frame_value(v) for k, v in r.items()}
            for i, r in enumerate(records) if isinstance(r, dict)}
    # object columns: pandas would infer Arrow strings, which reject lone surrogates
    frame = pd.DataFrame.from_dict(rows, orient="index", dtype=object) if rows else pd.DataFrame()
    for column in REQUIRED:  # a field missing everywhere is reported per record
        if column not in frame.columns:
            frame[column] = None
    frame = frame.astype(object)
    if "judge_success_gpt4" in frame.columns:
        # pandera skips nulls in a nullable column, and pandas reads an explicit NaN (bad) like
        # an absent field (fine): so the column carries the verdict on the original value
        frame["judge_success_gpt4"] = pd.Series(
            [judge_problem(rows[i].get("judge_success_gpt4")) for i in frame.index],
            index=frame.index, dtype=object)
    return frame, faults


def validate_records(records: list, path: str = "<records>") -> ValidationReport:
    frame, faults = records_frame(records)
    if frame.empty and not faults:
        faults.append({"record": "-", "field": "(file)", "problem": "no records"})
    if not frame.empty:
        try:
            JailbreakRecords.validate(frame, lazy=True)
        except SchemaErrors as err:
            for case in err.failure_cases.itertuples():
                value = records[int(case.index)].get(case.column)
                why = WHY[case.column](value) if case.check != "not_nullable" else None
                faults.append({"record": int(case.index), "field": case.column,
                               "problem": why or "missing"})
    failures = pd.DataFrame(faults, columns=["record", "field", "problem"])
    failures = failures.drop_duplicates().sort_values(["record", "field"], key=lambda s: s.astype(str),
                                                      ignore_index=True)
    return ValidationReport(path, len(records), failures)


def validate_file(path: str | Path) -> ValidationReport:
    """Parse errors (DatasetError naming file, line and column) propagate; faults are reported."""
    return validate_records(read_json_records(path), str(path))
