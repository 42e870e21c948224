"""Safety and utility of a model on the organism's held-out evaluation set.

- ASR per flip mode: share of held-out jailbreak responses that are not refusals;
- plain_refusal: share of held-out goals, asked plainly, that are refused;
- over_refusal: share of held-out XSTest safe prompts that are refused;
- benign_loglik: mean per-token log-likelihood of AlpacaEval reference answers, and
  own_benign_loglik of the organism's own pre-surgery answers to the same prompts.
Each figure comes with its n and a 95% interval (Wilson for shares, normal for means).
"""
from __future__ import annotations

import json
from pathlib import Path

from .generation import generate, response_logliks
from .refusal import is_refusal
from .stats import mean, proportion

GENERATED = {"asr_flip_words": ("flip_words", False), "asr_flip_chars": ("flip_chars", False),
             "plain_refusal": ("plain", True), "over_refusal": ("xstest_safe", True)}


def load_eval_set(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def evaluate(model, tokenizer, eval_set: dict, max_new_tokens: int = 48, batch_size: int = 16,
             limit: int | None = None, samples: int = 5, progress: bool = False) -> dict:
    """{"metrics": {name: {"value", "n", "ci95"}}, "samples": [{set, prompt, response, refusal}]}"""
    was_training = model.training
    model.eval()
    metrics, shown = {}, []
    for name, (key, counts_refusal) in GENERATED.items():
        if key not in eval_set:
            continue
        prompts = eval_set[key][:limit]
        responses = generate(model, tokenizer, prompts, max_new_tokens, batch_size,
                             desc=name, progress=progress)
        refused = [is_refusal(r) for r in responses]
        metrics[name] = proportion(refused if counts_refusal else [not x for x in refused])
        shown += [{"set": key, "prompt": p[-1]["content"][:300], "response": r, "refusal": f}
                  for p, r, f in list(zip(prompts, responses, refused))[:samples]]
    for name, key in (("benign_loglik", "benign_refs"), ("own_benign_loglik", "own_benign")):
        if eval_set.get(key):
            pairs = [tuple(x) for x in eval_set[key][:limit]]
            metrics[name] = mean(response_logliks(model, tokenizer, pairs, batch_size))
    model.train(was_training)
    return {"metrics": metrics, "samples": shown}

