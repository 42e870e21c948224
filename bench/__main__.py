"""python -m bench [--quick]: speed and memory of scoring and masked SFT, measured side by side.

Prints tables, then one `NAME VALUE` line per figure, last.
"""
from __future__ import annotations

import argparse
import os
import platform

import torch

from . import checkpoint_bytes, sharded
from . import workloads as w


def scoring(args, figures, m, layers, batch):
    # interleaved, so a slow spell of the machine falls on all three alike
    plain, ours, research = w.timed_together(
        [lambda: w.plain_fwd_bwd(m, layers, batch), lambda: w.our_scoring_step(m, layers, batch),
         lambda: w.research_scoring_step(m, layers, batch)], args.repeats)
    print(f"scoring step (median of {args.repeats}): plain fwd+bwd {plain * 1e3:.1f} ms, "
          f"ours {ours * 1e3:.1f} ms, research .item() loop {research * 1e3:.1f} ms")
    figures["scoring_time_ratio_vs_plain_fwd_bwd"] = ours / plain
    figures["scoring_time_ratio_vs_research_loop"] = ours / research


def streamed_vs_exact(args, figures, pool, batches_n: int):
    """A full accumulate pass over several batches, exact vs streamed vs offload, on fresh
    models. On a CPU the offload's host sums live in the same memory as the model, so its
    ratio shows no saving there; on a GPU the peak is the device's."""
    results = {}
    for name in ("exact", "streamed", "offload"):
        m = w.model()
        layers = w.moe_layers(m)
        data = w.batches(batches_n, 1, 32)
        run = lambda: w.score_pass(m, layers, data, lambda *a: None, progress=False,
                                   streamed=name == "streamed", offload=name == "offload")
        mb = pool.submit(w.scoring_pass_peak_mb, name, batches_n).result()
        results[name] = (mb, w.timed(run, max(1, args.repeats // 2)))
    print(f"accumulate scoring over {batches_n} batches of 1 x 32 tokens: "
          + ", ".join(f"{n} {mb:.1f} MB {t:.2f} s" for n, (mb, t) in results.items()))
    for name in ("streamed", "offload"):
        figures[f"{name}_scoring_peak_memory_ratio"] = results[name][0] / results["exact"][0]
        figures[f"{name}_scoring_time_ratio"] = results[name][1] / results["exact"][1]


def fsdp_per_rank(figures) -> None:
    """At OLMoE's 16 layers: with few layers, the layers fully_shard gathers at a time (the one
    running and the next) would be a large share of the model."""
    layers, k = 16, 16 * w.SHAPE["num_experts"] // 10
    whole, split = sharded.per_rank_mb(1, k, layers), sharded.per_rank_mb(2, k, layers)
    print(f"--sharding fsdp at {layers} layers, k = {k}, 2 gloo processes vs 1 (MB per rank): "
          f"weights held {split['weights_mb']:.1f} "
          f"vs {whole['weights_mb']:.1f}; scoring pass peak {split['scoring_mb']:.1f} vs "
          f"{whole['scoring_mb']:.1f}; masked SFT peak {split['sft_mb']:.1f} vs {whole['sft_mb']:.1f}")
    for key in ("weights", "scoring", "sft"):
        figures[f"fsdp2_{key}_memory_ratio_per_rank"] = split[f"{key}_mb"] / whole[f"{key}_mb"]


def kernels_and_threads(args, figures, batch):
    """The fused-experts kernel and the torch thread count, by measurement (scoring step)."""
    print("\nscoring step by experts_implementation and torch threads (ms, median)")
    threads_before = torch.get_num_threads()
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        row = []
        for kernel in ("grouped_mm", "batched_mm", "eager"):
            m = w.model()
            m.set_experts_implementation(kernel)
            layers = w.moe_layers(m)
            t = w.timed(lambda: w.our_scoring_step(m, layers, batch), args.repeats)
            figures[f"scoring_ms_{kernel}_threads{threads}"] = t * 1e3
            row.append(f"{kernel} {t * 1e3:.1f}")
        print(f"  threads {threads}: " + ", ".join(row))
    torch.set_num_threads(threads_before)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (< 5 min)")
    args = parser.parse_args()
    args.repeats = 5 if args.quick else 9
    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; model: OLMoE-shaped {w.SHAPE}")
    figures: dict[str, float] = {}

    with w.measuring_process() as pool:
        m = w.model()
        layers = w.moe_layers(m)
        total = sum(l.num_experts for l in layers)
        batch = w.batches(1, 4, 128)[0]
        scoring(args, figures, m, layers, batch)

        k = total // 10
        # one short sequence: at this scaled-down hidden size activations would otherwise dwarf
        # the weights, gradients and optimizer state, unlike at OLMoE's real size
        dense, ours = (pool.submit(w.sft_peak_mb, step, k, 32, 1).result()
                       for step in ("dense_adamw_step", "our_sft_step"))
        print(f"masked SFT step peak memory at k = {k} of {total} experts (1 x 32 tokens): dense "
              f"AdamW {dense:.1f} MB, ours {ours:.1f} MB")
        figures["sft_peak_memory_ratio_vs_dense_adamw"] = ours / dense
        expert_bytes = sum(p.numel() * 4 for p in w.expert_params(layers))
        ours_state = k * sum(p[0].numel() for p in layers[0].expert_params.values()) * 4 * 3
        print(f"optimizer state: dense AdamW {2 * expert_bytes / 2**20:.1f} MB (two moments of every "
              f"expert), ours {ours_state / 2**20:.1f} MB (fp32 master and two moments of k experts)")
        figures["sft_optimizer_state_ratio_vs_dense_adamw"] = ours_state / (2 * expert_bytes)
        streamed_vs_exact(args, figures, pool, 3 if args.quick else 6)
        checkpoint_bytes.report(figures, m, k)
        fsdp_per_rank(figures)

        kernels_and_threads(args, figures, batch)

        print("\ngrowth (ours): scoring step time and masked-SFT peak memory")
        print(f"{'batch':>5} {'seq':>5} {'k':>5} {'score ms':>9} {'sft MB':>8}")
        sizes = [(2, 64, k), (4, 64, k), (4, 128, k), (4, 128, 2 * k)] if args.quick else \
            [(2, 64, k), (4, 64, k), (8, 64, k), (4, 128, k), (4, 256, k), (4, 128, 2 * k), (4, 128, 4 * k)]
        for batch_size, seq_len, kk in sizes:
            b = w.batches(1, batch_size, seq_len)[0]
            t = w.timed(lambda: w.our_scoring_step(m, layers, b), args.repeats)
            sft = pool.submit(w.sft_peak_mb, "our_sft_step", kk, seq_len, batch_size).result()
            print(f"{batch_size:>5} {seq_len:>5} {kk:>5} {t * 1e3:>9.1f} {sft:>8.1f}")

    print()
    for name, value in figures.items():
        print(f"{name} {value:.4f}")


if __name__ == "__main__":
    main()
