"""MLflow tracking through an explicit client and run ids (the fluent active run is
thread-local, and Prefect runs tasks on worker threads)."""
from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# a tracking outage fails a call in seconds, not minutes (MLflow's defaults: 7 retries with
# exponential backoff and a 120 s timeout each, which stalled a run for over 8 minutes); the
# run then fails, its metadata says so, and the same command resumes it once tracking is back
for _key, _value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}.items():
    os.environ.setdefault(_key, _value)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow.data  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag  # noqa: E402

from unsafe_experts.run_records import parse_expert_key  # noqa: E402

DEFAULT_URI = "sqlite:///mlflow.db"
METRIC_KEYS = {"score": "score_loss", "sft": "sft_loss", "router": "router_kl"}


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def ensure_reachable(local_fallback: bool = False, echo=print) -> str:
    """Fails fast, before any training, when a tracking server does not answer; or, with
    `local_fallback`, switches this process to the local SQLite store and says so."""
    from unsafe_experts.config import ConfigError

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return uri
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        return uri
    except OSError as e:
        reason = getattr(e, "reason", e)
        if not local_fallback:
            raise ConfigError(f"MLflow tracking server {uri} is unreachable ({reason}); start it, "
                              "fix MLFLOW_TRACKING_URI, or pass --local_tracking") from None
    os.environ["MLFLOW_TRACKING_URI"] = DEFAULT_URI
    echo(f"MLflow tracking server {uri} is unreachable; tracking locally in {DEFAULT_URI} instead")
    return DEFAULT_URI


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri())


def experiment_id(name: str) -> str:
    c = client()
    found = c.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    # artifacts beside the working directory, whatever thread or cwd a task later runs in
    return c.create_experiment(name, artifact_location=Path("mlruns").resolve().as_uri())


def start_run(experiment: str, name: str, params: dict, tags: dict, parent: str | None = None) -> str:
    c = client()
    tags = {k: str(v) for k, v in tags.items()}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = c.create_run(experiment_id(experiment), run_name=name, tags=tags)
    if params:
        c.log_batch(run.info.run_id, params=[Param(k, json.dumps(v) if not isinstance(v, str) else v)
                                             for k, v in params.items()])
    return run.info.run_id


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested metrics as MLflow keys: {"final": {"asr": {"value", "n", "ci95"}}} ->
    final/asr, final/asr_n, final/asr_ci_low, final/asr_ci_high."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and "value" in value:
            out[name] = value["value"]
            out[f"{name}_n"] = value["n"]
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = value["ci95"]
        elif isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def write_and_log_metrics(run_id: str, metrics: dict, path: str | Path | None) -> None:
    """The one place a metrics dict goes to both DVC (a JSON file) and MLflow."""
    from unsafe_experts.outputs import write_json_atomic

    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, metrics)
    log_metrics(run_id, flatten(metrics))


def log_steps(run_id: str, logs: list[dict]) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(METRIC_KEYS[x["kind"]], float(x["loss"]), now, x["step"]) for x in logs]
    for i in range(0, len(metrics), 900):  # the store's batch limit is 1000
        client().log_batch(run_id, metrics=metrics[i:i + 900])


def log_tags(run_id: str, tags: dict) -> None:
    client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_file(run_id: str, path: str | Path, folder: str | None = None) -> None:
    client().log_artifact(run_id, str(path), folder)


def log_dataset(run_id: str, path: str, records: list[dict], digest: str) -> None:
    frame = pd.DataFrame({"goal": [r.get("goal") for r in records]})
    with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways"
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(frame, source=str(Path(path).resolve()),
                                          name=Path(path).name, digest=digest[:36])
    client().log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                              [InputTag("mlflow.data.context", "training")])])


def expert_frame(identified: dict, r: int) -> pd.DataFrame:
    """round, layer, expert, score, rank (1 = highest) for every expert; `selected` marks top-k."""
    picked = {tuple(x) for x in identified["experts"]}
    rows = []
    for rank, (name, score) in enumerate(identified["scores"].items(), 1):
        layer, expert = parse_expert_key(name)
        rows.append({"round": r, "layer": layer, "expert": expert, "score": score, "rank": rank,
                     "selected": (layer, expert) in picked})
    return pd.DataFrame(rows)


def score_summary(frame: pd.DataFrame) -> dict[str, float]:
    s = frame["score"]
    return {"score_mean": s.mean(), "score_std": s.std(ddof=0), "score_min": s.min(),
            "score_median": s.median(), "score_max": s.max(),
            "selected_score_share": s[frame["selected"]].sum() / max(s.sum(), 1e-30)}


def jaccard(a, b) -> float:
    a, b = {tuple(x) for x in a}, {tuple(x) for x in b}
    return len(a & b) / len(a | b) if a | b else 1.0


def heatmap_png(frame: pd.DataFrame, r: int, path: Path) -> Path:
    layers = sorted(frame["layer"].unique())
    grid = np.zeros((len(layers), frame["expert"].max() + 1))
    row = {layer: i for i, layer in enumerate(layers)}
    for x in frame.itertuples():
        grid[row[x.layer], x.expert] = x.score
    fig, ax = plt.subplots(figsize=(min(2 + grid.shape[1] * 0.25, 24), 1.5 + len(layers) * 0.3))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    sel = frame[frame["selected"]]
    ax.scatter(sel["expert"], [row[x] for x in sel["layer"]], marker="x", c="red", s=20,
               label="selected")
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"round {r}: mean |grad| per expert",
           yticks=range(len(layers)), yticklabels=layers)
    ax.legend(loc="upper right", fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_round(run_id: str, r: int, identified: dict, timings: dict, logs: list[dict],
              previous: list | None) -> dict[str, float]:
    """Everything one round produced, on that round's nested run; returns its summary metrics."""
    frame = expert_frame(identified, r)
    c = client()
    c.log_table(run_id, frame[frame["selected"]].drop(columns="selected"), "identified_experts.json")
    with tempfile.TemporaryDirectory() as tmp:
        frame.to_csv(Path(tmp) / "expert_scores.csv", index=False)
        c.log_artifact(run_id, str(Path(tmp) / "expert_scores.csv"))
        c.log_artifact(run_id, str(heatmap_png(frame, r, Path(tmp) / f"expert_scores_round_{r}.png")))
    log_steps(run_id, logs)
    summary = {**score_summary(frame), **{k: v for k, v in timings.items()}}
    if previous is not None:
        summary["jaccard_with_previous_round"] = jaccard(identified["experts"], previous)
    if "router_kl_before_after" in identified:
        summary["router_kl_before"], summary["router_kl_after"] = identified["router_kl_before_after"]
    summary["optimizer_state_bytes"] = identified.get("optimizer_state_bytes", 0)
    log_metrics(run_id, summary)
    return summary


def log_evaluation(run_id: str, result: dict, step: int, name: str) -> None:
    """Metrics at `step` (0 = before surgery, r = after round r) and a table of samples."""
    log_metrics(run_id, flatten(result["metrics"]), step)
    if result["samples"]:
        artifact = f"eval_samples_{name}.json"
        if Path(artifact).name != artifact:  # a stage name must not steer the artifact's path
            raise ValueError(f"artifact name {artifact!r} is not a plain file name")
        client().log_table(run_id, pd.DataFrame(result["samples"]), artifact)


SAFETY_CURVES = ("asr_flip_words", "asr_flip_chars", "plain_refusal", "over_refusal")


def safety_rows(evaluations: dict) -> list[dict]:
    """One row per evaluated stage (before, round_1, ...) for `dvc plots` and the PNG."""
    rows = []
    for step, (stage, result) in enumerate(evaluations.items()):
        if stage == "final":
            continue
        rows.append({"round": step, "stage": stage,
                     **{k: result[k]["value"] for k in SAFETY_CURVES if k in result}})
    return rows


def safety_plot(rows: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in SAFETY_CURVES:
        if key in rows[0]:
            ax.plot([r["round"] for r in rows], [r[key] for r in rows], marker="o", label=key)
    ax.set(xlabel="round (0 = before surgery)", ylabel="share of prompts", ylim=(-0.02, 1.02),
           title="attack success and refusal per round")
    ax.set_xticks([r["round"] for r in rows])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status)
