"""Uncertainty of eval numbers: 95% intervals, so a difference that is noise reads as noise.

Held-out KL is averaged over windows of consecutive tokens, which are not independent token by
token: its intervals resample whole windows. Task scores are per-problem means.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

RESAMPLES = 2000
SEED = 0  # fixed: the same numbers give the same interval on every run


def bootstrap_ci(values: Sequence[float], level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval [lo, hi] of the mean of ``values`` (one per independent
    unit: a window, a problem), :data:`RESAMPLES` resamples with a fixed seed."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return [float(values.mean()), float(values.mean())] if len(values) else []
    rng = np.random.default_rng(SEED)
    means = values[rng.integers(0, len(values), (RESAMPLES, len(values)))].mean(axis=1)
    tail = (1 - level) / 2
    return [float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))]


def paired_delta(a: Sequence[float], b: Sequence[float]) -> dict[str, object]:
    """``mean(a - b)`` over the same units (windows, problems) and its :func:`bootstrap_ci`."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return {"delta": float(diff.mean()), "ci": bootstrap_ci(diff)}
