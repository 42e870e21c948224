import os

import pytest
import torch
from conftest import ARCHITECTURES, sft_batches, snapshot

from unsafe_experts.models.architectures import moe_layers
from unsafe_experts.selection.score_pass import per_batch_sft, score_pass
from unsafe_experts.selection.scoring import top_k
from unsafe_experts.training.phases import masked_sft
from unsafe_experts.training.sparse_adamw import SparseRowAdamW


def assert_only_selected_moved(model, before, layers, selection):
    picked: dict[int, set[int]] = {}
    for layer_index, e in selection:
        picked.setdefault(layer_index, set()).add(e)
    owners = {id(p): layer.index for layer in layers for p in layer.expert_params.values()}
    moved_rows = 0
    for name, p in model.named_parameters():
        if id(p) not in owners:
            assert torch.equal(p, before[name]), f"non-expert parameter {name} changed"
            continue
        for e in range(p.shape[0]):
            same = torch.equal(p[e], before[name][e])
            if e in picked.get(owners[id(p)], ()):
                moved_rows += not same
            else:
                assert same, f"unselected expert {e} of {name} changed"
    assert moved_rows > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_masked_sft_moves_only_selected_experts_and_lowers_loss(arch, make_model, tokenizer, records):
    model = make_model(arch)
    layers = moe_layers(model)
    batches = sft_batches(tokenizer, records[:8])
    scores = score_pass(model, layers, batches, lambda *a: None, progress=False)
    selection = top_k(scores, 4, layers)
    before = snapshot(model)
    logs = []
    state_bytes = masked_sft(model, layers, batches, selection, lr=1e-2, weight_decay=0.1, epochs=3,
                             log=lambda kind, v: logs.extend(v), progress=False)
    assert_only_selected_moved(model, before, layers, selection)
    per_expert = sum(p[0].numel() for p in layers[0].expert_params.values())
    assert state_bytes == 3 * 4 * per_expert * 4  # master + two moments, fp32, k experts only
    assert logs[-1] < logs[0]
    assert not any(p.requires_grad for p in model.parameters())


def test_per_batch_mode_never_moves_unpicked_experts(make_model, tokenizer, records):
    model = make_model("olmoe")
    layers = moe_layers(model)
    before = snapshot(model)
    counts, score_sum, picks, _ = per_batch_sft(
        model, layers, sft_batches(tokenizer, records[:12]), k=2, lr=1e-2, weight_decay=0.1,
        epochs=1, log=lambda *a: None, progress=False)
    assert len(picks) == 3 and all(len(p) == 2 for p in picks)
    assert counts.sum() == 6
    every_pick = sorted({x for p in picks for x in p})
    assert_only_selected_moved(model, before, layers, every_pick)


def test_deselected_rows_do_not_move_despite_momentum_and_decay():
    w = torch.nn.Parameter(torch.randn(4, 3, 2))
    opt = SparseRowAdamW(lr=0.1, weight_decay=0.5)
    opt.add_rows(w, [0, 1])
    w.grad = torch.randn_like(w)
    opt.step({id(w): [0, 1]})
    after_first = w.detach().clone()
    w.grad = torch.randn_like(w)
    opt.step({id(w): [1]})
    assert torch.equal(w[0], after_first[0]) and not torch.equal(w[1], after_first[1])
    assert torch.equal(w[2:], after_first[2:])


def test_sparse_adamw_equals_dense_adamw_on_selected_rows():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5, 4))
    rows = [1, 4]
    reference = torch.nn.Parameter(w.detach()[rows].clone())
    ours = SparseRowAdamW(lr=1e-2, weight_decay=0.1)
    ours.add_rows(w, rows)
    dense = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn_like(w)
        w.grad = grad
        reference.grad = grad[rows].clone()
        ours.step()
        dense.step()
    torch.testing.assert_close(w.detach()[rows], reference.detach(), rtol=1e-5, atol=1e-6)


def test_stepping_rows_in_place_a_few_at_a_time_gives_the_same_bits_as_through_copies():
    """Every row is stepped in the state itself, ROWS_AT_ONCE at a time (views, few temporaries);
    a subset of rows (`active`) goes through copies. Same arithmetic, so the same bits."""
    from unsafe_experts.training import sparse_adamw

    torch.manual_seed(0)
    rows = [0, 2, 3, 5, 6, 7, 9, 10, 12, 13, 15]  # more than ROWS_AT_ONCE, not a multiple of it
    assert len(rows) > sparse_adamw.ROWS_AT_ONCE and len(rows) % sparse_adamw.ROWS_AT_ONCE
    params = [torch.nn.Parameter((torch.randn(16, 24, 8) * 0.02).to(torch.bfloat16)) for _ in range(2)]
    params[1].data.copy_(params[0].data)
    opts = [SparseRowAdamW(lr=1e-3, weight_decay=0.1) for _ in params]
    for p, opt in zip(params, opts):
        opt.add_rows(p, rows)
    for _ in range(4):
        grad = torch.randn(16, 24, 8).to(torch.bfloat16)
        for i, (p, opt) in enumerate(zip(params, opts)):
            p.grad = grad.clone()
            opt.step(active=None if i == 0 else {id(p): rows})
            opt.zero_grad()
    assert torch.equal(params[0], params[1])
    a, b = (next(iter(o.state.values())) for o in opts)
    for field in ("master", "exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_bf16_updates_accumulate_in_fp32_masters():
    torch.manual_seed(0)
    w = torch.nn.Parameter((torch.randn(4, 64, 64) * 0.02).to(torch.bfloat16))
    naive = torch.nn.Parameter(w.detach().clone())
    start = w.detach().clone()
    ours = SparseRowAdamW(lr=5e-5)
    ours.add_rows(w, [0])
    pure_bf16 = torch.optim.AdamW([naive], lr=5e-5, weight_decay=0.0)
    for _ in range(4):
        grad = torch.randn_like(w)
        w.grad, naive.grad = grad, grad.clone()
        ours.step()
        pure_bf16.step()
    master = ours.state[id(w)].master
    assert master.dtype == torch.float32
    assert torch.equal(w[0].detach(), master[0].to(torch.bfloat16))
    moved = (master[0] - start[0].float()).abs().mean()
    assert 1e-4 < moved < 3e-4  # four steps of ~lr each, kept in full
    assert (w[0] != start[0]).float().mean() > (naive[0] != start[0]).float().mean()


def test_nan_loss_stops_the_run_naming_where_and_keeps_earlier_rounds(tiny_dir, records_path, tmp_path):
    import json

    from unsafe_experts.config import TrainConfig
    from unsafe_experts.surgery import Surgery
    from unsafe_experts.training.phases import NonFiniteLossError

    out = tmp_path / "out"
    cfg = TrainConfig(model_name=str(tiny_dir), dataset_path=str(records_path), output_dir=str(out),
                      num_rounds=2, top_k_experts=2, batch_size=4, max_samples=8)
    surgery = Surgery(cfg, progress=False, echo=lambda *a: None)
    surgery.start()
    surgery.identify(1)
    surgery.repair(1)
    surgery.checkpoint(1)
    with torch.no_grad():
        surgery.layers[0].router.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"round 2 score: the loss is nan at step 0 \(batch 0 of 2\)"):
        surgery.identify(2)
    surgery.fail(NonFiniteLossError("x"))
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["status"] == "failed" and list(meta["identified_experts_per_round"]) == ["1"]
    assert (out / "round_1" / "delta.safetensors").exists()


def test_a_second_run_on_the_same_output_dir_is_refused(tiny_dir, records_path, tmp_path):
    from unsafe_experts.artefacts.atomic import DirectoryLock, OutputDirBusyError
    from unsafe_experts.config import TrainConfig
    from unsafe_experts.surgery import run_surgery

    out = tmp_path / "out"
    out.mkdir()
    holder = DirectoryLock(out).acquire()  # another run holds the directory
    cfg = TrainConfig(model_name=str(tiny_dir), dataset_path=str(records_path), output_dir=str(out),
                      num_rounds=1, top_k_experts=2, batch_size=4, max_samples=4, overwrite=True)
    with pytest.raises(OutputDirBusyError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
        run_surgery(cfg, progress=False, echo=lambda *a: None)
    holder.release()
    assert run_surgery(cfg, progress=False, echo=lambda *a: None)["status"] == "completed"
    assert not (out / ".unsafe-experts.lock").exists()


def test_compact_gradients_give_the_same_update(make_model, tokenizer, records):
    from unsafe_experts.training.phases import lm_loss

    batches = sft_batches(tokenizer, records[:8])
    selection = [(0, 1), (1, 5), (1, 2)]
    ours = make_model("qwen3_moe")
    masked_sft(ours, moe_layers(ours), batches, selection, lr=1e-2, weight_decay=0.1, epochs=1,
               log=lambda *a: None, progress=False)
    plain = make_model("qwen3_moe")  # same seed: the same starting weights
    layers = moe_layers(plain)
    opt = SparseRowAdamW(lr=1e-2, weight_decay=0.1)
    for layer in layers:
        for p in layer.expert_params.values():
            p.requires_grad_(True)
            opt.add_rows(p, [e for l, e in selection if l == layer.index])
    for batch in batches:
        lm_loss(plain, batch).backward()
        opt.step()
        opt.zero_grad()
    for (name, a), b in zip(ours.named_parameters(), plain.parameters()):
        assert torch.equal(a, b.detach()), name


def test_joined_output_paths_cannot_escape(tmp_path):
    from unsafe_experts.artefacts.atomic import inside

    assert inside(tmp_path, "round_1") == (tmp_path / "round_1").resolve()
    for name in ("../elsewhere", "/etc/passwd", "round_1/../../x"):
        with pytest.raises(ValueError, match="outside"):
            inside(tmp_path, name)
    (tmp_path / "link").symlink_to("/tmp")
    with pytest.raises(ValueError, match="outside"):
        inside(tmp_path, "link/x")


def test_per_batch_top_k_comes_from_that_batch_alone(make_model, tokenizer, records):
    """The same batch four times at learning rate 0: nothing changes, so every batch must pick
    the same experts. Before the fix, layers with no pick kept summing gradients across
    batches and took over the later top-k (reproduced on qwen3_moe with k = 1)."""
    model = make_model("qwen3_moe")
    layers = moe_layers(model)
    batch = sft_batches(tokenizer, records[:4])[0]
    counts, score_sum, picks, _ = per_batch_sft(
        model, layers, [batch] * 4, k=1, lr=0.0, weight_decay=0.0, epochs=1,
        log=lambda *a: None, progress=False)
    assert picks == [picks[0]] * 4
    assert counts.sum() == 4 and counts.max() == 4
    assert all(p.grad is None for p in model.parameters())


def _mixed_batch(tokenizer, records):
    """Rows of very different lengths, as a repair batch (jailbreak prompts and short plain
    retention examples) has them."""
    from unsafe_experts.text.examples import DEFAULT_REFUSAL, collate, plain_prompt, sft_example

    long = [sft_example(tokenizer, r["all_prompt"], DEFAULT_REFUSAL, 256) for r in records[:4]]
    short = [sft_example(tokenizer, plain_prompt(r["goal"]), "Sure.", 256) for r in records[4:10]]
    return collate([x for pair in zip(short, long) for x in pair] + short[4:], tokenizer.pad_token_id)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_micro_batches_give_the_whole_batch_gradient_from_narrower_forwards(arch, make_model, tokenizer, records):
    from unsafe_experts.training.phases import expert_params, lm_backward, set_trainable

    batch = _mixed_batch(tokenizer, records)
    grads, losses, widths = {}, {}, {}
    for micro in (None, 3):
        model = make_model(arch)
        layers = moe_layers(model)
        set_trainable(model, expert_params(layers))
        seen = []
        hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)  # noqa: B023 (removed below, in this iteration)
        losses[micro] = float(lm_backward(model, batch, micro, "sft", 0, 1))
        hook.remove()
        widths[micro] = seen
        grads[micro] = [p.grad.clone() for p in expert_params(layers)]
    assert widths[None] == [batch["input_ids"].shape]
    assert [rows for rows, _ in widths[3]] == [3, 3, 3, 1]
    # the shortest rows' group is cut to their own length, far below the batch's
    assert min(width for _, width in widths[3]) < batch["input_ids"].shape[1] / 2
    assert losses[3] == pytest.approx(losses[None], rel=1e-5)
    for whole, micro in zip(grads[None], grads[3]):
        torch.testing.assert_close(micro, whole, rtol=1e-4, atol=1e-7)


def test_masked_sft_with_micro_batches_takes_the_whole_batch_step(make_model, tokenizer, records):
    """One step on one batch, whole vs in micro-batches: the optimizer must see the sum of the
    micro-batches' gradients (its compact-gradient hook once kept only the last one's). Adam's
    first step is about lr * sign(gradient) in every element, so a wrong gradient moves most
    elements the other way; float order can only flip elements whose gradient is ~0."""
    batch = _mixed_batch(tokenizer, records)
    ends = {}
    for micro in (None, 3):
        model = make_model("qwen3_moe")
        layers = moe_layers(model)
        before = snapshot(model)
        selection = [(layers[0].index, e) for e in range(layers[0].num_experts)]
        masked_sft(model, layers, [batch], selection, lr=1e-3, weight_decay=0.0, epochs=1,
                   log=lambda *a: None, progress=False, micro=micro)
        ends[micro] = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    moved = [n for n, d in ends[None].items() if d.abs().max() > 0]
    assert moved
    for name in moved:
        disagree = ((ends[3][name] - ends[None][name]).abs() > 1e-4).float().mean()
        assert disagree < 0.01, f"{name}: {float(disagree):.1%} of the elements stepped differently"


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe"])
@pytest.mark.parametrize("shared,micro", [(False, None), (True, None), (False, 3)])
def test_stepping_inside_backward_is_the_same_update(arch, shared, micro, make_model, tokenizer,
                                                      records, monkeypatch):
    """A batch run as one backward is stepped tensor by tensor inside it, holding no gradient
    of the trained rows until the step: the weights end bit-identical to stepping after it,
    for the experts and for shared whole tensors (the defence, the dense baseline); batches in
    micro-batches (several backwards) still step after them."""
    from unsafe_experts.training.phases import shared_params

    held, real_step = [], SparseRowAdamW.step

    def step(self, active=None):  # what the optimizer holds when the step starts
        held[-1].append(sum(g.numel() for g in self._rows_grad.values()))
        return real_step(self, active)
    monkeypatch.setattr(SparseRowAdamW, "step", step)
    ends = []
    for inside in (False, True):
        model = make_model(arch)
        layers = moe_layers(model)
        batches = sft_batches(tokenizer, records[:8])
        selection = top_k(score_pass(model, layers, batches, lambda *a: None, progress=False), 3, layers)
        held.append([])
        masked_sft(model, layers, batches, selection, lr=1e-2, weight_decay=0.1, epochs=2,
                   log=lambda *a: None, progress=False, micro=micro,
                   shared=shared_params(model, layers) if shared else [], step_in_backward=inside)
        ends.append(snapshot(model))
    for name in ends[0]:
        assert torch.equal(ends[0][name], ends[1][name]), name
    after, inside = held
    assert len(after) == len(inside) == 2 * len(batches) and all(k > 0 for k in after)
    assert all(k == 0 for k in inside) if micro is None else inside == after


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_recomputed_activations_give_the_same_scores_and_repair(arch, make_model, tokenizer, records):
    """--activations recompute (each decoder layer recomputed in backward) changes memory, not
    results: the same scores and bit-identical weights after masked SFT; afterwards the model
    is as it was (no layer left in training mode or checkpointing)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from unsafe_experts.training.phases import recomputed_activations

    results, calls = [], []
    for on in (False, True):
        model = make_model(arch)
        layers = moe_layers(model)
        batches = sft_batches(tokenizer, records[:8])
        first = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
        calls.append(0)  # a module inside the layer: the layer's own hooks stay outside a recompute
        next(first.children()).register_forward_pre_hook(lambda *a: calls.__setitem__(-1, calls[-1] + 1))
        with recomputed_activations(model, on):
            scores = score_pass(model, layers, batches, lambda *a: None, progress=False)
            selection = top_k(scores, 3, layers)
            masked_sft(model, layers, batches, selection, lr=1e-2, weight_decay=0.1, epochs=1,
                       log=lambda *a: None, progress=False)
        assert not any(m.training for m in model.modules())
        assert not model.is_activation_checkpointing and not hasattr(model, "_require_grads_hook")
        results.append((scores, snapshot(model)))
    (scores_kept, kept), (scores_again, again) = results
    assert calls[1] > calls[0]  # the layers did run again in backward
    assert torch.allclose(scores_kept, scores_again, rtol=1e-5, atol=0)
    for name in kept:
        assert torch.equal(kept[name], again[name]), name
