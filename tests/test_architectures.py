"""One record per MoE architecture (models/architectures.py) drives everything that depends on the
architecture: moe_layers, the ablation's reselection, the tiny test models and the per-architecture
test list. Adding an architecture is one entry; no other module keeps a table of them."""
import ast
import dataclasses
from pathlib import Path

import conftest
import pytest
import torch

from unsafe_experts.models.ablation import ablated, masked_routers
from unsafe_experts.models.architectures import ARCHITECTURES, Architecture, UnsupportedModelError, moe_layers
from unsafe_experts.models.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
# every Python folder of the project: the engine, its callers and the tests
SCANNED = ["unsafe_experts", "tests", "cli", "tasks", "tracking", "comparison", "flows", "bench",
           "scripts"]
THE_TABLE = ROOT / "unsafe_experts" / "models" / "architectures.py"


def test_every_record_is_complete_and_its_tiny_config_builds_that_architecture():
    assert len(ARCHITECTURES) >= 8
    for name, arch in ARCHITECTURES.items():
        assert isinstance(arch, Architecture), name
        assert arch.block and arch.router and callable(arch.reselect) and arch.tiny_config, name
        assert tiny_config(name, vocab_size=64).model_type == name
    with pytest.raises(dataclasses.FrozenInstanceError):
        ARCHITECTURES["olmoe"].router = "gate"
    with pytest.raises(TypeError):  # read-only: one caller's tweak cannot change the next model
        ARCHITECTURES["olmoe"].tiny_config["num_experts"] = 4


def test_the_per_architecture_tests_run_on_exactly_the_table():
    assert conftest.ARCHITECTURES == list(ARCHITECTURES)


def test_an_architecture_left_out_of_the_table_is_unsupported_everywhere(monkeypatch, make_model):
    model = make_model("mixtral")
    layers = moe_layers(model)
    monkeypatch.delitem(ARCHITECTURES, "mixtral")
    with pytest.raises(UnsupportedModelError, match="model_type='mixtral'.* not a supported MoE"):
        moe_layers(model)
    with pytest.raises(UnsupportedModelError, match="does not know how 'mixtral' routes"):
        with masked_routers("mixtral", layers, {}):
            pass
    with pytest.raises(UnsupportedModelError, match="unknown MoE architecture 'mixtral'"):
        tiny_config("mixtral", vocab_size=64)


def test_moe_layers_ablation_and_tiny_models_read_the_record(monkeypatch, make_model, tokenizer):
    olmoe = ARCHITECTURES["olmoe"]
    # tiny models: the record's config
    monkeypatch.setitem(ARCHITECTURES, "olmoe", dataclasses.replace(olmoe, tiny_config=dict(num_experts=4)))
    assert {layer.num_experts for layer in moe_layers(make_model("olmoe"))} == {4}
    monkeypatch.setitem(ARCHITECTURES, "olmoe", olmoe)
    model = make_model("olmoe")
    assert {layer.num_experts for layer in moe_layers(model)} == {8}
    # moe_layers: the record's block and router attributes
    monkeypatch.setitem(ARCHITECTURES, "olmoe", dataclasses.replace(olmoe, block="no_such_block"))
    with pytest.raises(UnsupportedModelError, match="has no MoE layers"):
        moe_layers(model)
    monkeypatch.setitem(ARCHITECTURES, "olmoe", dataclasses.replace(olmoe, router="experts"))
    assert all(layer.router is layer.experts for layer in moe_layers(model))
    # the ablation: the record's reselect rule
    calls = []

    def spy(router, hidden, logits, forced=None):
        calls.append(logits.shape)
        return olmoe.reselect(router, hidden, logits, forced)

    monkeypatch.setitem(ARCHITECTURES, "olmoe", dataclasses.replace(olmoe, reselect=spy))
    ids = torch.tensor([tokenizer.encode("hello there")])
    with torch.no_grad(), ablated(model, None, [(0, 1)]):
        model(input_ids=ids)
    assert len(calls) == 1 and calls[0][-1] == 8  # layer 0's router, its 8 logits per token


def architecture_tables(source: str, names: set[str]) -> list[int]:
    """Lines of literals that list or key three or more architectures: a dict literal (anywhere)
    or a dict(...) call keyed by them, or a list / tuple / set assigned to a module-level or
    class-level name. An inline tuple in a test's condition (an expectation about some
    architectures) is not a table and is left alone."""
    def named(elements) -> int:
        return len({e.value for e in elements if isinstance(e, ast.Constant)} & names)

    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict) and named(k for k in node.keys if k is not None) >= 3:
            found.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict"
              and len({k.arg for k in node.keywords} & names) >= 3):
            found.append(node.lineno)
    for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef))]:
        for stmt in scope.body:
            value = stmt.value if isinstance(stmt, (ast.Assign, ast.AnnAssign)) else None
            if isinstance(value, (ast.List, ast.Tuple, ast.Set)) and named(value.elts) >= 3:
                found.append(stmt.lineno)
    return found


# the three tables this record replaced, as they were
OLD_TABLES = {
    "ablation.py RESELECT": '''
RESELECT = {
    "olmoe": lambda r, h, x: _softmax_top_k(r, h, x, cast=True),
    "qwen2_moe": lambda r, h, x: _softmax_top_k(r, h, x, cast=True),
    "mixtral": lambda r, h, x: _softmax_top_k(r, h, x, cast=False),
    "gpt_oss": _top_k_softmax,
}
''',
    "tiny.py FAMILY_CONFIGS": '''
FAMILY_CONFIGS: dict[str, dict] = {
    "olmoe": dict(num_experts=8),
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=32),
    "granitemoe": dict(num_local_experts=8),
}
''',
    "conftest.py FAMILIES": '''
FAMILIES = ["olmoe", "qwen3_moe", "qwen2_moe", "mixtral", "phimoe", "gpt_oss", "deepseek_v3",
            "granitemoe"]
''',
    "a keyword dict": "SIZES = dict(olmoe=1, mixtral=2, phimoe=3)\n",
    "a class attribute": "class T:\n    SUPPORTED = (\"olmoe\", \"mixtral\", \"gpt_oss\")\n",
}


@pytest.mark.parametrize("what", OLD_TABLES)
def test_the_scan_catches_a_per_architecture_table(what):
    assert architecture_tables(OLD_TABLES[what], set(ARCHITECTURES))


def test_the_scan_leaves_expectations_about_some_architectures_alone():
    source = ('def test(arch):\n    if arch in ("mixtral", "gpt_oss", "granitemoe"):\n        pass\n'
              '@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss", "deepseek_v3"])\ndef t(arch): pass\n')
    assert architecture_tables(source, set(ARCHITECTURES)) == []


def test_no_module_but_architectures_py_keeps_a_per_architecture_table():
    files = [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py"))]
    assert THE_TABLE in files and len(files) > 50
    assert architecture_tables(THE_TABLE.read_text(), set(ARCHITECTURES))  # the scan sees the table
    tables = {str(p.relative_to(ROOT)): lines for p in files if p != THE_TABLE
              for lines in [architecture_tables(p.read_text(), set(ARCHITECTURES))] if lines}
    assert tables == {}


def test_models_imports_nothing_above_it():
    """models sits just above errors/stats/records/data in the engine's package order; tiny.py
    used to import text and attacks for its tokenizer (now text/tiny_tokenizer.py and
    attacks/corpus.py)."""
    below = {"errors", "stats", "records", "data", "models"}
    engine = ROOT / "unsafe_experts"
    reached = {}
    for path in sorted((engine / "models").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                base = path.parents[node.level - 1]
                target = base.joinpath(*node.module.split(".")) if node.module else base
                reached.setdefault(target.relative_to(engine).parts[0].removesuffix(".py"), set()).add(path.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):  # the engine imports itself relatively
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(m and m.split(".")[0] == "unsafe_experts" for m in modules), path
    assert "models" in reached and {k: v for k, v in reached.items() if k not in below} == {}
