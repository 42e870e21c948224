"""Safety and utility of a model on the organism's held-out evaluation set.

- asr_F per attack family F: share of held-out harmful goals in F not refused (the
  version-1 sets `flip_words` / `flip_chars` give asr_flip_words / asr_flip_chars when the
  eval set has no `families`; with it, the same names come from the family sets);
- over_refusal_F: share of held-out benign prompts (XSTest safe, AlpacaEval) in F refused,
  the control that tells a repair that refuses harm from one that refuses the format;
- plain_refusal: share of held-out goals, asked plainly, that are refused;
- over_refusal: share of held-out XSTest safe prompts that are refused;
- benign_loglik: mean per-token log-likelihood of AlpacaEval reference answers, and
  own_benign_loglik of the organism's own pre-surgery answers to the same prompts.
Each figure comes with its n and a 95% interval (Wilson for shares, normal for means).

Or, with `suite`, on an evaluation suite (suites.py): `evaluate_suite` is what both
`unsafe-experts evaluate --suite` and the pipeline (`evaluation.suite`) run. An organism's
folder read as a suite (suites.organism_suite) holds the same sets as its eval_set.json under
the same metric names.

With `endpoint` the responses come from an OpenAI-compatible server (endpoint.py) and the
model is not loaded: the log-likelihoods and lm-eval tasks, which need the weights here, are
left out and named in the result's `left_out`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import option
from ..errors import ConfigError
from ..text.endpoint import Endpoint
from ..text.generation import generate, response_logliks
from ..text.refusal import is_refusal
from ..stats import mean, proportion, subset

EVAL_SET_TOKENS = 48  # tokens per prompt on an eval_set when max_new_tokens is not set
LEGACY = {"asr_flip_words": "flip_words", "asr_flip_chars": "flip_chars"}
PLAIN = {"plain_refusal": "plain", "over_refusal": "xstest_safe"}


@dataclass
class EvaluationConfig:
    """The one source of evaluation defaults (params.yaml `evaluation`, the CLI and the flow)."""
    eval_set: str | None = option(None, flag="--eval_set", help="evaluate before surgery and after "
                                  "every round on this eval_set.json (from `unsafe-experts organism`)")
    suite: str | None = option(None, flag="--eval_suite",
                               help="evaluate before surgery and after every round on this "
                                    "evaluation suite instead of an eval_set: a suite YAML file, "
                                    "an organism's folder or a bundled suite's name (organism: "
                                    "build/organism; standard)")
    # None, so that a suite's own max_new_tokens applies unless this is set
    max_new_tokens: int | None = option(None, flag="--eval_max_new_tokens",
                                        help="tokens generated per prompt (none: the suite's "
                                             f"max_new_tokens, {EVAL_SET_TOKENS} on an eval_set)")
    batch_size: int = option(16, flag="--eval_batch_size", help="prompts generated at once")
    limit: int | None = option(None, flag="--eval_limit",
                               help="N prompts of each set, a sample seeded by --eval_limit_seed "
                                    "and kept in file order (none: all)")
    limit_seed: int = option(0, flag="--eval_limit_seed",
                             help="seed of the --eval_limit sample: the same seed scores every "
                                  "run on the same prompts; another seed, another sample")
    samples: int = option(5, flag="--eval_samples",
                          help="prompts and responses per set kept as an MLflow table")
    lm_eval_tasks: list[str] = option(factory=list, flag="--lm_eval_task",
                                      help="lm-eval task run on the model at every evaluation; "
                                           "repeat for several (benign_choice is bundled; mmlu, "
                                           "gsm8k, truthfulqa_mc2 need the hub)")
    lm_eval_limit: int | None = option(None, flag="--lm_eval_limit",
                                       help="first N items of each lm-eval task (none: all)")
    # a comparison of many runs needs only before and after; every round is the demo's view
    rounds: str = option("every", choices=("every", "last"), flag="--eval_rounds",
                         help="every: evaluate after every round; last: after the last round only "
                              "(always before surgery too)")
    endpoint: str | None = option(None, flag="--endpoint",
                                  help="generate through this OpenAI-compatible server (vLLM, "
                                       "SGLang, TGI, transformers serve), e.g. "
                                       "http://localhost:8000/v1, as many requests at a time "
                                       "as the batch size; --model then gives the tokenizer and "
                                       "chat template only, and log-likelihoods are left out")
    served_model: str | None = option(None, flag="--served_model",
                                      help="with --endpoint: the model's name on the server, as "
                                           "its /v1/models lists it")

    def validate(self) -> "EvaluationConfig":
        for key in ("max_new_tokens", "batch_size", "limit", "lm_eval_limit"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}: must be at least 1, got {value}")
        if self.samples < 0:
            raise ConfigError(f"samples: must not be negative, got {self.samples}")
        if self.eval_set and self.suite:
            raise ConfigError("eval_set and suite: give one of them, not both (an organism's "
                              "eval_set.json, or a suite such as its folder)")
        if self.rounds not in ("every", "last"):
            raise ConfigError(f"rounds: must be one of every, last, got {self.rounds!r}")
        if bool(self.endpoint) != bool(self.served_model):
            raise ConfigError("endpoint and served_model go together: the server's URL and the "
                              "name it serves the model under")
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint: an http:// or https:// URL, got {self.endpoint!r}")
        return self


def connect(config: EvaluationConfig) -> Endpoint | None:
    """The checked server of `config` (None: generate in process), one request per prompt and
    batch_size of them at a time."""
    if not config.endpoint:
        return None
    return Endpoint(config.endpoint, config.served_model, config.batch_size).check()


def load_eval_set(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def generated_sets(eval_set: dict) -> list[tuple[str, str, str, list, bool]]:
    """(metric, family, set name, prompts, whether the metric counts refusals) for every set
    that is answered by generation; each metric computed once."""
    out = []
    families = eval_set.get("families", {})
    for name, key in LEGACY.items():
        if key in eval_set and key not in families:
            out.append((name, key, key, eval_set[key], False))
    for family, sets in families.items():
        out.append((f"asr_{family}", family, f"{family}/harmful", sets["harmful"], False))
        out.append((f"over_refusal_{family}", family, f"{family}/benign", sets["benign"], True))
    for name, key in PLAIN.items():
        if key in eval_set:
            out.append((name, "plain", key, eval_set[key], True))
    return out


def evaluate(model, tokenizer, eval_set: dict, config: EvaluationConfig | None = None,
             progress: bool = False, endpoint: Endpoint | None = None) -> dict:
    """{"metrics": {name: {"value", "n", "ci95"}},
    "samples": [{set, family, prompt, response, refusal}], "left_out": [metric names]}.
    `model` may be None when a server generates (`endpoint`, or config.endpoint)."""
    config = config or EvaluationConfig()
    max_new_tokens, batch_size, limit, samples = (config.max_new_tokens or EVAL_SET_TOKENS,
                                                  config.batch_size, config.limit, config.samples)
    endpoint = endpoint or connect(config)
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    metrics, shown, left_out = {}, [], []
    for name, family, key, prompts, counts_refusal in generated_sets(eval_set):
        prompts = subset(prompts, limit, config.limit_seed)
        responses = generate(model, tokenizer, prompts, max_new_tokens, batch_size,
                             desc=name, progress=progress, endpoint=endpoint)
        refused = [is_refusal(r) for r in responses]
        metrics[name] = proportion(refused if counts_refusal else [not x for x in refused])
        shown += [{"set": key, "family": family, "prompt": p[-1]["content"][:300], "response": r,
                   "refusal": f} for p, r, f in list(zip(prompts, responses, refused))[:samples]]
    for name, key in (("benign_loglik", "benign_refs"), ("own_benign_loglik", "own_benign")):
        if eval_set.get(key) and model is None:
            left_out.append(name)
        elif eval_set.get(key):
            pairs = [tuple(x) for x in subset(eval_set[key], limit, config.limit_seed)]
            metrics[name] = mean(response_logliks(model, tokenizer, pairs, batch_size))
    _utility(model, tokenizer, config, metrics, left_out)
    if model is not None:
        model.train(was_training)
    return {"metrics": metrics, "samples": shown, "left_out": left_out}


def _utility(model, tokenizer, config: EvaluationConfig, metrics: dict, left_out: list) -> None:
    """The lm-eval tasks' metrics, added to `metrics` (or named in `left_out` without weights)."""
    if config.lm_eval_tasks and model is None:
        left_out += config.lm_eval_tasks
    elif config.lm_eval_tasks:
        from .lm_eval_utility import run_lm_eval

        metrics.update(run_lm_eval(model, tokenizer, config.lm_eval_tasks, config.lm_eval_limit,
                                   config.batch_size))


def evaluate_suite(model, tokenizer, suite, config: EvaluationConfig | None = None,
                   progress: bool = False, endpoint: Endpoint | None = None,
                   trust_remote_code: bool = False, judges: dict | None = None) -> dict:
    """A loaded suite (suites.load_suite) under `config`'s max_new_tokens (when set, instead of
    the suite's), batch size, limit and samples, then its lm-eval tasks: the result of
    suites.run_suite with the utility metrics added. What `evaluate --suite` and the
    pipeline's `evaluation.suite` both run."""
    from .suites import run_suite

    config = config or EvaluationConfig()
    endpoint = endpoint or connect(config)
    result = run_suite(model, tokenizer, suite, max_new_tokens=config.max_new_tokens,
                       batch_size=config.batch_size, limit=config.limit, limit_seed=config.limit_seed,
                       samples=config.samples,
                       judges=judges, trust_remote_code=trust_remote_code, progress=progress,
                       endpoint=endpoint)
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    _utility(model, tokenizer, config, result["metrics"], result["left_out"])
    if model is not None:
        model.train(was_training)
    return result

