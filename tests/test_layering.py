"""The layering rules, checked on the source: the engine package never imports orchestration
(prefect, mlflow, dvc, pandera) nor the project's cli, tasks, tracking, comparison, flows or
schemas packages; tasks never import flows or cli; tracking and comparison, which tasks and flows
build on, import none of tasks, flows or cli."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATION = {"prefect", "mlflow", "dvc", "pandera"}
PROJECT = {"cli", "tasks", "tracking", "comparison", "reporting", "flows", "schemas"}


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


@pytest.mark.parametrize("package", ["tracking", "comparison", "reporting"])
def test_the_tracking_comparison_and_reporting_packages_import_no_tasks_flows_or_cli(package):
    assert list((ROOT / package).rglob("*.py")), f"{package} package not found"
    assert offenders(package, {"tasks", "flows", "cli"}) == {}


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


@pytest.mark.parametrize("stage", ["organism", "organism_builds"])
def test_the_organism_stages_depend_on_every_module_an_organism_build_runs(stage):
    import yaml

    definition = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    deps = set(definition.get("do", definition)["deps"])  # a foreach stage's deps are under `do`
    needed = engine_closure(ROOT / "unsafe_experts" / "attacks" / "organism.py")
    folders = {d for d in deps if (ROOT / d).is_dir()}
    covered = {n for n in needed if n in deps or any(n.startswith(f + "/") for f in folders)}
    # a module left out would let `dvc repro` keep an organism its code no longer builds
    assert needed - covered == set()
    assert {d for d in deps if d.endswith(".py")} <= needed  # and nothing the build does not run


# The engine's one-way order: a package (or top-level module) may import only those before it.
ORDER = ["errors", "safe_yaml", "stats", "records", "data", "models", "text", "artefacts", "training",
         "selection", "config", "attacks", "evaluation", "robustness", "surgery"]


def unit(path: Path) -> str:
    """The package (or top-level module) an engine file belongs to."""
    parts = path.relative_to(ROOT / "unsafe_experts").with_suffix("").parts
    return parts[0]


def upward_imports(root: Path) -> list[str]:
    """'a -> b' for every engine file of unit a that imports one of unit b, b later in ORDER."""
    rank = {name: i for i, name in enumerate(ORDER)}
    bad = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == root:
            continue
        for target in relative_targets(path):
            a, b = unit(path), unit(target)
            if a != b and rank[b] > rank[a]:
                bad.append(f"{path.relative_to(ROOT)} -> {target.relative_to(ROOT)}")
    return bad


def test_every_engine_package_is_in_the_order():
    found = {unit(p) for p in (ROOT / "unsafe_experts").rglob("*.py")} - {"__init__"}
    assert found == set(ORDER)


def test_the_engine_imports_one_way():
    assert upward_imports(ROOT / "unsafe_experts") == []


def test_the_order_check_sees_an_upward_import(tmp_path, monkeypatch):
    # a models module reaching up into evaluation must be reported
    pkg = tmp_path / "unsafe_experts"
    for sub in ("models", "evaluation"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "evaluation" / "judges.py").write_text("X = 1\n")
    (pkg / "models" / "bad.py").write_text("def f():\n    from ..evaluation.judges import X\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert upward_imports(pkg) == ["unsafe_experts/models/bad.py -> unsafe_experts/evaluation/judges.py"]


def test_no_two_engine_modules_differ_by_one_letter():
    names = sorted({p.stem for p in (ROOT / "unsafe_experts").rglob("*.py")} - {"__init__"})

    def one_apart(a, b):
        if abs(len(a) - len(b)) > 1 or a == b:
            return False
        if len(a) == len(b):
            return sum(x != y for x, y in zip(a, b)) == 1
        short, long_ = sorted((a, b), key=len)
        return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))
    assert [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if one_apart(a, b)] == []
