"""The lesson's losses and accuracy as pure functions, each with an optional per-example mask.

A mask (1 for a real example, 0 for padding) makes every function return the mean over the real
examples only, so a padded final batch gives exactly the loss of the unpadded one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``sum(mask * values) / sum(mask)``; the plain mean when ``mask`` is None."""
    if mask is None:
        mask = jnp.ones(values.shape[:1], values.dtype)
    mask = jnp.asarray(mask).astype(values.dtype)
    return jnp.sum(values * mask) / jnp.sum(mask)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``nn.CrossEntropyLoss`` on raw logits: mean of ``-log softmax(logits)[label]``.

    Stable for large logits (log-sum-exp with the maximum subtracted).

    Args:
        logits: ``(B, classes)``.
        labels: int ``(B,)``.
        mask: optional ``(B,)``, 1 for real examples, 0 for padding.

    Returns:
        The mean over the real examples, a scalar.

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(cross_entropy_loss(jnp.zeros((2, 10)), jnp.array([3, 7]))), 4)  # log(10)
        2.3026
    """
    per_example = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    return masked_mean(per_example, mask)


def nll_loss(log_probs: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``nn.NLLLoss``: mean of ``-log_probs[label]``, for the output of a ``LogSoftmax`` layer.

    Args:
        log_probs: ``(B, classes)`` log-probabilities.
        labels: int ``(B,)``.
        mask: optional ``(B,)``, 1 for real examples, 0 for padding.

    Returns:
        The mean over the real examples, a scalar.

    Example:
        >>> import jax.numpy as jnp
        >>> float(nll_loss(jnp.log(jnp.array([[0.5, 0.5], [0.25, 0.75]])), jnp.array([0, 1]), jnp.array([1, 0])))
        0.6931471824645996
    """
    picked = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    return masked_mean(-picked, mask)


def log_softmax_nll_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """The lesson's main variant: a ``LogSoftmax`` layer on the logits, then ``NLLLoss``."""
    return nll_loss(jax.nn.log_softmax(logits), labels, mask)


def mse_loss(predictions: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """The lesson's mean squared error ``l = 1/(2n) sum_i (y_i - yhat_i)^2`` over the n examples.

    For vector outputs (e.g. one-hot targets) each example's squared error is summed over its entries.

    Args:
        predictions: ``(B, ...)``.
        targets: the same shape.
        mask: optional ``(B,)``, 1 for real examples, 0 for padding.

    Returns:
        A scalar.

    Example:
        >>> import jax.numpy as jnp
        >>> float(mse_loss(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 0.0]])))
        0.5
    """
    squared_error = jnp.square(targets - predictions).reshape(predictions.shape[0], -1).sum(axis=-1)
    return masked_mean(squared_error, mask) / 2


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Fraction of examples whose largest logit is the label.

    Args:
        logits: ``(B, classes)``.
        labels: int ``(B,)``.
        mask: optional ``(B,)``, 1 for real examples, 0 for padding.

    Returns:
        A scalar in [0, 1].

    Example:
        >>> import jax.numpy as jnp
        >>> float(accuracy(jnp.array([[0.0, 1.0], [1.0, 0.0]]), jnp.array([1, 1])))
        0.5
    """
    correct = (jnp.argmax(logits, axis=-1).astype(labels.dtype) == labels).astype(logits.dtype)
    return masked_mean(correct, mask)


LOSSES = {"nll": log_softmax_nll_loss, "ce": cross_entropy_loss}
