"""Intervals of eval numbers (mixq.stats)."""

from __future__ import annotations

import numpy as np

from mixq.stats import bootstrap_ci, paired_delta


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_units():
    rng = np.random.default_rng(1)
    few, many = rng.normal(1.0, 0.5, 8), rng.normal(1.0, 0.5, 800)
    for values in (few, many):
        lo, hi = bootstrap_ci(values)
        assert lo < values.mean() < hi
    assert np.diff(bootstrap_ci(many))[0] < np.diff(bootstrap_ci(few))[0] / 5
    assert bootstrap_ci(few) == bootstrap_ci(few)  # fixed seed: same numbers, same interval


def test_paired_difference_removes_what_both_share():
    """Two quants scored on the same hard and easy windows: their per-window difference is
    tiny next to the spread of the windows, so the paired interval excludes 0 where the two
    separate intervals overlap."""
    windows = np.linspace(0.1, 2.0, 10)
    better, worse = windows, windows * 1.05
    a, b = bootstrap_ci(better), bootstrap_ci(worse)
    assert a[1] > b[0]  # alone, the intervals overlap
    paired = paired_delta(worse, better)
    assert paired["delta"] > 0 and paired["ci"][0] > 0
    assert paired_delta(better, better) == {"delta": 0.0, "ci": [0.0, 0.0]}
