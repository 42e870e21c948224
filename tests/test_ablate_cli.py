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
