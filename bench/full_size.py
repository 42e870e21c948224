"""python -m bench.full_size: scoring and masked SFT on OLMoE-1B-7B's real shape with random
bf16 weights, ours vs the research code's approach: tokens/s and peak memory.

Meant for a GPU (`--device cuda`; the whole model, 6.9 B parameters, 13.8 GB). On a CPU,
`--layers 1` keeps the real width with 1 of the 16 layers. Prints a table, then `NAME VALUE`
lines.
"""
from __future__ import annotations

import argparse
import gc
import platform

import torch

from . import workloads as w


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.full_size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=16, help="of OLMoE-1B-7B's 16")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = (args.device, args.layers, args.batch_size, args.seq_len)
    tokens = args.batch_size * args.seq_len
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"OLMoE-1B-7B shape, {args.layers} of 16 layers, bf16, random weights; {device} ({name}), "
          f"torch {torch.__version__}; batch {args.batch_size} x {args.seq_len} tokens; "
          f"k = 10% of the experts")
    results = {}
    with w.measuring_process() as pool:
        model, layers, batch, selection = w.full_size_setup(*shape)
        for phase, fn in w.FULL_SIZE_PHASES.items():
            def run():
                fn(model, layers, batch, selection)
                w.sync(device)
            repeats = max(1, args.repeats // 2) if phase == "scoring_research" else args.repeats
            seconds = w.timed(run, repeats)
            w.set_trainable(model, [])
            results[phase] = [tokens / seconds]
        del model, layers, batch, selection
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # peaks: allocator statistics on a GPU; on a CPU resident memory, in the measuring process
        for phase in w.FULL_SIZE_PHASES:
            results[phase].append(w.full_size_peak_mb(phase, *shape) if device.type == "cuda"
                                  else pool.submit(w.full_size_peak_mb, phase, *shape).result())
    print(f"{'':<18} {'tokens/s':>10} {'peak MB':>10}")
    for phase, (rate, mb) in results.items():
        print(f"{phase:<18} {rate:>10.1f} {mb:>10.1f}")
    print()
    for phase, (rate, mb) in results.items():
        print(f"full_{phase}_tokens_per_s {rate:.4f}")
        print(f"full_{phase}_peak_mb {mb:.4f}")
    for kind in ("scoring", "sft"):
        ours, research = results[f"{kind}_ours"], results[f"{kind}_research"]
        print(f"full_{kind}_speedup_vs_research {ours[0] / research[0]:.4f}")
        print(f"full_{kind}_peak_memory_ratio_vs_research {ours[1] / research[1]:.4f}")


if __name__ == "__main__":
    main()
