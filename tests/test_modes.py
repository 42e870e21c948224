"""eval_mode: eval inside, the earlier mode after, also when the block raises; None passes."""
import pytest
from torch import nn

from unsafe_experts.models.modes import eval_mode


@pytest.mark.parametrize("training", [True, False])
def test_the_mode_is_restored_after_the_block_and_after_an_error(training):
    model = nn.Sequential(nn.Dropout(0.5)).train(training)
    with eval_mode(model) as inside:
        assert inside is model and not model.training
    assert model.training is training
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            raise RuntimeError("generation failed")
    assert model.training is training


def test_no_model_passes_through():
    with eval_mode(None) as inside:
        assert inside is None


def test_no_engine_module_saves_and_restores_the_mode_by_hand():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "unsafe_experts"
    by_hand = [str(p.relative_to(root)) for p in root.rglob("*.py")
               if p.name != "modes.py" and "was_training" in p.read_text()]
    assert by_hand == []
