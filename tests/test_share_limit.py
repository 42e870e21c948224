"""The routing-share variant (issue 25, selection/share_limit.py): the shares against the model's
own router logits counted token by token, the demotion by hand, and a surgery whose picks keep
to the experts the benign-in-format requests route little to."""
import json

import pytest
import torch
from test_contrastive import config, retention_file

from unsafe_experts.artefacts.checkpoints import load_base, load_tokenizer
from unsafe_experts.config import TrainConfig
from unsafe_experts.errors import ConfigError
from unsafe_experts.models.architectures import moe_layers
from unsafe_experts.selection.share_limit import below_share_limit, benign_share
from unsafe_experts.surgery import run_surgery
from unsafe_experts.text.examples import batches, collate, sft_example


def test_experts_over_the_limit_rank_below_every_other_in_their_own_order():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [1.0, 0.5, -1.0, 6.0]])
    # top-2 of 4 experts: uniform share 0.5; limit 1.2 allows up to 0.6
    share = torch.tensor([[0.9, 0.1, 0.5, 0.5], [0.2, 0.2, 0.8, 0.8]])
    limited, eligible = below_share_limit(scores, share, 1.2)
    assert eligible.tolist() == [[False, True, True, True], [True, True, False, False]]
    order = limited.flatten().argsort(descending=True).tolist()
    # under the limit by score (4, 3, 2, 1, 0.5), then over it by score (6, 5, -1)
    assert order == [1, 2, 3, 4, 5, 7, 0, 6]
    torch.testing.assert_close(limited[eligible], scores[eligible])  # the eligible keep their scores
    # every expert under the limit, or none: the scores as they were
    for limit in (10.0, 0.01):
        same, _ = below_share_limit(scores, share, limit)
        torch.testing.assert_close(same, scores)


def reference_share(model, batch_list) -> torch.Tensor:
    """Per layer and expert, the share of real tokens whose top-k router logits include it,
    counted one token at a time from the model's own router_logits output (not the hooks)."""
    config = model.config
    counts = torch.zeros(config.num_hidden_layers, config.num_experts, dtype=torch.float64)
    tokens = 0
    with torch.no_grad():
        for batch in batch_list:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_router_logits=True)
            real = batch["attention_mask"].flatten().tolist()
            for layer, logits in enumerate(out.router_logits):
                for t, keep in enumerate(real):
                    if keep:
                        for e in logits[t].topk(config.num_experts_per_tok).indices.tolist():
                            counts[layer, e] += 1
            tokens += sum(real)
    return counts / tokens


def test_the_surgery_picks_only_experts_under_the_limit(tiny_dir, records_path, records, tmp_path):
    retention = retention_file(tmp_path / "retention.json", records[:12])
    cfg = config(tiny_dir, records_path, retention, tmp_path / "out", method="gradient_low_share",
                 share_limit=1.0)
    meta = run_surgery(cfg, progress=False, echo=lambda *a: None)
    first = meta["identified_experts_per_round"]["1"]
    saved = json.loads((tmp_path / "out" / "benign_in_format_answers.json").read_text())
    # FlipAttack's own records name no attack family: the summary says so (no family counted)
    assert meta["dataset"]["families"] == [] and meta["dataset"]["families_used"] == {}

    # the shares, from scratch: the unrepaired model on the saved benign-in-format answers
    model = load_base(str(tiny_dir), "float32").eval()
    tokenizer = load_tokenizer(str(tiny_dir))
    layers = moe_layers(model)
    examples = [sft_example(tokenizer, m, a, cfg.max_length, cfg.truncation, index=i)
                for i, (m, a) in enumerate(saved)]
    benign = [collate(b, tokenizer.pad_token_id) for b in batches(examples, cfg.batch_size)]
    expected = reference_share(model, benign)
    torch.testing.assert_close(benign_share(model, layers, benign).double(), expected, atol=1e-6, rtol=0)
    top_k = model.config.num_experts_per_tok
    uniform = top_k / model.config.num_experts
    for name, value in first["benign_share"].items():
        layer, expert = (int(x[1:]) for x in name.split("_"))
        assert value == pytest.approx(float(expected[layer, expert]), abs=1e-6)
    under = {name for name, value in first["benign_share"].items() if value <= uniform}
    assert first["share_limit"] == {"limit": 1.0, "experts_under": len(under),
                                    "experts": len(first["benign_share"])}
    assert 3 <= len(under) < len(first["benign_share"])  # the limit bites, and k fit under it
    picked = [f"L{l}_E{e}" for l, e in first["experts"]]
    assert set(picked) <= under
    # the picks are the gradient score's best among the experts under the limit
    gradient = first["gradient_scores"]
    assert picked == sorted(under, key=lambda n: -gradient[n])[:3]
    assert picked != list(gradient)[:3]  # the limit changed the picks: not gradient renamed


def test_the_gradient_side_is_the_gradient_methods_score(tiny_dir, records_path, records, tmp_path):
    retention = retention_file(tmp_path / "retention.json", records[:12])
    runs = {}
    for method in ("gradient", "gradient_low_share"):
        cfg = config(tiny_dir, records_path, retention, tmp_path / method, method=method)
        runs[method] = run_surgery(cfg, progress=False, echo=lambda *a: None)["identified_experts_per_round"]["1"]
    assert runs["gradient_low_share"]["gradient_scores"] == pytest.approx(runs["gradient"]["scores"], rel=1e-6)


def test_share_limit_is_checked():
    base = dict(model_name="m", dataset_path="d", output_dir="o", method="gradient_low_share")
    with pytest.raises(ConfigError, match="retention_path: method gradient_low_share needs a retention file"):
        TrainConfig(**base).validate()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="share_limit: must be positive and finite"):
            TrainConfig(**base, retention_path="r.json", share_limit=bad).validate()
