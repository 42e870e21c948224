"""`unsafe-experts serve`: the pipeline as a Prefect deployment, on the cron schedule of
params.yaml and triggered by newly validated datasets."""
from __future__ import annotations


def add_parser(sub) -> None:
    serve = sub.add_parser("serve", help="serve the pipeline as a Prefect deployment: the cron "
                           "schedule of params.yaml and a trigger on newly validated datasets")
    serve.add_argument("--params", default="params.yaml")


def run(args) -> None:
    from flows.serve import serve
    from flows.temporary_server import start_temporary_server

    start_temporary_server()
    serve(args.params)
