"""The statistics of the band comparison, against formulas written out by hand, and the reference data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxmnist import comparison
from jaxmnist.lesson import PYTORCH_LOSS_BAND, PYTORCH_TEST_ACCURACY, pytorch_seed_runs

pytest.importorskip("scipy", reason="pip install 'jaxmnist[parity]'")


def test_welch_statistic_and_standard_error_follow_their_formulas():
    ours = np.array([[1.0], [1.2], [0.9], [1.1]])
    theirs = np.array([[1.3], [1.5], [1.4], [1.2], [1.6]])
    (result,) = comparison.compare_bands(ours, theirs)
    a, b = ours[:, 0], theirs[:, 0]
    var_a, var_b = a.var(ddof=1), b.var(ddof=1)
    se = math.sqrt(var_a / 4 + var_b / 5)
    assert result.difference_in_standard_errors == pytest.approx((a.mean() - b.mean()) / se)
    # Welch-Satterthwaite degrees of freedom, then the two-sided t tail by the regularized incomplete beta.
    dof = (var_a / 4 + var_b / 5) ** 2 / ((var_a / 4) ** 2 / 3 + (var_b / 5) ** 2 / 4)
    from scipy.special import betainc

    t = result.difference_in_standard_errors
    assert result.welch_p == pytest.approx(betainc(dof / 2, 0.5, dof / (dof + t * t)), rel=1e-9)
    assert result.ours_std == pytest.approx(var_a**0.5) and result.theirs_mean == pytest.approx(b.mean())


def test_a_shifted_band_is_called_different_and_the_same_band_consistent():
    rng = np.random.default_rng(1)
    base = rng.normal(1.0, 0.05, (100, 3))
    shifted = base[:40] + np.array([0.0, 0.1, 0.0])
    assert comparison.verdict(comparison.compare_bands(base[40:], base[:60])).startswith("consistent")
    assert comparison.verdict(comparison.compare_bands(shifted, base[40:])).startswith("different in epoch(s) 2 ")


def test_the_reference_band_is_the_statistics_of_the_reference_runs():
    runs = pytorch_seed_runs()
    losses = runs["epoch_losses"]
    assert losses.shape == (100, 5) and list(runs["seed"]) == list(range(100))
    band = np.column_stack([losses.mean(0), losses.std(0, ddof=1), losses.min(0), losses.max(0)])
    np.testing.assert_allclose(band, np.array(PYTORCH_LOSS_BAND), atol=5e-5)
    accuracy = runs["test_accuracy"]
    np.testing.assert_allclose([accuracy.mean(), accuracy.min(), accuracy.max()], PYTORCH_TEST_ACCURACY, atol=5e-5)
