"""The contrastive selection method (issue 25): its definition against a slow per-expert
reference, its validation, and a resumed run scoring against the same benign answers."""
import json

import pytest
import torch
from test_scoring import expert_gradients, slow_reference

from unsafe_experts.artefacts.checkpoints import load_tokenizer
from unsafe_experts.config import TrainConfig
from unsafe_experts.errors import ConfigError
from unsafe_experts.models.architectures import moe_layers
from unsafe_experts.records import load_records
from unsafe_experts.selection.contrastive import contrast, normalised
from unsafe_experts.surgery import check_inputs, prepare_data, run_surgery
from unsafe_experts.text.examples import batches, collate, sft_example


def test_contrast_is_the_difference_of_mean_normalised_scores():
    harm = torch.tensor([[4.0, 2.0], [1.0, 1.0]])
    benign = torch.tensor([[0.0, 8.0], [4.0, 0.0]])
    torch.testing.assert_close(normalised(harm), harm / 2.0)
    expected = harm / 2.0 - 0.5 * benign / 3.0
    torch.testing.assert_close(contrast(harm, benign, 0.5), expected)
    # weight 0 ranks as the plain gradient score; all-zero benign scores subtract nothing
    torch.testing.assert_close(contrast(harm, benign, 0.0), normalised(harm))
    torch.testing.assert_close(contrast(harm, torch.zeros_like(benign), 1.0), harm / 2.0)
    # the benign side moves the ranking: expert (0, 1) is second on harm, but the benign
    # requests need it most, so it drops to last
    assert contrast(harm, benign, 1.0).flatten().argsort(descending=True).tolist() == [0, 3, 2, 1]


def retention_file(path, records):
    """{plain, contrastive}: the benign side, short requests wrapped in a format of their own."""
    benign = [[{"role": "user", "content": f"Decode and answer: {r['goal'][::-1]}"}] for r in records]
    path.write_text(json.dumps({"plain": [[{"role": "user", "content": r["goal"]}] for r in records],
                                "contrastive": benign}))
    return path


def config(tiny_dir, records_path, retention, out, **kw):
    kw = {"num_rounds": 1, "method": "contrastive", **kw}
    return TrainConfig(model_name=str(tiny_dir), dataset_path=str(records_path), output_dir=str(out),
                       top_k_experts=3, batch_size=4, max_samples=8,
                       expert_lr=1e-3, router_lr=1e-3, skip_router_training=True,
                       retention="none", retention_path=str(retention), retention_max_new_tokens=8,
                       **kw)


def reference_scores(model, layers, data):
    """Per expert, in double precision, the mean |grad| over its parameters of the mean batch
    loss: the definition, one parameter row at a time (test_scoring.slow_reference)."""
    expert_gradients(model, layers, data)
    table = slow_reference(layers)
    return torch.tensor([[table[(layer.index, e)] for e in range(layer.num_experts)] for layer in layers],
                        dtype=torch.float64)


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_contrastive_scores_match_a_slow_reference(weight, tiny_dir, records_path, records, tmp_path):
    retention = retention_file(tmp_path / "retention.json", records[:12])
    cfg = config(tiny_dir, records_path, retention, tmp_path / "out", contrast_weight=weight)
    meta = run_surgery(cfg, progress=False, echo=lambda *a: None)
    first = meta["identified_experts_per_round"]["1"]
    saved = json.loads((tmp_path / "out" / "benign_in_format_answers.json").read_text())
    assert len(saved) == 8 and all(a for _, a in saved)  # one benign prompt per jailbreak

    # the same batches from scratch: the unrepaired model, the surgery's jailbreaks, the saved answers
    from unsafe_experts.artefacts.checkpoints import load_base
    model = load_base(str(tiny_dir), "float32").eval()
    tokenizer = load_tokenizer(str(tiny_dir))
    layers = moe_layers(model)
    harm_batches = prepare_data(cfg, tokenizer, load_records(records_path))["sft"]
    benign_examples = [sft_example(tokenizer, m, a, cfg.max_length, cfg.truncation, index=i)
                       for i, (m, a) in enumerate(saved)]
    benign_batches = [collate(b, tokenizer.pad_token_id) for b in batches(benign_examples, cfg.batch_size)]
    harm = reference_scores(model, layers, harm_batches)
    benign = reference_scores(model, layers, benign_batches)
    expected = harm / harm.mean() - weight * benign / benign.mean()
    for name, value in first["scores"].items():
        layer, expert = (int(x[1:]) for x in name.split("_"))
        position = [x.index for x in layers].index(layer)
        assert value == pytest.approx(float(expected[position, expert]), rel=1e-4, abs=1e-6)
        assert first["contrast_harm"][name] == pytest.approx(float(harm[position, expert]), rel=1e-4, abs=1e-12)
        assert first["contrast_benign"][name] == pytest.approx(float(benign[position, expert]), rel=1e-4, abs=1e-12)
    assert [f"L{l}_E{e}" for l, e in first["experts"]] == list(first["scores"])[:3]
    # the benign side changed the ranking somewhere: not the gradient method under a new name
    harm_order = sorted(first["contrast_harm"], key=lambda k: -first["contrast_harm"][k])
    assert harm_order != list(first["scores"])


def test_contrastive_needs_a_contrastive_section(tiny_dir, records_path, records, tmp_path):
    base = dict(model_name="m", dataset_path="d", output_dir="o", method="contrastive")
    with pytest.raises(ConfigError, match="retention_path: method contrastive needs a retention file"):
        TrainConfig(**base).validate()
    with pytest.raises(ConfigError, match="contrast_weight: must not be negative"):
        TrainConfig(**base, retention_path="r.json", contrast_weight=-1.0).validate()
    plain_only = tmp_path / "plain.json"
    plain_only.write_text(json.dumps([[{"role": "user", "content": "hi"}]]))
    from unsafe_experts.records import DatasetError
    with pytest.raises(DatasetError, match="needs a 'contrastive' section"):
        check_inputs(config(tiny_dir, records_path, plain_only, tmp_path / "out"))

def kill_in_round_2(cfg, monkeypatch) -> None:
    """Runs the surgery until round 2's repair starts, as a kill there would leave it."""
    from unsafe_experts import surgery

    repair = surgery.Surgery.repair

    def killed_in_round_2(self, r):
        if r == 2:
            raise KeyboardInterrupt
        return repair(self, r)
    monkeypatch.setattr(surgery.Surgery, "repair", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_surgery(cfg, progress=False, echo=lambda *a: None)
    monkeypatch.setattr(surgery.Surgery, "repair", repair)


def test_a_resumed_run_scores_against_the_saved_benign_answers(tiny_dir, records_path, records, tmp_path,
                                                               monkeypatch):
    """Round 2 of a resumed run must not re-answer the benign prompts with the repaired model."""
    from unsafe_experts import surgery

    retention = retention_file(tmp_path / "retention.json", records[:12])
    whole = run_surgery(config(tiny_dir, records_path, retention, tmp_path / "whole", num_rounds=2),
                        progress=False, echo=lambda *a: None)
    cfg = config(tiny_dir, records_path, retention, tmp_path / "out", num_rounds=2)
    kill_in_round_2(cfg, monkeypatch)

    def no_generation(*a, **k):
        raise AssertionError("the benign answers were generated again on resume")
    monkeypatch.setattr(surgery, "generate", no_generation)
    resumed = run_surgery(cfg, progress=False, echo=lambda *a: None)
    assert resumed["resumed"][0]["after_round"] == 1
    assert (resumed["identified_experts_per_round"]["2"]["scores"]
            == pytest.approx(whole["identified_experts_per_round"]["2"]["scores"], rel=1e-5, abs=1e-7))


def test_every_training_log_kind_has_an_mlflow_metric():
    """The contrastive pass logged `benign_score`, which MLflow's logging had no name for:
    every comparison run of the method failed after its surgery (a KeyError)."""
    from tracking.mlflow_runs import METRIC_KEYS
    from unsafe_experts.training.phases import LOG_KINDS

    assert set(METRIC_KEYS) == set(LOG_KINDS)


def test_contrastive_through_the_cli_and_mlflow(tiny_dir, records_path, records, tmp_path, tracking_dir):
    from cli.main import main
    from tracking import mlflow_runs

    retention = retention_file(tmp_path / "retention.json", records[:12])
    out = tmp_path / "out"
    assert main(["train", "--model_name", str(tiny_dir), "--dataset_path", str(records_path),
                 "--output_dir", str(out), "--num_rounds", "1", "--top_k_experts", "3", "--batch_size", "4",
                 "--max_samples", "8", "--method", "contrastive", "--retention", "none",
                 "--retention_path", str(retention), "--retention_max_new_tokens", "8",
                 "--experiment", "contrastive-cli", "--quiet"]) == 0
    meta = json.loads((out / "training_metadata.json").read_text())
    assert {x["kind"] for x in meta["training_logs"]} == {"score", "benign_score", "sft", "router"}
    client = mlflow_runs.client()
    runs = client.search_runs([client.get_experiment_by_name("contrastive-cli").experiment_id])
    logged = {k for r in runs for k in r.data.metrics}
    assert "benign_score_loss_per_batch" in logged


@pytest.mark.parametrize("damage", ["edited", "missing"])
def test_a_resume_never_trusts_an_edited_or_lost_answers_file(damage, tiny_dir, records_path, records, tmp_path,
                                                              monkeypatch):
    """The benign answers came from the model before surgery: a resumed run cannot regenerate
    them, so a file that is not the one the run wrote stops it with one error naming it."""

    retention = retention_file(tmp_path / "retention.json", records[:12])
    cfg = config(tiny_dir, records_path, retention, tmp_path / "out", num_rounds=2)
    kill_in_round_2(cfg, monkeypatch)
    saved = tmp_path / "out" / "benign_in_format_answers.json"
    if damage == "edited":
        rows = json.loads(saved.read_text())
        rows[0][1] = "I cannot help with that."  # the benign side now teaches refusal
        saved.write_text(json.dumps(rows))
    else:
        saved.unlink()
    with pytest.raises(ConfigError, match="benign_in_format_answers.json is missing or changed since this run"):
        run_surgery(cfg, progress=False, echo=lambda *a: None)
