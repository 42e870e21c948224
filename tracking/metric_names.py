"""MLflow names of a surgery's figures: `<section>/<name>`, because MLflow's run page groups its
charts into sections by the part before the first `/` (a flat list of 40 names sorted
alphabetically hides the headline among single-value bars). The files (metrics/*.json,
training_metadata.json, the evaluation table artifact) keep the evaluation's own names.

    headline/<figure>      the six headline figures (unsafe_experts/evaluation/headline.py)
    asr/<family>           attack success per attack family
    benign_refused/<fam>   benign requests inside an attack format refused, per family
    benign_refused/xstest_plain   XSTest's safe prompts, asked plainly, refused
    refusal/plain          harmful goals asked plainly refused (refusal/<set>: a suite's)
    utility/<name>         log-likelihoods of benign answers and their change
    locality/, run/, training/   the locality check, times and memory, the last losses
    before/<any of those>  the value before surgery (a figure's history is the rounds)
"""
from __future__ import annotations

BEFORE = "before/"
HEADLINE = "headline/"
SUMMARY = {"rounds": "run", "total_s": "run", "identify_s": "run", "identify_peak_memory_mb": "run",
           "final_sft_loss": "training", "final_router_kl": "training",
           "jaccard_last_two_rounds": "training",
           "experts_changed": "locality", "routers_changed": "locality"}
# evaluate.py / suites.py prefixes (suites.PREFIXES)
PREFIXES = [("over_refusal_", "benign_refused/"), ("asr_", "asr/"), ("refusal_", "refusal/"),
            ("answered_", "answered/")]
FIXED = {"over_refusal": "benign_refused/xstest_plain", "plain_refusal": "refusal/plain",
         "locality_ok": "locality/ok"}


def mlflow_name(name: str) -> str:
    """The MLflow name of a figure, an evaluation's (`asr_persona`) or the run summary's
    (`locality_ok`, `asr_persona_before`); a name that already has a section stays as it is."""
    if "/" in name:
        return name
    if name.endswith("_before"):
        return BEFORE + mlflow_name(name[:-len("_before")])
    if name in FIXED:
        return FIXED[name]
    if name in SUMMARY:
        return f"{SUMMARY[name]}/{name}"
    if name.endswith("loglik") or name.endswith("loglik_change") or name.startswith("loglik_"):
        return "utility/" + name
    for prefix, section in PREFIXES:
        if name.startswith(prefix):
            return section + name[len(prefix):]
    return "eval/" + name  # an lm-eval task's metric, or a figure added later


def mlflow_names(values: dict[str, float]) -> dict[str, float]:
    return {mlflow_name(k): v for k, v in values.items()}


def headline_names(figures: dict[str, float]) -> dict[str, float]:
    return {HEADLINE + k: v for k, v in figures.items()}
