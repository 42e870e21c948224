"""The gradient-based unsafe-expert surgery: rounds of score -> select -> masked SFT -> router
alignment -> checkpoint, with every output written atomically into `output_dir`.

Everything that can be wrong with the inputs (parameters, dataset, model family, top-k) is
checked before the model is loaded and before `output_dir` is touched.
"""
from __future__ import annotations

import pickle
import platform
import resource
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .adapters import moe_layers
from .config import ConfigError, TrainConfig
from .examples import batches, collate, plain_prompt, router_example, sft_example
from .outputs import save_checkpoint_atomic, write_bytes_atomic, write_json_atomic
from .phases import align_router, masked_sft, per_batch_sft, score_pass
from .records import file_sha256, load_records, select_records
from .scoring import score_table, top_k

METADATA = "training_metadata.json"


def _count_experts(cfg: TrainConfig) -> dict:
    """Lay the model out on the meta device (no weights) to count its experts."""
    config = AutoConfig.from_pretrained(cfg.model_name, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    layers = moe_layers(skeleton)
    total = sum(layer.num_experts for layer in layers)
    if cfg.top_k_experts > total:
        raise ConfigError(
            f"top_k_experts: {cfg.top_k_experts} is more than the {total} routed experts of "
            f"{type(skeleton).__name__} ({len(layers)} MoE layers x {layers[0].num_experts})"
        )
    return {"class": type(skeleton).__name__, "model_type": config.model_type,
            "moe_layers": [layer.index for layer in layers],
            "num_experts": layers[0].num_experts, "router_top_k": layers[0].top_k}


def _check_output_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"output_dir: {out} is not empty; pass --overwrite to replace its outputs")
    return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _load_model(cfg: TrainConfig, device: torch.device):
    dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model_name, dtype=dtype, trust_remote_code=cfg.trust_remote_code
    )
    # eval mode: no dropout and no router jitter (PhiMoE), so scores are reproducible;
    # backward works the same
    return model.to(device).eval()


def prepare_data(cfg: TrainConfig, tokenizer) -> dict:
    loaded = load_records(cfg.dataset_path)
    records = select_records(loaded, cfg.max_samples, cfg.seed, cfg.require_judge_success)
    sft = [
        sft_example(tokenizer, r["all_prompt"], cfg.refusals[i % len(cfg.refusals)],
                    cfg.max_length, cfg.truncation, index=i)
        for i, r in enumerate(records)
    ]
    safe = [router_example(tokenizer, plain_prompt(r["goal"]), cfg.max_length, cfg.truncation)
            for r in records]
    unsafe = [router_example(tokenizer, r["all_prompt"], cfg.max_length, cfg.truncation)
              for r in records]
    pad = tokenizer.pad_token_id
    return {
        "sft": [collate(b, pad) for b in batches(sft, cfg.batch_size)],
        "safe": [collate(b, pad) for b in batches(safe, cfg.batch_size)],
        "unsafe": [collate(b, pad) for b in batches(unsafe, cfg.batch_size)],
        "summary": {
            "path": str(cfg.dataset_path), "sha256": file_sha256(cfg.dataset_path),
            "records_loaded": len(loaded), "records_used": len(records),
            "truncated_sft_examples": sum(e.truncated for e in sft),
            "truncated_router_prompts": sum(e.truncated for e in safe + unsafe),
        },
    }


def _round_summary(r: int, selection, logs, identified, shown: int = 20) -> str:
    names = " ".join(f"L{l}_E{e}" for l, e in selection[:shown])
    more = f" (+{len(selection) - shown} more)" if len(selection) > shown else ""
    sft = [x["loss"] for x in logs if x["round"] == r and x["kind"] == "sft"]
    line = f"round {r}: {len(selection)} experts: {names}{more} | sft loss {sft[0]:.4f} -> {sft[-1]:.4f}"
    if "router_kl_before_after" in identified:
        before, after = identified["router_kl_before_after"]
        line += f" | router KL {before:.2e} -> {after:.2e}"
    return line


def run_surgery(cfg: TrainConfig, progress: bool = True, echo=print) -> dict:
    cfg.validate()
    model_info = _count_experts(cfg)
    out = _check_output_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = prepare_data(cfg, tokenizer)
    if data["summary"]["truncated_sft_examples"]:
        echo(f"truncated the prompt of {data['summary']['truncated_sft_examples']} of "
             f"{data['summary']['records_used']} examples to fit max_length={cfg.max_length}")

    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.time()
    model = _load_model(cfg, device)
    layers = moe_layers(model)
    out.mkdir(parents=True, exist_ok=True)

    meta = {
        "method": "gradient",
        "status": "running",
        "parameters": asdict(cfg),
        "seed": cfg.seed,
        "dataset": data["summary"],
        "model": {**model_info, "dtype": str(next(model.parameters()).dtype), "device": str(device)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "identified_experts_per_round": {},
        "training_logs": [],
        "timings": {},
    }
    write_json_atomic(out / METADATA, meta)
    rounds_pickle = {}

    for r in range(1, cfg.num_rounds + 1):
        timings, t0 = {}, time.time()

        def log(kind, values, r=r):
            meta["training_logs"].extend(
                {"round": r, "kind": kind, "step": i, "loss": v} for i, v in enumerate(values)
            )

        if cfg.score_mode == "accumulate":
            scores = score_pass(model, layers, data["sft"], log, f"round {r} score", progress)
            selection = top_k(scores, cfg.top_k_experts, layers)
            timings["identify_s"] = time.time() - t0
            t1 = time.time()
            state_bytes = masked_sft(model, layers, data["sft"], selection, cfg.expert_lr,
                                     cfg.weight_decay, cfg.sft_epochs, log, f"round {r} sft", progress)
            timings["sft_s"] = time.time() - t1
            identified = {"experts": [list(x) for x in selection], "gradients": score_table(scores, layers)}
        else:
            counts, score_sum, picks, state_bytes = per_batch_sft(
                model, layers, data["sft"], cfg.top_k_experts, cfg.expert_lr, cfg.weight_decay,
                cfg.sft_epochs, log, f"round {r} per-batch sft", progress)
            # the round's experts: the most often picked, ties broken by summed score
            combined = counts * (score_sum.max() + 1) + score_sum
            selection = top_k(combined, cfg.top_k_experts, layers)
            timings["identify_and_sft_s"] = time.time() - t0
            identified = {"experts": [list(x) for x in selection],
                          "gradients": score_table(score_sum / len(picks), layers),
                          "per_batch_experts": [[list(x) for x in p] for p in picks]}
        identified["optimizer_state_bytes"] = state_bytes

        if not cfg.skip_router_training:
            t2 = time.time()
            identified["router_kl_before_after"] = align_router(
                model, layers, data["safe"], data["unsafe"], cfg.kl_type, cfg.router_lr,
                cfg.weight_decay, cfg.router_epochs, log, f"round {r} router", progress)
            timings["router_s"] = time.time() - t2

        t3 = time.time()
        save_checkpoint_atomic(model, tokenizer, out / f"round_{r}")
        timings["save_s"] = time.time() - t3
        timings["round_s"] = time.time() - t0
        timings["peak_memory_mb"] = _peak_memory_mb(device)
        meta["identified_experts_per_round"][str(r)] = identified
        meta["timings"][f"round_{r}"] = timings
        rounds_pickle[r] = {k: identified[k] for k in ("experts", "gradients")}
        write_json_atomic(out / METADATA, meta)
        echo(_round_summary(r, selection, meta["training_logs"], identified))

    save_checkpoint_atomic(model, tokenizer, out / "final_model")
    # written for the research scripts' readers; this project never loads a pickle
    write_bytes_atomic(out / "expert_gradients.pkl", pickle.dumps(rounds_pickle))
    meta["status"] = "completed"
    meta["timings"]["total_s"] = time.time() - started
    write_json_atomic(out / METADATA, meta)
    return meta
