"""What a run trains and with which randomness: its seeds and their keys, the held-out split, and the
model, optimizer and loss (the caller's, or those the settings describe) built into every seed's
initial state.

``fit`` builds a ``Run`` from its arguments; the train command builds one too, to restore a checkpoint
onto the run's own state and to name the model in its header.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmnist.config import TrainConfig, check_against_data
from jaxmnist.model_source import Model, ModelSource, from_object, load_model
from jaxmnist.recipe import build_model, build_optimizer
from jaxmnist.train import ModelCallError, TrainState, create_train_state
from jaxmnist.train.state import LossFn

# Salts for keys derived from the seed besides the init and data keys (which stay split(key(seed))).
_VALIDATION_SALT = 0x76616C  # "val"


class RunError(ValueError):
    """The model, the data and the settings do not fit together; raised before the first step."""


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """The initialization key and the data-order key of a run, both derived from its seed."""
    init_key, data_key = jax.random.split(jax.random.key(seed))
    return init_key, data_key


def epoch_key(data_key: jax.Array, epoch: int) -> jax.Array:
    """The key of one epoch's shuffle (epochs count from 1): reproducible without replaying earlier ones."""
    return jax.random.fold_in(data_key, epoch)


def seed_values(config: TrainConfig) -> list[int]:
    """The seeds of the run's independent runs: ``seed, seed + 1, ..., seed + seeds - 1``."""
    return list(range(config.seed, config.seed + config.seeds))


def hold_out(config: TrainConfig, images: np.ndarray, labels: np.ndarray) -> tuple[tuple, tuple]:
    """The training images split into ``(train, validation)``: ``val_split`` of them held out.

    Which ones depends on the seed alone (a key of its own, so the init and shuffle keys do not move);
    both parts keep the data set's order.

    Example:
        >>> images, labels = np.zeros((10, 28, 28), np.uint8), np.arange(10)
        >>> (train, _), (validation, held_labels) = hold_out(TrainConfig(val_split=3), images, labels)
        >>> len(train), len(validation), sorted(set(held_labels) & set(_))
        (7, 3, [])
    """
    check_against_data(config, len(images))
    order = np.asarray(
        jax.random.permutation(jax.random.fold_in(jax.random.key(config.seed), _VALIDATION_SALT), len(images))
    )
    held, kept = np.sort(order[: config.val_split]), np.sort(order[config.val_split :])
    return (images[kept], labels[kept]), (images[held], labels[held])


@dataclasses.dataclass(frozen=True)
class Run:
    """What a run trains, whatever its source.

    Attributes:
        model: where every seed's model comes from.
        optimizer: the optax optimizer.
        loss: ``"nll"``, ``"ce"`` or a ``loss_fn(logits, labels, mask)``.
        image_shape: the shape of one input image, e.g. ``(28, 28)`` or ``(32, 32, 3)``: from the data.
        optimizer_from_config: the optimizer is the one the settings describe, so their learning rate is
            the one it uses (another optimizer's rate is known only when it reports it).
    """

    model: ModelSource
    optimizer: optax.GradientTransformation
    loss: str | LossFn
    image_shape: tuple[int, ...]
    optimizer_from_config: bool

    def learning_rate(self, config: TrainConfig) -> float | None:
        """The learning rate to report when the optimizer does not report its own (``inject_hyperparams``)."""
        return config.learning_rate if self.optimizer_from_config else None


def check_images(images: np.ndarray, argument: str) -> tuple[int, ...]:
    """The shape of one image of ``images``; ``RunError`` naming ``argument`` unless uint8 ``(N, H, W[, C])``."""
    if getattr(images, "dtype", None) != np.uint8 or np.ndim(images) not in (3, 4):
        raise RunError(
            f"`{argument}` images must be uint8 (N, H, W) or (N, H, W, C), got "
            f"{getattr(images, 'dtype', type(images).__name__)}{tuple(np.shape(images))}"
        )
    return tuple(images.shape[1:])


def build_run(
    config: TrainConfig,
    image_shape: tuple[int, ...],
    num_train_images: int,
    model: Model | ModelSource | Callable[..., Model] | None = None,
    optimizer: optax.GradientTransformation | None = None,
    loss: str | LossFn | None = None,
) -> Run:
    """The run's model, optimizer and loss: the given ones, else those ``config`` describes.

    Args:
        config: the run's settings.
        image_shape: one training image's shape.
        num_train_images: the training set's size before the held-out images (schedules span the run).
        model: any model ``jaxmnist.model_source.from_object`` takes; default: ``config.model`` when set,
            else the lesson's MLP.
        optimizer: any optax optimizer; default: the one ``config`` describes.
        loss: default ``config.loss``.

    Returns:
        The ``Run``.

    Example:
        >>> run = build_run(TrainConfig(), (28, 28), 60_000)
        >>> run.model.name, run.loss, run.learning_rate(TrainConfig())
        ('MLP', 'nll', 0.003)
    """
    if model is None:
        source = load_model(config.model) if config.model else from_object(build_model(config))
    else:
        source = model if isinstance(model, ModelSource) else from_object(model)
    if config.seeds > 1 and not source.per_seed:
        raise RunError(
            f"`model` {source.name} is built without `rngs`: every seed would start from the same weights; for "
            "`seeds` > 1 give its class or a function that builds it from `rngs`"
        )
    return Run(
        model=source,
        optimizer=build_optimizer(config, num_train_images) if optimizer is None else optimizer,
        loss=config.loss if loss is None else loss,
        image_shape=tuple(image_shape),
        optimizer_from_config=optimizer is None,
    )


def initial_state(config: TrainConfig, run: Run) -> TrainState:
    """The freshly initialized train state of every seed of the run.

    With ``seeds`` > 1, the states stacked along a leading axis, each exactly the state its seed gives
    alone: a linen model is initialized from the seed's key, an NNX model built from ``nnx.Rngs`` of it.
    """
    states = []
    for seed in seed_values(config):
        init_key = run_keys(seed)[0]
        module = run.model.build(init_key)
        try:
            state = create_train_state(
                init_key, module, run.optimizer, loss=run.loss, input_shape=(1, *run.image_shape)
            )
        except (ModelCallError, TypeError) as error:  # a __call__ or a loss that cannot be called as asked
            raise RunError(str(error)) from error
        except Exception as error:  # the model's own code raised on images of the data's shape
            first_line = str(error).splitlines()[0] if str(error) else ""
            raise RunError(
                f"{run.model.name} raised {type(error).__name__} when initialized on images of shape "
                f"{run.image_shape}: {first_line}"
            ) from error
        states.append(state)
    if len(states) == 1:
        return states[0]
    # One calling convention for all seeds: an NNX model's is a new object per built module.
    first = states[0]
    states = [first, *(state.replace(apply_fn=first.apply_fn, model_call=first.model_call) for state in states[1:])]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def count_classes(state: TrainState, image_shape: tuple[int, ...]) -> int:
    """The number of classes the model of ``state`` (one seed's) scores; ``RunError`` unless its output is
    ``(batch, classes)`` logits. Found by shape alone (``jax.eval_shape``): nothing is computed."""
    dtype = jax.tree.leaves(state.params)[0].dtype
    sample = jax.ShapeDtypeStruct((2, *image_shape), dtype)
    try:
        output = jax.eval_shape(lambda images: state.apply_model(images)[0], sample)
    except Exception as error:  # the model's own code: say what it raised, in one line
        first_line = str(error).splitlines()[0] if str(error) else ""
        message = f"the model cannot take images of shape {image_shape}: {type(error).__name__}: {first_line}"
        raise RunError(message) from error
    shape = getattr(output, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != 2:
        shown = shape if shape is not None else type(output).__name__
        raise RunError(
            f"the model's output for 2 images of shape {image_shape} is {shown}; it must be logits (2, classes)"
        )
    return int(shape[1])


def check_labels(classes: int, labels: Mapping[str, np.ndarray]) -> None:
    """``RunError`` naming the first label outside ``[0, classes)`` and where it is (e.g. ``train_data``)."""
    for where, values in labels.items():
        values = np.asarray(values)
        outside = values[(values < 0) | (values >= classes)]
        if outside.size:
            raise RunError(
                f"label {outside[0]} in `{where}` is outside the model's {classes} classes [0, {classes}) "
                f"({outside.size} such label(s))"
            )
