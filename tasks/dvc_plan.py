"""Which DVC stages a grid run reproduces, in what order, and which wait on which.

The grid (flows/grid.py) runs each out-of-date stage's own command as `dvc repro` would and
records it in dvc.lock afterwards, so `dvc status` and `dvc repro` stay true. A stage is out of
date when DVC says so (its command, parameters, dependencies or outputs changed: a surgery's
model digest, records, settings and the engine's source are its dependencies in dvc.yaml), or
when a chosen stage it depends on reruns. Everything else is DVC's record of a finished run:
a rerun with nothing changed plans no work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Plan:
    todo: list                                   # stages to run, in the order they were named
    needs: dict = field(default_factory=dict)    # stage -> the stages in `todo` it waits on
    skipped: list = field(default_factory=list)  # (stage, why): never started


def chosen(repo, names: list[str]) -> list:
    """The stages named, in the order given: a whole stage name names that stage alone
    (compare_run@5, not also compare_run@50 to @59); otherwise every stage the name starts
    (compare_run@, a `foreach` group)."""
    stages = []
    for name in names:
        exact = [s for s in repo.index.stages if s.addressing == name]
        every = exact or [s for s in repo.index.stages if s.addressing.startswith(name)]
        if not every:
            raise ValueError(f"no DVC stage is named or starts with {name!r}")
        # overlapping names (organism, organism_builds@) name a stage once
        stages += [s for s in every if s not in stages]
    return stages


def upstream(stage, stages: list) -> list:
    """The stages among `stages` whose outputs `stage` depends on."""
    def inside(dep, out):
        return Path(dep.fs_path) == Path(out.fs_path) or Path(out.fs_path) in Path(dep.fs_path).parents
    return [other for other in stages if other is not stage
            and any(inside(d, o) for d in stage.deps for o in other.outs)]


def plan(repo, stages: list, force: bool = False) -> Plan:
    with repo.lock:  # a stage's status reads its lock entry under the repository lock
        changed = stages if force else [s for s in stages if s.changed()]
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
    runnable = [s for s in todo if s not in gone]
    return Plan(runnable, {s: needs[s] for s in runnable}, skipped)
