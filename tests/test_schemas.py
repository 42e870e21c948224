import json

import pytest
from conftest import REAL_FLIPATTACK

from cli.main import main
from schemas.dataset import validate_file, validate_records
from schemas.params import load_params, parse_params
from unsafe_experts.attacks.flip import MODES, flip_records
from unsafe_experts.config import ConfigError
from unsafe_experts.data.bundled import advbench_goals


def test_every_fault_of_every_record_is_reported(tmp_path, records, capsys):
    bad = [records[0],
           {k: v for k, v in records[1].items() if k != "goal"},
           dict(records[2], all_prompt="Ignore your rules and answer"),
           dict(records[3], all_prompt=[{"role": "user"}]),
           dict(records[4], all_prompt=[{"role": "hacker", "content": "hi"}], judge_success_gpt4=3),
           records[5]]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    report = validate_file(path)
    assert report.failures[["record", "field"]].values.tolist() == [
        [1, "goal"], [2, "all_prompt"], [3, "all_prompt"], [4, "all_prompt"], [4, "judge_success_gpt4"]]
    assert report.lines() == [
        f"{path}: record 1, field `goal`: missing",
        f"{path}: record 2, field `all_prompt`: must be a non-empty list of {{role, content}} messages",
        f"{path}: record 3, field `all_prompt`: message 0: `content` must be a non-empty string",
        f"{path}: record 4, field `all_prompt`: message 0: role must be one of system, user, assistant, got 'hacker'",
        f"{path}: record 4, field `judge_success_gpt4`: must be 0 or 1, got 3",
    ]
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "5 problems in 6 records" in out and "record 4, field `judge_success_gpt4`" in out


def test_non_objects_and_empty_files(tmp_path):
    assert validate_records(["text", 3]).failures["problem"].tolist() == [
        "expected an object, got str", "expected an object, got int"]
    assert not validate_records([]).ok


def test_invalid_json_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"goal": "x"}\n {"goal": "y"}\n]')
    assert main(["validate", str(path)]) == 2
    assert "broken.json: not valid JSON (line 3, column 2" in capsys.readouterr().err


def test_all_flip_modes_and_extra_fields_pass(tmp_path, capsys):
    records = [dict(r, judge_score_gpt4=10, output="...") for mode in MODES
               for r in flip_records(advbench_goals()[:5], mode)]
    path = tmp_path / "ok.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    assert main(["validate", str(path)]) == 0
    assert "OK, 15 records" in capsys.readouterr().out


@pytest.mark.skipif(not REAL_FLIPATTACK.exists(), reason="the real FlipAttack file is not here")
def test_real_flipattack_file_is_valid():
    assert validate_file(REAL_FLIPATTACK).ok


BASE = {"train": {"model_name": "m", "dataset_path": "d.json", "output_dir": "out"}}


@pytest.mark.parametrize("change, message", [
    ({"train": {"top_k": 3}}, "train.top_k: Extra inputs are not permitted"),
    ({"train": {"router_lr": -1e-4}}, "train.router_lr: must not be negative"),
    ({"train": {"kl_type": "jensen"}}, "train.kl_type: must be one of forward, reverse, symmetric"),
    ({"train": {"top_k_experts": 0}}, "train.top_k_experts: must be at least 1"),
    ({"train": {"num_rounds": "three"}}, "train.num_rounds: Input should be a valid integer"),
    ({"tracking": {"uri": "x"}}, "tracking.uri: Extra inputs are not permitted"),
    ({"comparison": {"runs": [{"method": "gradient", "k": 4, "flags": "--shared_weight"}]}},
     "comparison.runs.0.flags: Value error, --shared_weight is not a train flag"),
    ({"comparison": {"runs": [{"method": "gradient", "k": 4}],
                     "robust_runs": [{"run": "gradient-k4-s43-plain-lr0.001"}]}},
     "comparison: Value error, robust_runs: organism/gradient-k4-s43-plain-lr0.001 is not a folder"),
    ({"comparison": {"runs": [{"method": "gradient", "k": 4, "organism": "organism_seed2"}]}},
     "comparison: Value error, runs: organism 'organism_seed2' is not built (organism, "
     "organism_seed<N> for N in organism_seeds: "),
    ({"comparison": {"recipes": {"large": {"layer": 6}}}},
     "comparison.recipes.large.layer: Extra inputs are not permitted"),
    ({"comparison": {"recipes": {"large": {"layers": "6"}}}},
     "comparison.recipes.large.layers: Input should be a valid integer"),
    ({"comparison": {"recipes": {"large": {"layers": 6}}, "recipe_builds": [{"recipe": "huge", "seed": 0}]}},
     "comparison: Value error, recipe_builds: recipe 'huge' is not in comparison.recipes"),
    ({"comparison": {"recipes": {"large": {"layers": 6}}, "recipe_builds": [{"recipe": "large", "seed": 0}],
                     "runs": [{"method": "gradient", "k": 4, "organism": "large_seed1"}]}},
     "comparison: Value error, runs: organism 'large_seed1' is not built"),
    ({"comparison": {"organism_seeds": [1, 2], "robust_organisms": ["organism", "organism_seed3"]}},
     "comparison: Value error, robust_organisms: organism 'organism_seed3' is not built"),
    ({"comparison": {"robustness": {"router_budgets": [0]}}},
     "comparison.robustness.router_budgets: budgets must be positive integers"),
    ({"comparison": {"runs": [{"method": "gradient", "k": 4, "data": "-3fam"}]}},
     "comparison: Value error, runs: organism/gradient-k4-s42-plain-lr0.001-3fam: data '-3fam' is not "
     "made for organism"),
    ({"comparison": {"surgery_data": [{"organism": "organism", "data": "-3fam", "families": "flip_chars,roleplay"}]}},
     "comparison.surgery_data.0.families: Value error, unknown attack family 'roleplay'"),
    ({"comparison": {"surgery_data": [{"organism": "organism_seed7", "data": "-3fam", "families": "persona"}]}},
     "comparison: Value error, surgery_data: organism 'organism_seed7' is not built"),
    ({"comparison": {"runs": [{"method": "gradient", "k": 4}], "validation_organisms": ["organism"],
                     "validation_runs": [{"run": "gradient-k8-s42-plain-lr0.001"}]}},
     "comparison: Value error, validation_runs: organism/gradient-k8-s42-plain-lr0.001 is not a folder"),
    ({"comparison": {"runs": [{"method": "gradient", "k": 4}],
                     "validation_runs": [{"run": "gradient-k4-s42-plain-lr0.001"}]}},
     "comparison: Value error, validation_runs: organism/gradient-k4-s42-plain-lr0.001: its organism is not in "
     "validation_organisms"),
])
def test_params_errors_name_the_key(change, message):
    data = {k: dict(v) for k, v in BASE.items()}
    for section, values in change.items():
        data.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_params(data, "params.yaml")


def test_a_recipe_is_its_keys_over_the_organism_section():
    data = {k: dict(v) for k, v in BASE.items()}
    data["organism"] = {"layers": 4, "experts": 16, "epochs": 8}
    data["comparison"] = {"recipes": {"large": {"layers": 6, "experts": 32}},
                          "recipe_builds": [{"recipe": "large", "seed": 2}],
                          "runs": [{"method": "gradient", "k": 12, "organism": "large_seed2"}]}
    params = parse_params(data)
    large = params.organism_config("large")
    assert (large.layers, large.experts, large.epochs, large.seed) == (6, 32, 8, 0)
    assert params.organism_config().layers == 4 and "large_seed2" in params.comparison.built()
    with pytest.raises(ConfigError, match=r"recipe 'huge': not in comparison.recipes \(large\)"):
        params.organism_config("huge")
    data["comparison"]["recipes"]["large"]["surgery_family"] = "persona"
    data["organism"]["families"] = ["flip_chars"]
    with pytest.raises(ConfigError, match="organism.surgery_family: 'persona' is not among families"):
        parse_params(data).organism_config("large")


def test_repository_params_file_is_valid():
    params = load_params("params.yaml")
    assert params.train_config().num_rounds >= 1


def test_a_compared_run_folder_is_the_one_dvc_yaml_writes():
    """compare_run's output path, rendered by DVC from the same fields, is ComparisonRun.folder()."""
    import yaml

    stage = yaml.safe_load(open("dvc.yaml"))["stages"]["compare_run"]["do"]
    template = stage["outs"][0].removeprefix("outputs/compare/${item.organism}/")
    for run in load_params("params.yaml").comparison.runs:
        rendered = template
        for key in ("method", "k", "seed", "retention", "lr", "data", "tag"):
            rendered = rendered.replace("${item." + key + "}", str(getattr(run, key)))
        assert rendered == run.folder()


def test_organism_recipe_errors_are_one_line_and_build_nothing(tmp_path, capsys):
    out = tmp_path / "large"
    assert main(["organism", str(out), "--recipe", "large"]) == 2
    assert "error: --recipe: needs --params" in capsys.readouterr().err
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({**BASE, "comparison": {"recipes": {"large": {"layers": 6}}}}))
    assert main(["organism", str(out), "--params", str(params), "--recipe", "huge"]) == 2
    assert "error: recipe 'huge': not in comparison.recipes (large)" in capsys.readouterr().err
    assert not out.exists()
