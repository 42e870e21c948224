"""The MLflow Model Registry: the final model of a run as a version of a registered model.

Where the bytes live: a version's source is a URI, and MLflow's open-source registry records it
without copying anything. With `--log_model` the run already holds the model as its
`final_model` artifact, so the version points there (anyone who can read the tracking server's
artifact store can download it; one copy, the one --log_model makes). Without it:

- on a local store (a SQLite or file URI) the version points at the run's own `final_model/`
  directory (no copy at all: a model of 61 GB is not duplicated for a pointer), and its
  `final_model_dvc_md5` tag names the bytes that `dvc pull` fetches from the team's DVC remote;
- on a tracking server (an http(s) URI) a local path is refused as a source (and would mean
  nothing on another machine), so the directory is uploaded first as the run's `final_model`
  artifact, the copy --log_model would have made, and the version points there. A delta
  final model (`final_checkpoint: delta`) is materialized on its base before the upload, so
  the version is a loadable checkpoint (tag `materialized_from_delta`).

Either way `models:/NAME/VERSION` resolves to the source. Before a run's directory is used, its
DVC digest must still be the run's `final_model_dvc_md5`: a directory a later run overwrote is
refused, never registered under this run's tags (a run too old to have the digest is registered
with a warning).

A registry failure never loses the run: the run's metrics, tags and files are logged before,
and a failure here is reported and tagged, not raised. It is bounded by mlflow_runs.py's HTTP
retry settings (each call fails within about a minute) and by not waiting for the version to
become READY (the open-source registry creates it READY at once).
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

from tracking import mlflow_runs
from tracking.digests import dvc_md5
from tracking.metric_names import BEFORE
from unsafe_experts.errors import UserError

ARTIFACT = "final_model"  # the run's artifact path of its final model (--log_model's too)
# a run tag set while `register` uploads the final model to a server: "started", then "done"
# ("materialized" for a delta written out in full); an upload cut short is redone, never
# registered half
UPLOAD_TAG = "final_model_upload"
MATERIALIZED = {"materialized_from_delta": "true"}

# figures that describe a repair's safety, tagged before and after on every version: the
# sections of tracking/metric_names.py, and the flat names of runs logged before them
SAFETY_PREFIXES = ("headline/", "asr/", "benign_refused/", "refusal/", "asr_", "over_refusal", "plain_refusal")


class RegistryError(UserError, ValueError):
    """A run that cannot be registered (unknown, or not finished): the user's to fix."""


def safety_tags(metrics: dict[str, float]) -> dict[str, str]:
    """`<figure>_before` / `<figure>_after` from a parent run's metrics: a figure's latest value
    is after the last round (its steps are the rounds) and `before/<figure>` (or, in a run
    logged before metric sections, `<figure>_before`) is logged beside it; none where the run
    did not evaluate."""
    tags = {}
    for name, value in metrics.items():
        figure = name.removeprefix(BEFORE)
        if figure.startswith(SAFETY_PREFIXES):
            before = figure != name or figure.endswith("_before")
            key = figure.removesuffix("_before") + ("_before" if before else "_after")
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


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def local_final_model(run) -> Path:
    """The run's final_model directory here, as the run tagged it."""
    final = Path(run.data.tags["final_model"])
    if not final.is_dir():  # the tag is the path the run wrote, relative to where it ran
        raise RegistryError(f"{final}: run {run.info.run_id}'s final model is not here; register "
                            "from the directory the run ran in (or `dvc pull` it), or log it with "
                            "--log_model")
    return final


def check_digest(run, final: Path) -> None:
    """The directory must hold the bytes the run wrote: its DVC digest, computed as the run
    computed it (tracking/digests.py), against the run's `final_model_dvc_md5`. A run logged
    before the digest was has nothing to compare with: a warning, and the directory as it is."""
    run_id = run.info.run_id
    recorded = run.data.tags.get("final_model_dvc_md5")
    found = dvc_md5(final)
    if recorded is None:
        warnings.warn(f"run {run_id} recorded no final_model_dvc_md5 (a run older than the digest): "
                      f"{final} is registered as it is now (dvc md5 {found}), unchecked", stacklevel=3)
    elif found != recorded:
        raise RegistryError(f"{final}: the final model changed after run {run_id} (the run recorded "
                            f"final_model_dvc_md5 {recorded}, the directory now has {found}); these "
                            "are not the run's weights: restore the run's outputs (`dvc checkout` "
                            "at its git commit) or register the run that wrote them")


def upload(c, run, final: Path, base: str | None = None) -> dict[str, str]:
    """The directory as the run's `final_model` artifact, a delta materialized on its base
    first (in a temporary directory: TMPDIR needs room for the full model, and memory for
    loading it); returns the version tags the upload adds."""
    from unsafe_experts.artefacts.deltas import DeltaError, is_delta

    run_id = run.info.run_id
    if not is_delta(final):
        mlflow_runs.log_tags(run_id, {UPLOAD_TAG: "started"})
        c.log_artifacts(run_id, str(final), ARTIFACT)
        mlflow_runs.log_tags(run_id, {UPLOAD_TAG: "done"})
        return {}
    from unsafe_experts.artefacts.atomic import save_checkpoint_atomic
    from unsafe_experts.artefacts.checkpoints import load_checkpoint

    trust = run.data.params.get("trust_remote_code") == "True"
    with tempfile.TemporaryDirectory(prefix="unsafe-experts-register-") as tmp:
        try:
            model, tokenizer = load_checkpoint(final, trust, base)
        except DeltaError as e:
            raise RegistryError(f"{final} is a delta final model and is materialized before the "
                                f"upload, which failed: {e} (register --base BASE)") from None
        full = Path(tmp) / ARTIFACT
        save_checkpoint_atomic(model, tokenizer, full)
        del model
        mlflow_runs.log_tags(run_id, {UPLOAD_TAG: "started"})
        c.log_artifacts(run_id, str(full), ARTIFACT)
    mlflow_runs.log_tags(run_id, {UPLOAD_TAG: "materialized"})
    return MATERIALIZED


def artifact_source(run_id: str) -> str:
    """The real location of the run's final_model artifact, from this store (not mlflow's
    process-wide tracking URI, which a caller may have pointed elsewhere)."""
    return RunsArtifactRepository.get_underlying_uri(f"runs:/{run_id}/{ARTIFACT}",
                                                     tracking_uri=mlflow_runs.tracking_uri())


def source_uri(c, run, verify: bool = True, base: str | None = None) -> tuple[str, dict[str, str]]:
    """(the version's source, the tags the source adds): the logged artifact's real location
    when the run holds the model (--log_model, or an earlier upload), else on a local store
    the run's final_model directory as a file URI, and on a server that directory uploaded as
    the run's artifact. The directory's digest is checked first (`verify`)."""
    run_id = run.info.run_id
    uploaded = run.data.tags.get(UPLOAD_TAG)
    if uploaded != "started" and c.list_artifacts(run_id, ARTIFACT):
        tags = MATERIALIZED if uploaded == "materialized" else {}
        return artifact_source(run_id), tags
    final = local_final_model(run)
    if verify:
        check_digest(run, final)
    if not is_server(mlflow_runs.tracking_uri()):
        return final.resolve().as_uri(), {}
    tags = upload(c, run, final, base)
    return artifact_source(run_id), tags


def register_run(name: str, run_id: str, verify: bool = True, base: str | None = None) -> dict:
    """A new version of registered model `name` (created if absent) from a finished surgery
    run, tagged from the run; returns {"name", "version", "source"}. `verify`: check the run's
    final_model directory against its recorded digest before using it; `base`: a delta final
    model's base, where it is not at the path its manifest names. Raises RegistryError for a
    run that cannot be registered (or whose directory changed), MlflowException / OSError when
    the registry fails."""
    c = mlflow_runs.client()
    try:
        run = c.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"no MLflow run {run_id} in {mlflow_runs.tracking_uri()}") from None
        raise
    tags = version_tags(run)
    source, added = source_uri(c, run, verify, base)
    tags.update(added)
    description = run.data.tags.get("mlflow.note.content")
    with mlflow_runs.store_lock():  # the next version number is read, then inserted
        try:
            c.create_registered_model(name, description="Mixture-of-Experts models repaired by "
                                      "unsafe-experts surgery; one version per run.")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = c.create_model_version(name, source, run_id=run_id, tags=tags,
                                         description=description, await_creation_for=0)
    return {"name": name, "version": int(version.version), "source": source}


def register_after_run(name: str, run_id: str) -> dict:
    """register_run at the end of a pipeline run: a failure is reported, tagged on the run when
    tracking answers, and returned as {"name", "error"}, never raised."""
    try:
        # the flow took the directory's digest moments ago: no second pass over the weights
        done = register_run(name, run_id, verify=False)
        mlflow_runs.log_tags(run_id, {"registered_model": f"{name}/{done['version']}"})
    except (MlflowException, OSError, UserError) as e:
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
