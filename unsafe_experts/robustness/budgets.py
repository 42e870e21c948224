"""What a robustness evaluation runs: which attacks, each with its budget axis, and on how many
prompts (params.yaml `robustness`, the `robustness` command's flags)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import option
from ..errors import ConfigError


@dataclass
class RobustnessConfig:
    """Defaults are the full budget axes; params.yaml's `robustness` section holds the demo's
    smaller ones (README, "Re-attack the repair")."""
    attacks: list[str] = option(factory=list, flag="--attack",
                                help="attacks to run, repeat for several (default: every one "
                                     "in the table; `unsafe-experts robustness --help` lists them)")
    limit: int | None = option(24, flag="--robust_limit",
                               help="prompts of each evaluation set per attack, a seeded sample "
                                    "(the rest of each set is the attacker's own split)")
    limit_seed: int = option(0, flag="--robust_limit_seed", help="seed of that sample")
    router_budgets: list[int] = option(factory=lambda: [1, 2, 4, 8, 16], flag="--router_budget",
                                       help="experts the router attacks switch off or force on")
    rank_prompts: int = option(256, flag="--rank_prompts",
                               help="attacker prompts generated to rank experts by routing")
    prefill_budgets: list[int] = option(factory=lambda: [1, 2, 4], flag="--prefill_budget",
                                        help="affirmative openings tried per request (success if "
                                             "any succeeds)")
    gcg_steps: list[int] = option(factory=lambda: [5, 20], flag="--gcg_step",
                                  help="GCG steps after which the suffix is evaluated")
    gcg_goals: int = option(8, flag="--gcg_goals", help="goals a GCG suffix is optimised for, "
                            "one suffix each")
    gcg_suffix_tokens: int = option(8, flag="--gcg_suffix_tokens", help="suffix length")
    gcg_top_k: int = option(32, flag="--gcg_top_k", help="tokens per position from the gradient")
    gcg_candidates: int = option(64, flag="--gcg_candidates", help="swaps scored per step")
    finetune_steps: list[int] = option(factory=lambda: [10, 40], flag="--finetune_step",
                                       help="steps of benign full-weight fine-tuning after which "
                                            "the model is evaluated")
    harmful_examples: list[int] = option(factory=lambda: [4, 16], flag="--harmful_examples",
                                         help="harmful (goal, compliance) pairs fine-tuned on")
    harmful_steps: int = option(20, flag="--harmful_steps",
                                help="steps of fine-tuning on the harmful pairs")
    finetune_lr: float = option(5e-4, flag="--finetune_lr", help="AdamW learning rate of both "
                                "fine-tuning attacks")
    top_k_deltas: list[int] = option(factory=lambda: [-1, 1], flag="--top_k_delta",
                                     help="experts per token at inference, minus/plus the model's")
    quantisations: list[str] = option(factory=lambda: ["bf16", "int8_dynamic", "int8_weights"],
                                      flag="--quantisation", help="bf16, int8_dynamic (torch's, "
                                      "nn.Linear only), int8_weights (every weight, experts too)")
    seed: int = option(0, flag="--robust_seed", help="seed of attacker samples and fine-tuning")

    # budget lists that must hold positive integers, and the attack each belongs to
    POSITIVE = ("router_budgets", "prefill_budgets", "gcg_steps", "finetune_steps", "harmful_examples")

    def validate(self) -> RobustnessConfig:
        for name in self.POSITIVE + ("top_k_deltas", "quantisations"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: an empty budget; give at least one value")
        for name in self.POSITIVE:
            bad = [v for v in getattr(self, name) if not isinstance(v, int) or v < 1]
            if bad:
                raise ConfigError(f"{name}: budgets must be positive integers, got {bad[0]!r}")
        if 0 in self.top_k_deltas:
            raise ConfigError("top_k_deltas: 0 is the model as it is; give -1, 1, ...")
        for name in ("rank_prompts", "gcg_goals", "gcg_suffix_tokens", "gcg_top_k", "gcg_candidates",
                     "harmful_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be at least 1, got {self.limit}")
        if not self.finetune_lr > 0:
            raise ConfigError(f"finetune_lr: must be positive, got {self.finetune_lr}")
        return self

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
