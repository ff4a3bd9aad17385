"""Length statistics, defined once: the spread a stage logs as it goes (`spread`) and the
evaluation report's summary with percentiles (`summary`)."""
from __future__ import annotations

import statistics

import numpy as np


def spread(values: list) -> dict:
    """mean, population variance and std of a list of lengths."""
    return {"mean": statistics.fmean(values), "var": statistics.pvariance(values),
            "std": statistics.pstdev(values)}


def summary(values) -> dict:
    """mean, var (population), std, p5, p50, p95 of a list of lengths."""
    x = np.asarray(values, dtype=np.float64)
    p5, p50, p95 = np.percentile(x, [5, 50, 95])
    return {"mean": float(x.mean()), "var": float(x.var()), "std": float(x.std()),
            "p5": float(p5), "p50": float(p50), "p95": float(p95)}
