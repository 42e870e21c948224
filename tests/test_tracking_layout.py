"""The parent run's layout helpers handle any set of attack families (no server, no model)."""
import pandas as pd
import pytest

from tasks import tracking


def metric(value, n=10):
    return {"value": value, "n": n, "ci95": [max(0.0, value - 0.1), min(1.0, value + 0.1)]}


FAMILIES = ["flip_words", "flip_chars", "persona", "prefix_injection", "few_shot"]


def evaluations(rounds=2):
    def stage(asr, cost):
        return {**{f"asr_{f}": metric(asr) for f in FAMILIES},
                **{f"over_refusal_{f}": metric(cost) for f in FAMILIES},
                "over_refusal": metric(cost), "plain_refusal": metric(0.9),
                "benign_loglik": metric(-3.0 - cost), "own_benign_loglik": metric(-2.0 - cost)}
    out = {"before": stage(0.9, 0.0)}
    for r in range(1, rounds + 1):
        out[f"round_{r}"] = stage(0.9 - 0.4 * r, 0.05 * r)
    return out


def test_headline_and_compact_are_generic():
    ev = evaluations()
    head = tracking.headline(ev)
    assert {f"asr_{f}_before" for f in FAMILIES} <= set(head)
    assert head["over_refusal_before"] == 0.0 and "over_refusal_persona_before" not in head
    assert head["benign_loglik_change"] == pytest.approx(-0.1)
    compact = tracking.compact_evaluation({**ev, "final": ev["round_2"]})
    assert compact["before"]["asr_persona"] == 0.9 and compact["after"]["asr_persona"] == pytest.approx(0.1)
    # the parent's metrics: one per figure (rounds as history) + headline + about a dozen summary
    assert len(ev["before"]) + len(head) + 12 <= 42


def test_evaluation_rows_and_steps():
    rows = tracking.evaluation_rows("round_2", 2, {"asr_persona": metric(0.5)})
    assert rows == [{"stage": "round_2", "round": 2, "metric": "asr_persona", "value": 0.5, "n": 10,
                     "ci_low": 0.4, "ci_high": 0.6}]
    assert [tracking.stage_step(s) for s in ("before", "round_1", "round_12")] == [0, 1, 12]
    assert [r["round"] for r in tracking.safety_rows({**evaluations(), "final": {}})] == [0, 1, 2]


def test_plots_for_many_families_and_rounds(tmp_path):
    rows = tracking.safety_rows(evaluations(3))
    assert tracking.safety_plot(rows, tmp_path / "safety.png").stat().st_size > 10_000
    frames = []
    for r in (1, 2, 3):
        frame = pd.DataFrame([{"round": r, "layer": l, "expert": e, "score": (l + 1) * (e + 1) * r,
                               "rank": 0, "selected": (l, e) == (r % 2, 7)} for l in range(2) for e in range(8)])
        frames.append(frame)
    assert tracking.heatmap_png(frames, tmp_path / "experts.png").stat().st_size > 10_000
    assert tracking.expert_names([[0, 7], [1, 5]]) == "L0_E7,L1_E5"


def test_eval_set_rows_take_a_prompt_text(tmp_path):
    assert tracking._text([{"role": "user", "content": "hi"}]) == "hi"
    assert tracking._text(["prompt", "reference"]) == "prompt"
    assert tracking._text("plain") == "plain"
