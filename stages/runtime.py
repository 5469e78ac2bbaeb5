"""How many threads a stage computes with, as the pipeline decided when it gave the stage cores."""
from __future__ import annotations

import os
import re


def threads_variable(stage: str) -> str:
    """The environment variable carrying a stage's thread count (DVC stage names hold '@')."""
    return "CONSORT_THREADS_" + re.sub(r"[^A-Za-z0-9]", "_", stage).upper()


def use_granted_threads() -> int | None:
    """Set torch's thread count to what the pipeline granted this stage (DVC_STAGE names it).

    Run by hand, outside the pipeline, torch keeps its default.
    """
    stage = os.environ.get("DVC_STAGE", "").rsplit(":", 1)[-1]  # "dvc.yaml:name" outside the repo root
    granted = os.environ.get(threads_variable(stage)) if stage else None
    if not granted:
        return None
    import torch

    torch.set_num_threads(int(granted))
    return int(granted)
