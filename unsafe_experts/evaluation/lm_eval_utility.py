"""Utility through lm-eval (EleutherAI's lm-evaluation-harness, MIT): its tasks run on the
in-memory model (`simple_evaluate` over an `HFLM` wrapper), so the pipeline can report MMLU,
GSM8K or TruthfulQA before and after surgery for users with the hub, and a bundled local task
(`benign_choice`) exercises the same path offline.

`benign_choice`: an AlpacaEval instruction with its reference answer and three other
instructions' answers as choices; accuracy is how often the model gives the reference the
highest log-likelihood (lm-eval's multiple-choice `acc`). It is generated at run time from the
bundled AlpacaEval subset (CC BY-NC 4.0), because an lm-eval task names its data by path.
Its items are not split against the demo organism's training pairs: it checks the lm-eval
path end to end, and is no held-out utility measure (benign_loglik is, in evaluation.py).
"""
from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from ..data.bundled import alpaca_pairs
from ..errors import ConfigError
from ..models.modes import eval_mode
from ..stats import Z95

LOCAL_TASKS = ("benign_choice",)
TASK_YAML = """task: benign_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Instruction: {{{{instruction}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def benign_choice_docs(n: int = 100, seed: int = 0) -> list[dict]:
    """Multiple-choice items from the last `n` bundled AlpacaEval pairs (the organism trains on
    the first ones), each with three distractor answers from other items."""
    pairs = alpaca_pairs()[-n:]
    rng = random.Random(seed)
    docs = []
    for i, pair in enumerate(pairs):
        others = rng.sample([p["output"] for j, p in enumerate(pairs) if j != i], 3)
        label = rng.randrange(4)
        choices = others[:label] + [pair["output"]] + others[label:]
        docs.append({"instruction": pair["instruction"], "choices": choices, "label": label})
    return docs


def _local_tasks(folder: Path) -> None:
    data = folder / "benign_choice.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in benign_choice_docs()))
    (folder / "benign_choice.yaml").write_text(TASK_YAML.format(data=json.dumps(str(data))))


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None,
                batch_size: int = 8) -> dict:
    """{"lmeval_<task>_<metric>": {"value", "n", "ci95", "stderr"}} for every task's metrics
    (the interval from lm-eval's own standard error)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:  # an environment without the pinned requirements
        raise ConfigError(f"lm_eval_tasks: lm-eval is not installed ({e})") from None
    with tempfile.TemporaryDirectory() as tmp:
        _local_tasks(Path(tmp))
        manager = TaskManager(include_path=tmp)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ConfigError(f"lm_eval_tasks: unknown task(s) {', '.join(unknown)} (local tasks: "
                              f"{', '.join(LOCAL_TASKS)}; hub tasks such as mmlu need their data)")
        with eval_mode(model):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      log_samples=False, bootstrap_iters=1000)
    out = {}
    for task, values in results["results"].items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in values.items():
            metric, _, _filter = key.partition(",")
            if metric.endswith("_stderr") or metric == "sample_len" or not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{metric}_stderr,{_filter}")
            stderr = stderr if isinstance(stderr, (int, float)) else float("nan")
            out[f"lmeval_{task}_{metric}"] = {"value": float(value), "n": n, "stderr": stderr,
                                              "ci95": [value - Z95 * stderr, value + Z95 * stderr]}
    return out
