"""The robustness runner on a tiny model: every attack runs at a small budget on the repaired
model and its reference with the same prompts, results carry n and ci95, the attacker's split
is disjoint from what is evaluated, and bad input is refused before any attack runs."""
import json

import pytest
import torch

from unsafe_experts.attacks.organism import OrganismConfig, build_splits, eval_set
from unsafe_experts.errors import ConfigError, ExpertSetError
from unsafe_experts.evaluation.evaluate import EvaluationConfig
from unsafe_experts.evaluation.suites import load_eval_set
from unsafe_experts.models.architectures import moe_layers
from unsafe_experts.robustness import expert_ranking
from unsafe_experts.robustness.budgets import RobustnessConfig
from unsafe_experts.robustness.runner import (
    ATTACKS,
    Target,
    attacker_split,
    check_attacks,
    check_reference,
    run_robustness,
    setup,
)

SMALL = dict(limit=2, router_budgets=[1, 2], rank_prompts=6, prefill_budgets=[1, 2], gcg_steps=[1],
             gcg_goals=1, gcg_suffix_tokens=2, gcg_top_k=4, gcg_candidates=4, finetune_steps=[1, 2],
             harmful_examples=[1], harmful_steps=1, quantisations=["bf16", "int8_weights"])


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    (folder / "eval_set.json").write_text(json.dumps(eval_set(build_splits(OrganismConfig.small()))))
    return load_eval_set(folder / "eval_set.json")


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "training_metadata.json").write_text(json.dumps(
        {"identified_experts_per_round": {"1": {"experts": [[0, 1], [1, 2]]}, "2": {"experts": [[0, 3]]}}}))
    return tmp_path


def evaluation():
    return EvaluationConfig(max_new_tokens=4, batch_size=8)


def test_every_attack_runs_on_both_models_with_n_and_intervals(make_model, tokenizer, suite, run_dir, monkeypatch):
    after, before = make_model("olmoe", seed=1), make_model("olmoe", seed=2)
    # a random tiny model never refuses: alternate refusals so the attacker has both groups to rank by
    flips = iter(range(10**6))
    monkeypatch.setattr(expert_ranking, "is_refusal", lambda text: next(flips) % 2 == 0)
    snapshot = {n: p.clone() for n, p in after.named_parameters()}
    names = check_attacks([])
    s = setup(suite, evaluation(), RobustnessConfig(**SMALL), names, moe_layers(after), run_dir)
    written = []
    result = run_robustness([Target("after", after, tokenizer), Target("before", before, tokenizer)],
                            s, names, progress=False, on_attack=lambda name, r: written.append(name))
    assert written == names == list(ATTACKS)
    assert set(result["attacks"]["router_known"]) == {"all", "round_1", "round_2"}
    assert result["attacks"]["router_known"]["all"]["after"]["experts_off"] == [(0, 1), (1, 2), (0, 3)]
    for name, table in result["attacks"].items():
        for budget, row in table.items():
            assert set(row) == {"after", "before"}, (name, budget)
            for metrics in row.values():
                figures = [m for m in metrics.values() if isinstance(m, dict) and "value" in m]
                assert figures, (name, budget)
                assert all("n" in m and "ci95" in m for m in figures)
    known = result["attacks"]["router_known"]["all"]["after"]
    assert "asr_all_families" in known and "plain_refusal" in known and "benign_loglik" in known
    assert result["attacks"]["prefill"]["2"]["after"]["asr_plain"]["n"] == 2
    assert result["attacks"]["router_steer"]["2"]["after"]["experts_forced"]
    assert all(torch.equal(p, snapshot[n]) for n, p in after.named_parameters())  # nothing trained in place


def test_the_router_attacks_say_why_they_are_skipped_when_nothing_is_complied(make_model, tokenizer, suite, monkeypatch):
    model = make_model("olmoe")
    monkeypatch.setattr(expert_ranking, "is_refusal", lambda text: True)
    s = setup(suite, evaluation(), RobustnessConfig(**SMALL), ["router_unknown"], moe_layers(model))
    result = run_robustness([Target("after", model, tokenizer)], s, ["router_unknown"], progress=False)
    assert "no compliance" in result["attacks"]["router_unknown"]["1"]["after"]["skipped"]


def test_the_attacker_split_never_holds_an_evaluated_prompt(suite):
    from unsafe_experts.stats import subset

    split = attacker_split(suite, 5, 0)
    for s in suite.sets:
        evaluated = {json.dumps(x.messages) for x in subset(s.items, 5, 0)}
        own = {json.dumps(x.messages) for x in split[s.name + "/" + s.kind]}
        assert not evaluated & own
        assert len(own) == len(s.items) - min(5, len(s.items))


@pytest.mark.parametrize("change, message", [
    (dict(router_budgets=[]), "router_budgets: an empty budget"),
    (dict(prefill_budgets=[0]), "prefill_budgets: budgets must be positive integers, got 0"),
    (dict(gcg_steps=[-3]), "gcg_steps: budgets must be positive integers, got -3"),
    (dict(router_budgets=[17]), "router_budgets: 17 is more than the model's 16 experts"),
    (dict(top_k_deltas=[0]), "top_k_deltas: 0"),
    (dict(limit=None), "attacker's split has no"),
    (dict(harmful_examples=[10**4]), "harmful_examples: 10000 is more than"),
])
def test_bad_budgets_are_named_before_anything_runs(make_model, suite, change, message):
    model = make_model("olmoe")
    names = [n for n in ATTACKS if n != "router_known"]  # that one needs a run folder
    with pytest.raises(ConfigError, match=message):
        setup(suite, evaluation(), RobustnessConfig(**{**SMALL, **change}), names, moe_layers(model))


def test_an_unknown_attack_is_named():
    with pytest.raises(ConfigError, match="attack 'router_magic': unknown; choose from none, router_known"):
        check_attacks(["router_magic"])


def test_a_run_folder_with_no_expert_list_is_refused(make_model, suite, tmp_path):
    model = make_model("olmoe")
    with pytest.raises(ExpertSetError, match="no expert list"):
        setup(suite, evaluation(), RobustnessConfig(**SMALL), ["router_known"], moe_layers(model), tmp_path)
    with pytest.raises(ConfigError, match="needs the run's folder"):
        setup(suite, evaluation(), RobustnessConfig(**SMALL), ["router_known"], moe_layers(model))


def test_a_reference_of_another_architecture_is_refused(make_model, tokenizer):
    after = Target("after", make_model("olmoe"), tokenizer)
    before = Target("before", make_model("qwen3_moe"), tokenizer)
    after.layers, before.layers = moe_layers(after.model), moe_layers(before.model)
    with pytest.raises(ConfigError, match="reference model: qwen3_moe"):
        check_reference(after, before)


@pytest.mark.parametrize("flags, message", [
    (["--attack", "bogus"], "attack 'bogus': unknown"),
    (["--router_budget", "0"], "router_budgets: budgets must be positive integers, got 0"),
    (["--router_budget", "999", "--attack", "router_unknown"], "router_budgets: 999 is more than"),
    (["--attack", "router_known", "--run_dir", "{empty}"], "no expert list"),
    (["--reference", "{other}"], "reference model: qwen3_moe"),
    (["--attack", "prefill", "--prefill_budget", "9"], "prefill_budgets: 9 is more than the 4 openings"),
    (["--attack", "gcg", "--gcg_goals", "1000"], "gcg_goals: 1000 is more than"),
    (["--attack", "top_k", "--top_k_delta", "9"], "top_k_deltas: +9 gives top-k 11"),
    (["--attack", "router_known", "--run_dir", "{corrupt}"], "not readable as JSON"),
    (["--attack", "router_known", "--run_dir", "{listed}"], "no expert list"),
    (["--attack", "router_known", "--run_dir", "{emptyround}"], "round_1 lists no expert"),
    (["--out", "{tmp}/userdir"], "is a folder"),
    (["--out", "{tmp}/link.json"], "is a symbolic link"),
    (["--out", "{tmp}/userfile/r.json"], "is a file, not a folder"),
    (["--plots", "{tmp}/userfile"], "--plots: "),
    (["--attack", "none", "--plots", "{tmp}/userdir2"], "robustness_none.png is a symbolic link"),
])
def test_the_command_refuses_bad_input_with_one_line_and_writes_nothing(tiny_dir, tokenizer, tmp_path, capsys,
                                                                       flags, message):
    from conftest import one_error_line

    from cli.main import main
    from unsafe_experts.models.tiny import tiny_model

    (tmp_path / "eval_set.json").write_text(json.dumps(eval_set(build_splits(OrganismConfig.small()))))
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other"
    tiny_model("qwen3_moe", tokenizer).save_pretrained(other)
    tokenizer.save_pretrained(other)
    for name, text in {"corrupt": '{"identified', "listed": "[1, 2]",
                       "emptyround": '{"identified_experts_per_round": {"1": {"experts": []}}}'}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "training_metadata.json").write_text(text)
    (tmp_path / "userdir").mkdir()
    (tmp_path / "userfile").write_text("mine")
    (tmp_path / "target.json").write_text("mine too")
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")
    (tmp_path / "userdir2").mkdir()
    (tmp_path / "userdir2" / "robustness_none.png").symlink_to(tmp_path / "target.json")
    names = dict(empty=tmp_path / "empty", other=other, tmp=tmp_path, corrupt=tmp_path / "corrupt",
                 listed=tmp_path / "listed", emptyround=tmp_path / "emptyround")
    flags = [f.format(**names) for f in flags]
    out = tmp_path / "out" / "robustness.json"
    given = {"--out": str(out), "--plots": str(tmp_path / "plots")}
    for key in ("--out", "--plots"):
        if key in flags:  # the case names its own
            given.pop(key)
    code = main(["robustness", "--model", str(tiny_dir), "--eval_set", str(tmp_path / "eval_set.json"),
                 "--engine_only", *[x for kv in given.items() for x in kv], *flags])
    assert code == 2
    one_error_line(capsys, message)
    assert not out.parent.exists() and not (tmp_path / "plots").exists()
    assert (tmp_path / "userfile").read_text() == "mine" and (tmp_path / "target.json").read_text() == "mine too"
    assert (tmp_path / "link.json").is_symlink() and list((tmp_path / "userdir").iterdir()) == []


def test_the_report_writes_the_table_headlines_and_a_plot_per_attack(make_model, tokenizer, suite, tmp_path):
    from reporting.robustness_report import plots, table
    from tasks.robustness import headlines, metric_name, write_summaries

    model = make_model("olmoe")
    names = ["none", "prefill"]
    s = setup(suite, evaluation(), RobustnessConfig(**SMALL), names, moe_layers(model))
    result = run_robustness([Target("after", model, tokenizer)], s, names, progress=False)
    text = table(result)
    assert "| prefill | 2 |" in text and "(asr_plain, n=2)" in text and "asr_all_families" in text
    paths = plots(result, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["robustness_none.png", "robustness_prefill.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    compact, page = write_summaries(result, tmp_path / "robustness.json", text)
    assert json.loads(compact.read_text()) == headlines(result)
    assert set(headlines(result)["prefill"]) == {"1", "2"} and page.read_text().startswith("| attack |")
    assert metric_name("top_k", "-1", "after") == "robust_top_k_minus1_after_asr"
    assert metric_name("none", "-", "before") == "robust_none_none_before_asr"


def test_the_comparison_budgets_are_read_from_params_or_refused_without_them(tmp_path, capsys):
    """`--budgets comparison` takes comparison.robustness (what make compare runs), and needs
    --params to find it."""
    from argparse import Namespace

    from conftest import one_error_line

    from cli.main import main
    from cli.robustness import resolve

    assert main(["robustness", "--model", str(tmp_path), "--budgets", "comparison",
                 "--eval_set", str(tmp_path / "e.json")]) == 2
    one_error_line(capsys, "--budgets comparison reads comparison.robustness: give --params")
    _, config, _ = resolve(Namespace(params="params.yaml", budgets="comparison"))
    _, demo, _ = resolve(Namespace(params="params.yaml", budgets="robustness"))
    assert "gcg" not in config.attacks and config.router_budgets == [4, 16] and demo.router_budgets == [16]
