"""Loading a model from a checkpoint directory, full or delta, and writing a delta out in full.

`load_checkpoint` is the one way anything reads a run's `round_N/` or `final_model/` as a
model: a full checkpoint loads as it is; a delta (deltas.py) loads its base, checks the base's
weights digest against the manifest, and applies the chain of deltas in memory. The surgery
loads its base and resumes through the same `load_base` and `load_tokenizer`, so a
materialized round is what a full save of that round would have written.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from .deltas import DeltaError, apply_delta, check_base, delta_chain, is_delta, read_manifest


def check_weights(model: str | Path) -> None:
    """Weights load from safetensors only: a local checkpoint with pickle weights alone
    (pytorch_model.bin) is refused, since unpickling can run code; a truncated or corrupt
    safetensors file is named before anything loads (only its header is read)."""
    from safetensors import safe_open

    path = Path(model)
    if path.is_file():
        raise ConfigError(f"model_name: {path} is a file; expected a checkpoint directory or a hub id")
    if not path.is_dir():
        return  # a hub id: from_pretrained resolves it
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) or ["no weights file"]
        raise ConfigError(f"model_name: {path} has no safetensors weights ({', '.join(pickles)}); "
                          "pickle weights are never loaded: convert them to safetensors first")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ConfigError(f"model_name: {file} is not a readable safetensors file "
                              f"({type(e).__name__}: {e})") from None


def load_base(model_name: str | Path, dtype: str = "auto", trust_remote_code: bool = False,
              experts_implementation: str | None = None):
    """The model on the CPU, as the surgery loads it (the dtype and experts kernel matter:
    both are written into a full save's config)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_name, dtype="auto" if dtype == "auto" else getattr(torch, dtype),
        trust_remote_code=trust_remote_code, use_safetensors=True)
    if experts_implementation:
        model.set_experts_implementation(experts_implementation)
    return model


def load_tokenizer(model_name: str | Path, trust_remote_code: bool = False):
    """The tokenizer the surgery uses and saves: the model's, with eos as the pad token where
    it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _local(path: str | Path) -> bool:
    return Path(path).is_dir()


def load_checkpoint(path: str | Path, trust_remote_code: bool = False, base: str | Path | None = None):
    """(model on the CPU, tokenizer) of a checkpoint directory. A delta checkpoint is
    materialized in memory on its base (the manifest's, or `base`), whose weights digest must
    match the manifest's; with a local base that is checked before any weights load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not is_delta(path):
        check_weights(path)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True)
        return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    chain = delta_chain(path)
    manifest = read_manifest(path)
    recorded = manifest["base"]
    if base is None:
        base = recorded["path"]
        if recorded.get("local") and not _local(base):
            raise DeltaError(f"{path}: its base {base} is not there any more; pass the base "
                             "checkpoint's directory (materialize --base)")
    if _local(base):
        check_base(manifest, base, path)  # before a large base is read in full
    load = manifest.get("load", {})
    model = load_base(base, load.get("dtype", "auto"), trust_remote_code,
                      load.get("experts_implementation"))
    if not _local(base):  # a hub id: its files are in the cache only once loaded
        check_base(manifest, base, path)
    for delta in chain:
        apply_delta(model, delta)
    return model, load_tokenizer(base, trust_remote_code)


def checkpoint_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a checkpoint directory alone; a delta keeps none, so its base's (as the
    surgery loaded and would have saved it)."""
    from transformers import AutoTokenizer

    if is_delta(path):
        return load_tokenizer(read_manifest(path)["base"]["path"], trust_remote_code)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def materialize(output_dir: str | Path, round: int, out: str | Path, base: str | Path | None = None,
                trust_remote_code: bool = False) -> Path:
    """Writes round `round` of a run as a full checkpoint (config, tokenizer, safetensors) to
    `out`, the same tensors a full save of that round would have written. Every check (the
    round exists, `out` is free, the base's digest) comes before anything is written."""
    from .atomic import save_checkpoint_atomic

    output_dir, out = Path(output_dir), Path(out)
    if not output_dir.is_dir():
        raise DeltaError(f"{output_dir}: no such run directory")
    source = output_dir / f"round_{round}"
    if not source.is_dir():
        found = sorted(int(p.name[6:]) for p in output_dir.glob("round_*")
                       if p.is_dir() and p.name[6:].isdigit())
        raise DeltaError(f"{output_dir}: no round {round} on disk (rounds: "
                         f"{', '.join(map(str, found)) or 'none'})")
    if not is_delta(source):
        raise DeltaError(f"{source} is already a full checkpoint (written before delta "
                         "checkpoints); load it directly")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DeltaError(f"--out: {out} exists and is not an empty directory")
    model, tokenizer = load_checkpoint(source, trust_remote_code, base)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir():  # an empty directory given as the target: replaced as a whole
        out.rmdir()
    save_checkpoint_atomic(model, tokenizer, out)
    return out
