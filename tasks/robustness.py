"""Prefect tasks over the robustness runner (unsafe_experts/robustness/runner.py).

The models and the checked setup are loaded once, before the flow starts (bad input is then
one `error:` line and nothing is written), and stay in this process's registry; tasks exchange
its key, attack names and small dicts. The result file is rewritten after every attack, so an
interrupted run keeps every attack it finished.
"""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from reporting.robustness_report import headline, plots, table
from tracking import mlflow_runs
from unsafe_experts.artefacts.atomic import write_bytes_atomic, write_json_atomic
from unsafe_experts.robustness.runner import Setup, Target, run_robustness

_STATE: dict[str, dict] = {}


def register(targets: list[Target], setup: Setup, names: list[str]) -> str:
    """Holds the loaded models and setup for the flow's tasks; returns their key."""
    key = str(len(_STATE))
    _STATE[key] = {"targets": targets, "setup": setup, "result": None, "names": names}
    return key


def merge(result: dict | None, part: dict) -> dict:
    """`part` (one attack's run) added to the result of the attacks before it."""
    if result is None:
        return part
    result["attacks"].update(part["attacks"])
    result["setup"]["seconds"].update(part["setup"]["seconds"])
    return result


@task(name="robustness-attack")
def attack(key: str, name: str, out: str | None, progress: bool = True) -> dict:
    """One attack at every budget on every model; returns {budget: {label: headline value}}."""
    state = _STATE[key]
    part = run_robustness(state["targets"], state["setup"], [name], progress=False)
    state["result"] = merge(state["result"], part)
    state["result"]["setup"]["attacks"] = state["names"]
    if out:
        save_result(out, state["result"])
    found = {b: {label: (h[1]["value"] if (h := headline(m)) else None) for label, m in row.items()}
             for b, row in part["attacks"][name].items()}
    # a line per budget: the whole dict on one line ran to 260 characters
    for budget, row in found.items():
        get_run_logger().info("%s %s: %s", name, budget, ", ".join(
            f"{label} {'-' if v is None else f'{v:.3f}'}" for label, v in row.items()))
    return found


def surgery_run(experiment: str, run_dir: str) -> str | None:
    """The newest finished parent MLflow run of the surgery that wrote `run_dir` (its
    output_dir parameter), or None when there is none to log beside."""
    client = mlflow_runs.client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    quoted = run_dir.replace("\\", "\\\\").replace("'", "\\'")
    runs = client.search_runs([found.experiment_id],
                              f"attributes.status = 'FINISHED' and params.output_dir = '{quoted}'",
                              max_results=50, order_by=["attributes.start_time DESC"])
    return next((r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags), None)


def metric_name(attack: str, budget: str, label: str) -> str:
    budget = "none" if budget == "-" else budget.replace("-", "minus")
    return f"robust_{attack}_{budget}_{label}_asr"


def headlines(result: dict) -> dict:
    """{attack: {budget: {label: headline value}}}: what `dvc metrics show` lists."""
    return {a: {b: {label: h[1]["value"] for label, m in row.items() if (h := headline(m))}
                for b, row in budgets.items()} for a, budgets in result["attacks"].items()}


def save_result(out: str, result: dict) -> None:
    """The result so far, replacing the file atomically (its folder made when missing)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)


def summary_paths(out: str) -> list[Path]:
    """<out>_headline.json (the DVC metrics) and <out>.md (the table), beside the result."""
    out = Path(out)
    return [out.with_name(out.stem + "_headline.json"), out.with_suffix(".md")]


def write_summaries(result: dict, out: str, text: str) -> list[Path]:
    compact, page = summary_paths(out)
    write_json_atomic(compact, headlines(result))
    write_bytes_atomic(page, (text + "\n").encode())
    return [compact, page]


@task(name="robustness-report")
def report(key: str, out: str | None, plots_dir: str | None, experiment: str | None,
           run_dir: str | None) -> dict:
    """The plots, the table (a Prefect artifact, and <out>.md), the headline figures
    (<out>_headline.json) and everything on the surgery's MLflow run."""
    result = _STATE[key]["result"]
    text = table(result)
    written = plots(result, plots_dir) if plots_dir else []
    if out:
        written += write_summaries(result, out, text)
    create_markdown_artifact(text, key="robustness", description="the repair re-attacked")
    run_id = surgery_run(experiment, run_dir) if experiment and run_dir else None
    if run_id:
        values = {metric_name(a, b, label): v for a, budgets in headlines(result).items()
                  for b, row in budgets.items() for label, v in row.items()}
        mlflow_runs.log_metrics(run_id, values)
        for path in ([out] if out else []) + written:
            mlflow_runs.log_file(run_id, path, "robustness")
    return {"mlflow_run_id": run_id, "plots": [str(p) for p in written], "table": text, "result": result}
