"""The training steps of one round: masked SFT and router alignment, and the loss, trainable
set and batch helpers the scoring passes (selection/score_pass.py) share with them.

Each phase makes trainable exactly the parameters it needs, so nothing else gets a gradient,
and steps only through SparseRowAdamW, so nothing else can move.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import NonFiniteLossError, UnsupportedModelError
from ..models.ablation import by_layer, masked_routers
from ..models.architectures import MoELayer
from ..models.distributed import shard, sum_, world
from ..models.sharding import is_sharded
from ..text.examples import IGNORE
from .router_kl import captured_router_outputs, choice_biases, route, router_kl, routing_distribution
from .sparse_adamw import SparseRowAdamW

Batch = dict[str, torch.Tensor]
Log = Callable[[str, list[float]], None]  # (kind, per-step values)
# every kind a Log receives (the contrastive method's second scoring pass: benign_score);
# tracking maps each to an MLflow metric name, and a test keeps the two lists one
LOG_KINDS = ("score", "benign_score", "sft", "router")


def response_tokens(batch: Batch) -> torch.Tensor:
    """The number of loss-bearing positions in the whole batch, across data-parallel ranks."""
    return sum_((batch["labels"][:, 1:] != IGNORE).sum())


def lm_loss(model, batch: Batch, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy summed over response tokens only, divided by the number of response tokens
    in the whole batch (across data-parallel ranks, so their gradients sum to one process's).
    No labels go to the model, so no load-balancing aux loss is mixed in."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    labels = batch["labels"][:, 1:]
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                            ignore_index=IGNORE, reduction="sum")
    return total / (response_tokens(batch) if denominator is None else denominator)


@contextmanager
def recomputed_activations(model, on: bool):
    """While active (and `on`), each decoder layer's activations are recomputed in backward
    rather than kept from the forward: gradients are the same, activation memory one layer's.
    transformers checkpoints a layer only in training mode; the layers alone are marked
    training (not their submodules), so no dropout or router noise turns on."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not on:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers or not model.supports_gradient_checkpointing:
        raise UnsupportedModelError(f"activations: {type(model).__name__} cannot recompute its "
                                    "layers' activations; use --activations keep")
    was = [m.training for m in layers]
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, training in zip(layers, was):
            m.training = training
        model.activation_checkpointing_disable()
        if hasattr(model, "_require_grads_hook"):  # enable's hook on the embeddings' output
            model.disable_input_require_grads()


def one_backward(model, batch: Batch, micro: int | None) -> bool:
    """Whether lm_backward runs the batch as one forward and backward (else in micro-batches)."""
    return not micro or batch["input_ids"].shape[0] <= micro or is_sharded(model)


def lm_backward(model, batch: Batch, micro: int | None, desc: str, step: int, steps: int) -> torch.Tensor:
    """Backpropagates lm_loss(model, batch) and returns it. With `micro` rows, the batch's rows
    go in length-sorted micro-batches, each cut to its own longest row, their losses divided by
    the whole batch's response tokens: the same gradient (up to float order) from fewer padded
    positions and less activation memory. A repair batch mixes 8 jailbreak prompts with ~47
    retention examples of 20 to 400 tokens, so padding to the longest doubles the work. Batches
    are right-padded (examples.collate), so cutting columns past a row's length changes nothing
    it attends to. Sharded models run one whole forward a step (every rank must join each)."""
    if one_backward(model, batch, micro):
        loss = finite(lm_loss(model, batch), desc, step, steps)
        loss.backward()
        return loss.detach()
    denominator = response_tokens(batch)
    lengths = batch["attention_mask"].sum(1)
    total = torch.zeros((), device=lengths.device)
    for part in torch.argsort(lengths, stable=True).split(micro):
        width = int(lengths[part].max())
        piece = {k: batch[k][part, :width] for k in ("input_ids", "attention_mask", "labels")}
        loss = finite(lm_loss(model, piece, denominator), desc, step, steps)
        loss.backward()
        total += loss.detach()
    return total


def finite(loss: torch.Tensor, desc: str, step: int, batches: int) -> torch.Tensor:
    """Stops at the first NaN or inf loss, naming the phase, step and batch (one host sync a
    step: cheap beside a forward and backward, and no update is made from a broken loss)."""
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"{desc}: the loss is {float(loss.detach())} at step {step} "
                                 f"(batch {step % batches} of {batches}); no update was made from it")
    return loss


def set_trainable(model, params) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in params:
        p.requires_grad_(True)


def expert_params(layers: list[MoELayer], only: set[int] | None = None) -> list:
    return [p for layer in layers if only is None or layer.index in only
            for p in layer.expert_params.values()]


def rank_share(batch: Batch, device) -> Batch:
    """This rank's share of the batch, on the device."""
    return {k: v.to(device) for k, v in shard(batch).items()}


def _whole(batch: Batch, device) -> Batch:
    """The whole batch on every rank: the router KL of batch-mean distributions does not split
    into per-rank parts, so each rank aligns on all of it and the routers stay identical."""
    return {k: v.to(device) for k, v in batch.items()}


def bar(items, desc: str, progress: bool):
    return tqdm(items, desc=desc, leave=False, disable=not progress)


def selected_rows(layers, selection) -> list[tuple[torch.nn.Parameter, list[int]]]:
    grouped = by_layer(selection)
    return [(p, grouped[layer.index]) for layer in layers if layer.index in grouped
            for p in layer.expert_params.values()]


def shared_params(model, layers: list[MoELayer], routers: bool = False) -> list:
    """Every parameter outside the experts (and the routers, unless `routers`): attention,
    norms, embeddings, a dense MLP. Tied weights appear once (named_parameters)."""
    skip = {id(p) for layer in layers for p in layer.expert_params.values()}
    if not routers:
        skip |= {id(p) for layer in layers for p in layer.router_params.values()}
    return [p for _, p in model.named_parameters() if id(p) not in skip]


def dropout_draws(steps: int, p: float, seed: int) -> list[bool]:
    """Which masked-SFT steps switch the selected experts off: one seeded draw per step."""
    draws = torch.rand(steps, generator=torch.Generator().manual_seed(seed))
    return [bool(x < p) for x in draws] if p > 0 else [False] * steps


def masked_sft(model, layers, batches, selection, lr, weight_decay, epochs, log: Log,
               desc="sft", progress=True, micro: int | None = None, shared=(),
               dropout: float = 0.0, seed: int = 0, step_in_backward: bool = True) -> int:
    """Train only the selected experts, and `shared` whole tensors when given (the defence's
    weights outside the experts, or every other weight for the dense baseline); returns the
    optimizer state size in bytes. With `dropout`, each step switches the selected experts off
    at the router with that probability (dropout_draws): that step's loss is
    the model's without them, and only `shared` is stepped (the experts' rows would otherwise
    move by momentum alone)."""
    shared = list(shared)
    set_trainable(model, expert_params(layers, only=set(by_layer(selection))) + shared)
    opt = SparseRowAdamW(lr=lr, weight_decay=weight_decay)
    for p, experts in selected_rows(layers, selection):
        opt.add_rows(p, experts)
    for p in shared:
        opt.add_rows(p, range(p.shape[0]))
    only_shared = {id(p): list(range(p.shape[0])) for p in shared}
    draws = iter(dropout_draws(epochs * len(batches), dropout, seed))
    device = model.device
    sharded = is_sharded(model)  # gradients arrive summed and cut to this rank's experts
    # one process stepping every row: a batch run as one backward is stepped inside it
    # (SparseRowAdamW.compact_grads), the same update with less memory
    alone = step_in_backward and not dropout and not sharded and world()[1] == 1
    losses = []
    with opt.compact_grads():
        for epoch in range(epochs):
            for batch in bar(batches, f"{desc} epoch {epoch + 1}", progress):
                drop = next(draws)
                masks = masked_routers(model.config.model_type, layers, by_layer(selection)) if drop else nullcontext()
                opt.step_in_backward = alone and one_backward(model, batch, micro)
                with masks:
                    loss = lm_backward(model, rank_share(batch, device), micro, desc, len(losses), len(batches))
                if not sharded:
                    opt.sum_grads_across_ranks()
                opt.step(active=only_shared if drop else None)
                opt.zero_grad()
                losses.append(loss)
    set_trainable(model, [])
    log("sft", sum_(torch.stack(losses)).tolist())
    return opt.state_bytes()


def align_router(model, layers, safe_batches, unsafe_batches, kl_type, lr, weight_decay, epochs,
                 log: Log, desc="router", progress=True) -> list[float]:
    """Train only the routers so routing on jailbreak prompts matches routing on the same goals
    asked plainly. The plain-prompt routing is measured once, before any router step, and held
    fixed as the target. Returns the KL before and after alignment."""
    device = model.device
    # every rank computes the same whole-batch loss; fully_shard sums the ranks' gradients
    copies = world()[1] if is_sharded(model) else 1
    biases = choice_biases(layers)
    set_trainable(model, [])
    with torch.no_grad(), captured_router_outputs(layers) as captured:
        targets = []
        for batch in safe_batches:
            batch = _whole(batch, device)
            route(model, batch)
            targets.append(routing_distribution(captured, batch["content_mask"], biases))

    def mean_kl() -> float:
        with torch.no_grad(), captured_router_outputs(layers) as cap:
            total = torch.zeros((), device=device)
            for target, batch in zip(targets, unsafe_batches):
                batch = _whole(batch, device)
                route(model, batch)
                total += router_kl(target, routing_distribution(cap, batch["content_mask"], biases),
                                  kl_type)
        return float(total / len(targets))

    before = mean_kl()
    params = [p for layer in layers for p in layer.router_params.values()]
    set_trainable(model, params)
    opt = SparseRowAdamW(lr=lr, weight_decay=weight_decay)
    for p in params:
        opt.add_rows(p, range(p.shape[0]))
    kls = []
    with captured_router_outputs(layers) as captured:
        for epoch in range(epochs):
            pairs = list(zip(targets, unsafe_batches))
            for target, batch in bar(pairs, f"{desc} epoch {epoch + 1}", progress):
                batch = _whole(batch, device)
                tie = route(model, batch)
                loss = router_kl(target, routing_distribution(captured, batch["content_mask"], biases),
                                 kl_type)
                (finite(loss, desc, len(kls), len(pairs)) / copies + tie).backward()
                opt.step()
                opt.zero_grad()
                kls.append(loss.detach())
    set_trainable(model, [])
    log("router", torch.stack(kls).tolist())
    return [before, mean_kl()]
