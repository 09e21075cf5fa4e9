from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmnist.losses import accuracy, cross_entropy_loss, log_softmax_nll_loss, masked_mean, mse_loss, nll_loss

LOGITS = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0], [0.0, 0.0, 0.0], [-3.0, 1.0, 4.0]])
LABELS = jnp.array([0, 1, 2, 1])


def _hand_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """-log(exp(z_y) / sum_j exp(z_j)) per row, averaged, in float64 numpy."""
    logits = np.asarray(logits, np.float64)
    picked = logits[np.arange(len(labels)), labels]
    return float(np.mean(np.log(np.exp(logits).sum(axis=1)) - picked))


def test_cross_entropy_matches_hand_computed_value():
    loss = cross_entropy_loss(LOGITS, LABELS)
    chex.assert_shape(loss, ())
    chex.assert_type(loss, jnp.float32)
    np.testing.assert_allclose(loss, _hand_cross_entropy(LOGITS, np.asarray(LABELS)), rtol=1e-6)
    # One row by hand: z = (0, 0, 0) gives -log(1/3) = log 3.
    np.testing.assert_allclose(cross_entropy_loss(LOGITS[2:3], LABELS[2:3]), np.log(3), rtol=1e-6)


def test_cross_entropy_on_logits_equals_nll_on_log_softmax():
    log_probs = jax.nn.log_softmax(LOGITS)
    np.testing.assert_allclose(cross_entropy_loss(LOGITS, LABELS), nll_loss(log_probs, LABELS), rtol=1e-6)
    np.testing.assert_allclose(log_softmax_nll_loss(LOGITS, LABELS), nll_loss(log_probs, LABELS), rtol=0)


@pytest.mark.slow
def test_losses_agree_with_optax_on_random_batches():
    logits = jax.random.normal(jax.random.key(0), (64, 10)) * 3
    labels = jax.random.randint(jax.random.key(1), (64,), 0, 10)
    reference = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 10)).mean()
    np.testing.assert_allclose(cross_entropy_loss(logits, labels), reference, rtol=1e-6)
    np.testing.assert_allclose(log_softmax_nll_loss(logits, labels), reference, rtol=1e-6)
    predictions = jax.nn.softmax(logits)
    targets = jax.nn.one_hot(labels, 10)
    np.testing.assert_allclose(
        mse_loss(predictions, targets), optax.l2_loss(predictions, targets).sum(-1).mean(), rtol=1e-6
    )


def test_nll_picks_the_labels_log_probability():
    log_probs = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]))
    np.testing.assert_allclose(nll_loss(log_probs, jnp.array([1, 2])), -(np.log(0.2) + np.log(0.5)) / 2, rtol=1e-6)


def test_mse_is_the_lessons_one_over_2n_formula():
    predictions = jnp.array([1.0, 2.0, 4.0])
    targets = jnp.array([1.5, 2.0, 1.0])
    # 1/(2*3) * (0.25 + 0 + 9) = 9.25 / 6
    np.testing.assert_allclose(mse_loss(predictions, targets), 9.25 / 6, rtol=1e-7)


@pytest.mark.parametrize("loss_fn", [cross_entropy_loss, log_softmax_nll_loss])
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_losses_stay_finite_for_huge_logits(loss_fn, scale: float):
    logits = jnp.array([[1.0, 0.0, -1.0], [0.0, 1.0, 0.5]]) * scale
    labels = jnp.array([2, 0])
    loss = loss_fn(logits, labels)
    chex.assert_tree_all_finite(loss)
    np.testing.assert_allclose(loss, _stable_reference(logits, labels), rtol=1e-6)
    chex.assert_tree_all_finite(jax.grad(loss_fn)(logits, labels))


def _stable_reference(logits, labels) -> float:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


@pytest.mark.parametrize(
    "loss_fn",
    [cross_entropy_loss, log_softmax_nll_loss, accuracy, lambda p, t, m=None: mse_loss(p, jax.nn.one_hot(t, 3), m)],
)
def test_masked_padded_batch_equals_real_batch_mean(loss_fn):
    real = loss_fn(LOGITS[:3], LABELS[:3])
    padded_logits = jnp.concatenate([LOGITS[:3], jnp.full((5, 3), 7.0)])
    padded_labels = jnp.concatenate([LABELS[:3], jnp.zeros(5, LABELS.dtype)])
    mask = jnp.arange(8) < 3
    np.testing.assert_allclose(loss_fn(padded_logits, padded_labels, mask), real, rtol=1e-6)


def test_accuracy_counts_argmax_hits():
    # Rows predict 0, 1, 0 (ties go to the first), 2; labels 0, 1, 2, 1 -> 2 of 4.
    np.testing.assert_allclose(accuracy(LOGITS, LABELS), 0.5)


def test_masked_mean_with_all_ones_mask_is_the_plain_mean():
    values = jnp.array([1.0, 2.0, 6.0])
    np.testing.assert_allclose(masked_mean(values), 3.0)
    np.testing.assert_allclose(masked_mean(values, jnp.ones(3, bool)), 3.0)


def test_losses_work_unchanged_in_float64():
    with jax.enable_x64(True):
        logits = jnp.asarray(np.asarray(LOGITS), jnp.float64)
        loss = cross_entropy_loss(logits, LABELS)
        chex.assert_type(loss, jnp.float64)
        np.testing.assert_allclose(loss, _hand_cross_entropy(np.asarray(LOGITS), np.asarray(LABELS)), rtol=1e-6)
        np.testing.assert_allclose(
            log_softmax_nll_loss(logits, LABELS, jnp.ones(4, bool)), _stable_reference(logits, LABELS), rtol=1e-14
        )
