"""The gradient scoring passes: a round's whole-pass scores of a gradient method (shaped by its
row in methods.py), and per_batch mode's fresh top-k and step on every batch."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..models.distributed import sum_, world
from ..models.sharding import is_sharded
from ..text.examples import IGNORE
from ..training.phases import (
    Batch,
    Log,
    bar,
    expert_params,
    finite,
    lm_backward,
    lm_loss,
    rank_share,
    selected_rows,
    set_trainable,
)
from ..training.router_kl import captured_router_outputs
from ..training.sparse_adamw import SparseRowAdamW
from .methods import METHODS
from .scoring import expert_grad_scores, expert_row_sums, offloaded_rows, per_expert_numel, streamed_rows, top_k


def routed_response_tokens(captured: dict[int, tuple], batch: Batch, num_experts: int) -> torch.Tensor:
    """[layers, experts]: how many loss-bearing positions (those whose next token is a response
    token) the router sent to each expert, by its own top-k choices."""
    mask = F.pad(batch["labels"][:, 1:] != IGNORE, (0, 1)).flatten()
    return torch.stack([torch.bincount(captured[i][-1][mask].flatten(), minlength=num_experts)
                        for i in sorted(captured)]).float()


def score_pass(model, layers, batches: list[Batch], log: Log, desc="score", progress=True,
               streamed: bool = False, score: str = "gradient", offload: bool = False):
    """Gradients of the mean batch loss over all batches -> [layers, experts] scores of the
    gradient method named `score`, the mean over each expert's parameters of its reduction.

    gradient: mean |grad|; gradient_per_token: that divided by the routed loss-bearing tokens
    (an expert with none counts as one); snip: mean |grad x weight|; fisher: mean over batches
    of each batch's squared gradient, mean over parameters. exact: the gradient of the whole
    pass (|sum of gradients|), all layers' expert gradients held until the end (per-batch
    squares: one batch's); streamed: per-batch reductions summed, each layer's gradient freed
    as soon as backward produces it (an upper bound for the absolute scores, the same value for
    per-batch squares); offload: exact, the sum of gradients kept in host memory, each layer's
    freed on the device as backward produces it (per-batch squares take the streamed path)."""
    method = METHODS[score]
    sharded = is_sharded(model)
    if offload and method.squares_each_batch:
        streamed, offload = True, False  # per-batch squares: streamed is already exact
    if (streamed or offload) and world()[1] > 1 and not sharded:
        raise ValueError("streamed or offloaded scoring under data parallelism would score each "
                         "rank's gradients alone; use exact scoring, or --sharding fsdp (whose "
                         "gradients arrive summed)")
    reduce = method.reduction
    # a batch's own gradient is squared, so exact mode reduces after every batch
    each_batch = method.squares_each_batch and not streamed
    trainable = expert_params(layers)
    set_trainable(model, trainable)
    device = model.device
    losses = []
    counts = torch.zeros(len(layers), layers[0].num_experts, device=device)
    squares = torch.zeros_like(counts)
    counting = captured_router_outputs(layers) if method.per_routed_token else nullcontext()
    lean = streamed_rows(layers, reduce) if streamed else offloaded_rows(layers, reduce) if offload else None
    with lean or nullcontext() as sums, counting as captured:
        for i, batch in enumerate(bar(batches, desc, progress)):
            batch = rank_share(batch, device)
            loss = finite(lm_loss(model, batch), desc, i, len(batches)) / len(batches)
            loss.backward()
            losses.append(loss.detach() * len(batches))
            if captured is not None:
                counts += routed_response_tokens(captured, batch, layers[0].num_experts)
            if each_batch:
                if not sharded:
                    for p in trainable:
                        if p.grad is not None:
                            sum_(p.grad)
                squares += expert_row_sums(layers, reduce)
                for p in trainable:
                    p.grad = None
    numel = torch.tensor([per_expert_numel(layer) for layer in layers], device=device)[:, None]
    if offload:  # gathered across ranks already
        scores = sums / numel
    elif streamed:
        if sharded:  # each rank summed the experts it holds
            sum_(sums)
        scores = sums / numel
    elif each_batch:
        scores = squares / numel
    else:
        if not sharded:  # fully_shard's reduce-scatter has already summed them
            for p in trainable:
                if p.grad is not None:
                    sum_(p.grad)
        scores = expert_row_sums(layers, reduce) / numel
    if method.squares_each_batch:  # each batch's loss was divided by the number of batches, its square by n^2
        scores = scores * len(batches)
    if method.per_routed_token:
        scores = scores / sum_(counts).clamp_min(1)
    set_trainable(model, [])
    log("score", sum_(torch.stack(losses)).tolist())
    return scores


def per_batch_sft(model, layers, batches, k, lr, weight_decay, epochs, log: Log,
                  desc="per-batch sft", progress=True, micro: int | None = None):
    """The research code's real behaviour, made correct: on every batch a fresh top-k from that
    batch's gradients and a step on those experts only (deselected experts keep their Adam
    state but do not move). Returns (selection frequency, summed scores, per-batch picks)."""
    if world()[1] > 1:
        raise ValueError("per_batch scoring runs in one process; use accumulate with data parallelism")
    trainable = expert_params(layers)
    set_trainable(model, trainable)
    opt = SparseRowAdamW(lr=lr, weight_decay=weight_decay)
    device = model.device
    counts = torch.zeros(len(layers), layers[0].num_experts)
    score_sum = torch.zeros_like(counts)
    picks, losses = [], []
    position = {layer.index: i for i, layer in enumerate(layers)}
    for epoch in range(epochs):
        for batch in bar(batches, f"{desc} epoch {epoch + 1}", progress):
            loss = lm_backward(model, rank_share(batch, device), micro, desc, len(losses), len(batches))
            scores = expert_grad_scores(layers)
            selection = top_k(scores, k, layers)
            rows = selected_rows(layers, selection)
            for p, experts in rows:
                opt.add_rows(p, experts)
            opt.step({id(p): experts for p, experts in rows})
            # every expert's gradient, not just the rows the optimizer tracks: a layer with no
            # pick yet would otherwise carry this batch's gradient into the next batch's top-k
            for p in trainable:
                p.grad = None
            for layer_index, expert in selection:
                counts[position[layer_index], expert] += 1
            score_sum += scores.cpu()
            picks.append(selection)
            losses.append(loss)
    set_trainable(model, [])
    log("sft", torch.stack(losses).tolist())
    return counts, score_sum, picks, opt.state_bytes()
