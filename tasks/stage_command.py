"""One DVC stage's command as a Prefect task, run on whichever Dask worker is free.

A worker runs the command in a subprocess from the repository root, after removing the stage's
outputs (as `dvc repro` does): a surgery that crashes or is killed for memory takes its own
process down, not the worker. Each worker gives the commands it runs a Prefect home of its own,
so the temporary Prefect servers of two surgeries never share one SQLite file; MLflow's store is
shared (the comparison reads every run from it). On a cluster, every worker must see the
repository at the same path (a shared file system), as the stages' relative paths assume.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from unsafe_experts.artefacts.atomic import write_bytes_atomic

# each stage's output, under DVC's own ignored scratch folder (replaced by each run)
LOGS = ".dvc/tmp/grid-logs"


class StageFailed(RuntimeError):
    """A stage's command exited non-zero; the message ends with its output's last lines."""


def _worker_home(scratch: str) -> str:
    try:
        from distributed import get_worker
        name = str(get_worker().name)
    except (ImportError, ValueError):  # not on a Dask worker (a test, a thread pool)
        name = str(os.getpid())
    home = Path(scratch) / f"worker-{name}"
    home.mkdir(parents=True, exist_ok=True)
    return str(home)


def _nanny_malloc_trim():
    try:
        import dask
        return dask.config.get("distributed.nanny.pre-spawn-environ", {}).get("MALLOC_TRIM_THRESHOLD_")
    except ImportError:
        return None


def clear_outputs(outs: list[str]) -> None:
    for out in map(Path, outs):
        if out.is_symlink() or out.is_file():
            out.unlink()
        elif out.is_dir():
            shutil.rmtree(out)


# no Prefect result cache: whether a stage reruns is DVC's call (tasks/dvc_plan.py), which the
# flow makes before it submits anything
@task(name="dvc-stage", cache_policy=NO_CACHE, task_run_name="{name}")
def run_stage(name: str, cmd: str, outs: list[str], root: str, scratch: str) -> dict:
    clear_outputs([str(Path(root) / out) for out in outs])
    env = {**os.environ, "PREFECT_HOME": _worker_home(scratch)}
    if env.get("MALLOC_TRIM_THRESHOLD_") == str(_nanny_malloc_trim()):
        # a Dask nanny's setting for its worker, not the user's: glibc returning every freed
        # 64 KiB to the kernel made each surgery twice as slow (measured, docs/results.md)
        del env["MALLOC_TRIM_THRESHOLD_"]
    start = time.time()
    done = subprocess.run(cmd, shell=True, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    kept = keep_output(root, name, done.stdout + done.stderr)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise StageFailed(f"exit {done.returncode} after {seconds:.0f} s ({kept})\n{tail}")
    return {"name": name, "seconds": seconds, "log": kept}


def keep_output(root: str, name: str, output: str) -> str:
    """The stage's whole output in LOGS/<stage>.log (a traceback's last lines rarely name its
    cause), and where it went; never written through a link the user put there."""
    folder = Path(root) / LOGS
    if any(p.is_symlink() for p in (folder, *folder.parents) if Path(root) in p.parents or p == folder):
        return f"its output is not kept: {LOGS} is a link"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / (name.replace("/", "_").replace(":", "_") + ".log")
    write_bytes_atomic(log, output.encode())  # replaces a link at the log's own name, never follows it
    return f"its whole output: {log.relative_to(root)}"
