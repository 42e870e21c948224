"""The gradient-based unsafe-expert surgery: rounds of score -> select -> masked SFT -> router
alignment -> checkpoint, with every output written atomically into `output_dir`.

Everything that can be wrong with the inputs (parameters, dataset, model family, top-k) is
checked before the model is loaded and before `output_dir` is touched.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from .artefacts.atomic import (
    LOCK_NAME,
    DirectoryLock,
    inside,
    is_temporary_of,
    save_checkpoint_atomic,
    write_bytes_atomic,
    write_json_atomic,
)
from .artefacts.checkpoints import check_weights, load_base, load_tokenizer  # noqa: F401  (check_weights re-exported)
from .artefacts.deltas import (
    DeltaError,
    apply_delta,
    base_record,
    changed_tensors,
    check_config,
    delta_chain,
    read_manifest,
    write_delta,
)
from .artefacts.model_card import write_model_card
from .artefacts.result_cache import cached, model_digest
from .artefacts.run_metadata import METADATA, ROUNDS, SCHEMA_VERSION, expert_key, research_round, write_research_outputs
from .config import TrainConfig
from .errors import ConfigError
from .models.ablation import by_layer
from .models.architectures import moe_layers
from .models.distributed import barrier, join_process_group, launched_world, local_device
from .models.memory import peak_mb, reset_peak
from .models.sharding import full_state_dict, load_sharded
from .records import attack_families, file_digest, load_records, select_records
from .selection.contrastive import benign_in_format_sample, contrast
from .selection.methods import METHODS
from .selection.routing import generated_routing_scores, keep_pairs, routing_scores
from .selection.score_pass import per_batch_sft, score_pass
from .selection.scoring import score_table, top_k
from .selection.share_limit import below_share_limit, benign_share
from .text.examples import batches, collate, plain_prompt, router_example, sft_example
from .text.generation import generate, generate_ids
from .training.phases import (
    LOG_KINDS,
    align_router,
    dropout_draws,
    masked_sft,
    recomputed_activations,
    shared_params,
)
from .training.retention import load_retention, mixed_batches, sample_retention

ROUTING_RESPONSES = "routing_responses.json"
# what a run writes into output_dir (besides round_N/), cleared when a fresh run replaces it
BENIGN_IN_FORMAT = "benign_in_format_answers.json"
OUTPUT_FILES = {METADATA, "final_model", "expert_gradients.pkl", "retention_answers.json",
                ROUTING_RESPONSES, BENIGN_IN_FORMAT}


def _is_output(name: str) -> bool:
    """An entry of output_dir that a run writes: round_N/ or one of OUTPUT_FILES."""
    return name in OUTPUT_FILES or re.fullmatch(r"round_\d+", name) is not None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def check_device(device: str | None) -> None:
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device} asked for, but torch sees no CUDA GPU here")


def _count_experts(cfg: TrainConfig) -> dict:
    """Lay the model out on the meta device (no weights) to count its experts."""
    check_weights(cfg.model_name)
    try:
        config = AutoConfig.from_pretrained(cfg.model_name, trust_remote_code=cfg.trust_remote_code)
    except (ValueError, KeyError) as e:  # no or an unknown model_type, a config that is not JSON
        raise ConfigError(f"model_name: {cfg.model_name}: {e}") from None
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
    # a lock left by a run that died before its first metadata write is not content
    content = out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir())
    if content and not cfg.overwrite and resume_point(cfg) is None:
        raise ConfigError(f"output_dir: {out} is not empty; pass --overwrite to replace its outputs")
    return out


def _comparable(parameters: dict) -> dict:
    return {k: v for k, v in parameters.items() if k != "overwrite"}


def _same_run(cfg: TrainConfig) -> dict | None:
    """The metadata in output_dir when it is of a run with these parameters and data."""
    path = Path(cfg.output_dir) / METADATA
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if (_comparable(meta.get("parameters", {})) != _comparable(asdict(cfg))
            or meta.get("dataset", {}).get("sha256") != file_digest(cfg.dataset_path)):
        return None
    return meta


def resume_point(cfg: TrainConfig) -> dict | None:
    """The metadata of an unfinished run in output_dir with these same parameters and data,
    which this run then continues after its last completed round; None otherwise. A round
    counts as completed once it is in the metadata: that is written after its checkpoint has
    been renamed into place."""
    meta = _same_run(cfg)
    return None if meta is None or meta.get("status") == "completed" else meta


def completed_run(cfg: TrainConfig) -> dict | None:
    """The metadata of a finished run in output_dir with these same parameters and data."""
    meta = _same_run(cfg)
    done = meta is not None and meta.get("status") == "completed"
    return meta if done and (Path(cfg.output_dir) / "final_model").is_dir() else None


def check_inputs(cfg: TrainConfig, records: list[dict] | None = None) -> dict:
    """Everything that can be wrong before any weights load or any output is written: the
    parameters, the dataset (and what is left after filtering), the model family, top-k and
    the output directory. Returns the model's MoE layout. `records`: the dataset as the
    caller has already read and checked it, so that the file is parsed once."""
    cfg.validate()
    if cfg.sharding == "fsdp" and launched_world() < 2:
        raise ConfigError("sharding: fsdp splits the model across processes; launch with "
                          "`torchrun --nproc_per_node N -m cli train ...` (N >= 2)")
    if records is None:
        records = load_records(cfg.dataset_path)
    select_records(records, cfg.max_samples, cfg.seed, cfg.require_judge_success)
    if cfg.uses_retention:
        load_retention(cfg.retention_path, cfg.retention)
    if METHODS[cfg.method].needs_benign_in_format:
        load_retention(cfg.retention_path, "contrastive")
    check_device(cfg.device)
    info = _count_experts(cfg)
    _check_output_dir(cfg)
    return info


def _load_model(cfg: TrainConfig, device: torch.device, deltas: list[Path] = ()):
    """The base model with `deltas` applied in order (a resumed run's completed rounds) on
    `device`. (A run written before delta checkpoints is never resumed: its parameters lack
    final_checkpoint, so it does not count as the same run.)"""
    def load():
        model = load_base(cfg.model_name, cfg.dtype, cfg.trust_remote_code, cfg.experts_implementation)
        for delta in deltas:
            apply_delta(model, delta)
        return model

    # loaded on the CPU: with fsdp only this rank's shard moves to its device
    model = load_sharded(load, device) if cfg.sharding == "fsdp" else load().to(device)
    # eval mode: no dropout and no router jitter (PhiMoE), so scores are reproducible;
    # backward works the same
    return model.eval()


def prepare_data(cfg: TrainConfig, tokenizer, loaded: list[dict]) -> dict:
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
        "loaded": loaded,
        # the routing method generates responses to these (see routing.py)
        "jailbreak_prompts": [r["all_prompt"] for r in records],
        "plain_prompts": [plain_prompt(r["goal"]) for r in records],
        "sft_examples": sft,
        "sft": [collate(b, pad) for b in batches(sft, cfg.batch_size)],
        "safe": [collate(b, pad) for b in batches(safe, cfg.batch_size)],
        "unsafe": [collate(b, pad) for b in batches(unsafe, cfg.batch_size)],
        "summary": {
            "path": str(cfg.dataset_path), "sha256": file_digest(cfg.dataset_path),
            "records_loaded": len(loaded), "records_used": len(records),
            # the attack families the file covers, and the used records per family
            "families": list(attack_families(loaded)), "families_used": attack_families(records),
            "truncated_sft_examples": sum(e.truncated for e in sft),
            "truncated_router_prompts": sum(e.truncated for e in safe + unsafe),
        },
    }


def _round_summary(r: int, selection, logs, identified, shown: int = 20) -> str:
    names = " ".join(expert_key(l, e) for l, e in selection[:shown])
    more = f" (+{len(selection) - shown} more)" if len(selection) > shown else ""
    sft = [x["loss"] for x in logs if x["round"] == r and x["kind"] == "sft"]
    line = f"round {r}: {len(selection)} experts: {names}{more}"
    if sft:
        line += f" | sft loss {sft[0]:.4f} -> {sft[-1]:.4f}"
    if "router_kl_before_after" in identified:
        before, after = identified["router_kl_before_after"]
        line += f" | router KL {before:.2e} -> {after:.2e}"
    return line


class Surgery:
    """One run: validated inputs, the live model and the metadata, advanced one phase at a time
    (identify -> repair -> align -> checkpoint per round) by `run_surgery` or by a workflow."""

    def __init__(self, cfg: TrainConfig, progress: bool = True, echo=print):
        # under torchrun every rank runs this; only rank 0 writes, all compute the same
        self.rank = join_process_group(cfg.device)
        self.writer = self.rank == 0
        self.cfg, self.progress = cfg, progress and self.writer
        self.echo = echo if self.writer else (lambda *a: None)
        loaded = load_records(cfg.dataset_path)  # parsed once: checked here, tokenized below
        self.model_info = check_inputs(cfg, loaded)
        barrier()  # every rank has checked the output directory before rank 0 writes to it
        self.out = Path(cfg.output_dir)
        self.tokenizer = load_tokenizer(cfg.model_name, cfg.trust_remote_code)
        self.data = prepare_data(cfg, self.tokenizer, loaded)
        truncated = self.data["summary"]["truncated_sft_examples"]
        if truncated:
            self.echo(f"truncated the prompt of {truncated} of {self.data['summary']['records_used']} "
                 f"examples to fit max_length={cfg.max_length}")
        self.model, self.meta, self.lock = None, None, None

    def start(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.device = local_device(cfg.device)
        self.started = time.time()
        if self.writer:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock = DirectoryLock(self.out).acquire()
        resume = resume_point(cfg)
        if self.writer and not resume:
            self._clear_outputs()
        done = sorted(int(r) for r in resume[ROUNDS]) if resume else []
        self.first_round = (done[-1] if done else 0) + 1
        source = self.out / f"round_{done[-1]}" if done else None
        resuming_deltas = source is not None
        self.model = _load_model(cfg, self.device, delta_chain(source) if resuming_deltas else ())
        # the base's digest, for every delta's manifest (taken once loaded: a hub id's files
        # are in the cache by then); a resumed run's base must be the one its rounds were
        # trained on, which every rank checks before training
        self.base = base_record(cfg.model_name) if self.writer or resuming_deltas else None
        if resuming_deltas:
            recorded = read_manifest(source)["base"]
            expected = recorded["sha256"]
            if self.base["sha256"] != expected:
                raise DeltaError(f"model_name: {cfg.model_name} has weights digest "
                                 f"{self.base['sha256'][:16]}..., but the completed rounds in "
                                 f"{self.out} were trained on a base with digest {expected[:16]}...")
            check_config(recorded, self.base["config_sha256"], f"model_name: {cfg.model_name}")
        self.layers = moe_layers(self.model)
        self.meta = {
            "schema_version": SCHEMA_VERSION,
            "method": cfg.method,
            "status": "running",
            "parameters": asdict(cfg),
            "seed": cfg.seed,
            "dataset": self.data["summary"],
            "model": {**self.model_info, "dtype": str(next(self.model.parameters()).dtype),
                      "device": str(self.device), "world_size": launched_world()},
            "base": self.base,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            ROUNDS: {},
            "training_logs": [],
            "timings": {},
        }
        if resume:
            self._continue(resume, done)
        self._round: dict = {}
        if cfg.uses_retention:
            self.data["repair"] = self._retention_batches()
        else:
            self.data["repair"] = self.data["sft"]
            self.meta["retention"] = {"mode": "none", "path": None, "examples": 0, "per_batch": 0,
                                      "sections": {}}
        self._save_meta()

    def _clear_outputs(self) -> None:
        """A fresh run (--overwrite) removes what an earlier run wrote here, so a longer earlier
        run's round_3/ never sits beside metadata that says two rounds; other files stay."""
        for path in self.out.iterdir():
            if _is_output(path.name) or is_temporary_of(path.name, _is_output):
                _remove(path)

    def _continue(self, previous: dict, done: list[int]) -> None:
        """Keeps what the interrupted run completed; drops half-written leftovers."""
        last = done[-1] if done else 0
        for key in (ROUNDS, "evaluation", "cache", "benign_in_format"):
            if key in previous:
                self.meta[key] = previous[key]
        self.meta["training_logs"] = [x for x in previous["training_logs"] if x["round"] <= last]
        self.meta["timings"] = {k: v for k, v in previous["timings"].items()
                                if k.startswith("round_") and int(k[6:]) <= last}
        self.meta["resumed"] = previous.get("resumed", []) + [{"after_round": last, "at": time.time()}]
        self.echo(f"resuming {self.out} after round {last}")
        for leftover in self.out.iterdir():
            # only what this run's atomic writers left half-written (a checkpoint being written,
            # a file write the kill cut short); the folder's other hidden entries are the user's
            if is_temporary_of(leftover.name, _is_output):
                _remove(leftover)

    def record(self, key: str, stage: str, value) -> None:
        """Adds a result of the workflow (an evaluation) to the metadata, written at once."""
        self.meta.setdefault(key, {})[stage] = value
        self._save_meta()

    def _retention_batches(self) -> list:
        """Jailbreak->refusal batches, each joined by a share of retention prompts answered by
        the model as it is before surgery (its answers are kept in retention_answers.json)."""
        cfg = self.cfg
        saved = self.out / "retention_answers.json"
        if self.first_round > 1 and saved.is_file():  # resuming: the pre-surgery answers
            # [prompt, answer, section]; files from before sections were [prompt, answer]
            kept = [(row[0], row[1], row[2] if len(row) > 2 else "plain")
                    for row in json.loads(saved.read_text())]
        else:
            chosen = sample_retention(load_retention(cfg.retention_path, cfg.retention),
                                      cfg.retention_samples, cfg.seed)
            answers = self._answer([m for _, m in chosen])
            kept = [(m, a, section) for (section, m), a in zip(chosen, answers) if a]
            if self.writer:
                write_json_atomic(saved, [list(row) for row in kept])
        sections = {}
        for _, _, section in kept:
            sections[section] = sections.get(section, 0) + 1
        retained = [sft_example(self.tokenizer, m, a, cfg.max_length, cfg.truncation, index=i)
                    for i, (m, a, _) in enumerate(kept)]
        mixed = mixed_batches(self.data["sft_examples"], retained, cfg.batch_size,
                              self.tokenizer.pad_token_id)
        self.meta["retention"] = {"mode": cfg.retention, "path": str(cfg.retention_path),
                                  "examples": len(retained),
                                  "per_batch": -(-len(retained) // len(mixed)), "sections": sections}
        return mixed

    def _answer(self, prompts: list) -> list[str]:
        """The model's greedy answers, generated in a canonical order of the distinct prompts so
        that the answers depend on the set of prompts alone, not on the seed's shuffle: runs
        with other seeds then share one cache entry (cfg.cache_dir) and a hit equals a miss."""
        cfg = self.cfg
        keyed = {json.dumps(m, sort_keys=True): m for m in prompts}
        order = sorted(keyed)
        key = None
        digest = model_digest(cfg.model_name)
        if digest:
            key = {"model": digest, "prompts": hashlib.sha256("\n".join(order).encode()).hexdigest(),
                   "max_new_tokens": cfg.retention_max_new_tokens, "batch_size": cfg.batch_size,
                   "dtype": str(self.model.dtype), "device": self.model.device.type}
        used: dict = {}
        answers = cached(cfg.cache_dir, "retention_answers", key, lambda: generate(
            self.model, self.tokenizer, [keyed[k] for k in order], cfg.retention_max_new_tokens,
            cfg.batch_size, desc="retention answers", progress=self.progress),
            valid=lambda v: isinstance(v, list) and len(v) == len(order) and all(isinstance(a, str) for a in v),
            used=used)
        if used:  # the metadata names the cache entry the answers came from
            self.meta.setdefault("cache", {}).update(used)
        by_prompt = dict(zip(order, answers))
        return [by_prompt[json.dumps(m, sort_keys=True)] for m in prompts]

    def _log(self, r: int):
        def log(kind, values):
            if kind not in LOG_KINDS:  # a new kind would reach MLflow without a metric name
                raise ValueError(f"training log kind {kind!r} is not one of {LOG_KINDS}")
            self.meta["training_logs"].extend(
                {"round": r, "kind": kind, "step": i, "loss": v} for i, v in enumerate(values))
        return log

    def _timed(self, r: int, key: str, t0: float) -> None:
        self._round[r]["timings"][key] = time.time() - t0

    def identify(self, r: int) -> list[tuple[int, int]]:
        """Score and select this round's experts by the configured method (per_batch gradient
        mode also trains here, batch by batch)."""
        cfg, t0 = self.cfg, time.time()
        reset_peak(self.device)  # the round's peaks are measured from here
        extra = {}
        method = METHODS[cfg.method]
        recompute = recomputed_activations(self.model, cfg.activations == "recompute")
        if cfg.score_mode == "per_batch":
            with recompute:
                counts, score_sum, picks, state_bytes = per_batch_sft(
                    self.model, self.layers, self.data["sft"], cfg.top_k_experts, cfg.expert_lr,
                    cfg.weight_decay, cfg.sft_epochs, self._log(r), f"round {r} per-batch sft",
                    self.progress, cfg.micro_batch_size)
            # the round's experts: the most often picked, ties broken by summed score
            selection = top_k(counts * (score_sum.max() + 1) + score_sum, cfg.top_k_experts, self.layers)
            scores = score_sum / len(picks)
            extra = {"per_batch_experts": [[list(x) for x in p] for p in picks],
                     "optimizer_state_bytes": state_bytes}
        else:
            with recompute:
                scores, extra = self._scores(r)
            k = sum(l.num_experts for l in self.layers) if method.selects == "all" else cfg.top_k_experts
            selection = [] if method.selects == "none" else top_k(scores, k, self.layers)
        identified = research_round({"method": cfg.method, "experts": [list(x) for x in selection],
                                     "scores": score_table(scores, self.layers), **extra},
                                    method.from_gradients)
        # the experts whose rows this round trains (per_batch: every batch's picks), which is
        # what the round's delta checkpoint holds
        trained = {tuple(x) for p in extra.get("per_batch_experts", []) for x in p}
        self._round[r] = {"identified": identified, "selection": selection, "started": t0,
                          "timings": {}, "trained": trained, "routers": False, "shared": False}
        self._timed(r, "identify_s", t0)
        self._round[r]["timings"]["identify_peak_memory_mb"] = peak_mb(self.device)
        return selection

    def _scores(self, r: int) -> tuple[torch.Tensor, dict]:
        """[moe layers, experts] scores of the method (by its row's scorer, SCORERS), highest =
        most unsafe, and any tables the round's record keeps beside them."""
        return self.SCORERS[METHODS[self.cfg.method].scorer](self, r)

    def _gradient_scores(self, r: int) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        return score_pass(self.model, self.layers, self.data["sft"], self._log(r),
                          f"round {r} score", self.progress,
                          streamed=cfg.score_memory == "streamed", score=cfg.method,
                          offload=cfg.score_memory == "offload"), {}

    def _contrastive_gradient_scores(self, r: int) -> tuple[torch.Tensor, dict]:
        """The jailbreak-refusal scores contrasted with the benign-in-format ones (contrastive.py);
        both sides' own tables are kept in the round's record."""
        cfg = self.cfg
        harm, _ = self._gradient_scores(r)
        log = self._log(r)
        benign = score_pass(self.model, self.layers, self._benign_in_format(), lambda kind, v: log(f"benign_{kind}", v),
                            f"round {r} benign score", self.progress,
                            streamed=cfg.score_memory == "streamed", score=cfg.method,
                            offload=cfg.score_memory == "offload")
        return contrast(harm, benign, cfg.contrast_weight), {
            "contrast_harm": score_table(harm, self.layers), "contrast_benign": score_table(benign, self.layers)}

    def _share_limited_gradient_scores(self, r: int) -> tuple[torch.Tensor, dict]:
        """The jailbreak-refusal scores with the experts the benign-in-format requests route
        much to ranked last (share_limit.py); the shares and how many experts passed are kept."""
        harm, _ = self._gradient_scores(r)
        share = benign_share(self.model, self.layers, self._benign_in_format())
        limited, eligible = below_share_limit(harm, share, self.cfg.share_limit)
        return limited, {"gradient_scores": score_table(harm, self.layers),
                         "benign_share": score_table(share, self.layers),
                         "share_limit": {"limit": self.cfg.share_limit, "experts_under": int(eligible.sum()),
                                         "experts": eligible.numel()}}

    def _benign_in_format(self) -> list:
        """As many benign-in-format prompts as the surgery has jailbreaks (a seeded draw from the
        retention file's contrastive section), each with the model's answer before surgery as
        its target: drawn and answered once, kept in benign_in_format_answers.json so that a
        resumed run scores against the same answers."""
        if "benign_in_format" in self.data:
            return self.data["benign_in_format"]
        cfg = self.cfg
        saved = self.out / BENIGN_IN_FORMAT
        recorded = self.meta.get("benign_in_format", {}).get("sha256")
        if self.first_round > 1:
            # the answers of the model before surgery, which a resumed run cannot regenerate: used
            # only as written (the digest the run recorded), never an edited, foreign or lost file
            data = saved.read_bytes() if saved.is_file() and not saved.is_symlink() else b""
            if not recorded or hashlib.sha256(data).hexdigest() != recorded:
                raise ConfigError(f"output_dir: {saved} is missing or changed since this run wrote it; "
                                  "the resumed run cannot regenerate it (rerun with --overwrite)")
            kept = [tuple(row) for row in json.loads(data)]
        else:
            prompts = load_retention(cfg.retention_path, "contrastive")["contrastive"]
            chosen = benign_in_format_sample(prompts, len(self.data["sft_examples"]), cfg.seed)
            kept = [(m, a) for m, a in zip(chosen, self._answer(chosen)) if a]
            data = (json.dumps([list(row) for row in kept], indent=2) + "\n").encode()
            if self.writer:
                write_bytes_atomic(saved, data)
            self.meta["benign_in_format"] = {"examples": len(kept), "sha256": hashlib.sha256(data).hexdigest()}
            self._save_meta()
        if not kept:
            raise ConfigError(f"retention_path: the model answered none of the {BENIGN_IN_FORMAT} "
                              "prompts; the contrastive score has no benign side")
        examples = [sft_example(self.tokenizer, m, a, cfg.max_length, cfg.truncation, index=i)
                    for i, (m, a) in enumerate(kept)]
        pad = self.tokenizer.pad_token_id
        self.data["benign_in_format"] = [collate(b, pad) for b in batches(examples, cfg.batch_size)]
        return self.data["benign_in_format"]

    def _prompt_routing_scores(self, r: int) -> tuple[torch.Tensor, dict]:
        parts = routing_scores(self.model, self.layers, self.data["safe"], self.data["unsafe"])
        return parts["score"], self._routing_tables(parts)

    def _generated_routing_scores(self, r: int) -> tuple[torch.Tensor, dict]:
        responses = self._routing_responses()
        kept, pairs = keep_pairs([x["jailbreak_text"] for x in responses],
                                 [x["plain_text"] for x in responses])
        parts, counted = generated_routing_scores(
            self.model, self.layers, [(x["jailbreak_prompt_ids"], x["jailbreak_ids"]) for x in responses],
            [(x["plain_prompt_ids"], x["plain_ids"]) for x in responses], kept, self.cfg.batch_size,
            self.tokenizer.pad_token_id)
        return parts["score"], {"routing_pairs": {**pairs, **counted}, **self._routing_tables(parts)}

    def _seeded_draw(self, r: int) -> tuple[torch.Tensor, dict]:
        """Random scores, seeded per round (so a control's picks differ between rounds)."""
        shape = (len(self.layers), self.layers[0].num_experts)
        generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + r)
        return torch.rand(shape, generator=generator), {}

    # a method row's scorer -> how this surgery scores it (see selection/methods.py)
    SCORERS = {"gradients": _gradient_scores, "prompt_routing": _prompt_routing_scores,
               "generated_routing": _generated_routing_scores, "seeded_draw": _seeded_draw,
               "contrastive_gradients": _contrastive_gradient_scores,
               "share_limited_gradients": _share_limited_gradient_scores}

    def _routing_tables(self, parts: dict) -> dict:
        return {f"routing_{k}": score_table(v, self.layers) for k, v in parts.items() if k != "score"}

    def _routing_responses(self) -> list[dict]:
        """Greedy responses to every jailbreak prompt and its plain request, generated once per
        run on the model before surgery (a resumed run reads them back from output_dir), so
        every round measures the routing of the same complied jailbreaks and refusals."""
        if "routing_responses" in self.data:
            return self.data["routing_responses"]
        cfg = self.cfg
        saved = self.out / ROUTING_RESPONSES
        if self.first_round > 1 and saved.is_file():
            responses = json.loads(saved.read_text())
        else:
            def respond(prompts, desc):
                return generate_ids(self.model, self.tokenizer, prompts, cfg.routing_max_new_tokens,
                                    cfg.batch_size, cfg.max_length, desc, self.progress)
            jailbreak = respond(self.data["jailbreak_prompts"], "routing: jailbreak responses")
            plain = respond(self.data["plain_prompts"], "routing: plain responses")
            decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            responses = [{"jailbreak_prompt_ids": jp, "jailbreak_ids": jg, "jailbreak_text": decode(jg),
                          "plain_prompt_ids": pp, "plain_ids": pg, "plain_text": decode(pg)}
                         for (jp, jg), (pp, pg) in zip(jailbreak, plain)]
            if self.writer:
                write_json_atomic(saved, responses)
        self.data["routing_responses"] = responses
        return responses

    def repair(self, r: int) -> None:
        """Masked SFT of the selected experts (per_batch mode already trained in identify), with
        the shared weights too under the defence, or every weight for a dense method."""
        t0, state, cfg = time.time(), self._round[r], self.cfg
        if cfg.score_mode != "accumulate" or not state["selection"]:
            return
        dense = METHODS[cfg.method].trains_all_weights
        shared = shared_params(self.model, self.layers, routers=dense) if dense or cfg.shared_weights else []
        if cfg.expert_dropout:
            _check_maskable(state["selection"], self.layers)
        state["trained"] |= {tuple(x) for x in state["selection"]}
        state["shared"] = bool(shared)
        state["routers"] = state["routers"] or dense
        seed = cfg.seed * 1000 + r
        with recomputed_activations(self.model, cfg.activations == "recompute"):
            state["identified"]["optimizer_state_bytes"] = masked_sft(
                self.model, self.layers, self.data["repair"], state["selection"], cfg.expert_lr,
                cfg.weight_decay, cfg.sft_epochs, self._log(r), f"round {r} sft", self.progress,
                cfg.micro_batch_size, shared=shared, dropout=cfg.expert_dropout, seed=seed)
        if cfg.expert_dropout:
            draws = dropout_draws(cfg.sft_epochs * len(self.data["repair"]), cfg.expert_dropout, seed)
            state["identified"]["sft_steps_experts_off"] = [sum(draws), len(draws)]
        self._timed(r, "sft_s", t0)

    def align(self, r: int) -> list[float]:
        cfg, t0 = self.cfg, time.time()
        kl = align_router(self.model, self.layers, self.data["safe"], self.data["unsafe"],
                          cfg.kl_type, cfg.router_lr, cfg.weight_decay, cfg.router_epochs,
                          self._log(r), f"round {r} router", self.progress)
        self._round[r]["identified"]["router_kl_before_after"] = kl
        self._round[r]["routers"] = True
        self._timed(r, "router_s", t0)
        return kl

    def checkpoint(self, r: int) -> Path:
        t0, state = time.time(), self._round.pop(r)
        path = inside(self.out, f"round_{r}")
        weights = full_state_dict(self.model)  # sharded: every rank sends its part to rank 0
        if self.writer:
            self._write_delta(path, sorted(state["trained"]), state["routers"], state["shared"],
                              f"round_{r - 1}" if r > 1 else None, r, weights)
        timings = state["timings"]
        timings["save_s"] = time.time() - t0
        timings["round_s"] = time.time() - state["started"]
        timings["peak_memory_mb"] = peak_mb(self.device)
        self.meta[ROUNDS][str(r)] = state["identified"]
        self.meta["timings"][f"round_{r}"] = timings
        self._save_meta()
        self.echo(_round_summary(r, state["selection"], self.meta["training_logs"], state["identified"]))
        return path

    def _write_delta(self, path: Path, experts: list, routers: bool, shared: bool,
                     previous: str | None, label, weights) -> None:
        """A delta checkpoint of `experts`' rows (and the routers, and every weight outside the
        experts when `shared`) against `previous`, or against the base when None
        (docs/operations.md, "Outputs")."""
        cfg = self.cfg
        tensors, rows = changed_tensors(self.model, self.layers, experts, routers, weights, shared=shared)
        write_delta(path, tensors, rows, {
            "round": label, "base": self.base, "previous": previous,
            "load": {"dtype": cfg.dtype, "experts_implementation": cfg.experts_implementation},
            "experts": [list(x) for x in experts], "routers": routers, "shared": shared})

    def _final_delta(self, weights) -> None:
        """final_model/ as one delta against the base: every expert any round trained, and the
        routers if any round aligned them (read back from the rounds' manifests, so a resumed
        run counts the rounds its interrupted predecessor wrote)."""
        experts, routers, shared = set(), False, False
        for r in sorted(int(x) for x in self.meta[ROUNDS]):
            manifest = read_manifest(self.out / f"round_{r}")
            experts |= {tuple(x) for x in manifest["experts"]}
            routers = routers or manifest["routers"]
            shared = shared or manifest.get("shared", False)  # absent before the defence existed
        self._write_delta(inside(self.out, "final_model"), sorted(experts), routers, shared, None,
                          "final", weights)

    def fail(self, error: BaseException) -> None:
        """Marks the run failed in its metadata (when it got as far as writing one) and
        releases the output directory; completed rounds stay on disk as they are."""
        if self.meta is not None:
            self.meta["status"] = "failed"
            self.meta["error"] = f"{type(error).__name__}: {error}"
            self._save_meta()
        if self.lock is not None:  # no barrier: the other ranks may not be failing with it
            self.lock.release()

    def _save_meta(self) -> None:
        if self.writer:
            write_json_atomic(self.out / METADATA, self.meta)

    def finish(self) -> dict:
        self.meta["status"] = "completed"
        self.meta["timings"]["total_s"] = time.time() - self.started
        weights = full_state_dict(self.model)
        if self.writer and self.cfg.final_checkpoint == "delta":
            self._final_delta(weights)
        elif self.writer:
            save_checkpoint_atomic(self.model, self.tokenizer, inside(self.out, "final_model"), weights)
        if self.writer:
            write_research_outputs(self.out, self.meta)
            write_json_atomic(self.out / METADATA, self.meta)
            write_model_card(self.out)  # the pipeline rewrites it once the evaluation is in
            self.lock.release()
        barrier()  # no rank leaves before the outputs are complete
        return self.meta


def _check_maskable(selection, layers) -> None:
    """Expert dropout switches a round's experts off at the router: each layer must keep at
    least as many live experts as its router picks per token."""
    sizes = {layer.index: (layer.num_experts, layer.top_k) for layer in layers}
    for index, experts in by_layer(selection).items():
        total, k = sizes[index]
        if total - len(experts) < k:
            raise ConfigError(f"expert_dropout: layer {index} has {len(experts)} of its {total} "
                              f"experts selected; switching them off leaves fewer than the {k} "
                              "its router picks")


def run_surgery(cfg: TrainConfig, progress: bool = True, echo=print) -> dict:
    surgery = Surgery(cfg, progress, echo)
    try:
        surgery.start()  # inside: a failure after the lock is taken must release it
        for r in range(surgery.first_round, cfg.num_rounds + 1):
            surgery.identify(r)
            surgery.repair(r)
            if not cfg.skip_router_training:
                surgery.align(r)
            surgery.checkpoint(r)
        return surgery.finish()
    except BaseException as e:
        surgery.fail(e)
        raise
