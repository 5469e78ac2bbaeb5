"""The audit's statistics: Wilson intervals, membership AUC and TPR at low FPR, against values worked by hand."""
import numpy as np
import pytest

from stages.audit import auc, auc_interval, mia_scores, tpr_at_fpr
from stages.stats import wilson


def test_wilson_interval_matches_the_textbook_values():
    w = wilson(0, 20)
    assert w["rate"] == 0 and w["low"] == 0 and w["high"] == pytest.approx(0.1611, abs=1e-4)
    w = wilson(5, 10)
    assert (w["low"], w["high"]) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert np.isnan(wilson(0, 0)["rate"])


def test_auc_counts_ordered_pairs_and_ties_half():
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auc(np.array([1.0, 3.0]), np.array([2.0, 2.0])) == 0.5
    assert auc(np.array([2.0]), np.array([2.0])) == 0.5
    rng = np.random.default_rng(0)
    assert auc(rng.normal(size=2000), rng.normal(size=2000)) == pytest.approx(0.5, abs=0.03)


def test_the_auc_interval_covers_chance_for_alike_scores_and_clears_it_for_remembered_ones():
    rng = np.random.default_rng(1)
    alike = auc_interval(rng.normal(size=100), rng.normal(size=100))
    assert alike["low"] < 0.5 < alike["high"] and alike["high"] - alike["low"] < 0.35
    remembered = auc_interval(rng.normal(1.5, size=100), rng.normal(size=100))
    assert 0.75 < remembered["low"] <= remembered["value"] <= remembered["high"]
    one = auc_interval(np.array([0.0]), rng.normal(size=100))  # one document: where it ranks among held-out ones
    assert one["low"] < one["value"] < one["high"]


def test_tpr_at_one_percent_fpr():
    others = np.arange(1000, dtype=float)  # the threshold sits at the 99th percentile: 989.01
    members = np.array([995.0, 990.0, 500.0, 10.0])
    assert tpr_at_fpr(members, others) == 0.5


def test_membership_scores_are_higher_for_better_predicted_text():
    nll = [np.array([0.1, 0.2, 0.3]), np.array([2.0, 2.5, 3.0])]
    anchor = [np.array([1.0, 1.0, 1.0]), np.array([2.0, 2.5, 3.0])]
    s = mia_scores(nll, anchor, ["memorised text", "unseen text"])
    for name in ("loss", "zlib", "min_k", "anchor_ratio"):
        assert s[name][0] > s[name][1], name
