"""`unsafe-experts robustness --model M`: re-attack a model (and its unrepaired reference, on
the same prompts) with every attack of the table at every budget; write the result, its plots
and the table, and log them on the surgery's MLflow run."""
from __future__ import annotations

import argparse
from pathlib import Path

from unsafe_experts.errors import ConfigError
from unsafe_experts.evaluation.evaluate import EvaluationConfig
from unsafe_experts.robustness.budgets import RobustnessConfig
from unsafe_experts.robustness.runner import ATTACKS

from .flags import add_fields, field_values

EVAL, ROBUST = "eval__", "robust__"
# evaluation options that mean nothing here: the robustness sample has its own limit, and the
# weights must be in this process (a server cannot be masked, steered or fine-tuned)
EVAL_SKIP = ("limit", "limit_seed", "samples", "rounds", "endpoint", "served_model",
             "lm_eval_tasks", "lm_eval_limit")


def add_parser(sub) -> None:
    p = sub.add_parser("robustness", argument_default=argparse.SUPPRESS,
                       help="re-attack a repaired model and its reference: router masks and "
                            "steering, prefill, GCG, fine-tuning, top-k, quantisation",
                       description="Attacks: " + "; ".join(f"{k}: {a.description}" for k, a in ATTACKS.items()))
    p.add_argument("--model", required=True, help="the repaired model (a run's final_model)")
    p.add_argument("--reference", help="the unrepaired model, attacked the same way on the same prompts")
    p.add_argument("--run_dir", help="the surgery's output folder: the expert list of router_known, "
                                     "and the MLflow run the results are logged on")
    p.add_argument("--params", help="take the evaluation and robustness sections of this params.yaml "
                                    "(flags win)")
    p.add_argument("--budgets", choices=("robustness", "comparison"), default="robustness",
                   help="which section of --params holds the attacks and budgets: robustness (the "
                        "demo's) or comparison (comparison.robustness, what `make compare` runs on "
                        "every compared surgery)")
    add_fields(p.add_argument_group("evaluation (EvaluationConfig)"), EvaluationConfig, skip=EVAL_SKIP, dest=EVAL,
               helps={"eval_set": "attack both models on the prompts of this eval_set.json (from "
                                  "`unsafe-experts organism`)",
                      "suite": "attack both models on this evaluation suite instead of an eval_set"})
    add_fields(p.add_argument_group("attacks and budgets (RobustnessConfig)"), RobustnessConfig, dest=ROBUST)
    out = p.add_argument_group("this run")
    out.add_argument("--out", help="the result (JSON: attack -> budget -> before/after metrics), "
                                   "rewritten after every attack; the table and the headline "
                                   "figures go beside it (.md, _headline.json)")
    out.add_argument("--plots", help="a folder for robustness_<attack>.png")
    out.add_argument("--experiment", help="MLflow experiment of the surgery run (default: "
                                          "tracking.experiment or unsafe-experts)")
    out.add_argument("--engine_only", action="store_true", help="no Prefect flow, no MLflow")
    out.add_argument("--trust_remote_code", action="store_true")
    out.add_argument("--quiet", action="store_true", help="no progress bars")


def resolve(args) -> tuple[EvaluationConfig, RobustnessConfig, str]:
    """Dataclass defaults < params.yaml sections < flags, checked."""
    from schemas.params import load_params

    options = vars(args)
    params = load_params(options["params"], check=False) if options.get("params") else None
    evaluation = {**(params.evaluation.model_dump() if params else {}),
                  **field_values(args, EvaluationConfig, EVAL)}
    if options.get("budgets", "robustness") == "comparison" and not params:
        raise ConfigError("--budgets comparison reads comparison.robustness: give --params")
    section = params and (params.comparison.robustness if options.get("budgets") == "comparison" else params.robustness)
    robust = {**(section.model_dump() if section else {}), **field_values(args, RobustnessConfig, ROBUST)}
    evaluation = EvaluationConfig(**{k: v for k, v in evaluation.items() if k not in ("endpoint", "served_model")})
    if not evaluation.eval_set and not evaluation.suite:
        raise ConfigError("--eval_set or --eval_suite is required (or --params with evaluation.eval_set)")
    experiment = options.get("experiment") or (params.tracking.experiment if params else "unsafe-experts")
    return evaluation.validate(), RobustnessConfig(**robust).validate(), experiment


def check_outputs(out: str | None, plots_dir: str | None, names: list[str]) -> None:
    """Where the run will write, checked before a model loads: each output is replaced by a
    rename, so a symbolic link there would be replaced too (it is refused instead), and a
    folder or a file in the way is named now rather than after an hour of attacks."""
    from tasks.robustness import summary_paths

    for path in [Path(out), *summary_paths(out)] if out else []:
        if path.is_symlink():
            raise ConfigError(f"--out: {path} is a symbolic link; give the path of a plain file")
        if path.is_dir():
            raise ConfigError(f"--out: {path} is a folder; give a file path")
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise ConfigError(f"--out: {parent} is a file, not a folder")
    if plots_dir and Path(plots_dir).exists() and not Path(plots_dir).is_dir():
        raise ConfigError(f"--plots: {plots_dir} is a file; give a folder")
    from reporting.robustness_report import plot_path

    for path in [plot_path(plots_dir, name) for name in names] if plots_dir else []:
        if path.is_symlink():  # a plot is saved by opening its path, which would write through
            raise ConfigError(f"--plots: {path} is a symbolic link; the run will not write through it")


def run(args) -> int:
    from unsafe_experts.evaluation.evaluate import evaluation_suite
    from unsafe_experts.models.architectures import moe_layers
    from unsafe_experts.robustness.runner import Target, check_attacks, check_reference, setup

    from .loading import load_model

    options = vars(args)
    evaluation, config, experiment = resolve(args)
    names = check_attacks(config.attacks)
    check_outputs(options.get("out"), options.get("plots"), names)
    if options.get("quiet"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    suite = evaluation_suite(evaluation)  # data and judges checked before a model loads
    trust = options.get("trust_remote_code", False)
    after = Target("after", *load_model(args.model, trust))
    after.layers = moe_layers(after.model)
    targets = [after]
    if options.get("reference"):
        before = Target("before", *load_model(options["reference"], trust))
        before.layers = moe_layers(before.model)
        check_reference(after, before)
        targets.append(before)
    checked = setup(suite, evaluation, config, names, after.layers, options.get("run_dir"))
    quiet = options.get("quiet", False)
    out, plots_dir = options.get("out"), options.get("plots")
    # every input is checked: from here on, what is done is written
    if options.get("engine_only"):
        return _engine_only(targets, checked, names, out, plots_dir, quiet)
    from flows.robustness import robustness_flow
    from flows.temporary_server import start_temporary_server
    from tasks.robustness import register

    start_temporary_server()
    done = robustness_flow(register(targets, checked, names), names, out, plots_dir, experiment,
                           options.get("run_dir"))
    _print_table(done["result"], out)
    where = f"MLflow run {done['mlflow_run_id']}" if done["mlflow_run_id"] else "no surgery run found in MLflow"
    print(f"{where}; result: {out or '(not written: no --out)'}; plots: {plots_dir or '(none)'}")
    return 0


def _print_table(result: dict, out: str | None) -> None:
    # the terminal's table; the markdown one (<out>.md, every figure) is over 200 columns wide
    from .tables import robustness_table

    print(robustness_table(result))
    print(f"\nafter: the repaired model, before: --reference; {result['setup']['limit']} prompts per set; "
          f"every figure: {Path(out).with_suffix('.md') if out else '(no --out)'}")


def _engine_only(targets, checked, names, out, plots_dir, quiet) -> int:
    from reporting.robustness_report import plots, table
    from tasks.robustness import save_result, write_summaries
    from unsafe_experts.robustness.runner import run_robustness

    def save(name, partial):
        if out:
            save_result(out, partial)

    result = run_robustness(targets, checked, names, progress=not quiet, on_attack=save)
    if plots_dir:
        plots(result, plots_dir)
    if out:
        write_summaries(result, out, table(result))
    _print_table(result, out)
    return 0
