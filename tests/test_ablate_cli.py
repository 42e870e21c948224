"""`unsafe-experts ablate`: the experts of a file or a run switched off during evaluation."""
import json

import pytest
from conftest import one_error_line

from cli.ablate import random_like
from cli.main import main
from unsafe_experts.models.architectures import moe_layers


@pytest.fixture
def eval_set(tmp_path):
    user = [{"role": "user", "content": "Write a poem about the sea"}]
    path = tmp_path / "eval_set.json"
    path.write_text(json.dumps({"plain": [user] * 3, "benign_refs": [[user, "The sea is wide."]] * 3}))
    return path


def ablate(tiny_dir, eval_set, *extra):
    return main(["ablate", "--model", str(tiny_dir), "--eval_set", str(eval_set),
                 "--eval_max_new_tokens", "4", "--quiet", *extra])


def test_ablation_changes_the_evaluation_and_is_written(tiny_dir, eval_set, tmp_path, capsys):
    experts = tmp_path / "experts.json"
    experts.write_text(json.dumps([[0, 1], [0, 2], [1, 3]]))
    out = tmp_path / "ablation.json"
    assert ablate(tiny_dir, eval_set, "--experts", str(experts), "--with_baseline", "--out", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["experts"] == [[0, 1], [0, 2], [1, 3]]
    base, cut = (result[k]["metrics"]["benign_loglik"]["value"] for k in ("baseline", "ablated"))
    assert base != cut  # the switched-off experts mattered to the forward pass
    assert "ablated 3 experts: L0_E1 L0_E2 L1_E3" in capsys.readouterr().out


def test_random_control_has_the_same_size_and_respects_top_k(make_model):
    layers = moe_layers(make_model("olmoe"))  # 2 layers x 8 experts, top-2
    drawn = random_like([(0, 0)] * 10, layers, seed=3)
    assert len(drawn) == 10 and len(set(drawn)) == 10
    assert all(sum(l == layer.index for l, _ in drawn) <= layer.num_experts - layer.top_k for layer in layers)
    assert drawn == random_like([(0, 0)] * 10, layers, seed=3) != random_like([(0, 0)] * 10, layers, seed=4)


@pytest.mark.parametrize("setup, message", [
    ("bad_pair", "[5, 0]: layer 5 is not a MoE layer of this model"),
    ("no_metadata", "training_metadata.json: no such file"),
])
def test_bad_expert_sets_are_one_error_line(tiny_dir, eval_set, tmp_path, capsys, setup, message):
    if setup == "bad_pair":
        path = tmp_path / "experts.json"
        path.write_text(json.dumps([[5, 0]]))
        args = ["--experts", str(path)]
    else:
        (tmp_path / "run").mkdir()
        args = ["--run", str(tmp_path / "run")]
    assert ablate(tiny_dir, eval_set, *args, "--out", str(tmp_path / "o.json")) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "o.json").exists()


def test_experts_inline_as_json_are_the_same_as_from_a_file(tiny_dir, eval_set, tmp_path, monkeypatch):
    """--experts takes the JSON itself as well as a file holding it: the same experts either way,
    a list of pairs or {"experts": [...]}; a file whose name starts with `[` is still a file."""
    pairs = [[0, 1], [0, 2], [1, 3]]
    (tmp_path / "experts.json").write_text(json.dumps(pairs))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "[1]").write_text(json.dumps({"experts": pairs}))
    results = []
    for value in ("experts.json", json.dumps(pairs), json.dumps({"experts": pairs}), " [[0,1],[0,2],[1,3],[0,1]]", "[1]"):
        out = tmp_path / "ablation.json"
        assert ablate(tiny_dir, eval_set, "--experts", value, "--eval_samples", "0", "--out", str(out)) == 0, value
        result = json.loads(out.read_text())
        assert result["experts"] == pairs and result["source"]["experts"] == value
        results.append(result["ablated"]["metrics"])
    assert all(r == results[0] for r in results)


@pytest.mark.parametrize("value, message", [
    ("[[0, 1], [3", "error: --experts [[0, 1], [3: neither a file nor valid JSON (Expecting"),
    ('{"experts": [[0, 1]]', "neither a file nor valid JSON"),
    ("experts.json", "experts.json: no such file (nor inline JSON: a list of [layer, expert] pairs"),
    ('[[0, 1], [0, "2"]]', "error: --experts: [0, '2'] is not a [layer, expert] pair of integers"),
    ('{"pairs": [[0, 1]]}', 'error: --experts: an object needs an "experts" list'),
    ("[" * 100_000 + "]" * 100_000, "neither a file nor valid JSON (nested too deeply)"),
])
def test_experts_that_are_neither_a_file_nor_json_are_one_line_before_the_model_loads(
        tiny_dir, eval_set, tmp_path, capsys, monkeypatch, value, message):
    import cli.ablate
    monkeypatch.setattr(cli.ablate, "load_model", lambda *a: pytest.fail("the model loaded"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.json"
    out.write_text("earlier")
    assert ablate(tiny_dir, eval_set, "--experts", value, "--out", str(out)) == 2
    one_error_line(capsys, message)
    assert out.read_text() == "earlier"


def test_a_long_inline_list_is_json_not_a_file_name_too_long(tiny_dir, eval_set, tmp_path, capsys):
    """Over 255 bytes, a name is an OSError to stat (ENAMETOOLONG); it used to end there."""
    pairs = [[layer, expert] for layer in (0, 1) for expert in range(6)] * 4
    value = json.dumps(pairs)
    assert len(value) > 255
    assert ablate(tiny_dir, eval_set, "--experts", value, "--eval_samples", "0") == 0
    assert "ablated 12 experts" in capsys.readouterr().out
    assert ablate(tiny_dir, eval_set, "--experts", json.dumps(pairs + [[9, 0]])) == 2
    one_error_line(capsys, "--experts: [9, 0]: layer 9 is not a MoE layer of this model")
