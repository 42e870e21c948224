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


SPLITS = ("test", "validation")


def subset(items: list, limit: int | None, seed: int = 0, split: str = "test") -> list:
    """At most `limit` of `items`, drawn without replacement by a generator seeded with `seed`
    and kept in their order; all of them when `limit` is None or not smaller. A seeded sample
    rather than the first N, because prompt files come in category order (XSTest's first safe
    prompts are all homonyms and figurative language), so a prefix measures one category.
    Which positions are kept depends only on (len(items), limit, seed): sets of one length keep
    the same positions, so every attack family's harmful set holds the same goals as the plain
    set, and every run of a comparison is scored on the same prompts.

    split "validation": up to `limit` other positions, drawn (with a generator of their own) from
    those the test sample leaves out, so that a setting tuned on them never saw a test prompt;
    an error when the test sample leaves none."""
    if split not in SPLITS:
        raise ValueError(f"split: one of {', '.join(SPLITS)}, got {split!r}")
    if split == "test":
        if limit is None or limit >= len(items):
            return list(items)
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        return [items[i] for i in keep]
    test = {i for i, _ in subset(list(enumerate(items)), limit, seed)} if limit is not None else set(range(len(items)))
    rest = [i for i in range(len(items)) if i not in test]
    if not rest:
        raise ValueError(f"a set of {len(items)} prompts leaves none for validation beside a test sample "
                         f"of {limit}: give a smaller --eval_limit")
    keep = sorted(random.Random(f"validation-{seed}").sample(rest, min(limit, len(rest))))
    return [items[i] for i in keep]
