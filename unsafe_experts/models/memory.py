"""Peak memory of a phase: reset the high-water mark, run, read it back.

On CUDA, torch's allocator statistics. CPU tensors have no allocator statistics in torch, so on
Linux a phase's peak is the process's peak resident memory during it (VmHWM, reset through
/proc/self/clear_refs); where that reset is not allowed, the peak since the process started.
"""
from __future__ import annotations

import gc
import resource
from pathlib import Path

import torch


def status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    except OSError:
        pass


def peak_mb(device: torch.device) -> float:
    """Peak MB since the last reset_peak: allocated on CUDA, resident (the whole process) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def phase_peak_mb(fn) -> tuple[float, object]:
    """(peak CPU MB above the starting resident memory while fn() ran, fn's result)."""
    cpu = torch.device("cpu")
    reset_peak(cpu)
    start = status_kb("VmRSS") or 0
    result = fn()
    return peak_mb(cpu) - start / 1024, result
