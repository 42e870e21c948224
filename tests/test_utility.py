"""Utility through lm-eval on the in-memory model, offline, with the bundled local task."""
import json
import math

import pytest

from unsafe_experts.config import ConfigError
from unsafe_experts.evaluation.evaluate import EvaluationConfig, evaluate
from unsafe_experts.evaluation.lm_eval_utility import benign_choice_docs, run_lm_eval
from unsafe_experts.evaluation.suites import load_eval_set


def test_benign_choice_items_hold_the_reference_at_the_label():
    from unsafe_experts.data.bundled import alpaca_pairs

    docs = benign_choice_docs(n=20)
    answers = {p["instruction"]: p["output"] for p in alpaca_pairs()}
    assert len(docs) == 20
    for d in docs:
        assert len(d["choices"]) == 4 and d["choices"][d["label"]] == answers[d["instruction"]]
        assert len(set(d["choices"])) == 4
    assert len({d["label"] for d in docs}) > 1  # the right answer is not always in one place


@pytest.mark.slow  # lm-eval's import and datasets' cache: about 20 s each
def test_lm_eval_runs_on_the_model_in_memory(make_model, tokenizer):
    metrics = run_lm_eval(make_model("olmoe"), tokenizer, ["benign_choice"], limit=8, batch_size=4)
    acc = metrics["lmeval_benign_choice_acc"]
    assert acc["n"] == 8 and 0 <= acc["value"] <= 1 and math.isfinite(acc["stderr"])
    assert acc["ci95"][0] < acc["value"] < acc["ci95"][1] or acc["stderr"] == 0


@pytest.mark.slow
def test_the_evaluation_reports_lm_eval_beside_its_own_sets(make_model, tokenizer, tmp_path):
    config = EvaluationConfig(lm_eval_tasks=["benign_choice"], lm_eval_limit=4, max_new_tokens=2)
    (tmp_path / "eval_set.json").write_text(json.dumps({"plain": [[{"role": "user", "content": "hello"}]]}))
    result = evaluate(make_model("olmoe"), tokenizer, load_eval_set(tmp_path / "eval_set.json"), config)
    assert {"plain_refusal", "lmeval_benign_choice_acc"} <= set(result["metrics"])


def test_an_unknown_task_is_one_clear_error(make_model, tokenizer):
    with pytest.raises(ConfigError, match="unknown task.*no_such_task"):
        run_lm_eval(make_model("olmoe"), tokenizer, ["no_such_task"], limit=2)
