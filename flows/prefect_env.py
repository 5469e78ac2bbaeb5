"""Prefect's settings for consort's processes, set before Prefect is imported (it reads them then):
state in the workspace, a tolerant start-up, offline, and a console without Prefect's shutdown noise."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from flows.console import verbosity

# The same shutdown also interrupts the server's database pool mid-rollback; SQLAlchemy logs that
# through the root logger (which PREFECT_LOGGING_SERVER_LEVEL does not reach) as an ERROR with a
# traceback. Only the server's aiosqlite pool uses this class: MLflow's stores use synchronous pools.
QUIET_LOGGERS = ("sqlalchemy.pool.impl.AsyncAdaptedQueuePool",)
# A failed flow or task logs its exception with a traceback; consort prints the cause itself, last,
# so the console shows the traceback only with -v.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def prefect_environment(ws_root: Path) -> None:
    """Settings Prefect reads at import: keep its state in the workspace, start-up tolerant, offline."""
    os.environ.setdefault("PREFECT_HOME", str(ws_root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The ephemeral server, stopped as the command exits, cancels its event recorder mid-flush
    # and logs that as an ERROR with tracebacks (~150 lines after a run with nothing to do); the
    # flow's own failures reach the console through the client, not the server's log.
    os.environ.setdefault("PREFECT_LOGGING_SERVER_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_LOGGING_SETTINGS_PATH", str(prefect_logging_config(ws_root / ".prefect")))
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prefect_logging_config(home: Path) -> Path:
    """Prefect's own logging.yml with QUIET_LOGGERS at CRITICAL, written where every Prefect process reads it."""
    import importlib.util

    import yaml

    from stages.io import write_text

    package = Path(importlib.util.find_spec("prefect").submodule_search_locations[0])
    config = yaml.safe_load((package / "logging" / "logging.yml").read_text())
    for name in QUIET_LOGGERS:
        config["loggers"][name] = {"level": "CRITICAL"}
    for name in () if verbosity() > 0 else RUN_LOGGERS:  # still sent to the Prefect API (its UI), not the console
        config["loggers"][name] = {**config["loggers"][name], "propagate": False}
    path = home / "logging.yml"
    write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def need_prefect_server() -> str | None:
    """The coordinator's Prefect API URL, or None after saying how to get one."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        print("consort: PREFECT_API_URL is not set: start `consort server` and export the URL it prints",
              file=sys.stderr)
    return url
