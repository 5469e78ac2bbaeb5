"""What a stage's process does first under the pipeline: take the threads it was granted, and
leave its root cause where the pipeline can print it last (a failing stage's message otherwise
sits under dozens of lines of Prefect and DVC tracebacks)."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

FAILURES = Path(".consort") / "failures"  # in the workspace (DVC runs stages there): <stage>.txt


def failure_file(workspace: Path, stage: str) -> Path:
    return Path(workspace) / FAILURES / f"{re.sub(r'[^A-Za-z0-9@_.-]', '_', stage)}.txt"


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
    use_granted_threads()


def threads_variable(stage: str) -> str:
    """The environment variable carrying a stage's thread count (DVC stage names hold '@')."""
    return "CONSORT_THREADS_" + re.sub(r"[^A-Za-z0-9]", "_", stage).upper()


def use_granted_threads() -> int | None:
    """Set torch's thread count to what the pipeline granted this stage (DVC_STAGE names it).

    Run by hand, outside the pipeline, torch keeps its default.
    """
    stage = _dvc_stage()
    granted = os.environ.get(threads_variable(stage)) if stage else None
    if not granted:
        return None
    import torch

    torch.set_num_threads(int(granted))
    return int(granted)
