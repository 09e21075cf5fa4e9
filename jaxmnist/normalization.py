"""The lesson's input transform as a pure function: uint8 pixels to floats in [-1, 1]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike


def normalize(images: ArrayLike, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """The lesson's ``ToTensor()`` then ``Normalize(0.5, 0.5)``: ``x = (p / 255 - 0.5) / 0.5``.

    Args:
        images: uint8 pixels of any shape.
        dtype: the floating dtype to compute in (float64 for exactness checks).

    Returns:
        The pixels mapped to [-1, 1], in ``dtype``.

    Example:
        >>> import numpy as np
        >>> normalize(np.array([0, 255], np.uint8)).tolist()
        [-1.0, 1.0]
    """
    scaled = jnp.asarray(images).astype(dtype) / 255
    return (scaled - 0.5) / 0.5
