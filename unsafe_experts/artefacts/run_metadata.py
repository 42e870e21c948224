"""Typed views of a run's `training_metadata.json`, and the one place expert names are made.

The file keeps the research scripts' layout for its readers (`identified_experts_per_round:
{"1": {"experts": [[layer, expert], ...], "gradients": {"L0_E15": ...}}}`); code here reads it
through RunRecord / RoundRecord instead of string keys, and `schema_version` says which layout
a file has (1: before the field existed).
"""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .atomic import write_bytes_atomic

METADATA = "training_metadata.json"
SCHEMA_VERSION = 2
ROUNDS = "identified_experts_per_round"
_KEY = re.compile(r"L(\d+)_E(\d+)")

Expert = tuple[int, int]


def expert_key(layer: int, expert: int) -> str:
    return f"L{layer}_E{expert}"


def parse_expert_key(key: str) -> Expert:
    match = _KEY.fullmatch(key)
    if not match:
        raise ValueError(f"{key!r} is not an expert name like L3_E12")
    return int(match[1]), int(match[2])


@dataclass
class RoundRecord:
    round: int
    experts: list[Expert]
    scores: dict[str, float]
    router_kl_before_after: list[float] | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, r: int | str, data: dict) -> RoundRecord:
        return cls(int(r), [tuple(x) for x in data["experts"]],
                   data.get("scores", data.get("gradients", {})),
                   data.get("router_kl_before_after"), data)


@dataclass
class RunRecord:
    path: Path
    data: dict

    @classmethod
    def load(cls, output_dir: str | Path) -> RunRecord:
        path = Path(output_dir) / METADATA
        if not path.is_file():
            raise ConfigError(f"{path}: no such file; run `unsafe-experts train` (or `dvc repro`) first")
        try:
            return cls(path, json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None

    def rounds(self) -> dict[int, RoundRecord]:
        return {int(r): RoundRecord.from_dict(r, d)
                for r, d in sorted(self.data.get(ROUNDS, {}).items(), key=lambda x: int(x[0]))}

    def selected(self) -> list[Expert]:
        """Every expert selected in any round, in round order (repeats kept)."""
        return [x for r in self.rounds().values() for x in r.experts]


def research_round(identified: dict, from_gradients: bool) -> dict:
    """A round's record with the research scripts' `gradients` name for gradient-kind scores."""
    return {**identified, "gradients": identified["scores"]} if from_gradients else identified


def write_research_outputs(out: Path, meta: dict) -> None:
    """expert_gradients.pkl, for the research scripts' readers; this project never loads it."""
    rounds = {int(r): {"experts": v["experts"], "gradients": v.get("gradients", v["scores"])}
              for r, v in meta[ROUNDS].items()}
    write_bytes_atomic(out / "expert_gradients.pkl", pickle.dumps(rounds))
