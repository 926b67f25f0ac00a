"""Intervals for the experiments' figures."""

from __future__ import annotations

import numpy as np


def mean_interval(values, rng, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (scipy.stats.bootstrap); a sample of one
    value, or of identical values, gives that value twice."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=float)
    if len(values) < 2 or np.all(values == values[0]):
        return float(values.mean()), float(values.mean())
    result = bootstrap((values,), np.mean, n_resamples=2000, confidence_level=confidence, method="percentile",
                       random_state=rng)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
