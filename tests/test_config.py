"""One config path: dataclass defaults < params.yaml section < command-line flags."""
import dataclasses

import pytest
import yaml

from cli.flags import field_values
from cli.main import parser
from schemas.params import resolve_run
from unsafe_experts.config import ConfigError, TrainConfig
from unsafe_experts.evaluation.evaluate import EvaluationConfig

REQUIRED = {"model_name": "m", "dataset_path": "d.json", "output_dir": "out"}


def params_file(tmp_path, train=None, evaluation=None, tracking=None):
    path = tmp_path / "params.yaml"
    data = {"train": {**REQUIRED, **(train or {})}}
    if evaluation:
        data["evaluation"] = evaluation
    if tracking:
        data["tracking"] = tracking
    path.write_text(yaml.safe_dump(data))
    return path


def train_args(*argv):
    p, _ = parser()
    return p.parse_args(["train", *argv])


def test_defaults_then_params_then_flags(tmp_path):
    path = params_file(tmp_path, train={"top_k_experts": 4, "expert_lr": 1e-3},
                       evaluation={"limit": 10, "max_new_tokens": 32}, tracking={"experiment": "e1"})
    args = train_args("--params", str(path), "--top_k_experts", "7", "--eval_limit", "3")
    run = resolve_run(str(path), field_values(args, TrainConfig),
                      field_values(args, EvaluationConfig, "eval__"))
    assert run.train.top_k_experts == 7            # flag beats params
    assert run.train.expert_lr == 1e-3             # params beat the dataclass default (5e-5)
    assert run.train.router_lr == 1e-4             # nothing else says: the dataclass default
    assert run.evaluation.limit == 3 and run.evaluation.max_new_tokens == 32
    assert run.evaluation.batch_size == EvaluationConfig().batch_size
    assert run.experiment == "e1"


def test_flags_alone_without_params():
    args = train_args("--model_name", "m", "--dataset_path", "d", "--output_dir", "o",
                      "--no-require_judge_success", "--max_samples", "none")
    run = resolve_run(None, field_values(args, TrainConfig), {})
    assert run.train.require_judge_success is False and run.train.max_samples is None
    assert run.train.top_k_experts == 100  # the dataclass default when nothing else says


def test_a_false_flag_overrides_a_true_param(tmp_path):
    path = params_file(tmp_path, train={"overwrite": True, "skip_router_training": True})
    args = train_args("--params", str(path), "--no-overwrite", "--no-skip_router_training")
    run = resolve_run(str(path), field_values(args, TrainConfig), {})
    assert run.train.overwrite is False and run.train.skip_router_training is False


def test_every_config_field_has_a_flag():
    from cli.loading import ENDPOINT_FIELDS

    p, _ = parser()
    commands = p._subparsers._group_actions[0].choices
    dests = {a.dest for a in commands["train"]._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= dests
    # the server flags are evaluate's and attack's: train evaluates weights only it holds
    assert {"eval__" + f.name for f in dataclasses.fields(EvaluationConfig)
            if f.name not in ENDPOINT_FIELDS} <= dests
    assert not {"eval__" + f for f in ENDPOINT_FIELDS} & dests
    assert {"eval__" + f for f in ENDPOINT_FIELDS} <= {a.dest for a in commands["evaluate"]._actions}


@pytest.mark.parametrize("train, message", [
    ({"top_k": 3}, "train.top_k: Extra inputs are not permitted"),
    ({"expert_lr": float("nan")}, "train.expert_lr: must not be negative and must be finite"),
    ({"seed": 10**20}, "train.seed: must be between 0 and 4294967295"),  # was an OverflowError traceback
    # strings and booleans where numbers belong used to be converted silently (seed 1, lr 0.001)
    ({"seed": True}, "train.seed: Input should be a valid integer"),
    ({"expert_lr": "1e-3"}, "train.expert_lr: Input should be a valid number"),
    ({"max_samples": "12"}, "train.max_samples: Input should be a valid integer"),
    ({"overwrite": "yes"}, "train.overwrite: Input should be a valid boolean"),
])
def test_unknown_and_bad_params_name_the_key(tmp_path, train, message):
    with pytest.raises(ConfigError, match=message):
        resolve_run(str(params_file(tmp_path, train=train)), {}, {})


def test_a_bad_flag_value_names_the_section_and_key(tmp_path):
    with pytest.raises(ConfigError, match="evaluation.batch_size: must be at least 1"):
        resolve_run(str(params_file(tmp_path)), {}, {"batch_size": 0})


def test_validation_runs_once_per_set_of_values(monkeypatch):
    cfg = TrainConfig(**REQUIRED)
    calls = []
    original = TrainConfig._check
    monkeypatch.setattr(TrainConfig, "_check", lambda self: calls.append(1) or original(self))
    cfg.validate()
    cfg.validate()
    assert len(calls) == 1
    cfg.top_k_experts = 0  # a changed value is checked again
    with pytest.raises(ConfigError, match="top_k_experts"):
        cfg.validate()
    assert "_validated" not in dataclasses.asdict(cfg)
