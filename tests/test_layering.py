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


def relative_targets(path: Path) -> set[Path]:
    """The engine files a module's relative imports (lazy ones too, any depth of dots) load."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.ImportFrom) and node.level >= 1):
            continue
        base = path.parent
        for _ in range(node.level - 1):
            base = base.parent
        module = base.joinpath(*node.module.split(".")) if node.module else base
        candidates = [module.with_suffix(".py"), module / "__init__.py"]
        candidates += [module / f"{a.name}.py" for a in node.names]  # `from .pkg import module`
        found |= {c for c in candidates if c.is_file()}
    return found


def engine_closure(start: Path) -> set[str]:
    """The engine modules `start` imports relatively, directly or through others (lazy imports
    too), with the packages they sit in (Python runs each package's __init__): what an organism
    build runs."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(relative_targets(path))
        package = path.parent
        while package != ROOT and (package / "__init__.py").is_file():
            todo.append(package / "__init__.py")
            package = package.parent
    return {str(p.relative_to(ROOT)) for p in seen}


@pytest.mark.parametrize("stage", ["organism", "organism_second"])
def test_the_organism_stages_depend_on_every_module_an_organism_build_runs(stage):
    import yaml

    deps = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"])
    needed = engine_closure(ROOT / "unsafe_experts" / "attacks" / "organism.py")
    folders = {d for d in deps if (ROOT / d).is_dir()}
    covered = {n for n in needed if n in deps or any(n.startswith(f + "/") for f in folders)}
    # a module left out would let `dvc repro` keep an organism its code no longer builds
    assert needed - covered == set()
    assert {d for d in deps if d.endswith(".py")} <= needed  # and nothing the build does not run
