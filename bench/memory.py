"""Peak resident memory of a phase on Linux: reset the high-water mark, run, read it back.

CPU tensors have no allocator statistics in torch, so a phase's peak is the process's peak
RSS during it (VmHWM, reset through /proc/self/clear_refs) minus its RSS at the start.
"""
from __future__ import annotations

import gc
from pathlib import Path


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mb(fn) -> tuple[float, object]:
    """(peak MB above the starting RSS while fn() ran, fn's result)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = _status_kb("VmRSS")
    result = fn()
    return (_status_kb("VmHWM") - start) / 1024, result
