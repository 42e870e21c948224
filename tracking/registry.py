"""The MLflow Model Registry: the final model of a run as a version of a registered model.

Where the bytes live: a version's source is a URI, and MLflow's open-source registry records it
without copying anything. With `--log_model` the run already holds the model as its
`final_model` artifact, so the version points there (anyone who can read the tracking server's
artifact store can download it; one copy, the one --log_model makes). Without it the version
points at the run's own `final_model/` directory (no copy at all: a model of 61 GB is not
duplicated for a pointer), and its `final_model_dvc_md5` tag names the bytes that `dvc pull`
fetches from the team's DVC remote. Either way `models:/NAME/VERSION` resolves to the source.

A registry failure never loses the run: the run's metrics, tags and files are logged before,
and a failure here is reported and tagged, not raised. It is bounded by mlflow_runs.py's HTTP
retry settings (each call fails within about a minute) and by not waiting for the version to
become READY (the open-source registry creates it READY at once).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

from tracking import mlflow_runs
from unsafe_experts.errors import UserError

# figures that describe a repair's safety, tagged before and after on every version
SAFETY_PREFIXES = ("asr_", "over_refusal", "plain_refusal")


class RegistryError(UserError, ValueError):
    """A run that cannot be registered (unknown, or not finished): the user's to fix."""


def safety_tags(metrics: dict[str, float]) -> dict[str, str]:
    """`<figure>_before` / `<figure>_after` from a parent run's metrics: a figure's latest value
    is after the last round (its steps are the rounds) and `<figure>_before` is logged beside
    it; none where the run did not evaluate."""
    tags = {}
    for name, value in metrics.items():
        if name.startswith(SAFETY_PREFIXES):
            key = name if name.endswith("_before") else f"{name}_after"
            tags[key] = f"{value:.4g}"
    return tags


def version_tags(run) -> dict[str, str]:
    """What a teammate needs to judge a version without opening its run, read from the run:
    method, k, the experts per round, the data's and the model's digests, the safety figures."""
    params, tags = run.data.params, run.data.tags
    if "final_model" not in tags:
        raise RegistryError(f"MLflow run {run.info.run_id} has no final model (not a finished "
                            "surgery run)")
    out = {"method": params.get("method", ""), "k": params.get("top_k_experts", ""),
           "rounds": params.get("num_rounds", ""), "base_model": params.get("model_name", ""),
           **{key: tags[key] for key in ("data_dvc_md5", "final_model_dvc_md5") if key in tags},
           **{key: value for key, value in tags.items() if key.startswith("experts_round_")}}
    return {**out, **safety_tags(run.data.metrics)}


def source_uri(c, run) -> str:
    """The logged artifact's real location when the run logged the model (--log_model), else
    the run's final_model directory as a file URI."""
    run_id = run.info.run_id
    if c.list_artifacts(run_id, "final_model"):
        return RunsArtifactRepository.get_underlying_uri(f"runs:/{run_id}/final_model")
    final = Path(run.data.tags["final_model"])
    if not final.is_dir():  # the tag is the path the run wrote, relative to where it ran
        raise RegistryError(f"{final}: run {run_id}'s final model is not here; register from the "
                            "directory the run ran in (or `dvc pull` it), or log it with --log_model")
    return final.resolve().as_uri()


def register_run(name: str, run_id: str) -> dict:
    """A new version of registered model `name` (created if absent) from a finished surgery
    run, tagged from the run; returns {"name", "version", "source"}. Raises RegistryError for
    a run that cannot be registered, MlflowException / OSError when the registry fails."""
    c = mlflow_runs.client()
    try:
        run = c.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"no MLflow run {run_id} in {mlflow_runs.tracking_uri()}") from None
        raise
    tags = version_tags(run)
    source = source_uri(c, run)
    try:
        c.create_registered_model(name, description="Mixture-of-Experts models repaired by "
                                  "unsafe-experts surgery; one version per run.")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    description = run.data.tags.get("mlflow.note.content")
    version = c.create_model_version(name, source, run_id=run_id, tags=tags,
                                     description=description, await_creation_for=0)
    return {"name": name, "version": int(version.version), "source": source}


def register_after_run(name: str, run_id: str) -> dict:
    """register_run at the end of a pipeline run: a failure is reported, tagged on the run when
    tracking answers, and returned as {"name", "error"}, never raised."""
    try:
        done = register_run(name, run_id)
        mlflow_runs.log_tags(run_id, {"registered_model": f"{name}/{done['version']}"})
    except (MlflowException, OSError, RegistryError) as e:
        error = " ".join(str(e).split())[:300]
        warnings.warn(f"registering the final model as {name!r} failed ({error}); the run is "
                      f"intact: once the registry answers, `unsafe-experts register {run_id} "
                      f"--name {name}`", stacklevel=2)
        try:
            mlflow_runs.log_tags(run_id, {"registered_model_error": error})
        except Exception:  # the tracking server may be what failed
            pass
        return {"name": name, "error": error}
    return done
