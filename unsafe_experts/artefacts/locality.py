"""Which weights differ between two saved checkpoints, by expert, router and anything else.

Reads safetensors files tensor by tensor, so two large checkpoints never sit in memory at
once. Saved MoE checkpoints name experts one of two ways: per expert
(`layers.3.mlp.experts.17.gate_proj.weight`) or fused (`layers.3.mlp.experts.gate_up_proj`,
expert index on dim 0); both are resolved to (layer, expert).

A delta checkpoint (deltas.py) as `after` is compared on what it would materialize to: its
base is loaded once (the model's fused layout, which the delta's names use) and every row and
tensor the chain of deltas writes is compared with the base's; what no delta writes is the
base's by construction.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

PER_EXPERT = re.compile(r"layers\.(\d+)\.[^.]+\.experts\.(\d+)\.")
FUSED = re.compile(r"layers\.(\d+)\.[^.]+\.experts\.[A-Za-z_]+$")
ROUTER = re.compile(r"layers\.(\d+)\.[^.]+\.(gate|router)\.(weight|bias)$")


def _tensors(directory: Path) -> dict[str, Path]:
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no safetensors files")
    index = {}
    for path in files:
        with safe_open(path, "pt") as f:
            index.update({key: path for key in f.keys()})
    return index


def _get(path: Path, key: str) -> torch.Tensor:
    with safe_open(path, "pt") as f:
        return f.get_tensor(key)


def _classify(key: str, x: torch.Tensor, y: torch.Tensor, experts: set, routers: set, other: list):
    if x.shape == y.shape and torch.equal(x, y):
        return
    if m := PER_EXPERT.search(key):
        experts.add((int(m[1]), int(m[2])))
    elif (m := FUSED.search(key)) and x.shape == y.shape:
        rows = (x != y).flatten(1).any(1).nonzero().flatten().tolist()
        experts.update((int(m[1]), e) for e in rows)
    elif m := ROUTER.search(key):
        routers.add(int(m[1]))
    else:
        other.append(key)


def _delta_changes(before: str | Path, after: str | Path) -> dict:
    from .checkpoints import load_base
    from .deltas import apply_delta, check_base, delta_chain, read_manifest

    manifest = read_manifest(after)
    check_base(manifest, before, after)
    base = load_base(before, manifest.get("load", {}).get("dtype", "auto"))
    written = {name for delta in delta_chain(after) for name in read_manifest(delta)["tensors"]}
    original = {name: p.detach().clone() for name, p in base.named_parameters() if name in written}
    for delta in delta_chain(after):
        apply_delta(base, delta)
    now = dict(base.named_parameters())
    experts, routers, other = set(), set(), []
    for name in sorted(written):
        _classify(name, original[name], now[name].detach(), experts, routers, other)
    return {"experts": [list(x) for x in sorted(experts)], "routers": sorted(routers),
            "other": sorted(other)}


def weight_changes(before: str | Path, after: str | Path) -> dict:
    """{"experts": [[layer, expert], ...], "routers": [layer, ...], "other": [key, ...]}"""
    from .deltas import is_delta

    if is_delta(after):
        return _delta_changes(before, after)
    a, b = _tensors(before), _tensors(after)
    experts, routers, other = set(), set(), sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        _classify(key, _get(a[key], key), _get(b[key], key), experts, routers, other)
    return {"experts": [list(x) for x in sorted(experts)], "routers": sorted(routers),
            "other": sorted(other)}


def locality_report(before, after, selected: list, routers_may_change: bool,
                    others_may_change: bool = False) -> dict:
    """Compares the changes with what the surgery was allowed to touch (`others_may_change`:
    weights outside the experts and routers, which the defence and the dense baseline train)."""
    changes = weight_changes(before, after)
    allowed = {tuple(x) for x in selected}
    unexpected = [x for x in changes["experts"] if tuple(x) not in allowed]
    return {**changes, "unexpected_experts": unexpected,
            "ok": not unexpected and (others_may_change or not changes["other"])
            and (routers_may_change or not changes["routers"])}
