"""params.yaml: the single source of run parameters for the CLI, the flow and DVC.

The `train` section is exactly the engine's TrainConfig (types and defaults come from it, so
they cannot drift); unknown keys anywhere are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from unsafe_experts.config import ConfigError, TrainConfig
from unsafe_experts.organism import OrganismConfig

FORBID = ConfigDict(extra="forbid")


def _from_dataclass(cls, name: str) -> type[BaseModel]:
    hints = typing.get_type_hints(cls)
    spec = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory)
        else:
            default = ...
        spec[f.name] = (hints[f.name], default)
    return create_model(name, __config__=FORBID, **spec)


TrainParams = _from_dataclass(TrainConfig, "TrainParams")
OrganismParams = _from_dataclass(OrganismConfig, "OrganismParams")


class EvaluationParams(BaseModel):
    """Safety evaluation before surgery and after every round (None: no evaluation)."""
    model_config = FORBID
    eval_set: str | None = None
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(16, ge=1)
    limit: int | None = Field(None, ge=1)  # first N prompts of each set (None: all)
    samples: int = Field(5, ge=0)  # prompts and responses per set kept as an MLflow table


class TrackingParams(BaseModel):
    model_config = FORBID
    experiment: str = "unsafe-experts"
    log_model: bool = False  # log the final model's bytes as an MLflow artifact


class ComparisonRun(BaseModel):
    model_config = FORBID
    method: typing.Literal["gradient", "routing", "random", "all_experts", "router_only"]
    k: int = Field(ge=1)
    seed: int = 42


class ComparisonParams(BaseModel):
    """Runs of `dvc repro compare`: each a full surgery with evaluation, then one table."""
    model_config = FORBID
    experiment: str = "unsafe-experts-comparison"
    eval_limit: int | None = Field(None, ge=1)
    runs: list[ComparisonRun] = []


class ScheduleParams(BaseModel):
    """`unsafe-experts serve`: when the served pipeline runs by itself."""
    model_config = FORBID
    cron: str | None = None  # e.g. "0 3 * * 1" (Mondays 03:00); None: on dataset events only


class Params(BaseModel):
    model_config = FORBID
    organism: OrganismParams = OrganismParams()
    evaluation: EvaluationParams = EvaluationParams()
    train: TrainParams
    tracking: TrackingParams = TrackingParams()
    comparison: ComparisonParams = ComparisonParams()
    schedule: ScheduleParams = ScheduleParams()

    def train_config(self) -> TrainConfig:
        cfg = TrainConfig(**self.train.model_dump())
        try:
            return cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"train.{e}") from None


def parse_params(data: dict, source: str = "params") -> Params:
    try:
        params = Params.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
                             for err in e.errors())
        raise ConfigError(f"{source}: {problems}") from None
    try:
        params.train_config()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read params ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    return parse_params(data, str(path))
