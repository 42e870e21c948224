"""Prefect's temporary API server, started so that it dies with the process that runs the flow.

Without PREFECT_API_URL, Prefect starts a temporary server (uvicorn) as a child process and
stops it at exit. A process killed outright (SIGKILL, the OOM killer) runs no exit handler, so
that server lived on (parent 1, about 195 MB, still listening). Here the server is started by
this process instead, through a launcher that asks the Linux kernel to send it SIGTERM when its
parent dies (PR_SET_PDEATHSIG), and it is registered as Prefect's default temporary server so
that Prefect uses it rather than starting its own. With PREFECT_API_URL set (a real server),
nothing is started."""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

import prefect
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    get_current_settings,
)

from unsafe_experts.config import ConfigError

# Runs in the new process before uvicorn: asks for SIGTERM on the parent's death (which survives
# the exec), then checks that the parent did not die before the request took effect. Code given
# with -c rather than a preexec_fn: a preexec_fn runs Python between fork and exec, which is
# unsafe in a process that already has threads (torch's, Prefect's).
_LAUNCHER = """
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
    sys.exit("prctl(PR_SET_PDEATHSIG) failed: errno %d" % ctypes.get_errno())
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
os.execv(sys.executable, [sys.executable, "-m", "uvicorn", *sys.argv[2:]])
"""


class _FirstLineOnly(logging.Filter):
    """Prefect's "Starting temporary server on URL" without the line after it, a 124-character
    link to Prefect's docs that every command printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Starting temporary server"):
            record.msg = record.msg.split("\n", 1)[0]
        return True


class _ServerTiedToThisProcess(SubprocessASGIServer):
    """Prefect's temporary server (same app, settings and start-up checks) behind the launcher.
    Prefect calls `_run_uvicorn_command` to start it and again on a port clash; the test
    `tests/test_resume.py::test_sigkill_takes_the_temporary_prefect_server_with_it` fails if
    a Prefect upgrade stops calling it."""

    def _run_uvicorn_command(self) -> Any:
        import subprocess

        # the same command and environment as Prefect's own (prefect/server/api/server.py)
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1",
               **get_current_settings().to_environment_variables(exclude_unset=True)}
        uvicorn_args = ["--app-dir", str(prefect.__module_path__.parent), "--factory",
                        "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                        "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        return subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(os.getpid()), *uvicorn_args],
                                env=env)


def start_temporary_server() -> None:
    """Before a flow run: a temporary Prefect server tied to this process, unless the user's
    PREFECT_API_URL names a server, a server is already registered (an earlier flow in this
    process, a test harness), temporary servers are turned off (Prefect then says so itself),
    or the kernel cannot tie one (not Linux, or not the main thread: the kernel signals the
    death of the thread that started the server, and a worker thread may end long before the
    process; Prefect then starts its own, as before).

    Stopped at exit like Prefect's own (its `start` registers the atexit): after Prefect's log
    and event workers have drained, which stopping it when the flow returns would cut off."""
    if (PREFECT_API_URL.value() or SubprocessASGIServer._instances.get(None) is not None
            or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value() or not sys.platform.startswith("linux")
            or threading.current_thread() is not threading.main_thread()):
        return
    server = _ServerTiedToThisProcess()  # port None: Prefect's default instance from now on
    logger, short = logging.getLogger("prefect"), _FirstLineOnly()  # where Prefect logs it
    logger.addFilter(short)
    try:
        server.start()
    except RuntimeError as e:  # the start-up timeout, common on a loaded machine
        server.stop()
        now = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        # the value to try, not only the name: a loaded machine needs minutes, not seconds
        raise ConfigError(f"{e} The machine is too busy to start it in {now} s: run again with "
                          f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS={max(2 * now, 120)} "
                          "set, or point PREFECT_API_URL at a running server") from None
    finally:
        logger.removeFilter(short)
