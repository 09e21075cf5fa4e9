"""Classifying digit images with trained parameters (``python -m jaxmnist.predict`` prints the result).

An image is read as grayscale, resized to the model's input size (28x28 for the lesson) if it is another
size, and inverted when it is dark ink on a light background (MNIST digits are light on dark); then the
lesson's normalization applies. The model is the lesson's MLP, or the user's model rebuilt from the
spec its parameters file records (``--model FILE.py:NAME``), with its carried collections.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxmnist.idx import IMAGE_SIZE

if TYPE_CHECKING:
    from jaxmnist.config import TrainConfig
    from jaxmnist.plan import RunPlan


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
    config: TrainConfig | RunPlan,
    params: Any,
    images: np.ndarray,
    seed: int | None = None,
    collections: Any = None,
    values: dict[str, float] | None = None,
    diverged: Sequence[int] = (),
) -> np.ndarray:
    """Class probabilities ``(N, classes)`` of uint8 ``images`` under a trained model's config and parameters.

    The model is the one ``config`` describes (``config.model``, or the lesson's MLP), run in inference
    mode with its carried ``collections`` (e.g. BatchNorm's running statistics). Parameters of several
    runs (stacked: ``config.seeds`` > 1, or a grid) give the mean probability of the runs chosen: those
    of the grid configuration ``values`` names (every swept setting's value, e.g.
    ``{"learning_rate": 0.01}``), and of ``seed`` alone when it is given; the runs in ``diverged`` (a
    grid's that diverged in training) are left out.

    Raises:
        ValueError: ``seed`` or ``values`` do not name runs of these parameters (a grid needs ``values``),
            or every run they name diverged.
        jaxmnist.model_source.ModelSpecError: the model no longer builds parameters like these.
    """
    import jax
    import optax

    from jaxmnist.checkpoint import tree_difference
    from jaxmnist.model_source import ModelSpecError
    from jaxmnist.normalization import normalize
    from jaxmnist.plan import plan_of, run_keys
    from jaxmnist.runs import settings_model
    from jaxmnist.train import create_train_state

    collections = collections or {}
    plan = plan_of(config)
    config, runs = plan.config, plan.runs
    chosen = _chosen_runs(runs, plan.swept, values or {}, seed, diverged)
    chosen = [index for index in chosen if index not in diverged]
    if not chosen:
        raise ValueError("the runs chosen diverged in training: their parameters predict nothing; choose others")
    init_key = run_keys(config.seed)[0]
    template = create_train_state(
        init_key, settings_model(config).build(init_key), optax.identity(), input_shape=(1, *images.shape[1:])
    )
    stacked = plan.stacked
    one_run = jax.tree.map(lambda leaf: leaf[0], params) if stacked else params
    difference = tree_difference(one_run, template.params)
    if difference is not None:
        raise ModelSpecError(f"{config.model or 'the MLP'} no longer builds the saved parameters: {difference}")
    inputs = normalize(images, np.dtype(config.dtype), config.normalize)

    def probabilities(params: Any, collections: Any) -> jax.Array:
        return jax.nn.softmax(template.replace(params=params, collections=collections).apply_model(inputs)[0])

    if not stacked:
        return np.asarray(probabilities(params, collections))
    pick = partial(jax.tree.map, lambda leaf: leaf[np.asarray(chosen)])
    return np.asarray(jax.vmap(probabilities)(pick(params), pick(collections))).mean(axis=0)


def _chosen_runs(runs: Sequence, swept: dict[str, tuple[float, ...]], values: dict[str, float], seed: int | None,
                 diverged: Sequence[int]) -> list[int]:  # fmt: skip
    """The positions of the runs that ``values`` and ``seed`` name; ``ValueError`` saying what is missing, with
    the values of configurations that trained (a configuration whose every run diverged is no choice)."""
    from jaxmnist.config import value_text

    trained = [run for index, run in enumerate(runs) if index not in diverged]

    def offered(name: str, among: Sequence) -> str:
        """The values of ``name`` that runs of ``among`` trained with."""
        return ", ".join(value_text(value) for value in swept[name] if any(run.values[name] == value for run in among))

    unknown = sorted(set(values) - set(swept))
    if unknown:
        listed = f"lists only {', '.join(f'`{name}`' for name in swept)}" if swept else "is not a grid"
        raise ValueError(f"`{unknown[0]}`={values[unknown[0]]}: the run {listed}")
    for name, value in values.items():
        if value not in swept[name]:
            raise ValueError(f"`{name}`={value_text(value)} is not among the grid's values ({offered(name, trained)})")
    chosen = [
        index for index, run in enumerate(runs) if all(run.values[name] == value for name, value in values.items())
    ]
    seeds = sorted({runs[index].seed for index in chosen})
    if seed in seeds:
        chosen = [index for index in chosen if runs[index].seed == seed]
    missing = [name for name in swept if name not in values and len(swept[name]) > 1]
    if missing:
        given = [runs[index] for index in chosen if index not in diverged]
        if not given:
            named = {**values, **({"seed": seed} if seed in seeds else {})}
            named_text = ", ".join(f"`{name}`={value_text(value)}" for name, value in named.items())
            raise ValueError(f"every run with {named_text} diverged in training: their parameters predict nothing")
        give = " and ".join(f"`{name}` (one of {offered(name, given)})" for name in missing)
        raise ValueError(f"these parameters are of a grid: give {give} to pick its runs")
    if seed is not None and seed not in seeds:
        raise ValueError(f"`seed`={seed}: these parameters are of seeds {seeds[0]}..{seeds[-1]}")
    return chosen
