"""`unsafe-experts grid STAGE...`: the named DVC stages that are out of date, run in parallel on
Dask through Prefect (flows/grid.py) and recorded in dvc.lock as `dvc repro` would record them."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    grid = sub.add_parser("grid", help="run out-of-date DVC stages in parallel on Dask (make compare)",
                          description=__doc__)
    grid.add_argument("stages", nargs="+", metavar="STAGE",
                      help="a stage's name (compare_run@5) or the start of several (compare_run@)")
    grid.add_argument("--params", help="take the `grid` section's settings from this params.yaml")
    grid.add_argument("--workers", type=int, default=None,
                      help="local cluster: workers, each running one stage at a time (default: one per core)")
    grid.add_argument("--dask_address", default=None,
                      help="an existing Dask scheduler (tcp://host:8786) instead of a local cluster; "
                           "its workers must see this repository at the same path")
    grid.add_argument("--stage_resources", default=None,
                      help="what each stage holds on its worker, e.g. GPU=1 (workers started with "
                           "--resources GPU=1 then run one stage per GPU)")
    grid.add_argument("--force", action="store_true", help="rerun the named stages even if up to date")


def run(args) -> int:
    from flows.grid import grid_flow, parse_resources, task_runner
    from flows.temporary_server import start_temporary_server
    from unsafe_experts.errors import ConfigError

    settings = {}
    if args.params:
        from schemas.params import load_params

        settings = load_params(args.params).grid.model_dump()
    workers = args.workers if args.workers is not None else settings.get("workers")
    address = args.dask_address or settings.get("dask_address")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers: must be at least 1, got {workers}")
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    from tasks.dvc_plan import chosen
    try:
        resources = parse_resources(args.stage_resources or settings.get("stage_resources"))
        chosen(Repo("."), args.stages)  # an unknown stage is an error before any cluster starts
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except DvcException as e:  # not a DVC repository, a broken dvc.yaml
        raise ConfigError(f"dvc: {e}") from None
    start_temporary_server()
    result = grid_flow.with_options(task_runner=task_runner(workers, address))(
        args.stages, force=args.force, resources=resources or None)
    if result["failed"] or result["skipped"]:
        print("error: " + "; ".join(filter(None, [
            "failed: " + ", ".join(result["failed"]) if result["failed"] else "",
            "skipped: " + ", ".join(result["skipped"]) if result["skipped"] else ""])), file=sys.stderr)
        return 1
    return 0
