"""Run parameters of the gradient-based surgery, validated once before any work starts."""
from __future__ import annotations

from dataclasses import dataclass, field

from .examples import DEFAULT_REFUSAL
from .router_kl import KL_TYPES

SCORE_MODES = ("accumulate", "per_batch")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    model_name: str
    dataset_path: str
    output_dir: str
    num_rounds: int = 3
    top_k_experts: int = 100
    batch_size: int = 8
    expert_lr: float = 5e-5
    router_lr: float = 1e-4
    max_samples: int | None = 128
    skip_router_training: bool = False
    kl_type: str = "forward"
    score_mode: str = "accumulate"
    sft_epochs: int = 1
    router_epochs: int = 1
    weight_decay: float = 0.01
    max_length: int = 512
    truncation: str = "middle"
    refusals: list[str] = field(default_factory=lambda: [DEFAULT_REFUSAL])
    require_judge_success: bool = True
    seed: int = 42
    device: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    overwrite: bool = False

    def validate(self) -> "TrainConfig":
        def bad(key, why):
            raise ConfigError(f"{key}: {why}")

        for key in ("num_rounds", "top_k_experts", "batch_size", "sft_epochs", "router_epochs"):
            if getattr(self, key) < 1:
                bad(key, f"must be at least 1, got {getattr(self, key)}")
        if self.max_samples is not None and self.max_samples < 1:
            bad("max_samples", f"must be at least 1, got {self.max_samples}")
        for key in ("expert_lr", "router_lr", "weight_decay"):
            if getattr(self, key) < 0:
                bad(key, f"must not be negative, got {getattr(self, key)}")
        if self.max_length < 16:
            bad("max_length", f"must be at least 16, got {self.max_length}")
        choices = {"kl_type": KL_TYPES, "score_mode": SCORE_MODES, "dtype": DTYPES,
                   "truncation": ("middle", "left")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                bad(key, f"must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if not self.refusals or not all(isinstance(r, str) and r.strip() for r in self.refusals):
            bad("refusals", "needs at least one non-empty refusal text")
        return self
