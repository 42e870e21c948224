"""`unsafe-experts`: train, register, attack, validate, evaluate, compare, serve, report,
materialize, and the offline demo inputs (organism, tiny-model, flip-dataset). Every failure the
user can fix is one `error:` line and exit status 2."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from unsafe_experts.errors import UserError

from . import ablate, attack, commands, register, train

# every engine error the user can fix derives from UserError; a file the OS refuses is one too
USER_ERRORS = (UserError, OSError)


def parser() -> tuple[argparse.ArgumentParser, dict]:
    p = argparse.ArgumentParser(prog="unsafe-experts", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    train.add_parser(sub)
    ablate.add_parser(sub)
    attack.add_parser(sub)
    register.add_parser(sub)
    handlers = {"train": train.run, "ablate": ablate.run, "attack": attack.run, "register": register.run,
                **commands.add_parsers(sub)}
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
    try:
        return handler(args) or 0
    except USER_ERRORS as e:
        # one line, even when a library's message spans several
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
