"""What `evaluate`, `ablate` and `attack` share: the evaluation options and the model they read."""
from __future__ import annotations

from unsafe_experts.config import ConfigError
from unsafe_experts.evaluation import EvaluationConfig

from .flags import field_values


def evaluation_config(args) -> EvaluationConfig:
    cfg = EvaluationConfig(**field_values(args, EvaluationConfig, "eval__")).validate()
    if not cfg.eval_set:
        raise ConfigError("--eval_set is required")
    return cfg


def load_model(path: str, trust_remote_code: bool = False):
    """The model to evaluate, ablate or attack, from safetensors only (checked before anything
    loads), with its tokenizer; on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unsafe_experts.surgery import check_weights

    check_weights(path)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
