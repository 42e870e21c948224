"""Delta checkpoints: a round's directory holds only what the round changed.

A surgery round trains the rows of a few experts (dim 0 of every fused expert tensor is the
expert) and, when aligning, the routers; every other weight stays bit-identical (SparseRowAdamW
never writes an unselected row). So `round_N/` holds

- `delta.safetensors`: for each fused expert tensor of a layer with changed experts, the
  changed experts' rows stacked in the order the manifest lists them; each router tensor whole;
  every other weight whole when the round trained those too (the defence's shared weights,
  the dense baseline; the manifest's `shared`);
- `delta.json`: the manifest: the base checkpoint (path and a sha256 of its weights files),
  the previous delta it applies on top of (`round_{N-1}`, or none for round 1), how the base was
  loaded (dtype, experts kernel), and per tensor its row indices (or `null`: the whole tensor).

Tensors are named as in the loaded model's `state_dict()` (transformers' fused layout, e.g.
`model.layers.3.mlp.experts.gate_up_proj`), not as in the base's files, which may keep one
tensor per expert: applying a delta to a freshly loaded base is then one `index_copy_` per
tensor, whatever the family's on-disk layout.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import DeltaError
from .atomic import save_directory_atomic

MANIFEST = "delta.json"
WEIGHTS = "delta.safetensors"
FORMAT = "unsafe-experts-delta/1"


def is_delta(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def base_dir(model_name: str | Path) -> Path:
    """The directory of a base's weights files: a local checkpoint, or a hub id's snapshot in
    the local cache (present once from_pretrained has loaded it)."""
    path = Path(model_name)
    if path.is_dir():
        return path
    from transformers.utils import cached_file

    return Path(cached_file(str(model_name), "config.json")).parent


def weights_digest(model_name: str | Path) -> str:
    """sha256 over the sorted (file name, sha256 of its bytes) of the base's safetensors files:
    it changes when any weight byte does, and not when config or tokenizer files are edited."""
    from ..records import file_digest

    files = sorted(base_dir(model_name).glob("*.safetensors"))
    if not files:
        raise DeltaError(f"{model_name}: no safetensors weights to take a digest of")
    lines = "".join(f"{p.name}\0{file_digest(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def parameter_names(model) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def changed_tensors(model, layers, experts, routers: bool, state=None, shared: bool = False) -> tuple[dict, dict]:
    """({name: tensor}, {name: row indices or None}) of the given (layer, expert) rows of every
    fused expert tensor, with `routers` every router tensor whole, and with `shared` every
    other parameter whole (attention, norms, embeddings: a run that trained them). `state` (a
    sharded model's gathered weights) replaces the live parameters when given."""
    names = parameter_names(model)
    grouped: dict[int, set[int]] = {}
    for layer_index, expert in experts:
        grouped.setdefault(int(layer_index), set()).add(int(expert))
    tensors, rows = {}, {}

    def value(param):
        return (state[names[id(param)]] if state is not None else param).detach()

    for layer in layers:
        if layer.index in grouped:
            index = sorted(grouped[layer.index])
            for param in layer.expert_params.values():
                name, full = names[id(param)], value(param)
                tensors[name] = full[torch.tensor(index, device=full.device)].cpu()
                rows[name] = index
        if routers:
            for param in layer.router_params.values():
                name = names[id(param)]
                tensors[name] = value(param).cpu().clone()
                rows[name] = None
    if shared:
        inside_moe = {id(p) for layer in layers for p in (*layer.expert_params.values(), *layer.router_params.values())}
        for param in model.parameters():
            if id(param) not in inside_moe:
                tensors[names[id(param)]] = value(param).cpu().clone()
                rows[names[id(param)]] = None
    return tensors, rows


def write_delta(path: str | Path, tensors: dict, rows: dict, manifest: dict) -> None:
    """delta.safetensors and delta.json into `path`, written to a hidden sibling and renamed."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS),
                  metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(
            {"format": FORMAT, **manifest, "tensors": rows}, indent=1) + "\n")

    save_directory_atomic(path, write)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise DeltaError(f"{path}: not a delta checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeltaError(f"{file}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise DeltaError(f"{file}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if not (path / WEIGHTS).is_file():
        raise DeltaError(f"{path}: {WEIGHTS} is missing")
    return manifest


def delta_chain(path: str | Path) -> list[Path]:
    """The delta directories to apply, oldest first, ending with `path`: each manifest's
    `previous` names a sibling directory (round_1 has none)."""
    chain, seen = [], set()
    current: Path | None = Path(path)
    while current is not None:
        if current.resolve() in seen:
            raise DeltaError(f"{path}: its chain of previous deltas loops at {current}")
        seen.add(current.resolve())
        previous = read_manifest(current).get("previous")
        chain.append(current)
        current = current.parent / previous if previous else None
        if current is not None and not current.is_dir():
            raise DeltaError(f"{chain[-1]}: applies on top of {current}, which does not exist")
    return chain[::-1]


@torch.no_grad()
def apply_delta(model, path: str | Path) -> None:
    """Writes a delta's rows and tensors into the model's parameters in place."""
    from safetensors.torch import load_file

    rows = read_manifest(path)["tensors"]
    saved = load_file(str(Path(path) / WEIGHTS))
    params = dict(model.named_parameters())
    for name, index in rows.items():
        if name not in params or name not in saved:
            raise DeltaError(f"{path}: tensor {name} is not in the model or not in {WEIGHTS}")
        param, value = params[name], saved[name]
        if index is None:
            param.copy_(value)
        else:
            param.index_copy_(0, torch.tensor(index, device=param.device), value.to(param.device))


def check_base(manifest: dict, base: str | Path, where: str | Path) -> None:
    """The base's weights are the ones the delta was made on, or a DeltaError naming both."""
    expected = manifest["base"]["sha256"]
    found = weights_digest(base)
    if found != expected:
        raise DeltaError(f"{where}: base {base} has weights digest {found[:16]}..., but the delta "
                         f"was made on {manifest['base']['path']} with digest {expected[:16]}...")


def base_record(model_name: str | Path) -> dict:
    """The manifest's `base`: a local checkpoint by its absolute path (so a delta can be
    materialized from another working directory), a hub id as given; and the weights digest."""
    local = Path(model_name).is_dir()
    return {"path": str(Path(model_name).resolve()) if local else str(model_name),
            "given": str(model_name), "local": local, "sha256": weights_digest(model_name)}
