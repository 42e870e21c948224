"""`unsafe-experts register RUN_ID --name NAME`: a finished surgery run's final model as a new
version of an MLflow registered model (what `train --register_model` does at the end of a run;
this is how a run is registered later, e.g. after the registry was down). The run's final_model
directory must still hold the run's bytes (its recorded digest); against a tracking server it
is uploaded as the run's artifact, a delta materialized first (tracking/registry.py)."""
from __future__ import annotations

import sys

from unsafe_experts.config import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("register", help="register a finished run's final model in the MLflow "
                       "Model Registry (tags: method, k, experts, data digest, safety figures); "
                       "refused when the run's final_model changed since the run")
    p.add_argument("run_id", help="the MLflow run id `train` printed")
    p.add_argument("--name", required=True, help="the registered model (created if absent)")
    p.add_argument("--base", help="a delta final_model's base checkpoint, where it is not at the "
                   "path its manifest names (a tracking server gets the model materialized)")


def run(args) -> None:
    from mlflow.exceptions import MlflowException

    from schemas.params import check_model_name
    from tracking import mlflow_runs
    from tracking.registry import RegistryError, register_run

    check_model_name(args.name)
    mlflow_runs.ensure_reachable()
    try:
        done = register_run(args.name, args.run_id, base=args.base)
    except RegistryError as e:
        raise ConfigError(str(e)) from None
    except MlflowException as e:
        raise ConfigError(f"MLflow registry failed ({e})") from None
    try:  # as --register_model tags it; the version exists either way
        mlflow_runs.log_tags(args.run_id, {"registered_model": f"{done['name']}/{done['version']}"})
    except MlflowException as e:
        print(f"warning: the run was not tagged registered_model ({' '.join(str(e).split())[:200]})",
              file=sys.stderr)
    print(f"registered model {done['name']} version {done['version']}: "
          f"models:/{done['name']}/{done['version']} (source {done['source']})")
