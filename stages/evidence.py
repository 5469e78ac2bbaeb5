"""Paired bootstrap intervals over documents, and targets judged by them.

An evaluation scores every configuration on the same documents and keeps, per document and
configuration, the summed NLL; the document's token and byte counts are shared. Resampling
documents once and applying the same resample to every configuration (a paired bootstrap) keeps
the documents' own spread out of a comparison: configurations differ far less than documents do.
A mean over resampled documents is a ratio (summed NLL over summed tokens or bytes), as the
point estimate is. The per-document numbers stay where the text is; what is published is means,
intervals and standard errors.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

LEVEL = 0.95
RESAMPLES = 2000


class Interval(BaseModel):
    """An estimate with its 95 % percentile interval and the bootstrap standard error."""
    model_config = ConfigDict(extra="forbid")
    value: float
    low: float
    high: float
    se: float

    def text(self, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
        return (f"{self.value * scale:.{digits}f}{unit} [{self.low * scale:.{digits}f}, "
                f"{self.high * scale:.{digits}f}]")


class Documents(BaseModel):
    """What was scored: documents, target tokens and their bytes, and the bootstrap's size."""
    model_config = ConfigDict(extra="forbid")
    documents: int
    tokens: int
    bytes: int
    resamples: int = RESAMPLES
    split_bytes: int | None = None  # the whole held-out split, for xz's second reference


def resample(n_docs: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n_docs) document indices drawn with replacement: one draw, shared by every configuration."""
    return np.random.default_rng(seed).integers(0, n_docs, size=(resamples, n_docs))


def percentile_interval(point: float, replicates: np.ndarray) -> Interval:
    """A point estimate with the 95 % percentile interval and standard error of its bootstrap replicates."""
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Interval(value=point, low=float(low), high=float(high), se=float(replicates.std(ddof=1)))


def mean_interval(nll: np.ndarray, per: np.ndarray, draws: np.ndarray, scale: float = 1.0) -> Interval:
    """sum(nll) / sum(per) over documents (per: tokens for nats per token; bytes * ln 2 for bits per byte)."""
    point = scale * nll.sum() / per.sum()
    return percentile_interval(float(point), scale * nll[draws].sum(1) / per[draws].sum(1))


def relative_interval(nll_a: np.ndarray, nll_b: np.ndarray, draws: np.ndarray) -> Interval:
    """(A - B) / B of two configurations' mean loss on the same documents, paired (the count cancels)."""
    point = nll_a.sum() / nll_b.sum() - 1
    return percentile_interval(float(point), nll_a[draws].sum(1) / nll_b[draws].sum(1) - 1)


def average(intervals: list[Interval]) -> Interval:
    """The mean of independent domains' estimates: each domain was resampled on its own, so the
    standard errors add in quadrature (a normal interval; the domains' documents never meet)."""
    value = sum(i.value for i in intervals) / len(intervals)
    se = math.sqrt(sum(i.se ** 2 for i in intervals)) / len(intervals)
    z = 1.959963984540054
    return Interval(value=value, low=value - z * se, high=value + z * se, se=se)


Verdict = Literal["met", "missed", "cannot tell at this budget"]


def judge(interval: Interval, threshold: float, below: bool) -> Verdict:
    """Met when the whole interval is on the wanted side of the threshold (below it, or above it),
    missed when the whole of it is on the other side, else it cannot tell at this budget."""
    if below:
        return "met" if interval.high < threshold else "missed" if interval.low > threshold else \
            "cannot tell at this budget"
    return "met" if interval.low > threshold else "missed" if interval.high < threshold else \
        "cannot tell at this budget"


def judge_within(interval: Interval, limit: float) -> Verdict:
    """Met when the whole interval lies within (-limit, limit); missed when it lies wholly outside."""
    if -limit < interval.low and interval.high < limit:
        return "met"
    return "missed" if interval.low > limit or interval.high < -limit else "cannot tell at this budget"


def combine(verdicts: list[Verdict]) -> Verdict:
    """All of several conditions: missed if one is missed, met if every one is met."""
    if "missed" in verdicts:
        return "missed"
    return "met" if verdicts and all(v == "met" for v in verdicts) else "cannot tell at this budget"
