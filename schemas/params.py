"""params.yaml: the single source of run parameters for the CLI, the flow and DVC.

The `train` section is exactly the engine's TrainConfig, `evaluation` its EvaluationConfig and
`robustness` its RobustnessConfig
(types and defaults come from them, so they cannot drift); unknown keys anywhere are errors
that name the key. `resolve_run` is the one place a run's configuration is put together:

    dataclass defaults  <  params.yaml section  <  command-line flags

and validated once; the CLI, the flows and the engine all take its result as is.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from unsafe_experts.attacks.families import check_families
from unsafe_experts.attacks.organism import OrganismConfig
from unsafe_experts.config import METHODS, RETENTION, ConfigError, TrainConfig
from unsafe_experts.errors import UserError, YamlRefused
from unsafe_experts.evaluation.evaluate import EvaluationConfig
from unsafe_experts.robustness.budgets import RobustnessConfig
from unsafe_experts.safe_yaml import load_yaml

# strict: `seed: true` or `expert_lr: "1e-3"` is a mistake to name, not a value to convert
# (lax parsing made them 1 and 0.001 silently); an int is still a float
FORBID = ConfigDict(extra="forbid", strict=True)


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
# another organism recipe: the `organism` keys it changes (a larger model, say), each optional
RecipeParams = create_model("RecipeParams", __config__=FORBID,
                            **{name: (field.annotation | None, None)
                               for name, field in OrganismParams.model_fields.items() if name != "seed"})
EvaluationParams = _from_dataclass(EvaluationConfig, "EvaluationParams")
RobustnessParams = _from_dataclass(RobustnessConfig, "RobustnessParams")


def check_model_name(name: str | None) -> str | None:
    """A registered model's name as MLflow accepts it (checked before any training)."""
    if name is not None and (not name.strip() or any(c in name for c in "/:")):
        raise ConfigError(f"register_model {name!r}: a registered model's name must be non-empty "
                          "and contain no '/' or ':'")
    return name


class TrackingParams(BaseModel):
    model_config = FORBID
    experiment: str = "unsafe-experts"
    log_model: bool = False  # log the final model's bytes as an MLflow artifact
    register_model: str | None = None  # register the final model as a version of this name

    @field_validator("register_model")
    @classmethod
    def _registrable(cls, name):
        try:
            return check_model_name(name)
        except ConfigError as e:
            raise ValueError(str(e)) from None


class ComparisonRun(BaseModel):
    """One surgery of the comparison. Every key is spelled out in params.yaml (through the
    `run_defaults` anchor) because dvc.yaml's compare_run stage templates each of them."""
    model_config = FORBID
    method: typing.Literal[METHODS]
    k: int = Field(ge=1)
    seed: int = 42
    organism: str = Field("organism", pattern=r"^[a-z0-9_]+$")  # a folder under build/
    retention: typing.Literal[RETENTION] = "plain"
    lr: float = Field(1e-3, gt=0)  # the experts' learning rate
    # a defence's train flags (e.g. "--shared_weights --expert_dropout 0.5") and the suffix that
    # keeps its folder apart from the undefended run's ("-shared-drop0.5")
    flags: str = ""
    tag: str = Field("", pattern=r"^(-[a-z0-9.]+)*$")
    # the surgery's records: "" the organism's own (build/<organism>/surgery_records.json), or a
    # suffix naming a `surgery_data` entry's records (build/<organism><data>/surgery_records.json)
    data: str = Field("", pattern=r"^(-[a-z0-9]+)?$")

    @field_validator("flags")
    @classmethod
    def _train_flags(cls, flags: str) -> str:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        for word in flags.split():
            if word.startswith("--") and word[2:] not in known:
                raise ValueError(f"{word} is not a train flag")
        return flags

    def folder(self) -> str:
        """The run's folder under outputs/compare/<organism>/ (dvc.yaml's compare_run)."""
        return f"{self.method}-k{self.k}-s{self.seed}-{self.retention}-lr{self.lr}{self.data}{self.tag}"


class SurgeryData(BaseModel):
    """Surgery records in several attack families (the surgery_data stage: `unsafe-experts
    attack` on the organism's own training goals, judged by the refusal judge), written to
    build/<organism><data>/surgery_records.json; every other family stays unseen."""
    model_config = FORBID
    organism: str = Field(pattern=r"^[a-z0-9_]+$")
    data: str = Field(pattern=r"^-[a-z0-9]+$")
    families: str  # comma-separated, as `attack --family` takes them

    @field_validator("families")
    @classmethod
    def _known(cls, families: str) -> str:
        try:
            check_families(families.split(","))
        except UserError as e:
            raise ValueError(str(e)) from None
        return families


class RecipeBuild(BaseModel):
    """One build of another organism recipe (the recipe_builds stage): build/<recipe>_seed<seed>."""
    model_config = FORBID
    recipe: str = Field(pattern=r"^[a-z][a-z0-9]*$")
    seed: int = Field(ge=0)

    def organism(self) -> str:
        return f"{self.recipe}_seed{self.seed}"


class RobustRun(BaseModel):
    """A compared surgery re-attacked (the compare_robust stage): outputs/compare/<organism>/<run>."""
    model_config = FORBID
    organism: str = Field("organism", pattern=r"^[a-z0-9_]+$")
    run: str


class AblationRun(BaseModel):
    """The unrepaired organism with the experts of a compared run's round switched off (the
    compare_ablate stage), or with as many random experts drawn with `seed`
    (compare_ablate_random)."""
    model_config = FORBID
    run: str  # a folder under outputs/compare, e.g. gradient-k4-s42
    round: int = Field(1, ge=1)
    seed: int = 0


class GridParams(BaseModel):
    """Where `unsafe-experts grid` (make compare) runs the grid's stages: a local Dask cluster
    of `workers` processes (default: one per core), or an existing scheduler's address."""
    model_config = FORBID
    dask_address: str | None = None      # e.g. tcp://scheduler:8786; None: a local cluster
    workers: int | None = Field(None, ge=1)
    stage_resources: str | None = None   # e.g. "GPU=1": what each stage holds on its worker


class ComparisonParams(BaseModel):
    """Runs of `dvc repro compare`: each a full surgery with evaluation, then one table."""
    model_config = FORBID
    experiment: str = "unsafe-experts-comparison"
    eval_limit: int | None = Field(None, ge=1)
    # the retention answers and evaluation before surgery, shared by the runs of one organism
    cache_dir: str = "outputs/cache"
    # more organisms of the demo's recipe, one per seed, built into build/organism_seed<N>
    organism_seeds: list[int] = [1]
    # other organism recipes (e.g. a larger one), each the `organism` keys it changes, and
    # their builds: build/<recipe>_seed<N>, compared like the demo recipe's builds
    recipes: dict[str, RecipeParams] = {}
    recipe_builds: list[RecipeBuild] = []
    # the organisms attacked alone (compare_robust_organism): "organism" or organism_seed<N>
    robust_organisms: list[str] = ["organism"]
    run_defaults: dict = {}  # the YAML anchor the runs merge (`<<: *run`)
    surgery_data: list[SurgeryData] = []  # records in several families, a run's `data`
    runs: list[ComparisonRun] = []
    # `unsafe-experts ablate --out` files read as `ablated` rows (the compare_ablate stages)
    ablation_dir: str | None = "outputs/ablation"
    ablations: list[AblationRun] = []
    random_ablations: list[AblationRun] = []
    # the compared surgeries re-attacked, and with which attacks and budgets: their results
    # go to robust_dir/<organism>/<run>.json (the organism itself: organism.json)
    robust_dir: str | None = "outputs/robust"
    robust_runs: list[RobustRun] = []
    # each method tuned on the validation split (comparison/tuning.py): these compared runs'
    # final models (compare_validate) and these organisms before surgery
    # (compare_validate_organism) evaluated on it, into validation_dir/<organism>/<run>.json and
    # validation_dir/<organism>.json
    validation_dir: str | None = "outputs/validation"
    validation_runs: list[RobustRun] = []
    validation_organisms: list[str] = []
    robustness: RobustnessParams = RobustnessParams()

    def built(self) -> set[str]:
        """The organisms the comparison builds: folders under build/."""
        return {"organism", *(f"organism_seed{n}" for n in self.organism_seeds),
                *(b.organism() for b in self.recipe_builds)}

    @model_validator(mode="after")
    def _recipes_are_named(self):
        for b in self.recipe_builds:
            if b.recipe not in self.recipes:
                raise ValueError(f"recipe_builds: recipe {b.recipe!r} is not in comparison.recipes "
                                 f"({', '.join(sorted(self.recipes)) or 'none'})")
        return self

    @model_validator(mode="after")
    def _organisms_are_built(self):
        built = self.built()
        named = [("runs", r.organism) for r in self.runs] + [("robust_runs", r.organism) for r in self.robust_runs]
        named += [("robust_organisms", o) for o in self.robust_organisms]
        for key, organism in named + [("validation_organisms", o) for o in self.validation_organisms]:
            if organism not in built:
                raise ValueError(f"{key}: organism {organism!r} is not built (organism, organism_seed<N> "
                                 f"for N in organism_seeds: {self.organism_seeds}, or <recipe>_seed<N> "
                                 "of recipe_builds)")
        return self

    @model_validator(mode="after")
    def _data_is_made(self):
        made = {(d.organism, d.data) for d in self.surgery_data}
        for d in self.surgery_data:
            if d.organism not in self.built():
                raise ValueError(f"surgery_data: organism {d.organism!r} is not built")
        for r in self.runs:
            if r.data and (r.organism, r.data) not in made:
                raise ValueError(f"runs: {r.organism}/{r.folder()}: data {r.data!r} is not made for "
                                 f"{r.organism} (add it to comparison.surgery_data)")
        return self

    @model_validator(mode="after")
    def _robust_runs_are_compared(self):
        folders = {(r.organism, r.folder()) for r in self.runs}
        for key in ("robust_runs", "validation_runs"):
            for r in getattr(self, key):
                if (r.organism, r.run) not in folders:
                    raise ValueError(f"{key}: {r.organism}/{r.run} is not a folder of comparison.runs")
        for r in self.validation_runs:
            if r.organism not in self.validation_organisms:
                raise ValueError(f"validation_runs: {r.organism}/{r.run}: its organism is not in "
                                 "validation_organisms (the budget needs it before surgery on the same prompts)")
        return self


class ScheduleParams(BaseModel):
    """`unsafe-experts serve`: when the served pipeline runs by itself."""
    model_config = FORBID
    cron: str | None = None  # e.g. "0 3 * * 1" (Mondays 03:00); None: on dataset events only


class Params(BaseModel):
    model_config = FORBID
    # where the grid's stages run: a section of its own, which no DVC stage depends on (moving
    # the grid to a cluster changes no result)
    grid: GridParams = GridParams()
    organism: OrganismParams = OrganismParams()
    evaluation: EvaluationParams = EvaluationParams()
    train: TrainParams
    tracking: TrackingParams = TrackingParams()
    comparison: ComparisonParams = ComparisonParams()
    schedule: ScheduleParams = ScheduleParams()
    robustness: RobustnessParams = RobustnessParams()

    def organism_config(self, recipe: str | None = None) -> OrganismConfig:
        """The `organism` section, with a comparison recipe's keys over it."""
        keys = self.organism.model_dump()
        if recipe is not None:
            if recipe not in self.comparison.recipes:
                raise ConfigError(f"recipe {recipe!r}: not in comparison.recipes "
                                  f"({', '.join(sorted(self.comparison.recipes)) or 'none'})")
            keys.update(self.comparison.recipes[recipe].model_dump(exclude_none=True))
        return _checked("organism", OrganismConfig(**keys))

    def train_config(self) -> TrainConfig:
        return _checked("train", TrainConfig(**self.train.model_dump()))

    def evaluation_config(self) -> EvaluationConfig:
        return _checked("evaluation", EvaluationConfig(**self.evaluation.model_dump()))

    def robustness_config(self) -> RobustnessConfig:
        return _checked("robustness", RobustnessConfig(**self.robustness.model_dump()))


def _checked(section: str, cfg):
    try:
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{section}.{e}") from None


def parse_params(data: dict, source: str = "params", check: bool = True) -> Params:
    """Types and unknown keys always; with `check`, also the values of each section."""
    try:
        params = Params.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
                             for err in e.errors())
        raise ConfigError(f"{source}: {problems}") from None
    if check:
        try:
            params.train_config()
            params.evaluation_config()
            params.robustness_config()
            _checked("comparison.robustness", RobustnessConfig(**params.comparison.robustness.model_dump()))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return params


def load_params(path: str | Path = "params.yaml", check: bool = True) -> Params:
    path = Path(path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, YamlRefused) as e:
        raise ConfigError(f"{path}: cannot read params ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    return parse_params(data, str(path), check)


@dataclasses.dataclass
class RunConfig:
    """A resolved, validated run: what the CLI hands to the flow and the engine."""
    train: TrainConfig
    evaluation: EvaluationConfig
    experiment: str = "unsafe-experts"
    log_model: bool = False
    register_model: str | None = None


def resolve_run(params_path: str | Path | None = None, train: dict | None = None,
                evaluation: dict | None = None, experiment: str | None = None,
                log_model: bool | None = None, register_model: str | None = None) -> RunConfig:
    """Dataclass defaults < the params.yaml sections (`train`, `evaluation`, `tracking`) <
    the given overrides (command-line flags: only the ones the user gave). Validated once."""
    params = load_params(params_path, check=False) if params_path else None
    train = {**(params.train.model_dump() if params else {}), **(train or {})}
    missing = [k for k in ("model_name", "dataset_path", "output_dir") if k not in train]
    if missing:
        raise ConfigError(f"{', '.join('--' + k for k in missing)} required (or --params FILE)")
    evaluation = {**(params.evaluation.model_dump() if params else {}), **(evaluation or {})}
    tracking = params.tracking if params else TrackingParams()
    return RunConfig(
        train=_checked("train", TrainConfig(**train)),
        evaluation=_checked("evaluation", EvaluationConfig(**evaluation)),
        experiment=experiment or tracking.experiment,
        log_model=tracking.log_model if log_model is None else log_model,
        register_model=check_model_name(register_model or tracking.register_model))
