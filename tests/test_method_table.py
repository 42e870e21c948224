"""The method table carries each method's behaviour: no engine or comparison module checks a
method's name, every row's scorer and reduction exist, and a new gradient row needs nothing else."""
import ast
from pathlib import Path

import pytest
import torch

from unsafe_experts.config import TrainConfig
from unsafe_experts.selection.methods import METHODS, PAIRED, Method
from unsafe_experts.selection.scoring import REDUCERS
from unsafe_experts.surgery import Surgery, run_surgery

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "unsafe_experts" / "selection" / "methods.py"


def _literals(node: ast.AST) -> set[str]:
    """The strings a comparison operand holds: a literal, or literals in a tuple, list or set."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*map(_literals, node.elts))
    return set()


def name_checks(source: str) -> list[int]:
    """Lines that compare something with a method's name: ==, !=, in, a match case, or pandas'
    isin."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "isin":
            operands = list(node.args)
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        else:
            continue
        if any(_literals(o) & set(METHODS) for o in operands):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("source, found", [
    ('if cfg.method == "router_only":\n    pass', [1]),
    ('ranked = runs[~runs.method.isin(["router_only", "all_experts"])]', [1]),
    ('x = 1\nwanted = method in ("fisher", "snip")', [2]),
    ('ok = "gradient_per_token" != score', [1]),
    ('match method:\n    case "random":\n        pass', [2]),
    ('if cfg.method == PAIRED[0] or mode == "exact":\n    pass', []),
    ('label = "routing"', []),
])
def test_the_checker_sees_a_planted_name_check(source, found):
    assert name_checks(source) == found


def test_no_module_checks_a_method_name_outside_the_table():
    files = [p for p in sorted((ROOT / "unsafe_experts").rglob("*.py")) if p != TABLE]
    files += sorted((ROOT / "tasks").rglob("*.py")) + sorted((ROOT / "comparison").rglob("*.py"))
    assert len(files) > 20 and ROOT / "comparison" / "tables.py" in files
    found = {str(p.relative_to(ROOT)): lines for p in files if (lines := name_checks(p.read_text()))}
    assert found == {}


def test_every_row_names_a_scorer_and_reduction_that_exist():
    for method in METHODS.values():
        assert method.scorer in Surgery.SCORERS
        # gradient rows score by gradient passes: one (gradients), two contrasted, or one
        # limited by the benign-in-format routing shares
        assert (method.scorer in ("gradients", "contrastive_gradients", "share_limited_gradients")) \
            == method.from_gradients
        assert (method.reduction in REDUCERS) == method.from_gradients
        assert not method.squares_each_batch or method.reduction == "sq"
        assert not method.per_batch or method.from_gradients
    assert set(PAIRED) <= set(METHODS) and all(METHODS[m].ranks for m in PAIRED)


def _first_round(tiny_dir, records_path, out, method):
    # one batch of four: a per-batch square and the square of the pass's gradient coincide
    cfg = TrainConfig(model_name=str(tiny_dir), dataset_path=str(records_path), output_dir=str(out),
                      method=method, num_rounds=1, top_k_experts=3, batch_size=4, max_samples=4,
                      expert_lr=1e-3, skip_router_training=True)
    return run_surgery(cfg, progress=False, echo=lambda *a: None)["identified_experts_per_round"]["1"]


def test_a_new_gradient_row_runs_through_the_surgery(tiny_dir, records_path, tmp_path, monkeypatch):
    """A row with an existing reduction, and no other change, is a method the surgery scores:
    the sum of squares of the pass's gradient, which on one batch is fisher's score exactly."""
    monkeypatch.setitem(METHODS, "grad_sq", Method("grad_sq", "gradient", "mean grad^2 of the "
                                                   "pass's gradient", reduction="sq"))
    ours = _first_round(tiny_dir, records_path, tmp_path / "ours", "grad_sq")
    fisher = _first_round(tiny_dir, records_path, tmp_path / "fisher", "fisher")
    gradient = _first_round(tiny_dir, records_path, tmp_path / "gradient", "gradient")
    assert ours["method"] == "grad_sq" and ours["gradients"] == ours["scores"]
    assert ours["scores"] == fisher["scores"] and ours["experts"] == fisher["experts"]
    assert ours["scores"] != gradient["scores"]  # the row's reduction, not the default one
    assert [f"L{l}_E{e}" for l, e in ours["experts"]] == list(ours["scores"])[:3]
    assert torch.isfinite(torch.tensor(list(ours["scores"].values()))).all()


def test_training_never_imports_selection():
    """The scoring passes sit in selection, above training: the one-way package order."""
    from test_layering import relative_targets

    training = sorted((ROOT / "unsafe_experts" / "training").glob("*.py"))
    selection = ROOT / "unsafe_experts" / "selection"
    assert training and not [p.name for p in training
                             if any(t.is_relative_to(selection) for t in relative_targets(p))]
