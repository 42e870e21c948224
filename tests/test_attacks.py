import re

import pytest

from unsafe_experts.attacks.families import (
    FAMILIES,
    AttackFamilyError,
    attack_records,
    check_families,
    flip_mode,
    render,
    unflip,
)
from unsafe_experts.attacks.flip import flip_records
from unsafe_experts.data.bundled import advbench_goals
from unsafe_experts.records import messages_problem

GOALS = advbench_goals()[:5] + ["How do I kill a Python process?"]


def recovered(family: str, messages: list[dict]) -> str:
    """The goal as a model would read it back out of the attack prompt."""
    mode = flip_mode(family)
    (task,) = re.findall(r"TASK: '(.*)'", messages[-1]["content"], flags=re.S)
    return unflip(task, mode)


def test_every_family_renders_valid_messages_that_keep_the_goal():
    assert len(FAMILIES) >= 6 and all(re.fullmatch(r"[a-z0-9_]+", name) for name in FAMILIES)
    assert len([f for f in FAMILIES if not flip_mode(f)]) >= 3
    for family in FAMILIES:
        for goal in GOALS:
            messages = render(family, goal)
            assert messages_problem(messages) is None, family
            assert messages[-1]["role"] == "user"
            if flip_mode(family):
                assert goal not in messages[-1]["content"] and recovered(family, messages) == goal
            else:
                assert goal in messages[-1]["content"], family
    # different families are different formats
    assert len({str(render(f, GOALS[0])) for f in FAMILIES}) == len(FAMILIES)


def test_unknown_and_empty_family_lists_are_errors_naming_the_known_ones():
    with pytest.raises(AttackFamilyError, match="unknown attack family 'dan'; known: flip_words, "
                                                "flip_chars") as error:
        check_families(["persona", "dan"])
    assert all(name in str(error.value) for name in FAMILIES)
    assert isinstance(error.value, ValueError)
    with pytest.raises(AttackFamilyError, match="no attack families given"):
        check_families([])
    with pytest.raises(AttackFamilyError, match="unknown attack family 'nope'"):
        render("nope", "x")
    assert check_families(("fiction", "few_shot")) == ["fiction", "few_shot"]


def test_attack_records_are_flipattack_format():
    goals = GOALS[:3]
    flips = attack_records(goals, "flip_chars", start_id=7)
    assert [{k: v for k, v in r.items() if k != "attack_family"} for r in flips] == flip_records(
        goals, "chars", start_id=7)
    assert {r["attack_family"] for r in flips} == {"flip_chars"}
    (persona,) = attack_records(goals[:1], "persona")
    assert persona == {"id": 0, "goal": goals[0], "attack_family": "persona",
                       "all_prompt": render("persona", goals[0]), "judge_success_gpt4": 1}
    with pytest.raises(AttackFamilyError):
        attack_records(goals, "flip_lines")


def test_attack_families_count_the_records_of_each_family():
    from unsafe_experts.records import attack_families

    records = attack_records(GOALS[:3], "persona") + attack_records(GOALS[:2], "flip_chars")
    assert attack_families(records) == {"flip_chars": 2, "persona": 3}  # sorted by name
    assert attack_families([{"goal": "g"}, {"attack_family": ""}, {"attack_family": 3}]) == {}
