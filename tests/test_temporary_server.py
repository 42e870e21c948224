"""Prefect's temporary API server as the CLI starts it (flows/temporary_server.py): nothing when
the user names a server, one error line when it does not come up. That it dies with a killed
run is `tests/test_resume.py::test_sigkill_takes_the_temporary_prefect_server_with_it`."""
import os

import pytest
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from flows.temporary_server import start_temporary_server
from unsafe_experts.config import ConfigError


def _children() -> set[int]:
    pid, found = os.getpid(), set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found |= {int(x) for x in f.read().split()}
    return found


@pytest.fixture
def no_server_yet(monkeypatch):
    # a session's test harness may have registered its server as Prefect's default
    monkeypatch.setattr(SubprocessASGIServer, "_instances", {})


def test_a_server_the_user_names_is_used_and_nothing_is_started(no_server_yet):
    before = _children()
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        start_temporary_server()
    assert SubprocessASGIServer._instances == {} and _children() == before


@pytest.mark.slow  # starts (and stops) a server process
def test_a_server_that_does_not_come_up_in_time_is_one_error(no_server_yet):
    before = _children()
    with temporary_settings({PREFECT_API_URL: None, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 0}):
        with pytest.raises(ConfigError, match="PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 set"):
            start_temporary_server()
    assert SubprocessASGIServer._instances == {}
    assert _children() == before  # stopped, not left behind
