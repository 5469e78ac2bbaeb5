"""The child processes a command starts (servers, trace services, the UI): one supervisor waits on
them and stops them all, whether one of them ends, Ctrl-C is pressed or SIGTERM arrives."""
from __future__ import annotations

import signal
import subprocess
import sys
import time


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """`kill` or a supervisor's SIGTERM (systemd, `docker stop`) stops a command as Ctrl-C does."""
    signal.signal(signal.SIGTERM, _interrupt)


def supervise(procs: dict[str, subprocess.Popen], stopped: str, watched: tuple[str, ...] = ()) -> int:
    """Wait while every watched child (default: all) runs. 1 when one ends, after printing `stopped`
    with {names} filled in; 0 on Ctrl-C or SIGTERM. Every child is stopped on the way out."""
    from tracing.coordinator import stop_services

    stop_on_sigterm()
    watched = watched or tuple(procs)
    try:
        while all(procs[name].poll() is None for name in watched):
            time.sleep(0.5)
        dead = [name for name in watched if procs[name].poll() is not None]
        print(stopped.format(names=" and ".join(dead)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_services(procs)
