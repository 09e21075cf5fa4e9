"""Classifying digit images with trained parameters (``python -m jaxmnist.predict`` prints the result).

An image is read as grayscale, resized to 28x28 if it is another size, and inverted when it is dark
ink on a light background (MNIST digits are light on dark); then the lesson's normalization applies.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxmnist.idx import IMAGE_SIZE

if TYPE_CHECKING:
    from jaxmnist.config import TrainConfig


class ImageError(ValueError):
    """An image could not be read."""


def read_digit_image(path: str | os.PathLike) -> np.ndarray:
    """A uint8 ``(28, 28)`` MNIST-style image (light digit on dark) from any image file Pillow reads."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            gray = image.convert("L")
            if gray.size != (IMAGE_SIZE, IMAGE_SIZE):
                gray = gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
            pixels = np.asarray(gray, np.uint8)
    except (OSError, UnidentifiedImageError) as error:
        raise ImageError(f"{path}: cannot read as an image ({error})") from error
    return 255 - pixels if pixels.mean() > 127 else pixels


def predict_probabilities(config: TrainConfig, params: Any, images: np.ndarray, seed: int | None = None) -> np.ndarray:
    """Class probabilities ``(N, 10)`` of uint8 ``images`` under a trained model's config and parameters.

    Parameters of several seeds (``config.seeds`` > 1, stacked) give the ensemble's mean probability, or
    those of ``seed`` alone.
    """
    import jax

    from jaxmnist.config import build_model, seed_values
    from jaxmnist.normalization import normalize

    model, inputs = build_model(config), normalize(images, np.dtype(config.dtype))
    probabilities = lambda params: jax.nn.softmax(model.apply({"params": params}, inputs))
    if config.seeds == 1:
        if seed not in (None, config.seed):
            raise ValueError(f"`seed`={seed}: these parameters are of seed {config.seed} alone")
        return np.asarray(probabilities(params))
    each = np.asarray(jax.vmap(probabilities)(params))
    if seed is None:
        return each.mean(axis=0)
    if seed not in seed_values(config):
        raise ValueError(
            f"`seed`={seed}: these parameters are of seeds {config.seed}..{config.seed + config.seeds - 1}"
        )
    return each[seed - config.seed]
