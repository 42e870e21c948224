"""The layering rules, checked on the source: the engine package never imports orchestration
(prefect, mlflow, dvc, pandera) nor the project's cli, tasks, flows or schemas packages; tasks
never import flows."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATION = {"prefect", "mlflow", "dvc", "pandera"}
PROJECT = {"cli", "tasks", "flows", "schemas"}


def imported(path: Path) -> set[str]:
    """Top-level names of every absolute import in the file, at any depth (lazy ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def offenders(package: str, forbidden: set[str]) -> dict[str, set[str]]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported(path) & forbidden
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


def test_engine_package_imports_no_orchestration_and_no_project_layer():
    assert list((ROOT / "unsafe_experts").rglob("*.py")), "engine package not found"
    assert offenders("unsafe_experts", ORCHESTRATION | PROJECT) == {}


def test_tasks_never_import_flows_or_cli():
    assert offenders("tasks", {"flows", "cli"}) == {}


@pytest.mark.parametrize("source, found", [
    ("import prefect", {"prefect"}),
    ("def f():\n    from mlflow import MlflowClient", {"mlflow"}),
    ("from flows.surgery import surgery_flow", {"flows"}),
    ("from .config import TrainConfig", set()),
])
def test_the_checker_sees_lazy_and_aliased_imports(tmp_path, source, found):
    path = tmp_path / "m.py"
    path.write_text(source + "\n")
    assert imported(path) & (ORCHESTRATION | PROJECT) == found


def engine_closure(start: Path) -> set[str]:
    """The engine modules `start` imports relatively, directly or through others (lazy imports
    too): what an organism build runs."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                for name in [node.module] if node.module else [a.name for a in node.names]:
                    module = path.parent / f"{name.split('.')[0]}.py"
                    if module.is_file():
                        todo.append(module)
    return {str(p.relative_to(ROOT)) for p in seen}


@pytest.mark.parametrize("stage", ["organism", "organism_second"])
def test_the_organism_stages_depend_on_every_module_an_organism_build_runs(stage):
    import yaml

    deps = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"])
    needed = engine_closure(ROOT / "unsafe_experts" / "organism.py")
    # a module left out would let `dvc repro` keep an organism its code no longer builds
    assert needed - deps == set()
    assert {d for d in deps if d.endswith(".py")} == needed  # and nothing the build does not run
