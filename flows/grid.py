"""The comparison grid as one Prefect flow: every out-of-date DVC stage named is a task on a
Dask task runner (prefect-dask), a local cluster sized to the machine by default or an existing
scheduler by address; each finished stage is recorded in dvc.lock as `dvc repro` would record it.

The flow process plans (tasks/dvc_plan.py), submits every stage at once with the stages it
depends on as `wait_for` (Dask starts a stage when they are done, so the second organism builds
beside the first organism's surgeries), and records each stage in dvc.lock as it finishes, in
this process alone (DVC's lock is not shared between machines). A failed stage is named and the
others go on; what waits on it is not run. Each stage is recorded as soon as it finishes, so a
failure or an interrupt loses no finished stage's work (one that finished in the moment of an
interrupt, unrecorded, is out of date and reruns next time).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import nullcontext

import dask
from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner

from tasks.dvc_plan import chosen, plan
from tasks.stage_command import run_stage


def task_runner(workers: int | None = None, address: str | None = None) -> DaskTaskRunner:
    """An existing scheduler (tcp://host:8786) or a local cluster of `workers` workers with one
    thread each (a surgery of a small model keeps one core busy, OMP_NUM_THREADS=1). Local
    workers are threads of this process: a stage runs as a subprocess anyway, and worker
    processes would add a nanny each, whose environment for its worker (MALLOC_TRIM_THRESHOLD_)
    made every surgery twice as slow."""
    if address:
        return DaskTaskRunner(address=address)
    n = workers or os.cpu_count() or 1
    return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1,
                                          "processes": False, "dashboard_address": None})


def parse_resources(text: str | None) -> dict[str, float]:
    """`GPU=1,MEM=40e9` -> {"GPU": 1.0, "MEM": 4e10}: what each stage holds on its worker."""
    resources = {}
    for part in filter(None, (text or "").split(",")):
        name, _, amount = part.partition("=")
        try:
            resources[name.strip()] = float(amount)
        except ValueError:
            raise ValueError(f"stage_resources: {part!r} is not NAME=AMOUNT (e.g. GPU=1)") from None
        if not name.strip() or resources[name.strip()] <= 0:
            raise ValueError(f"stage_resources: {part!r} needs a name and an amount above 0")
    return resources


@flow(name="comparison-grid", log_prints=True)
def grid_flow(stages: list[str], force: bool = False, resources: dict[str, float] | None = None) -> dict:
    from dvc.repo import Repo

    logger = get_run_logger()
    repo = Repo(".")
    root = repo.root_dir
    work = plan(repo, chosen(repo, stages), force)
    for stage, why in work.skipped:
        logger.warning(f"{stage.addressing}: skipped, {why}")
    print(f"{len(work.todo)} stage(s) of {' '.join(stages)} to run")
    scratch = tempfile.mkdtemp(prefix="grid-prefect-homes-")
    futures, began = {}, time.time()
    done, failed = [], []
    try:
        # a stage's resources (GPU=1) make Dask start it only on a worker that has them free
        with dask.annotate(resources=resources) if resources else nullcontext():
            for stage in work.todo:
                futures[stage] = run_stage.submit(
                    stage.addressing, stage.cmd, [os.path.relpath(o.fs_path, root) for o in stage.outs],
                    root, scratch, wait_for=[futures[u] for u in work.needs[stage]])
        by_future = {f: s for s, f in futures.items()}
        for future in as_completed(list(futures.values())):
            stage = by_future[future]
            n = len(done) + len(failed) + 1
            future.wait()  # the task's final state, from its worker (not the API's copy)
            state = future.state
            if state.is_completed():
                repo.commit(stage.addressing, force=True)  # as `dvc repro` records it
                done.append(stage.addressing)
                print(f"[{n}/{len(work.todo)}] {stage.addressing}: done in {future.result()['seconds']:.0f} s")
            else:
                failed.append(stage.addressing)
                print(f"[{n}/{len(work.todo)}] {stage.addressing}: {_why(state)}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{len(done)} done, {len(failed)} failed, in {time.time() - began:.0f} s")
    return {"done": done, "failed": failed, "skipped": [s.addressing for s, _ in work.skipped],
            "seconds": time.time() - began}


def _why(state) -> str:
    if state.is_failed() or state.is_crashed():
        try:
            state.result()
        except Exception as e:  # the stage's own error: its exit status and last lines
            return f"FAILED, {e}"
    return "not run, an upstream stage failed"
