"""`unsafe-experts validate PATH...`: check jailbreak datasets against the schema, listing every
bad record; files that pass are announced to a Prefect server when one is set (a served
pipeline's trigger)."""
from __future__ import annotations

import os
from pathlib import Path


def add_parser(sub) -> None:
    validate = sub.add_parser("validate", help="check jailbreak datasets; every bad record is listed")
    validate.add_argument("paths", nargs="+")
    validate.add_argument("--metrics", help="write record and problem counts here (JSON, for DVC)")


def _announce(paths) -> None:
    """Tells a Prefect server that these files passed validation (a served pipeline's trigger)."""
    from prefect.events import emit_event

    from flows.serve import DATASET_EVENT
    from unsafe_experts.records import file_digest

    for path in paths:
        digest = file_digest(path)
        emit_event(event=DATASET_EVENT, resource={"prefect.resource.id": f"unsafe-experts.dataset.{digest}",
                                                   "path": str(Path(path).resolve()), "digest": digest})
        print(f"{path}: announced to Prefect ({DATASET_EVENT})")


def run(args) -> int:
    from schemas.dataset import validate_file

    failed, summary = 0, {}
    for path in args.paths:
        report = validate_file(path)
        summary[str(path)] = {"records": report.rows, "problems": len(report.failures)}
        if report.ok:
            print(f"{path}: OK, {report.rows} records")
        else:
            failed += 1
            print(f"{path}: {len(report.failures)} problems in {report.rows} records")
            for line in report.lines():
                print(f"  {line}")
    if not failed and os.environ.get("PREFECT_API_URL"):
        _announce(args.paths)
    if args.metrics:
        from unsafe_experts.artefacts.atomic import write_json_atomic

        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.metrics, summary[str(args.paths[0])] if len(args.paths) == 1 else summary)
    return 1 if failed else 0
