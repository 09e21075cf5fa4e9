"""``python -m jaxmnist.predict --params FILE IMAGE.png ...``: the top-3 digits of each image.

An image is read as grayscale, resized to 28x28 if it is another size, and inverted when it is dark
ink on a light background (MNIST digits are light on dark); then the lesson's normalization applies.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxmnist.cli import EXIT_BAD_INPUT, OneLineParser, positive_int
from jaxmnist.data import IMAGE_SIZE

if TYPE_CHECKING:
    from jaxmnist.fit import TrainConfig


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

    from jaxmnist.data import normalize
    from jaxmnist.fit import build_model

    logits = build_model(config).apply({"params": params}, normalize(images, np.dtype(config.dtype)))
    return np.asarray(jax.nn.softmax(logits))


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m jaxmnist.predict", description="Classify digit images with trained jaxmnist parameters.")
    parser.add_argument("--params", type=Path, required=True, metavar="FILE", help="parameters written by python -m jaxmnist.train --save FILE")
    parser.add_argument("--top", type=positive_int, default=3, help="how many digits to show per image (default 3)")
    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="28x28 (or larger, resized) digit images, e.g. PNG")
    args = parser.parse_args(argv)
    import jax

    from jaxmnist.checkpoint import CheckpointError, load_params

    try:
        config, params = load_params(args.params)
        images = np.stack([read_digit_image(path) for path in args.images])
    except (ImageError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    probabilities = predict_probabilities(config, params, images)
    for path, row in zip(args.images, probabilities):
        best = np.argsort(row)[::-1][: min(args.top, len(row))]
        print(f"{path}: " + ", ".join(f"{digit} ({row[digit]:.3f})" for digit in best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
