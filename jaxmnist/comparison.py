"""Distribution against distribution: jaxmnist's band of seeds beside PyTorch's, per epoch.

For each epoch: both means and sample standard deviations, the difference of the means in units of
its standard error ``sqrt(s1²/n1 + s2²/n2)``, Welch's t-test (unequal variances) and the two-sample
Kolmogorov-Smirnov test. scipy (``pip install 'jaxmnist[parity]'``) is imported when called.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Below this (per epoch, after a Bonferroni correction over the epochs) a test says "differs".
SIGNIFICANCE = 0.01


@dataclasses.dataclass(frozen=True)
class EpochComparison:
    """One epoch's losses of two sets of runs, compared."""

    epoch: int
    ours_mean: float
    ours_std: float
    theirs_mean: float
    theirs_std: float
    difference_in_standard_errors: float
    welch_p: float
    ks_p: float

    def consistent(self, epochs: int) -> bool:
        """Neither test rejects "same distribution" at ``SIGNIFICANCE`` shared over ``epochs`` epochs."""
        return min(self.welch_p, self.ks_p) >= SIGNIFICANCE / epochs


def compare_bands(ours: np.ndarray, theirs: np.ndarray) -> list[EpochComparison]:
    """Compares two sets of runs epoch by epoch.

    Args:
        ours: epoch losses ``(runs, epochs)``.
        theirs: the same of the other implementation (any number of runs, at least as many epochs).

    Returns:
        One ``EpochComparison`` per epoch of ``ours``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> same = compare_bands(rng.normal(1, 0.1, (50, 2)), rng.normal(1, 0.1, (80, 2)))
        >>> all(comparison.consistent(2) for comparison in same)
        True
    """
    from scipy import stats

    comparisons = []
    for epoch in range(ours.shape[1]):
        mine, other = np.asarray(ours[:, epoch], np.float64), np.asarray(theirs[:, epoch], np.float64)
        standard_error = np.sqrt(mine.var(ddof=1) / len(mine) + other.var(ddof=1) / len(other))
        comparisons.append(
            EpochComparison(
                epoch=epoch + 1,
                ours_mean=float(mine.mean()),
                ours_std=float(mine.std(ddof=1)),
                theirs_mean=float(other.mean()),
                theirs_std=float(other.std(ddof=1)),
                difference_in_standard_errors=float((mine.mean() - other.mean()) / standard_error),
                welch_p=float(stats.ttest_ind(mine, other, equal_var=False).pvalue),
                ks_p=float(stats.ks_2samp(mine, other).pvalue),
            )
        )
    return comparisons


def verdict(comparisons: list[EpochComparison]) -> str:
    """One line: are the two bands the same distribution, epoch by epoch?"""
    differing = [comparison.epoch for comparison in comparisons if not comparison.consistent(len(comparisons))]
    threshold = f"p < {SIGNIFICANCE}/{len(comparisons)} per epoch"
    if not differing:
        return f"consistent: no epoch's losses differ between the two ({threshold}, Welch's t and Kolmogorov-Smirnov)"
    return f"different in epoch(s) {', '.join(map(str, differing))} ({threshold}, Welch's t or Kolmogorov-Smirnov)"
