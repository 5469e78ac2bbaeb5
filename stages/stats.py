"""Rates with their confidence intervals, as the audit and the safety evaluation report them."""
from __future__ import annotations

import math


def wilson(k: int, n: int, z: float = 1.96) -> dict:
    """A rate with its Wilson score interval (sound at 0 and at small n, unlike the normal one)."""
    if n == 0:
        return {"rate": float("nan"), "low": float("nan"), "high": float("nan"), "k": 0, "n": 0}
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"rate": p, "low": max(0.0, centre - half), "high": min(1.0, centre + half), "k": k, "n": n}
