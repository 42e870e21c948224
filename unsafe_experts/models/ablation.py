"""Causal ablation: switch given (layer, expert) pairs off and see what the model does without them.

An ablated expert's router logit is set to -inf before the top-k, so the expert is never chosen,
and the routing weights of the experts that are chosen are recomputed exactly as the architecture
computes them (renormalised over the top-k where the architecture does so). The router's own
forward is left alone; a forward hook recomputes its (weights, indices) from the masked logits
with the architecture's reselect rule (its record in architectures.py, the rules in reselect.py).
Each rule reproduces the router bit for bit on unmasked logits (tested on every architecture),
which is what makes the un-ablated experts' weights trustworthy.
"""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import ExpertSetError
from ..records import parse_json
from .architectures import ARCHITECTURES, MoELayer, UnsupportedModelError, moe_layers

# SteerMoE's forcing margin: a forced expert's logit becomes the token's largest plus this, so
# it is chosen and weighted like (a little above) the expert the router liked best
FORCE_MARGIN = 0.01


@contextmanager
def masked_routers(model_type: str, layers: list[MoELayer], masked: dict[int, list[int]],
                   forced: dict[int, list[int]] | None = None):
    """Hooks the router of every layer in `masked` or `forced` (decoder index -> experts to
    switch off / to force on; an empty list re-routes unchanged); the hooks are removed on exit.
    A forced expert's logit is set to the token's largest remaining logit + FORCE_MARGIN before
    the top-k (SteerMoE's unsafe steering), and the architecture's rule is told which experts
    are forced where it ranks by more than the logit (DeepSeek-V3's bias-corrected scores)."""
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(f"ablation does not know how {model_type!r} routes; "
                                    f"supported: {', '.join(sorted(ARCHITECTURES))}")
    reselect = ARCHITECTURES[model_type].reselect  # looked up per call: the table is the one source
    forced = forced or {}

    def hook_for(off, on):
        def hook(module, inputs, output):
            logits = output[0].clone()
            logits[..., off] = float("-inf")
            mask = None
            if on:
                top = logits.max(dim=-1, keepdim=True).values
                raised = (top.float() + FORCE_MARGIN).to(logits.dtype)
                # in bf16 the margin can round away; the next representable value still wins
                raised = torch.where(raised > top, raised, torch.nextafter(top, torch.full_like(top, float("inf"))))
                logits[..., on] = raised.expand(*top.shape[:-1], len(on))
                mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                mask[on] = True
            weights, indices = reselect(module, inputs[0], logits, forced=mask)
            return (logits, weights, indices, *output[3:])
        return hook

    by_index = {layer.index: layer for layer in layers}
    handles = [by_index[i].router.register_forward_hook(
                   hook_for(sorted(masked.get(i, [])), sorted(forced.get(i, []))))
               for i in sorted(set(masked) | set(forced))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def steered(model, layers: list[MoELayer] | None, off: Iterable[tuple[int, int]] = (),
            on: Iterable[tuple[int, int]] = ()):
    """While active, no token is routed to an expert of `off` and every token is routed to each
    expert of `on` ((decoder layer index, expert) pairs, most wanted first). A layer takes at
    most its top-k forced experts (the first in `on`; more cannot all be chosen), as SteerMoE
    does; yields the pairs actually forced."""
    layers = layers if layers is not None else moe_layers(model)
    off = check_experts(list(off), layers, "ablation")
    on = [p for p in check_experts(list(on), layers, "steering") if p not in off]
    top_k = {layer.index: layer.top_k for layer in layers}
    masked, forced = by_layer(off), {}
    for layer_index, expert in on:
        if len(forced.get(layer_index, [])) < top_k[layer_index]:
            forced.setdefault(layer_index, []).append(expert)
    for layer in layers:
        live = layer.num_experts - len(masked.get(layer.index, []))
        if live < layer.top_k:
            raise ExpertSetError(f"ablation: layer {layer.index} would keep {live} experts, fewer "
                                 f"than the {layer.top_k} its router picks per token")
    with masked_routers(model.config.model_type, layers, masked, forced):
        yield [(i, e) for i, experts in sorted(forced.items()) for e in experts]


def by_layer(pairs: list[tuple[int, int]]) -> dict[int, list[int]]:
    """(layer, expert) pairs grouped: decoder layer index -> its experts, in the given order."""
    grouped: dict[int, list[int]] = {}
    for layer_index, expert in pairs:
        grouped.setdefault(layer_index, []).append(expert)
    return grouped


@contextmanager
def ablated(model, layers: list[MoELayer] | None, experts: Iterable[tuple[int, int]]):
    """While active, the model never routes a token to any of `experts` ((decoder layer index,
    expert) pairs); the other experts' weights are renormalised as the architecture does."""
    with steered(model, layers, off=experts):
        yield


def check_experts(pairs: list, layers: list[MoELayer] | None, source: str) -> list[tuple[int, int]]:
    """[(layer, expert)] with every pair checked against the model's layers (without layers:
    only that each is a pair of integers); duplicates dropped."""
    sizes = None if layers is None else {layer.index: layer.num_experts for layer in layers}
    out: list[tuple[int, int]] = []
    for pair in pairs:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
            raise ExpertSetError(f"{source}: {pair!r} is not a [layer, expert] pair of integers")
        layer_index, expert = pair
        if sizes is not None and layer_index not in sizes:
            raise ExpertSetError(f"{source}: [{layer_index}, {expert}]: layer {layer_index} is not "
                                 f"a MoE layer of this model (MoE layers: {', '.join(map(str, sizes))})")
        if sizes is not None and not 0 <= expert < sizes[layer_index]:
            raise ExpertSetError(f"{source}: [{layer_index}, {expert}]: layer {layer_index} has "
                                 f"experts 0 to {sizes[layer_index] - 1}")
        if (layer_index, expert) not in out:
            out.append((layer_index, expert))
    return out


def load_expert_set(spec: str | Path, round: int | None = None,
                    layers: list[MoELayer] | None = None) -> list[tuple[int, int]]:
    """The experts named by `spec`: a JSON list of [layer, expert] pairs or a JSON object
    {"experts": [...]}, given inline (a string starting with `[` or `{` that is not a file) or
    in a file, or a run's training_metadata.json (or its directory), whose round `round`
    (default: the last recorded) is read. With `layers`, every pair is checked to exist."""
    path = Path(spec)
    if _exists(path, Path.is_dir):
        path = path / "training_metadata.json"
    inline = isinstance(spec, str) and spec.lstrip()[:1] in ("[", "{") and not _exists(path, Path.is_file)
    if inline:
        source = "--experts"
        try:
            data = parse_json(spec)
        except ValueError as e:  # JSONDecodeError, nested too deeply, too many digits
            raise ExpertSetError(f"{source} {_shorten(spec)}: neither a file nor valid JSON ({e}); give a "
                                 "file, or inline JSON such as [[0, 1], [3, 7]]") from None
    else:
        if not _exists(path, Path.is_file):
            raise ExpertSetError(f"{path}: no such file (nor inline JSON: a list of [layer, expert] "
                                 "pairs such as [[0, 1], [3, 7]])")
        try:
            data = parse_json(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise ExpertSetError(f"{path}: not valid JSON ({e})") from None
        source = str(path)
    if isinstance(data, dict) and "identified_experts_per_round" in data:
        if inline:
            raise ExpertSetError(f"{source}: a run's metadata is read from its folder (--run), not inline")
        rounds = data["identified_experts_per_round"]
        if not rounds:
            raise ExpertSetError(f"{path}: the run has no completed round")
        key = str(round if round is not None else max(map(int, rounds)))
        if key not in rounds:
            raise ExpertSetError(f"{path}: no round {key}; recorded rounds: {', '.join(sorted(rounds, key=int))}")
        data, source = rounds[key], f"{path} round {key}"
    elif round is not None:
        raise ExpertSetError(f"{source}: round={round} needs a run's training_metadata.json")
    if isinstance(data, dict):
        if "experts" not in data:
            raise ExpertSetError(f"{source}: an object needs an \"experts\" list")
        data = data["experts"]
    if not isinstance(data, list):
        raise ExpertSetError(f"{source}: expected a list of [layer, expert] pairs")
    return check_experts(data, layers, source)


def _exists(path: Path, test) -> bool:
    """`test(path)`, False where the name cannot be a file at all: inline JSON longer than a
    file name may be is an OSError (ENAMETOOLONG) to stat, not a missing file."""
    try:
        return test(path)
    except OSError:
        return False


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
