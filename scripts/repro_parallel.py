"""Reproduces the DVC stages whose names start with a prefix (a `foreach` group, e.g.
`compare_run@`) several at a time, then records each in dvc.lock exactly as `dvc repro` would.

    python scripts/repro_parallel.py compare_run@ --jobs 2

`dvc repro` runs one stage at a time, and one surgery of the demo organism keeps one core busy
(OMP_NUM_THREADS=1 is faster for a model this small), so `make compare` would leave the second
core idle for an hour. Each out-of-date stage's own command (as dvc.yaml resolves it) runs in a
subprocess after its outputs are removed, as `dvc repro` does; when it succeeds its outputs are
committed (`dvc commit`), which records the same dependencies, parameters and output hashes a
`dvc repro` of that stage would. Up-to-date stages are skipped, and so are stages with a
missing dependency (named); a failed stage is named and the others go on; the exit status is 1
if any failed or was skipped. Each worker gets its own PREFECT_HOME, so
the temporary Prefect servers do not share one SQLite file; MLflow's store is shared (the
comparison reads every run from it).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path


def out_of_date(repo, prefix: str) -> list:
    stages = [s for s in repo.index.stages if s.addressing.startswith(prefix)]
    if not stages:
        raise SystemExit(f"error: no DVC stage starts with {prefix!r}")
    with repo.lock:  # a stage's status reads its lock entry under the repository lock
        return [s for s in stages if s.changed()]


def run_stage(stage, root: Path, homes: "queue") -> tuple[str, int, float, str]:
    home = homes.get()
    try:
        for out in stage.outs:  # as `dvc repro`: a stage starts from no outputs
            path = Path(out.fs_path)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        env = {**os.environ, "PREFECT_HOME": home}
        start = time.time()
        done = subprocess.run(stage.cmd, shell=True, cwd=root, env=env, capture_output=True, text=True)
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        return stage.addressing, done.returncode, time.time() - start, "\n".join(tail)
    finally:
        homes.put(home)


def main(argv: list[str] | None = None) -> int:
    import queue

    from dvc.repo import Repo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", help="stage-name prefix, e.g. compare_run@")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        print("error: --jobs must be at least 1", file=sys.stderr)
        return 2
    repo = Repo(".")
    root = Path(repo.root_dir)
    todo, waiting = [], []
    for stage in out_of_date(repo, args.prefix):
        missing = [str(d) for d in stage.deps if not Path(d.fs_path).exists()]
        (waiting if missing else todo).append((stage, missing))
    for stage, missing in waiting:  # e.g. an organism another stage has not built yet
        print(f"{stage.addressing}: skipped, missing {', '.join(missing)}", flush=True)
    todo = [stage for stage, _ in todo]
    print(f"{len(todo)} stage(s) of {args.prefix} to run, {args.jobs} at a time", flush=True)
    homes: queue.Queue = queue.Queue()
    scratch = Path(tempfile.mkdtemp(prefix="prefect-homes-"))
    for i in range(args.jobs):
        homes.put(str(scratch / f"worker{i}"))
    failed, commit_lock, began = [], threading.Lock(), time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_stage, stage, root, homes) for stage in todo]
        for n, future in enumerate(as_completed(futures), 1):
            name, code, seconds, tail = future.result()
            if code == 0:
                with commit_lock:
                    repo.commit(name, force=True)
                print(f"[{n}/{len(todo)}] {name}: done in {seconds:.0f} s", flush=True)
            else:
                failed.append(name)
                print(f"[{n}/{len(todo)}] {name}: FAILED (exit {code}) after {seconds:.0f} s\n{tail}",
                      flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"{len(todo) - len(failed)} done, {len(failed)} failed, in {time.time() - began:.0f} s",
          flush=True)
    if failed or waiting:
        print("error: " + "; ".join(filter(None, [
            "failed stages: " + ", ".join(failed) if failed else "",
            "skipped for missing dependencies: " + ", ".join(s.addressing for s, _ in waiting) if waiting else ""])),
            file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
