"""MLflow tracking through an explicit client and run ids (the fluent active run is
thread-local, and Prefect runs tasks on worker threads)."""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
import time
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # log_table appends by downloading
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

from tracking.metric_names import BEFORE, HEADLINE, headline_names, mlflow_names  # noqa: E402
from unsafe_experts.artefacts.run_metadata import parse_expert_key  # noqa: E402
from unsafe_experts.evaluation.headline import KEYS as HEADLINE_KEYS  # noqa: E402
from unsafe_experts.evaluation.headline import headline_figures  # noqa: E402

DEFAULT_URI = "sqlite:///mlflow.db"
# losses are logged per batch (the step is the batch); evaluation figures per round (the step
# is the round, 0 = before surgery): the names say which
# one per unsafe_experts.training.phases.LOG_KINDS
METRIC_KEYS = {"score": "score_loss_per_batch", "benign_score": "benign_score_loss_per_batch",
               "sft": "sft_loss_per_batch", "router": "router_kl_per_batch"}
EVALUATION_TABLE = "evaluation.json"   # one name on every run: stage, round, metric, value, n, CI
SAMPLES_TABLE = "eval_samples.json"    # the same: a stage column says which evaluation
EXPERIMENT_DESCRIPTION = """Unsafe-expert surgery on Mixture-of-Experts models.

One parent run per pipeline run, named `<method>-k<experts per round>-s<seed>` and then what
else differs from the defaults (`-lr0.001`, `-ret-none`, `-shared`, `-org-s1`: the organism's
seed, ...); its description says which experts were repaired, the attack success before ->
after and the benign cost. Each parent run has one nested run per round (`round-1`, ...).

Metric names are `<section>/<name>`, one chart section each. `headline/`: `asr_mean` (attack
success over the attack families), `asr_surgery` (in the family the surgery data used),
`refused_mean` and `refused_worst` (benign requests inside attack formats refused: the cost),
`plain_refusal` (harmful goals asked plainly refused), `benign_loglik` (utility). `asr/<family>`,
`benign_refused/<family>` (`benign_refused/xstest_plain`: XSTest's safe prompts asked plainly),
`refusal/plain`, `utility/` (log-likelihoods; `_change` = after - before, negative = utility
lost): shares of held-out prompts whose history is the rounds (step 0 = before surgery, the
latest value = after surgery). `before/<name>`: the value before surgery. `locality/`: only the
selected experts changed; `run/`, `training/`: times, memory, last losses. Tags
`experts_round_N` list the experts repaired in round N; artifacts: `expert_scores.png` (every
round side by side), `safety_per_round.png`, `evaluation.json` (intervals and counts).
The runs table's view "Surgery summary" (Views, top right) shows the headline figures before
beside after first, then each run's method, k, seed, experts per round and every figure."""


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


_OPENED: set[str] = set()  # stores this process has opened (and so migrated) under the lock


def client() -> MlflowClient:
    uri = tracking_uri()
    if uri in _OPENED:
        return MlflowClient(tracking_uri=uri)
    with store_lock():  # the first open of a fresh SQLite store runs MLflow's migrations
        c = MlflowClient(tracking_uri=uri)
        c.search_experiments(max_results=1)
    _OPENED.add(uri)
    return c


# MLflow 3 UIs before 3.17 open a "custom_model_development" experiment on its runs table; the
# 3.17 UI ignores the tag (a build-time flag makes it follow the GenAI / Model training switch,
# which comes from the URL's `workflowType=` or the browser's local storage, default GenAI):
# hence the links this project prints carry `?workflowType=machine_learning`
EXPERIMENT_KIND = "mlflow.experimentKind"


_LOCK_HELD = threading.local()


@contextmanager
def store_lock():
    """Held while a process first opens a local SQLite store, finds or creates its experiment,
    logs a dataset or registers a model version: each is MLflow's read-then-insert, so two
    surgeries at once (the comparison grid's workers) would both run the schema migration
    ("duplicate column name"), create the experiment, or insert one dataset ("UNIQUE constraint
    failed: datasets..."). A lock file beside the database; nothing for a tracking server."""
    uri = tracking_uri()
    # re-entered by the thread that holds it (experiment_id's first client()): a second flock
    # on another descriptor of the same file would wait for the first forever
    if not uri.startswith("sqlite:///") or getattr(_LOCK_HELD, "held", False):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    lock = db.parent / f".{db.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _LOCK_HELD.held = True
        yield
    finally:
        _LOCK_HELD.held = False
        os.close(fd)  # closing releases the lock


def experiment_id(name: str, description: str = EXPERIMENT_DESCRIPTION) -> str:
    with store_lock():
        return _experiment_id(name, description)


def _experiment_id(name: str, description: str) -> str:
    c = client()
    found = c.get_experiment_by_name(name)
    if found:
        exp_id = found.experiment_id
        have = found.tags
    else:
        # artifacts beside the working directory, whatever thread or cwd a task later runs in
        exp_id = c.create_experiment(name, artifact_location=Path("mlruns").resolve().as_uri())
        have = {}
    if EXPERIMENT_KIND not in have:
        c.set_experiment_tag(exp_id, EXPERIMENT_KIND, "custom_model_development")
    if "mlflow.note.content" not in have:
        c.set_experiment_tag(exp_id, "mlflow.note.content", description)
    return exp_id


# MLflow 3.17's runs table shows no metric, parameter or tag column until they are picked; a
# saved view (an experiment tag `mlflow.sharedViewState.<id>`, listed under "Views" and opened
# by `?viewStateShareKey=<id>`) picks them: the configuration, the experts per round and each
# headline figure before beside after
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
RUN_TABLE_VIEW = "surgery-summary"
VIEW_TAG_LIMIT = 20000  # MLflow's limit on an experiment tag's value


def _column(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"


# sections of the view after the configuration, in order; a run logged before metric names had
# sections (issue #26) has its figures ranked by their old prefixes
SECTIONS = [("utility/", "locality/"), ("asr/", "asr_"), ("benign_refused/", "over_refusal"),
            ("refusal/", "plain_refusal")]


# what a newcomer must see on the view's first screen, without scrolling (issue #26; checked
# in headless Chromium by scripts/mlflow_screenshots.py --check_view): mean ASR and mean
# benign-in-format refusal, each before beside after, then the experts of each round
FIRST_SCREEN = ("asr_mean", "refused_mean")


def _column_rank(column: str) -> tuple:
    """Where a column goes: the first screen's headline figures, the experts per round, the
    other headline figures, the configuration, then each section's figures (utility and
    locality, ASR per family, benign refusal per family, refusal), each value before surgery
    first; anything else after those, by name."""
    kind, _, name = column.partition(".")
    name = name.strip("`")
    config = ["method", "top_k_experts", "seed"]
    if kind == "params" and name in config:
        return (3, config.index(name), "", 0)
    if kind == "tags" and name.startswith("experts_round_") and name.rsplit("_", 1)[-1].isdigit():
        return (1, int(name.rsplit("_", 1)[-1]), "", 0)
    if kind != "metrics":
        return (11, 0, column, 0)
    base = name.removeprefix(BEFORE).removesuffix("_before")
    after = int(base == name)  # a figure's value before surgery goes first
    if base.startswith(HEADLINE):
        key = base[len(HEADLINE):]
        order = HEADLINE_KEYS.index(key) if key in HEADLINE_KEYS else len(HEADLINE_KEYS)
        return (0 if key in FIRST_SCREEN else 2, order, key, after)
    if base in ("over_refusal", "benign_loglik_change", "locality_ok"):  # the old names' cost columns
        return (4, 0, base, after)
    for i, prefixes in enumerate(SECTIONS):
        if base.startswith(prefixes):
            return (4 + i, 0, base, after)
    return (10, 0, base, after)


def run_table_columns(run) -> list[str]:
    """The saved view's columns for a parent run: the headline figures before beside after,
    method, k, seed, the experts of each round, the utility changes and the locality check,
    then every figure with a value before surgery beside its value after (each figure's
    latest value is its value after the last round)."""
    metrics, tags, params = run.data.metrics, run.data.tags, run.data.params
    columns = [_column("params", k) for k in ("method", "top_k_experts", "seed") if k in params]
    columns += [_column("tags", k) for k in tags if k.startswith("experts_round_")]
    for name in metrics:
        after = (name[len(BEFORE):] if name.startswith(BEFORE)
                 else name[:-len("_before")] if name.endswith("_before") else None)
        if after in metrics:
            columns += [_column("metrics", name), _column("metrics", after)]
    columns += [_column("metrics", k) for k in metrics
                if k in ("locality_ok", "locality/ok") or k.endswith("loglik_change")]
    return sorted(set(columns), key=_column_rank)


def _width(column: str) -> int:
    """Pixels that show the header (and an expert list) whole."""
    kind, name = column.split(".", 1)
    return 170 if kind == "tags" else max(70, 7 * len(name.strip("`")) + 30)


def save_run_table_view(exp_id: str, run_id: str, name: str = "Surgery summary") -> str:
    """Adds `run_id`'s headline columns to the experiment's saved runs-table view (the union
    over its runs, so older runs with other attack families or more rounds keep theirs);
    returns the view's id, for `?viewStateShareKey=`."""
    c = client()
    tag = VIEW_TAG_PREFIX + RUN_TABLE_VIEW
    columns = run_table_columns(c.get_run(run_id))
    now = int(time.time() * 1000)
    created = now
    old = c.get_experiment(exp_id).tags.get(tag)
    if old:
        try:
            envelope = json.loads(old)
            created = envelope["createdAt"]
            columns = sorted(set(columns) | set(json.loads(envelope["state"])["selectedColumns"]),
                             key=_column_rank)
        except (ValueError, KeyError, TypeError):  # someone's edit in the UI: ours replaces it
            pass
    while True:
        state = {"selectedColumns": columns, "columnOrder": columns,
                 "columnWidths": {k: _width(k) for k in columns}}
        envelope = json.dumps({"name": name, "createdAt": created, "updatedAt": now,
                               "state": json.dumps(state)})
        if len(envelope) <= VIEW_TAG_LIMIT or not columns:
            break
        columns = columns[:-1]  # hundreds of attack families: the last ones stay pickable by hand
    c.set_experiment_tag(exp_id, tag, envelope)
    return RUN_TABLE_VIEW


def run_table_url(exp_id: str) -> str:
    """The path (after the UI's address) of the experiment's runs table in the saved view; the
    query picks MLflow 3's model-training view, which the experiment's kind tag does not."""
    return f"#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey={RUN_TABLE_VIEW}"


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags, which the UI shows beside every run."""
    import getpass
    import shlex
    import sys

    from tracking.digests import git_commit

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    program = Path(sys.argv[0]).name
    program = "unsafe-experts" if program in ("__main__.py", "unsafe-experts") else program
    tags = {"mlflow.source.name": "flows/surgery.py", "mlflow.source.type": "LOCAL",
            "mlflow.user": user, "command": shlex.join([program, *sys.argv[1:]])[:500]}
    commit = git_commit(Path(__file__).resolve().parents[1])  # the code that ran, whatever the cwd
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def start_run(experiment: str, name: str, params: dict, tags: dict, parent: str | None = None,
              description: str | None = None) -> str:
    c = client()
    tags = {**source_tags(), **{k: str(v) for k, v in tags.items()}}
    if parent:
        tags["mlflow.parentRunId"] = parent
    if description:
        tags["mlflow.note.content"] = description
    run = c.create_run(experiment_id(experiment), run_name=name, tags=tags)
    if params:
        c.log_batch(run.info.run_id, params=[Param(k, json.dumps(v) if not isinstance(v, str) else v)
                                             for k, v in params.items()])
    return run.info.run_id


def system_metrics_wanted() -> bool:
    """MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING when set; otherwise only where a GPU is: on a CPU
    run the section is CPU load and memory, which say nothing about the surgery, and MLflow's
    compare page opened on its CPU-utilisation chart (issue #26)."""
    setting = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    if setting is not None:
        return setting.strip().lower() in ("true", "1")
    import torch

    return torch.cuda.is_available()


def system_metrics(run_id: str):
    """MLflow's system metrics (CPU, memory, disk, network; GPU with pynvml) on `run_id`, every
    10 s, as `system/...`; None where they are not wanted (system_metrics_wanted) or psutil is
    missing. Call `.finish()` on the result before the run ends."""
    if not system_metrics_wanted():
        return None
    try:
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri())
        monitor.start()
        return monitor
    except Exception as e:  # psutil missing: a run without system metrics, not a failure
        warnings.warn(f"no MLflow system metrics: {e}", stacklevel=2)
        return None


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), 900):  # the store's batch limit is 1000
        client().log_batch(run_id, metrics=items[i:i + 900])


def write_json(path: str | Path | None, data) -> None:
    from unsafe_experts.artefacts.atomic import write_json_atomic

    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)


def log_steps(run_id: str, logs: list[dict]) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(METRIC_KEYS[x["kind"]], float(x["loss"]), now, x["step"]) for x in logs]
    for i in range(0, len(metrics), 900):  # the store's batch limit is 1000
        client().log_batch(run_id, metrics=metrics[i:i + 900])


def log_tags(run_id: str, tags: dict) -> None:
    client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_file(run_id: str, path: str | Path, folder: str | None = None) -> None:
    client().log_artifact(run_id, str(path), folder)


def log_dir(run_id: str, path: str | Path, folder: str) -> None:
    """A directory's files directly under `folder` (log_artifact would nest them one level
    deeper, under the directory's own name), so `runs:/<run>/<folder>` is loadable as it is."""
    client().log_artifacts(run_id, str(path), folder)


def _log_frame(run_id: str, frame: pd.DataFrame, path: str, digest: str, context: str) -> None:
    with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways"
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(frame, source=str(Path(path).resolve()),
                                          name=Path(path).name, digest=digest[:36])
    c = client()
    with store_lock():  # MLflow finds or inserts the dataset: two runs logging one file at once clash
        c.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                           [InputTag("mlflow.data.context", context)])])


def log_dataset(run_id: str, path: str, records: list[dict], digest: str) -> None:
    _log_frame(run_id, pd.DataFrame({"goal": [r.get("goal") for r in records]}), path, digest, "training")


def log_eval_suite(run_id: str, suite) -> None:
    """The evaluation suite (suites.Suite: an organism's eval set or any suite) as a dataset
    input (context "evaluation"): one row per prompt with the metric of the set it belongs to;
    digest over the suite file and its data."""
    from unsafe_experts.evaluation.suites import suite_digest

    rows = [{"set": s.metric, "prompt": x.messages[-1]["content"][:500]} for s in suite.sets for x in s.items]
    _log_frame(run_id, pd.DataFrame(rows, columns=["set", "prompt"]), str(suite.path),
               suite_digest(suite), "evaluation")


def expert_frame(identified: dict, r: int) -> pd.DataFrame:
    """round, layer, expert, score, rank (1 = highest) for every expert; `selected` marks top-k."""
    picked = {tuple(x) for x in identified["experts"]}
    rows = []
    for rank, (name, score) in enumerate(identified["scores"].items(), 1):
        layer, expert = parse_expert_key(name)
        rows.append({"round": r, "layer": layer, "expert": expert, "score": score, "rank": rank,
                     "selected": (layer, expert) in picked})
    return pd.DataFrame(rows)


def expert_names(experts) -> str:
    return ",".join(f"L{layer}_E{expert}" for layer, expert in experts)


def score_summary(frame: pd.DataFrame) -> dict[str, float]:
    s = frame["score"]
    return {"score_mean": s.mean(), "score_std": s.std(ddof=0), "score_min": s.min(),
            "score_median": s.median(), "score_max": s.max(),
            "selected_score_share": s[frame["selected"]].sum() / max(s.sum(), 1e-30)}


def jaccard(a, b) -> float:
    a, b = {tuple(x) for x in a}, {tuple(x) for x in b}
    return len(a & b) / len(a | b) if a | b else 1.0


def _colour_scale(grids):
    """One scale for every round. Scores (gradient norms, routing mass) span orders of magnitude
    and fall after each repair, so a linear scale paints later rounds one colour: where no score
    is negative, a log scale from 1/10,000 of the highest (zeros take its lowest colour)."""
    from matplotlib.colors import LogNorm, Normalize

    values = np.concatenate([g[~np.isnan(g)] for g in grids])
    top = float(values.max())
    positive = values[values > 0]
    if values.min() >= 0 and len(positive) and top > positive.min():
        return LogNorm(vmin=max(float(positive.min()), top * 1e-4), vmax=top, clip=True), "log scale"
    low = float(values.min())
    return Normalize(vmin=low, vmax=top if top > low else low + 1e-12), "linear scale"


def heatmap_png(frames: list[pd.DataFrame], path: Path, title: str = "expert scores") -> Path:
    """One panel per round, side by side on one colour scale; the selected experts circled in
    red; the legend and colour bar beside the grids, never over them. Sized so that, shown a
    page wide in MLflow's artifact view, its text stays readable."""
    frames = [f for f in frames if len(f)]
    layers = sorted(set().union(*(f["layer"].unique() for f in frames)))
    width = int(max(f["expert"].max() for f in frames)) + 1
    row = {layer: i for i, layer in enumerate(layers)}
    grids = []
    for f in frames:
        grid = np.full((len(layers), width), np.nan)
        for x in f.itertuples():
            grid[row[x.layer], x.expert] = x.score
        grids.append(grid)
    norm, scale = _colour_scale(grids)
    panel_w = float(np.clip(0.6 + width * 0.17, 2.4, 9.0))
    panel_h = float(np.clip(0.9 + len(layers) * 0.22, 1.8, 9.0))
    columns = max(1, min(len(frames), int(15 // panel_w)))  # about 15 inches a row at most
    rows = -(-len(frames) // columns)
    fig, axes = plt.subplots(rows, columns, squeeze=False, sharey=True, layout="constrained",
                             figsize=(panel_w * columns + 1.6, panel_h * rows + 0.6))
    for ax in axes.flat[len(frames):]:
        ax.set_visible(False)
    for ax, f, grid in zip(axes.flat, frames, grids):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
        sel = f[f["selected"]]
        ax.scatter(sel["expert"], [row[x] for x in sel["layer"]], marker="o", s=60,
                   facecolors="none", edgecolors="red", linewidths=1.6, label="repaired (selected)")
        ax.set_title(f"round {int(f['round'].iloc[0])}", fontsize=10)
        ax.set_xlabel("expert", fontsize=9)
        ax.set_xticks(range(0, width, max(1, -(-width // 8))))
        ax.set_xticks(range(width), minor=True)  # every expert marked, every few numbered
        ax.tick_params(labelsize=8)
    step = max(1, -(-len(layers) // 16))
    for ax in axes[:, 0]:
        ax.set_ylabel("MoE layer", fontsize=9)
        ax.set_yticks(range(0, len(layers), step), [layers[i] for i in range(0, len(layers), step)])
    bar = fig.colorbar(im, ax=list(axes.flat), fraction=0.025, pad=0.01, aspect=30)
    bar.set_label(f"score ({scale}, one for all rounds)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    # the title and legend get their own space above the panels (constrained layout), over nothing
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", fontsize=8, frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def log_round(run_id: str, r: int, identified: dict, timings: dict, logs: list[dict],
              previous: list | None) -> dict[str, float]:
    """Everything one round produced, on that round's nested run; returns its summary metrics."""
    frame = expert_frame(identified, r)
    c = client()
    c.log_table(run_id, frame[frame["selected"]].drop(columns="selected"), "identified_experts.json")
    c.log_table(run_id, frame, "expert_scores.json")
    with tempfile.TemporaryDirectory() as tmp:
        frame.to_csv(Path(tmp) / "expert_scores.csv", index=False)
        c.log_artifact(run_id, str(Path(tmp) / "expert_scores.csv"))
        # the same name on every round, so the compare view lines rounds up
        c.log_artifact(run_id, str(heatmap_png([frame], Path(tmp) / "expert_scores.png",
                                               f"round {r}: expert scores")))
    log_steps(run_id, logs)
    log_tags(run_id, {"experts": expert_names(identified["experts"])})
    summary = {**score_summary(frame), **{k: v for k, v in timings.items()}}
    if previous is not None:
        summary["jaccard_with_previous_round"] = jaccard(identified["experts"], previous)
    if "router_kl_before_after" in identified:
        summary["router_kl_before"], summary["router_kl_after"] = identified["router_kl_before_after"]
    summary["optimizer_state_bytes"] = identified.get("optimizer_state_bytes", 0)
    log_metrics(run_id, summary)
    return summary


def log_experts(run_id: str, rounds: dict, folder: Path) -> Path:
    """On the parent run: a tag per round, every round's heatmap side by side (written to
    `folder`, returned), every expert's score per round."""
    frames = [expert_frame(identified, int(r)) for r, identified in sorted(rounds.items(), key=lambda x: int(x[0]))]
    log_tags(run_id, {f"experts_round_{int(f['round'].iloc[0])}": expert_names(
        f.loc[f["selected"], ["layer", "expert"]].itertuples(index=False)) for f in frames if len(f)})
    png = heatmap_png(frames, Path(folder) / "expert_scores.png", "expert scores per round (red circles: repaired)")
    log_file(run_id, png)
    table = pd.concat(frames, ignore_index=True)
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "expert_scores.csv", index=False)
        log_file(run_id, Path(tmp) / "expert_scores.csv")
    return png


def evaluation_values(metrics: dict) -> dict[str, float]:
    return {name: m["value"] for name, m in metrics.items()}


def evaluation_rows(stage: str, step: int, metrics: dict) -> list[dict]:
    return [{"stage": stage, "round": step, "metric": name, "value": m["value"], "n": m["n"],
             "ci_low": m["ci95"][0], "ci_high": m["ci95"][1]} for name, m in metrics.items()]


def log_evaluation(run_id: str, result: dict, step: int, stage: str,
                   surgery_family: str | None = None) -> None:
    """Each figure's value and the headline figures at `step` (0 = before surgery, r = after
    round r), under their sectioned MLflow names; intervals and counts as rows of the run's one
    evaluation table (the evaluation's own names); the samples in the run's samples table."""
    c = client()
    values = evaluation_values(result["metrics"])
    log_metrics(run_id, {**headline_names(headline_figures(values, surgery_family)),
                         **mlflow_names(values)}, step)
    c.log_table(run_id, pd.DataFrame(evaluation_rows(stage, step, result["metrics"])), EVALUATION_TABLE)
    if result["samples"]:
        c.log_table(run_id, pd.DataFrame([{"stage": stage, **x} for x in result["samples"]]), SAMPLES_TABLE)


def samples_markdown(samples: list[dict]) -> str:
    """The sample answers in full (MLflow's table view cuts long cells), grouped by stage."""
    lines, stage = ["# Sample answers", ""], None
    for x in samples:
        if x.get("stage") != stage:
            stage = x.get("stage")
            lines += [f"## {stage}", ""]
        # the judge's `complied`; None: its reply could not be parsed
        verdict = {True: "answered", False: "refused", None: "not judged"}[x["complied"]]
        lines += [f"### {x.get('set')} ({verdict})", "", "**prompt**", "", "```", str(x.get("prompt")), "```",
                  "", "**response**", "", "```", str(x.get("response")), "```", ""]
    return "\n".join(lines)


def log_samples_text(run_id: str, samples: list[dict]) -> None:
    if samples:
        client().log_text(run_id, samples_markdown(samples), "eval_samples.md")


def stage_step(stage: str) -> int:
    return 0 if stage == "before" else int(stage.split("_")[-1])


def headline(evaluations: dict) -> dict[str, float]:
    """The parent run's before-surgery values (`<name>_before`: attack success, benign and
    plain refusal) and benign cost (after = each figure's latest)."""
    stages = [s for s in evaluations if s != "final"]
    if not stages:
        return {}
    before, after = evaluations[stages[0]], evaluations[stages[-1]]
    out = {}
    for name, m in before.items():
        if name.startswith(("asr_", "over_refusal", "plain_refusal")):
            out[f"{name}_before"] = m["value"]
    # the organism suite's benign_loglik and other suites' reference sets (loglik_<set>)
    for name in before:
        if (name == "benign_loglik" or name.startswith("loglik_")) and name in after:
            out[f"{name}_change"] = after[name]["value"] - before[name]["value"]
    return out


def headline_before(evaluations: dict, surgery_family: str | None = None) -> dict[str, float]:
    """`before/headline/<figure>` for the parent run: beside each headline figure's latest
    value (after surgery) in the runs table."""
    stages = [s for s in evaluations if s != "final"]
    if not stages:
        return {}
    figures = headline_figures(evaluation_values(evaluations[stages[0]]), surgery_family)
    return {BEFORE + k: v for k, v in headline_names(figures).items()}


def compact_evaluation(evaluations: dict) -> dict:
    """metrics/evaluation.json for `dvc metrics show`: values only, before and after surgery."""
    stages = [s for s in evaluations if s != "final"]
    return {"before": evaluation_values(evaluations[stages[0]]),
            "after": evaluation_values(evaluations[stages[-1]])}


HEADLINE_FILES = {"before": "before.json", "after": "after.json"}


def write_headline_files(folder: str | Path, compact: dict, surgery_family: str | None = None) -> list[Path]:
    """metrics/before.json and after.json (dvc.yaml's train-stage metrics)
    from compact_evaluation's {"before": {...}, "after": {...}}: the same six keys in both, so
    `dvc metrics show` prints them as two rows of one narrow table."""
    paths = []
    for when, name in HEADLINE_FILES.items():
        paths.append(Path(folder) / name)
        write_json(paths[-1], headline_figures(compact[when], surgery_family))
    return paths


def safety_rows(evaluations: dict) -> list[dict]:
    """One row per evaluated stage (before, round_1, ...) with every figure's value."""
    return [{"round": stage_step(stage), "stage": stage, **evaluation_values(result)}
            for stage, result in evaluations.items() if stage != "final"]


def _curve_groups(names) -> list[tuple[str, list[str]]]:
    asr = sorted(n for n in names if n.startswith("asr_"))
    # a suite's harmful sets measuring refusal are refusal_<set>
    refusal = sorted(n for n in names if n.startswith(("over_refusal", "refusal_")) or n == "plain_refusal")
    return [("attack success (harmful prompts answered)", asr),
            ("refusal (over_refusal*: benign refused; plain_refusal: harmful asked plainly)", refusal)]


def safety_plot(rows: list[dict], path: Path) -> Path:
    """Three panels over the rounds: ASR per attack family, refusal (benign over-refusal and
    plain harmful requests), benign log-likelihood change; markers on every point and legends
    beside the axes."""
    steps = [r["round"] for r in rows]
    names = [k for k in rows[0] if k not in ("round", "stage")]
    loglik = [n for n in names if n in ("benign_loglik", "own_benign_loglik") or n.startswith("loglik_")]
    panels = [g for g in _curve_groups(names) if g[1]] + ([("log-likelihood change vs before", loglik)] if loglik else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), sharex=True, squeeze=False)
    colours = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    markers = "osD^vP*Xh<>"
    styles = ["-", "--", "-.", ":"]
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for i, key in enumerate(keys):
            values = [r.get(key, np.nan) for r in rows]
            if title.startswith("log-likelihood"):
                values = [v - values[0] for v in values]
            # identical values stay visible: each series is nudged sideways by a few pixels
            dodge = (i - (len(keys) - 1) / 2) * 0.2 / max(len(keys), 1)
            ax.plot([x + dodge for x in steps], values, marker=markers[i % len(markers)], linestyle=styles[i % len(styles)],
                    color=colours[i % len(colours)], markersize=6, linewidth=1.6, alpha=0.9,
                    label=key, clip_on=False)
        if title.startswith("log-likelihood"):
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_ylabel("after - before")
        else:
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel("share of prompts")
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[-1, 0].set_xticks(steps)
    axes[-1, 0].set_xticklabels(["before" if s == 0 else f"round {s}" for s in steps])
    axes[-1, 0].set_xlabel("evaluation (0 = before surgery, r = after round r)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status)
