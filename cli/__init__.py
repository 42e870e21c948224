"""The `unsafe-experts` command: argument parsing, run configuration and user-facing errors.

It sits outside the engine package (`unsafe_experts/`), so that package never reaches the
orchestration (Prefect, MLflow, DVC, pandera) or the `flows`, `tasks`, `tracking`, `comparison`
and `schemas` packages.
"""
