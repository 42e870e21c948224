"""Run parameters of the gradient-based surgery, validated once before any work starts."""
from __future__ import annotations

import math
from dataclasses import MISSING, astuple, dataclass, field, fields

from .errors import ConfigError
from .selection.methods import METHODS as METHOD_TABLE
from .text.examples import DEFAULT_REFUSAL
from .training.router_kl import KL_TYPES

SCORE_MODES = ("accumulate", "per_batch")
# the method names, from the one table that describes them (methods.py)
METHODS = tuple(METHOD_TABLE)
DTYPES = ("auto", "float32", "bfloat16", "float16")
SHARDING = ("none", "fsdp")
SCORE_MEMORY = ("exact", "streamed", "offload")
TRUNCATIONS = ("middle", "left")
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")
# none: no retention; plain: retention.json's `plain` section (train goals asked plainly,
# benign prompts); contrastive: also its `contrastive` section (benign prompts inside attack
# formats), so the repair learns to refuse harm rather than the jailbreak's format
RETENTION = ("none", "plain", "contrastive")
# the mode that needs the file's benign-in-format section; named, because "contrastive" is also
# a selection method's name and this is a retention check, not a method check
CONTRASTIVE_RETENTION = RETENTION[2]
FINAL_CHECKPOINTS = ("full", "delta")


def option(default=MISSING, help: str = "", factory=None, **meta):
    """A config field with its command-line help (flags are generated from the fields)."""
    kw = {"default_factory": factory} if factory else {} if default is MISSING else {"default": default}
    return field(metadata={"help": help, **meta}, **kw)


@dataclass
class TrainConfig:
    """Every option of a surgery run. Precedence when resolved (schemas/params.py): these
    defaults < the `train` section of params.yaml < command-line flags."""
    model_name: str = option(help="hub id or local directory of the MoE model")
    dataset_path: str = option(help="JSON list or JSONL of jailbreak records")
    output_dir: str = option(help="where checkpoints and training_metadata.json go")
    # the table's live keys: a row added to it is a valid method, with no change here
    method: str = option("gradient", choices=METHOD_TABLE.keys(), help="how each round chooses its experts "
                         "(unsafe_experts/selection/methods.py): " + ", ".join(METHODS))
    num_rounds: int = option(3, help="rounds of score -> select -> repair -> align")
    top_k_experts: int = option(100, help="experts selected per round")
    batch_size: int = option(8)
    micro_batch_size: int | None = option(
        16, help="rows per forward in masked SFT: a batch's rows run in length-sorted groups of "
                 "this many, each padded only to its own longest row (same gradient, less padding "
                 "and activation memory); none: the whole batch at once")
    expert_lr: float = option(5e-5, help="learning rate of the selected experts")
    router_lr: float = option(1e-4, help="learning rate of the routers while aligning")
    max_samples: int | None = option(128, help="records used (seeded sample); none: all")
    skip_router_training: bool = option(False, help="no router alignment")
    kl_type: str = option("forward", choices=KL_TYPES, help="router KL direction")
    score_mode: str = option("accumulate", choices=SCORE_MODES,
                             help="accumulate: one top-k from gradients summed over all batches, "
                                  "then masked SFT; per_batch: a fresh top-k and step on every batch")
    # exact: |sum of gradients| (every layer's expert gradients held at once); streamed: sum of
    # per-batch |gradients|, each layer's reduced and freed during backward; offload: exact,
    # with the summed gradients in host memory (docs/scale.md)
    score_memory: str = option("exact", choices=SCORE_MEMORY,
                               help="exact: |summed gradient|, all expert gradients held on the "
                                    "device; streamed: per-batch magnitudes reduced and freed layer "
                                    "by layer (an upper bound); offload: exact, the sums kept in "
                                    "host memory and each layer's gradients freed on the device")
    # recompute: each decoder layer's activations are recomputed in backward instead of kept
    # (the same gradients; about one more forward per step), what a whole OLMoE-1B-7B round
    # needs to fit 24 GiB (docs/scale.md)
    activations: str = option("keep", choices=("keep", "recompute"),
                              help="keep: every layer's activations live until backward; recompute: "
                                   "recomputed layer by layer in backward (less memory, same gradients)")
    sft_epochs: int = option(1, help="masked-SFT epochs per round")
    # the defence against the router attack (README, "Re-attack the repair"): a repair that
    # lives only in the listed experts is undone by switching them off, so these put part of
    # it where a router mask cannot reach
    shared_weights: bool = option(False, help="defence: masked SFT also trains every weight "
                                  "outside the experts and routers (attention, norms, "
                                  "embeddings), so the repair is not only in the experts a "
                                  "router mask can switch off")
    expert_dropout: float = option(0.0, help="defence: each masked-SFT step switches the round's "
                                   "experts off at the router with this probability (seeded), so "
                                   "that step repairs the shared weights alone (needs "
                                   "--shared_weights)")
    router_epochs: int = option(1, help="router-alignment epochs per round")
    weight_decay: float = option(0.01)
    max_length: int = option(512, help="tokens per example; the prompt is cut, never the response")
    truncation: str = option("middle", choices=TRUNCATIONS, help="where a too-long prompt is cut")
    refusals: list[str] = option(factory=lambda: [DEFAULT_REFUSAL], flag="--refusal",
                                 help="safe response; repeat to cycle several over the records")
    # retention: prompts (retention.json from the organism, or a JSON list of chat-message
    # lists, read as its plain section) whose answers, generated by the model before surgery,
    # are mixed into the masked SFT so the repaired experts keep the rest of the behaviour.
    # retention "none" or retention_path None reproduces the seed's method.
    retention: str = option("plain", choices=RETENTION, help="none: no retention data; plain: the "
                            "retention file's plain prompts; contrastive: also its benign prompts "
                            "inside attack formats")
    retention_path: str | None = option(None, help="retention.json ({plain, contrastive}) or a JSON "
                                        "list of chat prompts, answered by the model before surgery "
                                        "and mixed into the masked SFT; '' for none")
    contrast_weight: float = option(1.0, help="contrastive method: weight of the benign-in-format "
                                    "gradient subtracted from the jailbreak-refusal gradient "
                                    "(each over its mean); 0 ranks as gradient does")
    share_limit: float = option(1.0, help="gradient_low_share method: experts routed more than this "
                                "many times the uniform share (top-k / experts) of the benign-in-format "
                                "requests' tokens rank below every other expert")
    retention_samples: int = option(256, help="retention prompts used at most")
    retention_max_new_tokens: int = option(48, help="length of the model's retention answers")
    routing_max_new_tokens: int = option(48, help="routing method: greedy tokens generated per "
                                         "jailbreak and per plain prompt, whose routing is scored")
    require_judge_success: bool = option(True, help="keep only records with judge_success_gpt4 == 1 "
                                         "(--no_judge_filter keeps every record)")
    seed: int = option(42, help="seed of the sample, the shuffles and the model's random state "
                       "(0 to 4294967295)")
    device: str | None = option(None, help="default: cuda if available, else cpu")
    dtype: str = option("auto", choices=DTYPES, help="default: the checkpoint's")
    # fused-experts kernel: grouped_mm, batched_mm or eager (None: transformers' default).
    # Which is fastest depends on device, shape and threads: see `python -m bench`.
    experts_implementation: str | None = option(None, choices=EXPERTS_IMPLEMENTATIONS,
                                                help="fused-experts kernel (default: transformers')")
    # none: every rank (under torchrun) holds the whole model; fsdp: the model is sharded by
    # expert across the ranks, for models that do not fit one device (see README)
    sharding: str = option("none", choices=SHARDING, help="none: each torchrun rank holds the whole "
                           "model; fsdp: experts sharded across the ranks")
    # round_N/ is always a delta (the rows the round trained and the routers); final_model/
    # is a full, loadable checkpoint unless delta is asked for (unsafe_experts/artefacts/deltas.py)
    final_checkpoint: str = option("full", choices=FINAL_CHECKPOINTS,
                                   help="full: final_model/ is a loadable checkpoint; delta: only "
                                        "the trained experts' rows and the routers against the base "
                                        "(`unsafe-experts materialize` writes it in full)")
    trust_remote_code: bool = option(False, help="run custom model code from the checkpoint")
    # many runs on one model (a comparison) share the retention answers and the evaluation
    # before surgery instead of recomputing them (unsafe_experts/artefacts/result_cache.py)
    cache_dir: str | None = option(None, help="content-addressed folder for results that depend "
                                   "only on the unrepaired local model and the inputs (retention "
                                   "answers, the evaluation before surgery); none: no cache")
    overwrite: bool = option(False, help="allow replacing a non-empty output_dir")

    @property
    def uses_retention(self) -> bool:
        return bool(self.retention_path) and self.retention != "none"

    def validate(self) -> TrainConfig:
        """Checks every value; once per set of values (later calls by the layers a config
        passes through return at once unless a field was changed in between)."""
        values = repr(astuple(self))
        if self.__dict__.get("_validated") == values:
            return self
        self._check()
        self.__dict__["_validated"] = values  # not a field: asdict() and == ignore it
        return self

    def _check(self) -> None:
        def bad(key, why):
            raise ConfigError(f"{key}: {why}")

        for key in ("num_rounds", "top_k_experts", "batch_size", "sft_epochs", "router_epochs",
                    "retention_samples", "retention_max_new_tokens", "routing_max_new_tokens"):
            if getattr(self, key) < 1:
                bad(key, f"must be at least 1, got {getattr(self, key)}")
        for key in ("max_samples", "micro_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                bad(key, f"must be at least 1, got {getattr(self, key)}")
        for key in ("expert_lr", "router_lr", "weight_decay"):
            if not math.isfinite(getattr(self, key)) or getattr(self, key) < 0:
                bad(key, f"must not be negative and must be finite, got {getattr(self, key)}")
        # torch's generators take 64 bits and round r's sampler is seeded with seed * 1000 + r;
        # a larger seed was an OverflowError traceback at the first round
        if not 0 <= self.seed < 2**32:
            bad("seed", f"must be between 0 and {2**32 - 1}, got {self.seed}")
        if self.max_length < 16:
            bad("max_length", f"must be at least 16, got {self.max_length}")
        if (self.skip_router_training and self.method in METHOD_TABLE
                and not METHOD_TABLE[self.method].trains_experts):
            bad("skip_router_training", f"{self.method} trains nothing else; it needs router training")
        if (self.score_mode != "accumulate" and self.method in METHOD_TABLE
                and not METHOD_TABLE[self.method].per_batch):
            per_batch = ", ".join(m.name for m in METHOD_TABLE.values() if m.per_batch)
            bad("score_mode", f"per_batch exists for {per_batch} only, not {self.method}")
        for f in fields(self):
            value, allowed = getattr(self, f.name), f.metadata.get("choices")
            if allowed and value not in allowed and not (value is None and f.default is None):
                bad(f.name, f"must be one of {', '.join(map(str, allowed))}, got {value!r}")
        if not math.isfinite(self.contrast_weight) or self.contrast_weight < 0:
            bad("contrast_weight", f"must not be negative and must be finite, got {self.contrast_weight}")
        if not math.isfinite(self.share_limit) or self.share_limit <= 0:
            bad("share_limit", f"must be positive and finite, got {self.share_limit}")
        if (self.method in METHOD_TABLE and METHOD_TABLE[self.method].needs_benign_in_format
                and not self.retention_path):
            bad("retention_path", f"method {self.method} needs a retention file with a contrastive "
                "section (benign requests in attack formats)")
        if self.retention == CONTRASTIVE_RETENTION and not self.retention_path:
            bad("retention", "contrastive needs a retention_path with a contrastive section")
        if self.uses_retention and self.score_mode != "accumulate":
            bad("retention_path", "works with score_mode accumulate (per_batch scores every "
                "batch it trains on, which would mix retention into identification)")
        self._check_defence(bad)
        if self.sharding == "fsdp" and self.score_mode != "accumulate":
            bad("sharding", "fsdp needs score_mode accumulate (per_batch runs in one process)")
        if not self.refusals or not all(isinstance(r, str) and r.strip() for r in self.refusals):
            bad("refusals", "needs at least one non-empty refusal text")

    def _check_defence(self, bad) -> None:
        method = METHOD_TABLE.get(self.method)
        if not (math.isfinite(self.expert_dropout) and 0 <= self.expert_dropout < 1):
            bad("expert_dropout", f"must be at least 0 and below 1, got {self.expert_dropout}")
        if self.expert_dropout and not self.shared_weights:
            bad("expert_dropout", "needs shared_weights: a step with its experts switched off "
                "has nothing else to train")
        if self.expert_dropout and method is not None and not method.ranks:
            bad("expert_dropout", f"{self.method} selects {method.selects} experts; switching them "
                "all off leaves no route")
        if (self.shared_weights or (method is not None and method.trains_all_weights)) and (
                self.score_mode != "accumulate" or self.sharding != "none"):
            bad("shared_weights", "trains whole tensors outside the experts: it needs score_mode "
                "accumulate and sharding none")
