"""Percentile bootstrap intervals (95 %, 200 resamples) for the evaluate stage's headline numbers.

Every resample comes from the caller's seeded generator (``randomness.numpy_rng(seed, <section>)``), so intervals
are reproducible. A statistic that is a mean of 0/1 outcomes is resampled exactly and cheaply as a binomial draw
(the bootstrap distribution of a mean of n Bernoulli outcomes is Binomial(n, p̂) / n); other statistics are
recomputed under multinomial record weights, vectorised over resamples.
"""
from __future__ import annotations

import numpy as np

N_BOOT = 200     # resamples; the 2.5 / 97.5 % quantiles of 200 are stable to about ±0.01 for proportions
CI = 0.95


def weights(n: int, rng: np.random.Generator, b: int = N_BOOT) -> np.ndarray:
    """(b, n) bootstrap resample counts of n records."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=b) if n else np.zeros((b, 0), np.int64)


def proportion_boots(x: np.ndarray, rng: np.random.Generator, b: int = N_BOOT) -> np.ndarray:
    """Bootstrap replicates of the mean of 0/1 outcomes ``x``."""
    n = len(x)
    return rng.binomial(n, float(np.mean(x)), size=b) / n if n else np.full(b, np.nan)


def interval(boots: np.ndarray, n: int, n_text: str | None = None) -> dict:
    """``{"lo", "hi", "n"}`` from bootstrap replicates (non-finite ones dropped)."""
    boots = np.asarray(boots, float)
    boots = boots[np.isfinite(boots)]
    if not len(boots):
        return {"lo": float("nan"), "hi": float("nan"), "n": int(n)}
    lo, hi = np.quantile(boots, [(1 - CI) / 2, 1 - (1 - CI) / 2])
    out = {"lo": float(lo), "hi": float(hi), "n": int(n)}
    if n_text:
        out["n_text"] = n_text
    return out
