"""Classifying digit images with trained parameters (``python -m jaxmnist.predict`` prints the result).

An image is read as grayscale, resized to the model's input size (28x28 for the lesson) if it is another
size, and inverted when it is dark ink on a light background (MNIST digits are light on dark); then the
lesson's normalization applies. The model is the lesson's MLP, or the user's model rebuilt from the
spec its parameters file records (``--model FILE.py:NAME``), with its carried collections.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxmnist.idx import IMAGE_SIZE

if TYPE_CHECKING:
    from jaxmnist.config import TrainConfig


class ImageError(ValueError):
    """An image could not be read, or not in the shape the model takes."""


def read_digit_image(path: str | os.PathLike, image_shape: tuple[int, ...] = (IMAGE_SIZE, IMAGE_SIZE)) -> np.ndarray:
    """A uint8 MNIST-style image (light digit on dark) of ``image_shape`` (``(H, W)`` or ``(H, W, 1)``) from
    any image file Pillow reads."""
    from PIL import Image, UnidentifiedImageError

    if len(image_shape) == 3 and image_shape[2] != 1:
        raise ImageError(f"{path}: the model takes {image_shape[2]}-channel images; predict reads grayscale digits")
    height, width = image_shape[:2]
    try:
        with Image.open(path) as image:
            gray = image.convert("L")
            if gray.size != (width, height):
                gray = gray.resize((width, height), Image.Resampling.LANCZOS)
            pixels = np.asarray(gray, np.uint8)
    except (OSError, UnidentifiedImageError) as error:
        raise ImageError(f"{path}: cannot read as an image ({error})") from error
    pixels = 255 - pixels if pixels.mean() > 127 else pixels
    return pixels.reshape(image_shape)


def predict_probabilities(
    config: TrainConfig, params: Any, images: np.ndarray, seed: int | None = None, collections: Any = None
) -> np.ndarray:
    """Class probabilities ``(N, classes)`` of uint8 ``images`` under a trained model's config and parameters.

    The model is the one ``config`` describes (``config.model``, or the lesson's MLP), run in inference
    mode with its carried ``collections`` (e.g. BatchNorm's running statistics). Parameters of several
    seeds (``config.seeds`` > 1, stacked) give the ensemble's mean probability, or those of ``seed`` alone.

    Raises:
        ValueError: ``seed`` is not one of the parameters' seeds.
        jaxmnist.model_source.ModelSpecError: the model no longer builds parameters like these.
    """
    import jax
    import optax

    from jaxmnist.checkpoint import tree_difference
    from jaxmnist.model_source import ModelSpecError
    from jaxmnist.normalization import normalize
    from jaxmnist.runs import build_run, run_keys, seed_values
    from jaxmnist.train import create_train_state

    collections = collections or {}
    run = build_run(config, images.shape[1:], 1, optimizer=optax.identity())
    init_key = run_keys(config.seed)[0]
    template = create_train_state(
        init_key, run.model.build(init_key), optax.identity(), input_shape=(1, *images.shape[1:])
    )
    one_seed = params if config.seeds == 1 else jax.tree.map(lambda leaf: leaf[0], params)
    difference = tree_difference(one_seed, template.params)
    if difference is not None:
        raise ModelSpecError(f"{config.model or 'the MLP'} no longer builds the saved parameters: {difference}")
    inputs = normalize(images, np.dtype(config.dtype))

    def probabilities(params: Any, collections: Any) -> jax.Array:
        return jax.nn.softmax(template.replace(params=params, collections=collections).apply_model(inputs)[0])

    if config.seeds == 1:
        if seed not in (None, config.seed):
            raise ValueError(f"`seed`={seed}: these parameters are of seed {config.seed} alone")
        return np.asarray(probabilities(params, collections))
    each = np.asarray(jax.vmap(probabilities)(params, collections))
    if seed is None:
        return each.mean(axis=0)
    if seed not in seed_values(config):
        raise ValueError(
            f"`seed`={seed}: these parameters are of seeds {config.seed}..{config.seed + config.seeds - 1}"
        )
    return each[seed - config.seed]
