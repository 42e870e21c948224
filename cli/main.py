"""`unsafe-experts`: train, register, attack, validate, evaluate, robustness, compare, grid, serve, report,
materialize, and the offline demo inputs (organism, tiny-model, flip-dataset). Every failure the
user can fix is one `error:` line and exit status 2."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from unsafe_experts.errors import UserError

from . import (
    ablate,
    attack,
    compare,
    evaluate,
    flip_dataset,
    grid,
    materialize,
    organism,
    register,
    report,
    robustness,
    serve,
    tiny_model,
    train,
    validate,
)
from .prefect_defaults import default_startup_timeout
from .quiet import quiet_progress

# one module per command, each with add_parser(sub) and run(args); --help and docs/cli.md list
# the commands in this order
COMMANDS = (train, ablate, attack, register, tiny_model, flip_dataset, validate, organism, evaluate,
            robustness, compare, grid, serve, report, materialize)
# every engine error the user can fix derives from UserError; a file the OS refuses is one too
USER_ERRORS = (UserError, OSError)


def parser() -> tuple[argparse.ArgumentParser, dict]:
    """The argument parser and command name -> its module's run."""
    p = argparse.ArgumentParser(prog="unsafe-experts", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    handlers = {}
    for command in COMMANDS:
        before = set(sub.choices)
        command.add_parser(sub)
        (name,) = set(sub.choices) - before  # the name lives in one place: the module's parser
        handlers[name] = command.run
    return p, handlers


def _exit_on_sigterm(signum, frame):
    # SIGTERM's default action ends the process at once: no `finally`, no atexit, so Prefect's
    # temporary API server (a child process) lived on and the metadata stayed "running".
    # As an exception, the run records its failure and the server is stopped on the way out.
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    p, handlers = parser()
    args = p.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    handler = handlers[args.__dict__.pop("command")]
    default_startup_timeout()  # before any command imports Prefect, which reads it once
    try:
        with quiet_progress(getattr(args, "quiet", False)):
            return handler(args) or 0
    except USER_ERRORS as e:
        # one line, even when a library's message spans several
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
