"""The one rule for what MLflow gets as a metric: a finite number that is not a bool."""
from __future__ import annotations

import math


def numbers(values: dict) -> dict[str, float]:
    """The entries of `values` that are finite numbers (True is an int to Python, not a metric)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
