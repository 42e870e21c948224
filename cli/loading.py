"""What `evaluate` and `ablate` share: their evaluation options and the model they read."""
from __future__ import annotations

from unsafe_experts.config import ConfigError
from unsafe_experts.evaluation import EvaluationConfig

from .flags import field_values


def evaluation_config(args) -> EvaluationConfig:
    cfg = EvaluationConfig(**field_values(args, EvaluationConfig, "eval__")).validate()
    if not cfg.eval_set:
        raise ConfigError("--eval_set is required")
    return cfg


def load_model(path: str, trust_remote_code: bool):
    """Model and tokenizer from safetensors only (checked before anything loads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unsafe_experts.surgery import check_weights

    check_weights(path)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
