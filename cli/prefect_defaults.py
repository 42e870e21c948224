"""The Prefect setting the CLI gives a value of its own when the user has given none: the
temporary API server's start-up time. Prefect's default (20 s) is too short on a loaded machine
(a CLI command failed with "Timed out while attempting to connect to ephemeral Prefect API
server"); the Makefile and the tests already ran with 120 s, a bare `unsafe-experts` did not."""
from __future__ import annotations

import os
from pathlib import Path

STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_S = 120


def _settings_files(environ) -> list[Path]:
    """Where Prefect reads settings besides the environment: the profiles file, and .env,
    prefect.toml and pyproject.toml in the working directory."""
    home = Path(environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    profiles = Path(environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    return [profiles, Path(".env"), Path("prefect.toml"), Path("pyproject.toml")]


def _named_in(path: Path) -> bool:
    # a profile names it PREFECT_SERVER_EPHEMERAL_..., a TOML table startup_timeout_seconds
    try:
        return "startup_timeout_seconds" in path.read_text(errors="replace").lower()
    except OSError:
        return False


def default_startup_timeout(environ=None) -> None:
    """Set the start-up time to DEFAULT_STARTUP_S in the environment, before Prefect reads its
    settings, unless the user set it: in the environment or in any of Prefect's settings files
    (an environment variable would override a profile's value, so a profile that names it at
    all is left to Prefect)."""
    environ = os.environ if environ is None else environ
    if STARTUP_TIMEOUT in environ or any(_named_in(p) for p in _settings_files(environ)):
        return
    environ[STARTUP_TIMEOUT] = str(DEFAULT_STARTUP_S)
