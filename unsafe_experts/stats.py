"""Figures with their count and a 95% confidence interval."""
from __future__ import annotations

import math
import random

Z95 = 1.959963984540054


def shown(figure: dict) -> str:
    """A figure as every table prints it, `0.146 [0.07, 0.27]`: the value to three decimals and
    its 95% interval to two, so that the terminal, the reports and the docs read alike."""
    low, high = figure["ci95"]
    return f"{figure['value']:.3f} [{low:.2f}, {high:.2f}]"


def wilson(successes: int, n: int) -> list[float]:
    """Wilson score interval for a proportion; well-behaved at 0 and 1 and small n."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    # min/max: at p = 0 or 1 rounding can leave p a hair outside its own interval
    return [max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))]


def proportion(flags: list[bool]) -> dict:
    n, k = len(flags), sum(bool(f) for f in flags)
    return {"value": k / n if n else float("nan"), "n": n, "ci95": wilson(k, n)}


def mean(values: list[float]) -> dict:
    """Mean with a normal-approximation interval (t would differ little at our n >= 30)."""
    n = len(values)
    if n == 0:
        return {"value": float("nan"), "n": 0, "ci95": [float("nan"), float("nan")]}
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n)
    return {"value": m, "n": n, "ci95": [m - half, m + half]}


def subset(items: list, limit: int | None, seed: int = 0) -> list:
    """At most `limit` of `items`, drawn without replacement by a generator seeded with `seed`
    and kept in their order; all of them when `limit` is None or not smaller. A seeded sample
    rather than the first N, because prompt files come in category order (XSTest's first safe
    prompts are all homonyms and figurative language), so a prefix measures one category.
    Which positions are kept depends only on (len(items), limit, seed): sets of one length keep
    the same positions, so every attack family's harmful set holds the same goals as the plain
    set, and every run of a comparison is scored on the same prompts."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]
