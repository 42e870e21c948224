"""What `evaluate`, `ablate` and `attack` share: the evaluation options and the model they read
(or, with --endpoint, only its tokenizer: a server holds the weights)."""
from __future__ import annotations

from unsafe_experts.config import ConfigError
from unsafe_experts.evaluation.evaluate import EvaluationConfig

from .flags import field_values

# the flags that send generation to a server; `train` and `ablate` go without them, since
# they evaluate weights changed in this process, which a server never sees
ENDPOINT_FIELDS = ("endpoint", "served_model")


def evaluation_config(args) -> EvaluationConfig:
    cfg = EvaluationConfig(**field_values(args, EvaluationConfig, "eval__")).validate()
    if not cfg.eval_set:
        raise ConfigError("--eval_set is required")
    return cfg


def load_model(path: str, trust_remote_code: bool = False):
    """The model to evaluate, ablate or attack, with its tokenizer, on the GPU when there is
    one: a full checkpoint from safetensors only (checked before anything loads), or a run's
    delta checkpoint (round_N/) materialized in memory on its base."""
    import torch

    from unsafe_experts.artefacts.checkpoints import load_checkpoint

    model, tokenizer = load_checkpoint(path, trust_remote_code)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, tokenizer


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer alone: what rendering chat prompts for a server needs from --model."""
    from unsafe_experts.artefacts.checkpoints import checkpoint_tokenizer

    return checkpoint_tokenizer(path, trust_remote_code)


def load_target(path: str, trust_remote_code: bool, endpoint) -> tuple:
    """(model, tokenizer) to generate in process, or (None, tokenizer) when `endpoint` does."""
    if endpoint is not None:
        return None, load_tokenizer(path, trust_remote_code)
    return load_model(path, trust_remote_code)
