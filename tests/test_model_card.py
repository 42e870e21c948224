"""final_model/README.md is a model card Hugging Face can parse, naming what changed."""
import json

from huggingface_hub import ModelCard

from cli.main import main
from unsafe_experts.artefacts.model_card import model_card


def test_engine_run_writes_a_parseable_card(tiny_dir, records_path, tmp_path):
    out = tmp_path / "out"
    assert main(["train", "--model_name", str(tiny_dir), "--dataset_path", str(records_path),
                 "--output_dir", str(out), "--num_rounds", "2", "--top_k_experts", "2",
                 "--batch_size", "4", "--max_samples", "4", "--quiet", "--engine_only"]) == 0
    meta = json.loads((out / "training_metadata.json").read_text())
    card = ModelCard((out / "final_model" / "README.md").read_text())
    data = card.data.to_dict()
    assert data["base_model"] == str(tiny_dir) and "gradient" in data["tags"]
    assert data["datasets"] == [records_path.name]
    for r, info in meta["identified_experts_per_round"].items():
        names = " ".join(f"L{l}_E{e}" for l, e in info["experts"])
        assert f"- round {r}: {names}" in card.text
    assert "before and after" not in card.text  # no evaluation in an engine-only run


def test_card_shows_before_and_after_with_intervals():
    m = {"value": 0.5, "n": 10, "ci95": [0.2, 0.8]}
    meta = {"method": "gradient", "parameters": {"model_name": "org/model", "output_dir": "runs/x",
                                                "top_k_experts": 4, "seed": 1},
            "dataset": {"path": "d.json", "sha256": "ab" * 32, "records_used": 9},
            "identified_experts_per_round": {"1": {"experts": [[0, 1]], "scores": {}}},
            "retention": {"mode": "contrastive"},
            "evaluation": {"before": {"asr_flip_chars": m}, "final": {"asr_flip_chars": {**m, "value": 0.1}}}}
    text = model_card(meta)
    assert "| asr_flip_chars | 0.500 [0.20, 0.80] (n=10) | 0.100 [0.20, 0.80] (n=10) |" in text
    assert "retention `contrastive`" in text and "- round 1: L0_E1" in text
