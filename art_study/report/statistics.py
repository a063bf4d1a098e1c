"""The statistics of the report: plain functions on arrays and frames, no MLflow.

- the 95 % Student-t confidence interval of a mean over seeds, and the per-cell summary of a
  score table;
- the Wilson score interval of one model's accuracy on n test images (:func:`wilson_interval`);
- the paired t-test over seeds (same seed, same data order and test images);
- McNemar's test on one seed's discordant test images, and the clustered McNemar test over
  seeds with each test image as the unit (:func:`clustered_mcnemar`).

``tests/test_statistics.py`` checks each against scipy on known numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

EXACT_MCNEMAR_BELOW = 25  # discordant pairs; above, the χ² approximation is accurate


def ci95_half_width(values: pd.Series) -> float:
    """Half-width of the 95 % Student-t confidence interval of the mean; NaN below 2 values."""
    values = values.dropna()
    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def summarise_seeds(scores: pd.DataFrame, by: list[str], value: str = "acc") -> pd.DataFrame:
    """Mean, 95 % CI half-width and seed count of ``value`` per group of ``by`` in a long table
    with one row per run and measurement (a run that logged no value is not counted; a NaN key,
    such as the ε of clean accuracy, is a group of its own)."""
    return (scores.dropna(subset=[value]).groupby(by, sort=False, dropna=False)[value]
                  .agg(mean="mean", half=ci95_half_width, n="count").reset_index())


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: ``correct`` of ``n`` images, as (low, high).

    How uncertain one model's accuracy is because it was measured on ``n`` test images (each
    image a Bernoulli draw), apart from how it would differ with another training seed. Wilson
    rather than the normal (Wald) interval: it stays inside [0, 1], is not of zero width at 0
    or n correct, and its coverage stays close to the nominal 95 % for accuracies near 90 %
    (a robust model's) and beyond, where Wald's falls short unless n is large (Brown, Cai &
    DasGupta, 2001).
    scipy's ``binomtest(...).proportion_ci(method="wilson")`` computes it.
    """
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"a proportion needs 0 <= correct <= n and n >= 1, got {correct}/{n}")
    ci = stats.binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence,
                                                             method="wilson")
    return float(ci.low), float(ci.high)


def wilson_half_width(accuracy: float, n: int, confidence: float = 0.95) -> float:
    """Half the width of the Wilson interval (as a fraction) of one model with ``accuracy`` (a
    fraction, rounded to a count of images) on ``n`` images. The interval is not symmetric
    about the accuracy near 0 or 1: this is its size, not a distance from the accuracy."""
    low, high = wilson_interval(round(accuracy * n), n, confidence)
    return (high - low) / 2


def paired_t(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided paired t-test of ``a`` against ``b`` (paired by position): its p-value, or None
    where it is undefined (fewer than two pairs, or the same difference in every pair)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or np.allclose(a - b, (a - b)[0]):
        return None
    return float(stats.ttest_rel(a, b).pvalue)


def mcnemar(a_only: int, b_only: int) -> tuple[float, str]:
    """McNemar's test on the discordant counts: exact binomial below 25 discordant images, else
    χ² with continuity correction."""
    n = a_only + b_only
    if n == 0:
        return 1.0, "exact"
    if n < EXACT_MCNEMAR_BELOW:
        return float(stats.binomtest(a_only, n, 0.5).pvalue), "exact"
    chi2 = (abs(a_only - b_only) - 1) ** 2 / n
    return float(stats.chi2.sf(chi2, 1)), "χ²"


@dataclass(frozen=True)
class SeedDiscordance:
    """One seed's discordant images at one metric: A right and B wrong, and the reverse."""

    seed: int
    a_only: np.ndarray  # bool per test image
    b_only: np.ndarray

    @property
    def counts(self) -> tuple[int, int]:
        return int(self.a_only.sum()), int(self.b_only.sum())


def clustered_mcnemar(per_seed: list[SeedDiscordance]) -> tuple[float, str] | None:
    """McNemar's test over seeds with each test image as a cluster of its seeds' outcomes.

    The seeds of a study are evaluated on the same test images (the full test set, or subsets
    aligned by position), so an image that is hard for B is hard for B in every seed: summing
    the seeds' discordant counts, as if every (seed, image) were an independent pair, overstates
    the evidence. Here the unit is the image: its net discordance d = Σ_seeds (A✓B✗ − A✗B✓).
    Under H0 (A and B exchangeable) d is symmetric about 0, and the test is on Σ d:
    Durkalski et al. (2003)'s clustered McNemar χ² = (Σ d)² / Σ d² with 1 df from
    ``EXACT_MCNEMAR_BELOW`` images with d ≠ 0, and below that the sign-flip permutation test
    of Σ d (scipy's ``permutation_test``; exact up to 2^16 sign patterns, seeded Monte Carlo
    above). With one seed this is McNemar's test (exact binomial; χ² without continuity
    correction). Where the seeds hold different images, aligning them by position keeps the
    test valid (a sum of independent symmetric terms is symmetric), only less powerful.
    None when the seeds' image counts differ (no alignment).
    """
    if not per_seed or len({len(s.a_only) for s in per_seed}) != 1:
        return None
    net = sum(s.a_only.astype(int) - s.b_only.astype(int) for s in per_seed)
    d = net[net != 0].astype(float)
    if d.size < 2:  # no discordant image, or one: both sign patterns are as extreme, p = 1
        return 1.0, "exact"  # (scipy's permutation test refuses a single observation)
    if d.size >= EXACT_MCNEMAR_BELOW:
        return float(stats.chi2.sf(d.sum() ** 2 / np.sum(d * d), 1)), "clustered χ²"
    result = stats.permutation_test((d,), lambda x, axis: np.sum(x, axis=axis),
                                    permutation_type="samples", vectorized=True,
                                    n_resamples=2**16, alternative="two-sided", random_state=0)
    how = "exact" if 2**d.size <= 2**16 else "sign-flip, 2^16 draws"
    return float(min(result.pvalue, 1.0)), how
