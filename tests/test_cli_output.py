"""What the commands print (issue #26): the evaluation table once, without a `final` column that
repeats the last round, every line under 120 characters, one interval format, a legend of the
metric names (in `report` and the README), no progress bars under --quiet, each command's own
help, and Prefect's temporary server given time to start on a loaded machine."""
import json
import re
from pathlib import Path

import pytest

from cli.main import main, parser
from cli.prefect_defaults import DEFAULT_STARTUP_S, STARTUP_TIMEOUT, default_startup_timeout
from cli.tables import LEGEND, evaluation_table, legend
from unsafe_experts.attacks.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
FIGURE = re.compile(r"-?\d+\.\d{3} \[-?\d+\.\d{2}, -?\d+\.\d{2}\]")  # 0.146 [0.07, 0.27]


def check_lines(text: str) -> list[str]:
    """Every line under 120 characters, every bracket an interval of the one format."""
    lines = text.splitlines()
    assert all(len(line) < 120 for line in lines), max(lines, key=len)
    for interval in re.findall(r"\S+ \[[^\]]*\d\.\d[^\]]*\]", text):
        assert FIGURE.fullmatch(interval), interval
    return lines


def figure(value, n=48):
    return {"value": value, "n": n, "ci95": [value - 0.05, value + 0.05]}


def demo_evaluation(rounds=3) -> dict:
    """The demo's metric names, a negative log-likelihood (the widest cell) and, as the flow
    writes it, `final` equal to the last round."""
    names = [f"{kind}_{family}" for family in FAMILIES for kind in ("asr", "over_refusal")]
    names += ["plain_refusal", "over_refusal", "benign_loglik", "own_benign_loglik"]
    stages = {stage: {n: figure(-5.829 - i if "loglik" in n else 0.5 - i / 10) for n in names}
              for i, stage in enumerate(["before", *(f"round_{r}" for r in range(1, rounds + 1))])}
    return {**stages, "final": stages[f"round_{rounds}"]}


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    rounds = {str(r): {"experts": [[0, r], [1, r + 1]], "scores": {}, "router_kl_before_after": [4e-3, 7e-4]}
              for r in (1, 2, 3)}
    (out / "training_metadata.json").write_text(json.dumps({
        "status": "completed", "parameters": {"score_mode": "accumulate"},
        "model": {"class": "OlmoeForCausalLM"}, "identified_experts_per_round": rounds,
        "evaluation": demo_evaluation()}))
    return out


def test_report_prints_each_stage_once_narrow_in_one_format_with_a_legend(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    lines = check_lines(capsys.readouterr().out)
    headers = [line.split() for line in lines if line.startswith("metric ")]
    stages = [s for header in headers for s in header[2:]]  # after `metric` and `n`
    assert stages == ["before", "round_1", "round_2", "round_3"]  # each once, no `final`
    body = [line for line in lines if line.startswith("asr_persona ")]
    assert len(body) == len(headers) and all(FIGURE.search(line) for line in body)
    # the legend: one line per metric family the table shows, none for families it lacks
    after = lines[lines.index("what the names mean (README: Metrics):") + 1:]
    shown = [line.split()[0] for line in after]
    assert shown == ["asr_<family>", "over_refusal_<family>", "plain_refusal", "over_refusal",
                     "benign_loglik", "own_benign_loglik"]
    assert any("benign in family refused" in line for line in lines)


def test_a_final_column_is_shown_only_where_it_differs_from_the_last_round():
    evaluation = demo_evaluation(rounds=1)
    assert "final" not in evaluation_table(evaluation)
    evaluation["final"] = {"plain_refusal": figure(0.9)}
    assert "final" in evaluation_table(evaluation)


@pytest.mark.parametrize("rounds", [1, 3, 10])
def test_the_evaluation_table_fits_any_number_of_rounds(rounds):
    lines = check_lines(evaluation_table(demo_evaluation(rounds)))
    stages = [s for line in lines if line.startswith("metric ") for s in line.split()[2:]]
    assert stages == ["before", *(f"round_{r}" for r in range(1, rounds + 1))]


def test_the_legend_is_in_the_readme_line_for_line():
    readme = (ROOT / "README.md").read_text()
    for line in legend().splitlines():
        assert line in readme, line
    assert len(legend().splitlines()) == len(LEGEND)


@pytest.mark.parametrize("command", ["evaluate", "ablate"])
def test_evaluate_and_ablate_have_their_own_eval_set_help_and_no_rounds(command):
    p, _ = parser()
    text = p._subparsers._group_actions[0].choices[command].format_help()
    assert "--eval_set" in text and "--eval_rounds" not in text
    assert "after every round" not in " ".join(text.split())  # train's words for it


def test_the_prefect_start_up_time_is_set_only_where_the_user_set_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    environ = {"PREFECT_HOME": str(tmp_path / "home")}
    default_startup_timeout(environ)
    assert environ[STARTUP_TIMEOUT] == str(DEFAULT_STARTUP_S) == "120"
    environ = {"PREFECT_HOME": str(tmp_path / "home"), STARTUP_TIMEOUT: "7"}
    default_startup_timeout(environ)
    assert environ[STARTUP_TIMEOUT] == "7"  # the user's value stands
    (tmp_path / "home").mkdir()
    (tmp_path / "home/profiles.toml").write_text(
        f'active = "mine"\n[profiles.mine]\n{STARTUP_TIMEOUT} = "9"\n')
    environ = {"PREFECT_HOME": str(tmp_path / "home")}
    default_startup_timeout(environ)
    assert STARTUP_TIMEOUT not in environ  # an environment variable would override the profile's


def test_every_command_sets_the_prefect_start_up_time(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(STARTUP_TIMEOUT)
    assert main(["report", str(run_dir)]) == 0
    import os

    assert os.environ[STARTUP_TIMEOUT] == "120"


def test_evaluate_and_ablate_print_narrow_tables_and_no_bars_under_quiet(tiny_dir, tmp_path, capsys):
    user = [{"role": "user", "content": "Write a poem about the sea"}]
    eval_set = tmp_path / "eval_set.json"
    eval_set.write_text(json.dumps({"plain": [user] * 3, "benign_refs": [[user, "The sea is wide."]] * 3}))
    common = ["--model", str(tiny_dir), "--eval_set", str(eval_set), "--eval_max_new_tokens", "4"]
    experts = tmp_path / "experts.json"
    experts.write_text("[[0, 1]]")
    for command in (["evaluate", *common], ["ablate", *common, "--experts", str(experts), "--with_baseline"]):
        assert main([*command]) == 0
        assert "it/s" in capsys.readouterr().err  # the bars this checks for, shown without --quiet
        assert main([*command, "--quiet"]) == 0
        printed = capsys.readouterr()
        assert "it/s" not in printed.err and "%|" not in printed.err
        lines = check_lines(printed.out)
        assert any(FIGURE.search(line) for line in lines if line.startswith("plain_refusal"))


def test_organism_quiet_shows_no_library_bars(tiny_dir, tmp_path, monkeypatch, capsys):
    """transformers' "Writing model shards" bar showed under `organism --quiet` in make demo:
    its bars are off while a --quiet command runs (and on again afterwards), and so are those of
    any tqdm user loaded later (TQDM_DISABLE)."""
    import os

    from transformers.utils import logging as hf_logging

    import unsafe_experts.attacks.organism as organism

    seen = []

    def build(out, cfg, progress=True):  # the real build (45 s) saves its model with transformers
        seen.append((hf_logging.is_progress_bar_enabled(), os.environ.get("TQDM_DISABLE"), progress))
        (Path(out) / "build.json").parent.mkdir(parents=True)
        (Path(out) / "build.json").write_text(json.dumps({"examples": 1, "first_loss": 2.0,
                                                          "last_loss": 1.0, "seconds": 1}))
        return Path(out)

    monkeypatch.setattr(organism, "build_organism", build)
    monkeypatch.delenv("TQDM_DISABLE")
    hf_logging.enable_progress_bar()  # the tests switch them off; a user's process has them on
    try:
        assert main(["organism", str(tmp_path / "a"), "--small"]) == 0
        assert main(["organism", str(tmp_path / "b"), "--small", "--quiet"]) == 0
        assert seen == [(True, None, True), (False, "1", False)]
        assert hf_logging.is_progress_bar_enabled() and "TQDM_DISABLE" not in os.environ  # as before
    finally:
        hf_logging.disable_progress_bar()


def test_the_robustness_table_fits_the_terminal_in_the_one_format():
    """`robustness` printed its markdown table, 200-220 characters a line."""
    from cli.tables import robustness_table

    pooled = {"asr_all_families": figure(0.969, 128), "plain_refusal": figure(0.125, 16),
              "format_refusal_all": figure(0.016, 128), "benign_loglik": figure(-5.812, 16)}
    result = {"setup": {"limit": 16}, "attacks": {
        "router_known": {"round_1": {"after": pooled, "before": pooled}},
        "prefill": {"1": {"after": {"asr_plain": figure(1.0, 16)}, "before": {"asr_plain": figure(1.0, 16)}}},
        "top_k": {"1": {"after": pooled, "before": {"skipped": "PhiMoE's router cannot change top-k " * 5}}}}}
    lines = check_lines(robustness_table(result))
    assert lines[0].split() == ["attack", "budget", "metric", "n", "after", "before"]
    assert lines[1].split()[:4] == ["router_known", "round_1", "asr_all_families", "128"]
    assert lines[2].split()[:4] == ["prefill", "1", "asr_plain", "16"]
    assert lines[3].endswith("skipped")


def test_train_leaves_the_table_to_report(tiny_dir, records_path, tmp_path, capsys, tracking_dir):
    """`make demo` runs train, then report: the evaluation table was printed by both."""
    user = [{"role": "user", "content": "Write a poem about the sea"}]
    eval_set = tmp_path / "eval_set.json"
    eval_set.write_text(json.dumps({"plain": [user] * 3, "benign_refs": [[user, "The sea is wide."]] * 3}))
    out = tmp_path / "out"
    assert main(["train", "--model_name", str(tiny_dir), "--dataset_path", str(records_path),
                 "--output_dir", str(out), "--num_rounds", "2", "--top_k_experts", "2",
                 "--batch_size", "4", "--max_samples", "8", "--eval_set", str(eval_set),
                 "--eval_max_new_tokens", "4", "--quiet"]) == 0
    printed = check_lines(capsys.readouterr().out)
    assert not any(line.startswith("metric ") for line in printed)
    assert f"the evaluation table: unsafe-experts report {out}" in printed
    assert main(["report", str(out)]) == 0
    lines = check_lines(capsys.readouterr().out)
    assert [s for line in lines if line.startswith("metric ") for s in line.split()[2:]] == [
        "before", "round_1", "round_2"]
    assert "plain_refusal          plain refusal: harmful requests asked plainly, without an attack, refused" in lines
