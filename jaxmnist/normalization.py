"""The input transform as a pure function: uint8 pixels to floats, by default the lesson's, in [-1, 1]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

# The lesson's Normalize(0.5, 0.5): pixels to [-1, 1].
LESSON_NORMALIZATION = (0.5, 0.5)


def normalize(
    images: ArrayLike, dtype: DTypeLike = jnp.float32, normalization: tuple[float, float] = LESSON_NORMALIZATION
) -> jax.Array:
    """``ToTensor()`` then ``Normalize(mean, std)``: ``x = (p / 255 - mean) / std``, by default the lesson's.

    Args:
        images: uint8 pixels of any shape.
        dtype: the floating dtype to compute in (float64 for exactness checks).
        normalization: ``(mean, std)``; ``(0.5, 0.5)`` maps the pixels to [-1, 1], ``(0, 1)`` to [0, 1],
            ``(0.1307, 0.3081)`` is PyTorch's MNIST example.

    Returns:
        The normalized pixels, in ``dtype``.

    Example:
        >>> import numpy as np
        >>> normalize(np.array([0, 255], np.uint8)).tolist()
        [-1.0, 1.0]
    """
    mean, std = normalization
    scaled = jnp.asarray(images).astype(dtype) / 255
    return (scaled - mean) / std
