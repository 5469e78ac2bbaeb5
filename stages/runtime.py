"""What a stage's process does first under the pipeline: take the threads it was granted, write
its output to a log file of its own (stages run side by side; on one console their bars and
warnings would interleave), and leave its root cause where the pipeline can print it last (a
failing stage's message otherwise sits under dozens of lines of Prefect and DVC tracebacks)."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

FAILURES = Path(".consort") / "failures"  # in the workspace (DVC runs stages there): <stage>.txt
LOGS = Path(".consort") / "logs"  # <stage>.log, written when the pipeline sets LOGS_VARIABLE
LOGS_VARIABLE = "CONSORT_STAGE_LOGS"
THREADS = Path(".consort") / "threads"  # <stage>: a running stage's thread count, when the pipeline changes it


def _file_name(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9@_.-]", "_", stage)


def failure_file(workspace: Path, stage: str) -> Path:
    return Path(workspace) / FAILURES / f"{_file_name(stage)}.txt"


def log_file(workspace: Path, stage: str) -> Path:
    return Path(workspace) / LOGS / f"{_file_name(stage)}.log"


def logging_to_file() -> bool:
    """Whether this stage's output goes to its log file (progress bars then redraw at a pace a reader follows)."""
    return bool(os.environ.get(LOGS_VARIABLE)) and bool(_dvc_stage())


def in_stage() -> bool:
    """Whether this process is a stage the pipeline (DVC) runs."""
    return bool(_dvc_stage())


def _dvc_stage() -> str:
    return os.environ.get("DVC_STAGE", "").rsplit(":", 1)[-1]  # "dvc.yaml:name" outside the repo root


def start_stage() -> None:
    """Under DVC: record an uncaught error's message for the pipeline, and use the granted threads."""
    stage = _dvc_stage()
    if stage:
        path = failure_file(Path.cwd(), stage)
        path.unlink(missing_ok=True)
        default_hook = sys.excepthook

        def record(kind, err, tb):
            if not issubclass(kind, KeyboardInterrupt):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"{kind.__name__}: {err}")
            default_hook(kind, err, tb)

        sys.excepthook = record
        if logging_to_file():
            _write_output_to(log_file(Path.cwd(), stage))
    follow_granted_threads()  # the threads the pipeline granted; run by hand, torch keeps its default


def step_bar(steps: range, desc: str, total: int, disable: bool = False):
    """A training loop's progress bar, redrawn every second where someone watches it (a terminal,
    or the stage's log file whose last line the pipeline's console shows), every 20 s elsewhere."""
    from tqdm import tqdm

    watched = sys.stderr.isatty() or logging_to_file()
    return tqdm(steps, initial=steps.start, total=total, desc=desc, unit="step", dynamic_ncols=True,
                mininterval=1.0 if watched else 20.0, disable=disable)


def _write_output_to(path: Path) -> None:
    # At the descriptor level, so that what C code and child processes print lands there too.
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)


def granted_threads_file(workspace: Path, stage: str) -> Path:
    """Where the pipeline keeps a running stage's thread count while it changes (cores lent or taken back)."""
    return Path(workspace) / THREADS / _file_name(stage)


def follow_granted_threads() -> None:
    """At the start and at each step boundary: take up the thread count the pipeline grants this stage now,
    if it changed (read every time: a file's timestamp can miss two changes within a clock tick)."""
    stage = _dvc_stage()
    if not stage:
        return
    try:
        granted = int(granted_threads_file(Path.cwd(), stage).read_text())
    except (FileNotFoundError, ValueError):
        return
    import torch

    if granted != torch.get_num_threads():
        torch.set_num_threads(granted)
