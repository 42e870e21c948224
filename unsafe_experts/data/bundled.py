"""Public data shipped with the package (licences in data/ATTRIBUTION.md): AdvBench goals and
targets (MIT), XSTest prompts (CC BY 4.0), an AlpacaEval subset (CC BY-NC 4.0)."""
from __future__ import annotations

import csv
import json
from importlib import resources

DATA = resources.files("unsafe_experts.data")


def _csv(name: str) -> list[dict[str, str]]:
    with DATA.joinpath(name).open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def advbench_rows() -> list[dict[str, str]]:
    """520 harmful behaviours: `goal` and its affirmative `target` ("Sure, here is ...")."""
    return _csv("advbench_harmful_behaviors.csv")


def advbench_goals() -> list[str]:
    return [row["goal"] for row in advbench_rows()]


def xstest_safe_prompts() -> list[str]:
    """XSTest's 250 prompts that a model should answer (label `safe`)."""
    return [row["prompt"] for row in _csv("xstest_prompts.csv") if row["label"] == "safe"]


def alpaca_pairs() -> list[dict[str, str]]:
    """400 benign AlpacaEval instructions with reference outputs cut to 60 words."""
    path = DATA.joinpath("alpaca_eval_cc_by_nc/alpaca_eval_subset.json")
    return [{"instruction": x["instruction"], "output": x["output"]}
            for x in json.loads(path.read_text(encoding="utf-8"))]
