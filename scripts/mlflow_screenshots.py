"""Screenshots of the MLflow UI for a store, rendered: the experiment's runs table (in the
project's saved view), the newest parent run (overview, metric charts, the combined expert
heatmap) and its first round run.

    pip install playwright==1.65.2     # the Python driver only: it uses the system's Chromium
    python scripts/mlflow_screenshots.py --backend-store-uri sqlite:///mlflow.db --out screenshots/

Starts `mlflow ui` on 127.0.0.1 on a free port, waits until it answers, drives headless Chromium
(Debian: `apt-get install chromium`; no browser download) through Playwright, waits on each page
for what it is about (the run names, the description, a chart, the image) and stops the server
at the end. `--save_view` first adds the runs-table view to a store written before the project
saved one (it writes experiment tags: run it on a copy if the store is not yours to change).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tracking.mlflow_runs, from any cwd

# MLflow's assistant panel opens by itself on a browser's first visit and covers a third of
# the page; a user closes it once, the browser remembers, and so does this one
QUIET_UI = "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"


class UsageError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, server: subprocess.Popen, seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if server.poll() is not None:
            raise UsageError(f"mlflow ui exited with status {server.returncode} before answering")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(1)
    raise UsageError(f"{url} did not answer within {seconds:.0f} s")


def browser(path: str | None) -> str:
    for name in ([path] if path else ["chromium", "chromium-browser", "google-chrome"]):
        found = shutil.which(name)
        if found:
            return found
    raise UsageError(f"no browser {path or 'chromium'} (Debian: apt-get install chromium)")


def pages(experiment, parent, first_round, view: bool) -> list[tuple[str, str, str, str | None]]:
    """(file name, URL path, selector that shows the page has rendered, the runs-table column
    to scroll to or None)."""
    from tracking import mlflow_runs

    exp, run = experiment.experiment_id, parent.info.run_id
    ml = "?workflowType=machine_learning"
    table = mlflow_runs.run_table_url(exp) if view else f"#/experiments/{exp}{ml}"
    name = f"text={parent.info.run_name}"
    out = [("runs_table", table, name, None)]
    if view:  # the table is wider than a screen: its metrics, scrolled to
        out.append(("runs_table_metrics", table, name, "metrics."))
    out += [("parent_overview", f"#/experiments/{exp}/runs/{run}{ml}", "text=experts_round_1", None),
            ("parent_charts", f"#/experiments/{exp}/runs/{run}/model-metrics{ml}", ".js-plotly-plot", None),
            ("parent_heatmap", f"#/experiments/{exp}/runs/{run}/artifacts/expert_scores.png{ml}",
             "img[src^='blob:']", None)]
    if first_round is not None:
        out.append(("round_overview", f"#/experiments/{exp}/runs/{first_round.info.run_id}{ml}",
                    "text=score_mean", None))
    return out


# scrolls the runs table (ag-grid) so that the first column whose id starts with the prefix is
# at the left edge, beside the pinned run names
SCROLL_TO = """prefix => {
    const cell = Array.from(document.querySelectorAll('.ag-header-cell[col-id]'))
        .find(c => c.getAttribute('col-id').startsWith(prefix));
    if (!cell) return false;
    const left = cell.offsetLeft;
    document.querySelectorAll('.ag-body-horizontal-scroll-viewport, .ag-center-cols-viewport')
        .forEach(v => { v.scrollLeft = left; v.dispatchEvent(new Event('scroll')); });
    return true;
}"""


def shoot(base: str, targets, out: Path, size: tuple[int, int], executable: str, settle_s: float) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            context = chromium.new_context(viewport={"width": size[0], "height": size[1]})
            context.add_init_script(QUIET_UI)
            for name, url, ready, column in targets:
                page = context.new_page()
                page.goto(f"{base}/{url}")
                page.wait_for_selector(ready, state="visible", timeout=180_000)
                # the data has arrived; charts and images finish drawing in the next moments
                page.wait_for_timeout(settle_s * 1000)
                if column and page.evaluate(SCROLL_TO, column):
                    page.wait_for_timeout(1000)
                path = out / f"{name}.png"
                page.screenshot(path=str(path))
                print(f"{path}: {base}/{url}")
                page.close()
        finally:
            chromium.close()


def first_screen_columns(run) -> list[str]:
    """The view's columns a newcomer must see without scrolling: mean ASR and mean benign
    refusal in attack formats, before beside after, and the experts of each round."""
    from tracking import mlflow_runs

    wanted = [c for c in mlflow_runs.run_table_columns(run)
              if c.startswith("tags.`experts_round_")
              or any(c.strip("`").endswith(f"headline/{k}") for k in mlflow_runs.FIRST_SCREEN)]
    return wanted


# per column id: the header cell's box, or null when the grid has no such column
HEADER_BOXES = """ids => ids.map(id => {
    const cell = Array.from(document.querySelectorAll('.ag-header-cell[col-id]'))
        .find(c => c.getAttribute('col-id') === id);
    if (!cell) return null;
    const r = cell.getBoundingClientRect();
    return {left: r.left, right: r.right, top: r.top, bottom: r.bottom};
})"""


def check_view(base: str, url: str, ready: str, columns: list[str], size: tuple[int, int],
               executable: str, settle_s: float) -> dict[str, str]:
    """Opens the runs-table view as a newcomer would (the address `make demo` prints) in a
    window of `size` and says, per column, whether its header lies inside the window without
    scrolling ("visible") or where it is instead."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            context = chromium.new_context(viewport={"width": size[0], "height": size[1]})
            context.add_init_script(QUIET_UI)
            page = context.new_page()
            page.goto(f"{base}/{url}")
            page.wait_for_selector(ready, state="visible", timeout=180_000)
            page.wait_for_timeout(settle_s * 1000)
            boxes = page.evaluate(HEADER_BOXES, columns)
        finally:
            chromium.close()
    width, height = size
    return {c: "not in the view" if b is None
            else "visible" if b["left"] >= 0 and b["right"] <= width and b["top"] >= 0 and b["bottom"] <= height
            else f"off screen (x {b['left']:.0f}-{b['right']:.0f}, y {b['top']:.0f})"
            for c, b in zip(columns, boxes)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend-store-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    p.add_argument("--experiment", default="unsafe-experts")
    p.add_argument("--out", default="screenshots")
    p.add_argument("--size", default="1600,1000", help="browser window, pixels: WIDTH,HEIGHT")
    p.add_argument("--browser", help="Chromium executable (default: chromium on PATH)")
    p.add_argument("--save_view", action="store_true",
                   help="add the runs-table view to every parent run's experiment first (writes tags)")
    p.add_argument("--settle_s", type=float, default=3.0, help="seconds a page gets to draw once its data is there")
    p.add_argument("--start_timeout_s", type=float, default=300, help="how long `mlflow ui` may take to start")
    p.add_argument("--check_view", action="store_true",
                   help="instead of screenshots: check that the saved view's first screen shows mean ASR "
                        "and mean benign refusal before/after and the experts per round without scrolling "
                        "(exit 1 if not)")
    args = p.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    try:
        size = tuple(int(x) for x in args.size.split(","))
        assert len(size) == 2 and min(size) > 0
    except (ValueError, AssertionError):
        raise UsageError(f"--size {args.size!r}: expected WIDTH,HEIGHT in pixels") from None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise UsageError("Playwright is not installed: pip install playwright==1.65.2") from None
    executable = browser(args.browser)
    os.environ["MLFLOW_TRACKING_URI"] = args.backend_store_uri  # tracking.mlflow_runs' client
    from mlflow import MlflowClient

    from tracking import mlflow_runs

    client = MlflowClient(tracking_uri=args.backend_store_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise UsageError(f"no experiment {args.experiment!r} in {args.backend_store_uri}")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        raise UsageError(f"experiment {args.experiment!r} has no parent run")
    if args.save_view:
        for parent in reversed(parents):
            mlflow_runs.save_run_table_view(experiment.experiment_id, parent.info.run_id)
        experiment = client.get_experiment(experiment.experiment_id)
    parent = parents[0]
    rounds = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                    key=lambda r: r.info.run_name)
    view = mlflow_runs.VIEW_TAG_PREFIX + mlflow_runs.RUN_TABLE_VIEW in experiment.tags

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # one worker: the UI needs no more, and four take minutes to start on a busy machine
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                               args.backend_store_uri, "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        wait(f"{base}/health", server, args.start_timeout_s)
        if args.check_view:
            if not view:
                raise UsageError(f"experiment {args.experiment!r} has no saved runs-table view (--save_view)")
            seen = check_view(base, mlflow_runs.run_table_url(experiment.experiment_id),
                              f"text={parent.info.run_name}", first_screen_columns(parent), size, executable,
                              args.settle_s)
            for column, where in seen.items():
                print(f"{column:<45} {where}")
            return 0 if seen and all(w == "visible" for w in seen.values()) else 1
        shoot(base, pages(experiment, parent, rounds[0] if rounds else None, view), out, size,
              executable, args.settle_s)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers, started above
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
