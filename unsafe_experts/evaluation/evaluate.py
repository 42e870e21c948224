"""Safety and utility of a model on an evaluation suite (suites.py), the one evaluation path:
`evaluate()` is what `unsafe-experts evaluate`, `ablate` and the pipeline (before surgery and
after each round) run. An organism's held-out eval set (`--eval_set`) is read as the organism
suite (suites.organism_suite) and evaluated by the same runner:

- asr_F per attack family F: share of held-out harmful goals in F not refused (a version-1
  eval set's `flip_words` / `flip_chars` give asr_flip_words / asr_flip_chars);
- over_refusal_F: share of held-out benign prompts (XSTest safe, AlpacaEval) in F refused,
  the control that tells a repair that refuses harm from one that refuses the format;
- plain_refusal: share of held-out goals, asked plainly, that are refused;
- over_refusal: share of held-out XSTest safe prompts that are refused;
- benign_loglik: mean per-token log-likelihood of AlpacaEval reference answers, and
  own_benign_loglik of the organism's own pre-surgery answers to the same prompts.
Each figure comes with its n and a 95% interval (Wilson for shares, normal for means); the
lm-eval tasks' metrics are added beside the suite's.

With `endpoint` the responses come from an OpenAI-compatible server (endpoint.py) and the
model is not loaded: the log-likelihoods and lm-eval tasks, which need the weights here, are
left out and named in the result's `left_out`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..errors import ConfigError
from ..stats import SPLITS
from ..text.endpoint import Endpoint
from .suites import EVAL_SET_TOKENS, Suite, load_eval_set, load_suite, run_suite


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
    split: str = option("test", flag="--eval_split", choices=SPLITS,
                        help="test: the --eval_limit sample every table reports; validation: as "
                             "many other prompts of each set, never in the test sample (for "
                             "choosing settings; needs --eval_limit)")
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

    def validate(self) -> EvaluationConfig:
        for key in ("max_new_tokens", "batch_size", "limit", "lm_eval_limit"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}: must be at least 1, got {value}")
        if self.samples < 0:
            raise ConfigError(f"samples: must not be negative, got {self.samples}")
        if self.eval_set and self.suite:
            raise ConfigError("eval_set and suite: give one of them, not both (an organism's "
                              "eval_set.json, or a suite such as its folder)")
        if self.split not in SPLITS:
            raise ConfigError(f"split: must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.split == "validation" and self.limit is None:
            raise ConfigError("split: validation needs a limit (--eval_limit): without one the test "
                              "sample is every prompt, and no prompt is left to validate on")
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


def evaluation_suite(config: EvaluationConfig) -> Suite:
    """The suite `config` names, checked and read before any model loads: its eval_set as the
    organism suite, or its suite."""
    if config.eval_set:
        return load_eval_set(config.eval_set)
    if config.suite:
        return load_suite(config.suite)
    raise ConfigError("eval_set or suite: give one (an organism's eval_set.json, or a suite)")


def is_evaluation_result(value) -> bool:
    """Whether `value` has the form evaluate() returns, as far as its readers rely on it
    (a cached result of an evaluation is checked against this before it is used)."""
    def figure(m) -> bool:
        return isinstance(m, dict) and type(m.get("value")) in (int, float) and isinstance(m.get("n"), int)

    return (isinstance(value, dict) and isinstance(value.get("metrics"), dict)
            and all(isinstance(name, str) and figure(m) for name, m in value["metrics"].items())
            and isinstance(value.get("samples"), list)
            and all(isinstance(x, dict) for x in value["samples"])
            and isinstance(value.get("left_out"), list))


def evaluate(model, tokenizer, suite: Suite, config: EvaluationConfig | None = None,
             progress: bool = False, endpoint: Endpoint | None = None,
             judges: dict | None = None) -> dict:
    """A loaded suite (evaluation_suite, suites.load_suite) under `config`'s max_new_tokens
    (when set, instead of the suite's), batch size, limit and samples, then its lm-eval tasks:
    the result of suites.run_suite, {"suite", "metrics": {name: {"value", "n", "ci95"}},
    "samples": [{set, kind, prompt, response, complied}], "left_out": [metric names]}, with the
    utility metrics added. `model` may be None when a server generates (`endpoint`, or
    config.endpoint)."""
    config = config or EvaluationConfig()
    endpoint = endpoint or connect(config)
    result = run_suite(model, tokenizer, suite, max_new_tokens=config.max_new_tokens,
                       batch_size=config.batch_size, limit=config.limit, limit_seed=config.limit_seed,
                       split=config.split,
                       samples=config.samples, judges=judges,
                       progress=progress, endpoint=endpoint)
    _utility(model, tokenizer, config, result["metrics"], result["left_out"])
    return result


def _utility(model, tokenizer, config: EvaluationConfig, metrics: dict, left_out: list) -> None:
    """The lm-eval tasks' metrics, added to `metrics` (or named in `left_out` without weights),
    with the model in eval mode as the suite ran it."""
    if config.lm_eval_tasks and model is None:
        left_out += config.lm_eval_tasks
    elif config.lm_eval_tasks:
        from .lm_eval_utility import run_lm_eval

        metrics.update(run_lm_eval(model, tokenizer, config.lm_eval_tasks, config.lm_eval_limit,
                                   config.batch_size))
