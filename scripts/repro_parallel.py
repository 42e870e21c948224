"""Reproduces the DVC stages named (a whole stage name) or whose names start with the given
prefixes (a `foreach` group such as `compare_run@`) several at a time, then records each in
dvc.lock exactly as `dvc repro` would.

    python scripts/repro_parallel.py organism_builds@ compare_run@ compare_ablate --jobs 2

`dvc repro` runs one stage at a time, and one surgery of the demo organism keeps one core busy
(OMP_NUM_THREADS=1 is faster for a model this small), so `make compare` would leave the second
core idle for an hour. Each out-of-date stage's own command (as dvc.yaml resolves it) runs in a
subprocess after its outputs are removed, as `dvc repro` does; when it succeeds its outputs are
committed (`dvc commit`), which records the same dependencies, parameters and output hashes a
`dvc repro` of that stage would. A stage that depends on another chosen stage's output waits
for it (and reruns when that one runs): the second organism's build runs beside the first
organism's surgeries instead of before them all. Stages start in the order the prefixes are
given. Up-to-date stages are skipped, and so are stages with a missing dependency that no
chosen stage makes (named) or whose upstream failed; a failed stage is named and the others go
on; the exit status is 1 if any failed or was skipped. Each worker gets its own PREFECT_HOME, so
the temporary Prefect servers do not share one SQLite file; MLflow's store is shared (the
comparison reads every run from it).
"""
from __future__ import annotations

import argparse
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path


def chosen(repo, prefixes: list[str]) -> list:
    """The stages named by the prefixes, in the prefixes' order. A whole stage name names that
    stage alone (compare_run@5, not also compare_run@50 to @59)."""
    stages = []
    for prefix in prefixes:
        exact = [s for s in repo.index.stages if s.addressing == prefix]
        every = exact or [s for s in repo.index.stages if s.addressing.startswith(prefix)]
        if not every:
            raise SystemExit(f"error: no DVC stage starts with {prefix!r}")
        # overlapping prefixes (organism, organism_builds@) name a stage once
        stages += [s for s in every if s not in stages]
    return stages


def upstream(stage, stages: list) -> list:
    """The stages among `stages` whose outputs `stage` depends on."""
    def inside(dep, out):
        return Path(dep.fs_path) == Path(out.fs_path) or Path(out.fs_path) in Path(dep.fs_path).parents
    return [other for other in stages if other is not stage
            and any(inside(d, o) for d in stage.deps for o in other.outs)]


def plan(repo, stages: list) -> tuple[list, dict, list]:
    """(stages to run in order, {stage: its upstream stages to run}, [(skipped, why)])."""
    with repo.lock:  # a stage's status reads its lock entry under the repository lock
        changed = [s for s in stages if s.changed()]
    todo = []
    for stage in stages:  # a stage reruns when anything it depends on reruns
        if stage in changed or any(u in todo for u in upstream(stage, stages)):
            todo.append(stage)
    needs = {s: upstream(s, todo) for s in todo}
    skipped = []
    for stage in todo:
        made = {Path(o.fs_path) for u in needs[stage] for o in u.outs}
        missing = [str(d) for d in stage.deps if not Path(d.fs_path).exists() and Path(d.fs_path) not in made]
        if missing:  # e.g. an organism no chosen stage builds
            skipped.append((stage, "missing " + ", ".join(missing)))
    gone = {s for s, _ in skipped}
    for stage in todo:  # and whatever waits on a skipped stage
        if stage not in gone and any(u in gone for u in needs[stage]):
            skipped.append((stage, "an upstream stage is skipped"))
            gone.add(stage)
    return [s for s in todo if s not in gone], needs, skipped


def run_stage(stage, root: Path, homes: queue.Queue) -> tuple[str, int, float, str]:
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

    from dvc.repo import Repo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefixes", nargs="+", metavar="prefix",
                        help="stage-name prefix, e.g. compare_run@; several run as one plan")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        print("error: --jobs must be at least 1", file=sys.stderr)
        return 2
    repo = Repo(".")
    root = Path(repo.root_dir)
    todo, needs, skipped = plan(repo, chosen(repo, args.prefixes))
    for stage, why in skipped:
        print(f"{stage.addressing}: skipped, {why}", flush=True)
    names = " ".join(args.prefixes)
    print(f"{len(todo)} stage(s) of {names} to run, {args.jobs} at a time", flush=True)
    homes: queue.Queue = queue.Queue()
    scratch = Path(tempfile.mkdtemp(prefix="prefect-homes-"))
    for i in range(args.jobs):
        homes.put(str(scratch / f"worker{i}"))
    done, failed, began = set(), [], time.time()
    pending, running = list(todo), {}
    with ThreadPoolExecutor(args.jobs) as pool:
        while pending or running:
            for stage in list(pending):  # start what is ready, in order, while workers are free
                if len(running) == args.jobs:
                    break
                if any(u in failed for u in needs[stage]):
                    pending.remove(stage)
                    failed.append(stage)
                    print(f"{stage.addressing}: not run, an upstream stage failed", flush=True)
                elif all(u in done for u in needs[stage]):
                    pending.remove(stage)
                    running[pool.submit(run_stage, stage, root, homes)] = stage
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                stage = running.pop(future)
                name, code, seconds, tail = future.result()
                n = len(done) + len(failed) + 1
                if code == 0:
                    repo.commit(name, force=True)
                    done.add(stage)
                    print(f"[{n}/{len(todo)}] {name}: done in {seconds:.0f} s", flush=True)
                else:
                    failed.append(stage)
                    print(f"[{n}/{len(todo)}] {name}: FAILED (exit {code}) after {seconds:.0f} s\n{tail}",
                          flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"{len(done)} done, {len(failed)} failed, in {time.time() - began:.0f} s", flush=True)
    if failed or skipped:
        print("error: " + "; ".join(filter(None, [
            "failed stages: " + ", ".join(s.addressing for s in failed) if failed else "",
            "skipped: " + ", ".join(s.addressing for s, _ in skipped) if skipped else ""])),
            file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
