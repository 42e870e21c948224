"""Delta checkpoints: a round's directory holds only what the round changed.

A surgery round trains the rows of a few experts (dim 0 of every fused expert tensor is the
expert) and, when aligning, the routers; every other weight stays bit-identical (SparseRowAdamW
never writes an unselected row). So `round_N/` holds

- `delta.safetensors`: for each fused expert tensor of a layer with changed experts, the
  changed experts' rows stacked in the order the manifest lists them; each router tensor whole;
  every other weight whole when the round trained those too (the defence's shared weights,
  the dense baseline; the manifest's `shared`);
- `delta.json`: the manifest: the base checkpoint (path, a sha256 of its weights files and one
  of its config.json), the previous delta it applies on top of (`round_{N-1}`, or none for
  round 1), how the base was loaded (dtype, experts kernel), per tensor its row indices (or
  `null`: the whole tensor), and `delta_sha256`, the sha256 of delta.safetensors, checked
  before any of its bytes are applied.

Deltas and manifests written before those digests existed have no `delta_sha256` or
`base.config_sha256`: they are still accepted (they sit in users' run folders), unverified on
that point; every delta written now carries both.

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
CONFIG = "config.json"


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


def config_digest(model_name: str | Path) -> str | None:
    """sha256 of the base's config.json (the architecture the weights are loaded into: top-k,
    expert count, rope...); None when it has none."""
    from ..records import file_digest

    path = base_dir(model_name) / CONFIG
    return file_digest(path) if path.is_file() else None


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
    """delta.safetensors and delta.json into `path`, written to a hidden sibling and renamed;
    the manifest records the sha256 of the weights file as written (`delta_sha256`)."""
    from safetensors.torch import save_file

    from ..records import file_digest

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS),
                  metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(
            {"format": FORMAT, **manifest, "delta_sha256": file_digest(tmp / WEIGHTS),
             "tensors": rows}, indent=1) + "\n")

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


def check_weights_file(path: str | Path, manifest: dict) -> None:
    """delta.safetensors is the file the manifest was written with (its sha256), or a
    DeltaError naming it and both digests. A manifest from before the digest was recorded has
    no `delta_sha256`: accepted unverified (such deltas exist in users' run folders)."""
    from ..records import file_digest

    expected = manifest.get("delta_sha256")
    if expected is None:
        return  # written before delta_sha256 existed: nothing to check against
    file = Path(path) / WEIGHTS
    found = file_digest(file)
    if found != expected:
        raise DeltaError(f"{file}: sha256 {found}, but {MANIFEST} records {expected}: the delta "
                         "was changed or damaged after it was written")


def _load_weights(path: str | Path) -> dict:
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise DeltaError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None


@torch.no_grad()
def apply_delta(model, path: str | Path) -> None:
    """Writes a delta's rows and tensors into the model's parameters in place, once its
    weights file matches the manifest's digest; every load of a delta (materialize, evaluate,
    a resumed run, the locality check) comes through here."""
    manifest = read_manifest(path)
    check_weights_file(path, manifest)
    rows, saved = manifest["tensors"], _load_weights(path)
    params = dict(model.named_parameters())
    for name, index in rows.items():
        if name not in params or name not in saved:
            raise DeltaError(f"{path}: tensor {name} is not in the model or not in {WEIGHTS}")
        param, value = params[name], saved[name]
        want = param.shape if index is None else (len(index), *param.shape[1:])
        if tuple(value.shape) != tuple(want):
            raise DeltaError(f"{path}: tensor {name} has shape {tuple(value.shape)} in {WEIGHTS}, "
                             f"expected {tuple(want)}")
        if index is None:
            param.copy_(value)
        else:
            param.index_copy_(0, torch.tensor(index, device=param.device), value.to(param.device))


def check_base(manifest: dict, base: str | Path, where: str | Path) -> None:
    """The base's weights and config.json are the ones the delta was made on, or a DeltaError
    naming both digests. A manifest from before the config digest was recorded has no
    `config_sha256`: its config is not checked."""
    recorded = manifest["base"]
    expected = recorded["sha256"]
    found = weights_digest(base)
    if found != expected:
        raise DeltaError(f"{where}: base {base} has weights digest {found[:16]}..., but the delta "
                         f"was made on {recorded['path']} with digest {expected[:16]}...")
    check_config(recorded, config_digest(base), f"{where}: base {base}")


def check_config(recorded: dict, found: str | None, what: str) -> None:
    """`found` (a base's config.json digest) is the manifest base record's, or a DeltaError;
    a record without `config_sha256` (written before it existed) is accepted."""
    expected = recorded.get("config_sha256")
    if expected is not None and found != expected:
        raise DeltaError(f"{what} has {CONFIG} digest {(found or 'none (no file)')[:16]}..., but the "
                         f"delta was made on {recorded['path']} whose {CONFIG} has digest "
                         f"{expected[:16]}...: the architecture it loads into changed")


def base_record(model_name: str | Path) -> dict:
    """The manifest's `base`: a local checkpoint by its absolute path (so a delta can be
    materialized from another working directory), a hub id as given; the weights digest and
    the config.json digest."""
    local = Path(model_name).is_dir()
    return {"path": str(Path(model_name).resolve()) if local else str(model_name),
            "given": str(model_name), "local": local, "sha256": weights_digest(model_name),
            "config_sha256": config_digest(model_name)}
