"""python -m bench.micro_batches [ORGANISM_DIR] [--repeats N]: masked SFT on the demo organism's
real repair batches, whole batches vs length-sorted micro-batches (`train.micro_batch_size`),
side by side in one run: seconds per epoch, positions computed, peak memory of one step.

The batches are built as the surgery builds them (unsafe_experts/surgery.py): the first
`max_samples` flip_chars records with a refusal, each batch of 8 joined by its share of the
plain retention prompts answered greedily by the organism (48 new tokens).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from unsafe_experts.models.architectures import moe_layers
from unsafe_experts.models.memory import phase_peak_mb
from unsafe_experts.text.examples import DEFAULT_REFUSAL, batches, sft_example
from unsafe_experts.text.generation import generate
from unsafe_experts.training.phases import masked_sft
from unsafe_experts.training.retention import load_retention, mixed_batches, sample_retention

from .workloads import measuring_process, timed_together


def repair_batches(organism: Path, max_samples: int = 128, batch_size: int = 8) -> list:
    tokenizer = AutoTokenizer.from_pretrained(organism / "model")
    model = AutoModelForCausalLM.from_pretrained(organism / "model").eval()
    records = json.loads((organism / "surgery_records.json").read_text())[:max_samples]
    jailbreak = [sft_example(tokenizer, r["all_prompt"], DEFAULT_REFUSAL, 512) for r in records]
    chosen = sample_retention(load_retention(organism / "retention.json", "plain"), 1000, 42)
    prompts = [m for _, m in chosen]
    answers = generate(model, tokenizer, prompts, max_new_tokens=48, desc="retention answers", progress=True)
    retained = [sft_example(tokenizer, m, a, 512) for m, a in zip(prompts, answers) if a]
    return mixed_batches(jailbreak, retained, batch_size, tokenizer.pad_token_id)


def positions(data: list, micro: int | None) -> int:
    """Token positions the forwards compute: each (micro-)batch padded to its longest row."""
    total = 0
    for batch in data:
        lengths = sorted(batch["attention_mask"].sum(1).tolist())
        groups = [lengths] if micro is None else batches(lengths, micro)
        total += sum(len(g) * max(g) for g in groups)
    return total


def sft(organism: Path, data: list, micro: int | None):
    model = AutoModelForCausalLM.from_pretrained(organism / "model").eval()
    layers = moe_layers(model)
    selection = [(layer.index, e) for layer in layers for e in (0, 1)]  # 8 of the 64 experts
    return lambda: masked_sft(model, layers, data, selection, 1e-3, 0.01, 1, lambda *a: None,
                              progress=False, micro=micro)


def step_peak_mb(organism: str, data: list, micro: int | None) -> float:
    """One step on the widest batch, in the measuring process."""
    widest = max(data, key=lambda b: b["input_ids"].numel())
    mb, _ = phase_peak_mb(sft(Path(organism), [widest], micro))
    return mb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("organism", nargs="?", default="build/organism")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    organism = Path(args.organism)
    if not (organism / "retention.json").is_file():
        print(f"error: {organism} is not a built organism (run `make demo` or `unsafe-experts organism`)",
              file=sys.stderr)
        return 2
    data = repair_batches(organism)
    variants = (None, 16, 8)
    seconds = timed_together([sft(organism, data, m) for m in variants], args.repeats)
    with measuring_process() as pool:
        peaks = [pool.submit(step_peak_mb, str(organism), data, m).result() for m in variants]
    real = sum(int(b["attention_mask"].sum()) for b in data)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s); "
          f"{len(data)} repair batches of {data[0]['input_ids'].shape[0]} rows, {real} real tokens; "
          f"median of {args.repeats} epochs")
    print(f"{'micro_batch_size':>16} {'s/epoch':>8} {'ratio':>6} {'positions':>10} {'ratio':>6} "
          f"{'step peak MB':>12} {'ratio':>6}")
    for m, s, peak in zip(variants, seconds, peaks):
        computed = positions(data, m)
        print(f"{str(m):>16} {s:8.2f} {s / seconds[0]:6.2f} {computed:10d} "
              f"{computed / positions(data, None):6.2f} {peak:12.1f} {peak / peaks[0]:6.2f}")
    for m, s, peak in zip(variants[1:], seconds[1:], peaks[1:]):
        print(f"micro_{m}_sft_time_ratio_vs_whole {s / seconds[0]:.3f}")
        print(f"micro_{m}_step_peak_ratio_vs_whole {peak / peaks[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
