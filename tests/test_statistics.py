"""The report's statistics on known numbers, against scipy: no MLflow, no training.

``art_study.report.statistics`` is imported on its own (the package loads its other modules on
first use), so these tests need neither MLflow nor TensorFlow.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from art_study.report import statistics


def test_confidence_interval_is_students_t() -> None:
    values = pd.Series([97.1, 96.4, 98.0, np.nan, 97.5])  # a run that did not finish: NaN
    half = statistics.ci95_half_width(values)
    low, high = stats.t.interval(0.95, 3, loc=values.mean(), scale=stats.sem(values.dropna()))
    assert half == pytest.approx((high - low) / 2)
    assert statistics.ci95_half_width(pd.Series([1.0, 2.0, 3.0])) == pytest.approx(
        stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3))
    assert np.isnan(statistics.ci95_half_width(pd.Series([0.5])))
    assert np.isnan(statistics.ci95_half_width(pd.Series([0.5, np.nan])))


def test_summary_per_group_of_a_long_table() -> None:
    """One row per run and measurement; a NaN value is not counted, a NaN key (the ε of clean
    accuracy) is a group of its own."""
    scores = pd.DataFrame({"depth": [2, 2, 2, 3, 2, 2, 2], "sequence": ["none"] * 7,
                           "kind": ["clean"] * 3 + ["fgsm"] * 4,
                           "eps": [np.nan] * 3 + [0.3] * 4,
                           "acc": [99.0, 98.0, 97.0, 30.0, 10.0, 20.0, np.nan]})
    summary = statistics.summarise_seeds(scores, ["depth", "sequence", "kind", "eps"])
    assert len(summary) == 3
    cell = summary[summary["kind"] == "clean"].iloc[0]
    assert np.isnan(cell["eps"]) and cell["mean"] == pytest.approx(98.0) and cell["n"] == 3
    assert cell["half"] == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3))
    at2 = summary[(summary["kind"] == "fgsm") & (summary["depth"] == 2)].iloc[0]
    assert at2["n"] == 2 and at2["mean"] == 15.0  # the NaN seed is not counted
    one = summary[summary["depth"] == 3].iloc[0]
    assert one["mean"] == 30.0 and one["n"] == 1 and np.isnan(one["half"])


def test_paired_t_is_scipys_and_undefined_where_it_is() -> None:
    a, b = [60.0, 55.0, 58.0, 61.0], [10.0, 12.0, 9.0, 15.0]
    assert statistics.paired_t(a, b) == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert statistics.paired_t(np.array(a), np.array(b)) == statistics.paired_t(a, b)
    assert statistics.paired_t([60.0], [10.0]) is None  # one seed
    assert statistics.paired_t([], []) is None
    assert statistics.paired_t([60.0, 55.0], [10.0, 5.0]) is None  # differences all equal


def test_mcnemar_exact_and_chi2() -> None:
    p, how = statistics.mcnemar(1, 9)
    assert how == "exact" and p == pytest.approx(stats.binomtest(1, 10, 0.5).pvalue)
    assert statistics.mcnemar(0, 0) == (1.0, "exact")
    p, how = statistics.mcnemar(40, 20)
    assert how == "χ²" and p == pytest.approx(stats.chi2.sf((20 - 1) ** 2 / 60, 1))


def _seed(seed: int, a_only: list[int], b_only: list[int], n: int = 200):
    """A seed's discordance: the images (by position) only A, and only B, gets right."""
    a, b = np.zeros(n, bool), np.zeros(n, bool)
    a[a_only], b[b_only] = True, True
    return statistics.SeedDiscordance(seed, a, b)


def test_mcnemar_over_seeds_counts_images_not_seed_image_pairs() -> None:
    """Seeds on the same test images are not independent evidence: the same discordant images
    in two seeds give the p of one seed, where summing the counts (the old pooled test)
    claimed far more. One seed: McNemar's exact and (uncorrected) χ² tests."""
    one = _seed(0, list(range(20)), list(range(20, 28)))
    p_one, how = statistics.clustered_mcnemar([one])
    assert how == "clustered χ²"
    assert p_one == pytest.approx(stats.chi2.sf((20 - 8) ** 2 / 28, 1))
    twice = [one, _seed(1, list(range(20)), list(range(20, 28)))]
    p_twice, _ = statistics.clustered_mcnemar(twice)
    assert p_twice == pytest.approx(p_one)
    p_pooled, _ = statistics.mcnemar(40, 16)  # what summing the seeds' counts gave
    assert p_pooled < 0.01 < 0.02 < p_twice
    # Seeds that disagree cancel image by image.
    assert statistics.clustered_mcnemar([one, _seed(1, list(range(20, 28)), list(range(20)))]) == \
        (1.0, "exact")

    small = _seed(0, [0, 1, 2, 3, 4, 5, 6, 7, 8], [9])
    p, how = statistics.clustered_mcnemar([small])
    assert how == "exact" and p == pytest.approx(stats.binomtest(9, 10, 0.5).pvalue)
    assert statistics.clustered_mcnemar([small, _seed(1, [0], [], n=100)]) is None
    # One discordant image (a robust model against a broken one on a small slice): McNemar's
    # exact p, 1 (scipy's permutation test refuses a single observation).
    single = statistics.clustered_mcnemar([_seed(0, [3], [])])
    assert single == (1.0, "exact") and stats.binomtest(1, 1, 0.5).pvalue == 1.0


def test_mcnemar_over_seeds_is_the_sign_flip_test_of_net_discordance() -> None:
    """The χ² is the normal approximation of the exact sign-flip test of Σ d over images (the
    permutation variance of Σ d is Σ d²): on 3 seeds with mixed nets, the two agree."""
    rng = np.random.default_rng(0)
    seeds = []
    for s in range(3):
        a = rng.random(400) < 0.12
        b = ~a & (rng.random(400) < 0.115)
        seeds.append(statistics.SeedDiscordance(s, a, b))
    p, how = statistics.clustered_mcnemar(seeds)
    net = sum(s.a_only.astype(int) - s.b_only.astype(int) for s in seeds)
    d = net[net != 0].astype(float)
    assert how == "clustered χ²" and len(set(np.abs(d))) > 1
    flips = stats.permutation_test((d,), lambda x, axis: np.sum(x, axis=axis),
                                   permutation_type="samples", vectorized=True,
                                   n_resamples=10_000, random_state=1)
    assert p == pytest.approx(flips.pvalue, abs=0.004)  # χ² p 0.0103; MC s.e. ~0.0007
    assert 0.001 < p < 0.5  # a case where the approximation matters, not a foregone result




def _wilson_closed_form(k: int, n: int, z: float = stats.norm.ppf(0.975)) -> tuple[float, float]:
    """Wilson (1927): the roots in p of (p̂ − p)² = z² p (1 − p) / n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(890, 1000), (8900, 10_000), (37, 40), (1, 3)])
def test_wilson_interval_is_the_closed_form(k: int, n: int) -> None:
    low, high = statistics.wilson_interval(k, n)
    assert (low, high) == pytest.approx(_wilson_closed_form(k, n), abs=1e-12)
    assert statistics.wilson_half_width(k / n, n) == pytest.approx((high - low) / 2, abs=1e-15)


def test_wilson_half_width_of_one_robust_model_on_1000_and_10000_images() -> None:
    """89 % on 1 000 images is ± 1.9 points, on 10 000 ± 0.6: ten times the images, √10
    narrower."""
    on_1k, on_10k = statistics.wilson_half_width(0.89, 1000), statistics.wilson_half_width(
        0.89, 10_000)
    assert round(on_1k * 100, 1) == 1.9 and round(on_10k * 100, 1) == 0.6
    assert on_1k / on_10k == pytest.approx(np.sqrt(10), rel=0.01)
    # accuracies stored as floats are rounded to a count of images, not truncated
    assert statistics.wilson_half_width(0.8899999999, 1000) == on_1k


def test_wilson_interval_at_none_and_all_correct_stays_in_zero_one() -> None:
    z2 = stats.norm.ppf(0.975) ** 2
    low, high = statistics.wilson_interval(0, 50)
    assert low == pytest.approx(0.0, abs=1e-15) and high == pytest.approx(z2 / (50 + z2))
    low, high = statistics.wilson_interval(50, 50)
    assert high == pytest.approx(1.0, abs=1e-15) and low == pytest.approx(50 / (50 + z2))
    assert statistics.wilson_half_width(0.0, 50) == pytest.approx(
        statistics.wilson_half_width(1.0, 50)) == z2 / (50 + z2) / 2  # not of zero width
    for bad in ((3, 2), (-1, 10), (0, 0)):
        with pytest.raises(ValueError, match="0 <= correct <= n"):
            statistics.wilson_interval(*bad)
