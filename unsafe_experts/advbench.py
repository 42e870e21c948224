"""The AdvBench goals shipped with the package (MIT, see data/ATTRIBUTION.md)."""
from __future__ import annotations

import csv
from importlib import resources


def advbench_rows() -> list[dict[str, str]]:
    with resources.files("unsafe_experts").joinpath("data/advbench_harmful_behaviors.csv").open(
        encoding="utf-8"
    ) as f:
        return list(csv.DictReader(f))


def advbench_goals() -> list[str]:
    return [row["goal"] for row in advbench_rows()]
