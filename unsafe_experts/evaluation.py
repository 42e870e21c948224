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
"""
from __future__ import annotations

import json
from pathlib import Path

from .generation import generate, response_logliks
from .refusal import is_refusal
from .stats import mean, proportion

LEGACY = {"asr_flip_words": "flip_words", "asr_flip_chars": "flip_chars"}
PLAIN = {"plain_refusal": "plain", "over_refusal": "xstest_safe"}


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


def evaluate(model, tokenizer, eval_set: dict, max_new_tokens: int = 48, batch_size: int = 16,
             limit: int | None = None, samples: int = 5, progress: bool = False) -> dict:
    """{"metrics": {name: {"value", "n", "ci95"}},
    "samples": [{set, family, prompt, response, refusal}]}"""
    was_training = model.training
    model.eval()
    metrics, shown = {}, []
    for name, family, key, prompts, counts_refusal in generated_sets(eval_set):
        prompts = prompts[:limit]
        responses = generate(model, tokenizer, prompts, max_new_tokens, batch_size,
                             desc=name, progress=progress)
        refused = [is_refusal(r) for r in responses]
        metrics[name] = proportion(refused if counts_refusal else [not x for x in refused])
        shown += [{"set": key, "family": family, "prompt": p[-1]["content"][:300], "response": r,
                   "refusal": f} for p, r, f in list(zip(prompts, responses, refused))[:samples]]
    for name, key in (("benign_loglik", "benign_refs"), ("own_benign_loglik", "own_benign")):
        if eval_set.get(key):
            pairs = [tuple(x) for x in eval_set[key][:limit]]
            metrics[name] = mean(response_logliks(model, tokenizer, pairs, batch_size))
    model.train(was_training)
    return {"metrics": metrics, "samples": shown}

