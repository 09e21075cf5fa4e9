"""Classifying digit images with trained parameters (``python -m jaxmnist.predict`` prints the result).

An image is read as grayscale, resized to 28x28 if it is another size, and inverted when it is dark
ink on a light background (MNIST digits are light on dark); then the lesson's normalization applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxmnist.idx import IMAGE_SIZE

if TYPE_CHECKING:
    from jaxmnist.config import TrainConfig


class ImageError(ValueError):
    """An image could not be read."""


def read_digit_image(path: Path) -> np.ndarray:
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


def predict_probabilities(config: TrainConfig, params: Any, images: np.ndarray) -> np.ndarray:
    """Class probabilities ``(N, 10)`` of uint8 ``images`` under a trained model's config and parameters."""
    import jax

    from jaxmnist.config import build_model
    from jaxmnist.normalization import normalize

    logits = build_model(config).apply({"params": params}, normalize(images, np.dtype(config.dtype)))
    return np.asarray(jax.nn.softmax(logits))
