"""What a pipeline run shows while it runs: one line per running stage, then one per finished one.

Stages write their output to their own log files (stages/runtime.py); here the last progress
line of each running stage's log is shown beside its name and elapsed time. On a terminal the
lines of running stages redraw in place (rich); elsewhere (CI, a log file) a line is printed
when a stage starts and when it ends, so nothing redraws.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from stages.runtime import log_file

OUTCOMES = {"ran": "ran", "restored": "restored", "cached": "up to date", "failed": "FAILED"}
VERBOSITY_VARIABLE = "CONSORT_VERBOSITY"  # `consort -q` sets -1, `-v` 1: read by the console of a run


def verbosity() -> int:
    """-1: failures and the summary only; 0: a line per stage; 1: also each finished stage's log tail."""
    return int(os.environ.get(VERBOSITY_VARIABLE, "0"))


def stage_line(result: dict, suffix: str = "") -> str:
    """A stage's line in a run's summary. Results from owners' workers may say only whether it ran."""
    outcome = result.get("outcome") or ("ran" if result["ran"] else "cached")
    return f"  {OUTCOMES[outcome]:<10} {result['stage']:<30} {result['seconds']:7.1f} s{suffix}"


def last_line(path: Path, limit: int = 4096) -> str:
    """The newest progress-bar line of a log (bars redraw with carriage returns), else its newest line:
    a warning printed after the bar's last redraw says less about where the stage is."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - limit))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.replace("\r", "\n").splitlines() if ln.strip()]
    bars = [ln for ln in lines if "%|" in ln]
    return (bars or lines or [""])[-1]


def log_tail(path: Path, lines: int = 25) -> str:
    """The last lines of a stage's log, progress-bar redraws collapsed to their final state."""
    try:
        with path.open(errors="replace", newline="") as fh:  # keeps the carriage returns
            text = fh.read()
    except OSError:
        return ""
    kept = [ln.rstrip("\r").rsplit("\r", 1)[-1] for ln in text.split("\n") if ln.strip()]
    return "\n".join(kept[-lines:])


class StageConsole:
    """Thread-safe: Prefect runs stages in threads, each reporting its own start and end."""

    def __init__(self, workspace: Path, stream=None) -> None:
        self.workspace, self.level = workspace, verbosity()
        self.console = Console(file=stream or sys.stdout, highlight=False)
        self.running: dict[str, float] = {}
        self.lock = threading.Lock()
        self.live: Live | None = None

    def __enter__(self) -> StageConsole:
        if self.console.is_terminal and self.level >= 0:
            self.live = Live(self._table(), console=self.console, refresh_per_second=2, transient=True,
                             get_renderable=self._table)
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()

    def _table(self) -> Table:
        with self.lock:
            running = sorted(self.running.items(), key=lambda kv: kv[1])
        # One line per stage: the name and time whole, the progress cut at the terminal's edge.
        table = Table.grid(padding=(0, 2))
        table.add_column(no_wrap=True, min_width=max((len(s) for s, _ in running), default=0))
        table.add_column(no_wrap=True, justify="right", min_width=6)
        table.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
        for stage, t0 in running:
            table.add_row(Text(stage, style="bold"), f"{time.monotonic() - t0:.0f} s",
                          Text(last_line(log_file(self.workspace, stage))))
        return table

    def started(self, stage: str) -> None:
        with self.lock:
            self.running[stage] = time.monotonic()
        if self.live is None and self.level >= 0:
            self.console.print(f"  {'started':<10} {stage}", soft_wrap=True)

    def finished(self, stage: str, outcome: str, seconds: float) -> None:
        """outcome: one of OUTCOMES' keys. Up-to-date stages print nothing until the summary."""
        with self.lock:
            self.running.pop(stage, None)
        if outcome == "cached" or (self.level < 0 and outcome != "failed"):
            return
        line = stage_line({"stage": stage, "outcome": outcome, "seconds": seconds})
        if outcome == "failed" or (self.level > 0 and outcome == "ran"):
            tail = log_tail(log_file(self.workspace, stage))
            line += f"\n  last lines of {log_file(self.workspace, stage)}:\n" + "\n".join(
                "    " + ln for ln in tail.splitlines())
        self.console.print(line, markup=False, soft_wrap=True)
