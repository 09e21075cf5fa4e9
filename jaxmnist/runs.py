"""What a run trains and with which randomness: its runs (grid rows × seeds), their keys, the held-out
split, and the model, optimizer and loss (the caller's, or those the settings describe) built into every
run's initial state.

``fit`` builds a ``Run`` from its arguments; the train command builds one too, to restore a checkpoint
onto the run's own state and to name the model in its header.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmnist.config import (
    TrainConfig,
    check_against_data,
    grid_rows,
    num_runs,
    row_config,
    swept_settings,
)
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


@dataclasses.dataclass(frozen=True)
class GridRun:
    """One of the runs trained together: its grid row's values (``{}`` without a grid) and its seed."""

    values: dict[str, float]
    seed: int
    row: int = 0


def grid_runs(config: TrainConfig) -> list[GridRun]:
    """Every run of ``config``: each grid row's ``seeds`` seeds, rows in ``grid_rows`` order.

    Example:
        >>> config = TrainConfig(learning_rate=(0.1, 0.2), seeds=2)
        >>> [(run.values["learning_rate"], run.seed) for run in grid_runs(config)]
        [(0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)]
    """
    return [GridRun(values, seed, row) for row, values in enumerate(grid_rows(config)) for seed in seed_values(config)]


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
    if not config.val_split:  # nothing held out: no permutation to draw (or compile)
        return (images, labels), (images[:0], labels[:0])
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
        row_optimizers: the optimizer of every grid row (each initializes its runs' hyperparameters);
            ``(optimizer,)`` without a grid.
        num_train_images: the training set's size before the held-out images.
    """

    model: ModelSource
    optimizer: optax.GradientTransformation
    loss: str | LossFn
    image_shape: tuple[int, ...]
    optimizer_from_config: bool
    row_optimizers: tuple[optax.GradientTransformation, ...] = ()
    num_train_images: int = 0

    def learning_rates(self, config: TrainConfig) -> list[float] | None:
        """Every run's learning rate as the settings give it, when they give it exactly (their optimizer,
        at a constant rate); None otherwise: then the rate is the one the optimizer reports, if any."""
        if not self.optimizer_from_config or config.schedule != "constant":
            return None
        return [run.values.get("learning_rate", config.learning_rate) for run in grid_runs(config)]


def check_images(images: np.ndarray, argument: str) -> tuple[int, ...]:
    """The shape of one image of ``images``; ``RunError`` naming ``argument`` unless uint8 ``(N, H, W[, C])``."""
    if getattr(images, "dtype", None) != np.uint8 or np.ndim(images) not in (3, 4):
        raise RunError(
            f"`{argument}` images must be uint8 (N, H, W) or (N, H, W, C), got "
            f"{getattr(images, 'dtype', type(images).__name__)}{tuple(np.shape(images))}"
        )
    return tuple(images.shape[1:])


def settings_model(config: TrainConfig) -> ModelSource:
    """The model the settings describe: ``config.model`` when set, else the lesson's MLP."""
    return load_model(config.model) if config.model else from_object(build_model(config))


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
        >>> run.model.name, run.loss, run.learning_rates(TrainConfig())
        ('MLP', 'nll', [0.003])
    """
    if model is None:
        source = settings_model(config)
    else:
        source = model if isinstance(model, ModelSource) else from_object(model)
    if config.seeds > 1 and not source.per_seed:
        raise RunError(
            f"`model` {source.name} is built without `rngs`: every seed would start from the same weights; for "
            "`seeds` > 1 give its class or a function that builds it from `rngs`"
        )
    swept = swept_settings(config)
    if optimizer is not None and set(swept) - {"dropout"}:
        raise RunError(
            f"`{next(iter(swept))}` lists values for the optimizer the settings describe, and `optimizer` is "
            "given: sweep with the settings' optimizer, or give one value"
        )
    if model is not None and "dropout" in swept:
        raise RunError("`dropout` lists rates for the lesson's MLP, and `model` is given: give one value")
    if optimizer is None:
        rows = grid_rows(config)
        row_optimizers = tuple(
            build_optimizer(row_config(config, row), num_train_images, per_run_hyperparameters=bool(swept))
            for row in rows
        )
    else:
        row_optimizers = (optimizer,)
    return Run(
        model=source,
        optimizer=row_optimizers[0],
        loss=config.loss if loss is None else loss,
        image_shape=tuple(image_shape),
        optimizer_from_config=optimizer is None,
        row_optimizers=row_optimizers,
        num_train_images=num_train_images,
    )


def initial_state(config: TrainConfig, run: Run) -> TrainState:
    """The freshly initialized train state of every run (grid rows × seeds).

    With several runs, the states stacked along a leading axis, each exactly the state its values and
    seed give alone: a linen model is initialized from the seed's key, an NNX model built from
    ``nnx.Rngs`` of it; the optimizer holds the row's hyperparameters. Before the second run is built,
    the memory the program needs is estimated from the first, and a grid too large is refused
    (``RunError``).
    """
    first_run = GridRun(grid_rows(config)[0], config.seed)
    if num_runs(config) == 1:
        return _run_state(run, first_run)
    compiled: dict[int, Callable[[jax.Array], TrainState]] = {}  # one compiled initialization per module
    states = [_run_state(run, first_run, compiled)]
    check_memory(config, states[0], run.num_train_images)  # before the other runs are listed or built
    states += [_run_state(run, grid_run, compiled) for grid_run in grid_runs(config)[1:]]
    # One program for every run: the first run's calling convention and optimizer, whose update reads
    # each run's hyperparameters from its own state (an NNX model's convention is a new object per module).
    first = states[0]
    shared = {"apply_fn": first.apply_fn, "model_call": first.model_call, "tx": first.tx}
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *(state.replace(**shared) for state in states))


def _run_state(run: Run, grid_run: GridRun, compiled: dict | None = None) -> TrainState:
    """The initial state of one run: its seed's weights, its row's optimizer and dropout rate.

    With ``compiled`` (several runs), a linen model is initialized by one compiled call per module
    (kept in ``compiled``, by grid row when rows differ in dropout), the same numbers as the eager
    initialization a single run uses, without compiling each of its operations on a cold start; the
    row's optimizer state is then initialized from those parameters.
    """
    init_key = run_keys(grid_run.seed)[0]
    module = run.model.build(init_key)
    if "dropout" in grid_run.values:
        module = module.clone(dropout_rate=grid_run.values["dropout"])
    optimizer = run.row_optimizers[grid_run.row] if run.row_optimizers else run.optimizer
    create = partial(create_train_state, model=module, loss=run.loss, input_shape=(1, *run.image_shape))
    try:
        if compiled is None or not isinstance(module, nn.Module):
            return create(init_key, optimizer=optimizer)
        slot = grid_run.row if "dropout" in grid_run.values else 0
        if slot not in compiled:
            compiled[slot] = jax.jit(partial(create, optimizer=optimizer))
        try:
            state = compiled[slot](init_key)
        except jax.errors.ConcretizationTypeError:  # a model whose initialization looks at values: eager
            return create(init_key, optimizer=optimizer)
        return state.replace(tx=optimizer, opt_state=optimizer.init(state.params))
    except (ModelCallError, TypeError) as error:  # a __call__ or a loss that cannot be called as asked
        raise RunError(str(error)) from error
    except Exception as error:  # the model's own code raised on images of the data's shape
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise RunError(
            f"{run.model.name} raised {type(error).__name__} when initialized on images of shape "
            f"{run.image_shape}: {first_line}"
        ) from error


def estimated_bytes(config: TrainConfig, state: TrainState, num_train_images: int) -> int:
    """About how much memory the compiled epoch of ``num_runs(config)`` runs like ``state`` (one run's) needs.

    Per run: the state twice (the donated one and the updated one), its gradients, a batch of images in
    the model's dtype with as much again for activations, and the epoch's per-step metrics; a rough
    figure, meant to refuse what cannot fit, before anything is compiled.
    """
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves((state.params, state.opt_state, state.collections)))
    param_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
    itemsize = jax.tree.leaves(state.params)[0].dtype.itemsize
    batch_bytes = 2 * config.batch_size * int(np.prod(state.image_shape)) * itemsize
    metric_bytes = 4 * 8 * (num_train_images - config.val_split) // config.batch_size + 64
    return num_runs(config) * (2 * state_bytes + param_bytes + batch_bytes + metric_bytes)


def available_bytes() -> int | None:
    """Memory free for the program: the default device's free memory, else the host's; None when unknown."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every system reports it
        return None


def check_memory(config: TrainConfig, state: TrainState, num_train_images: int) -> None:
    """``RunError`` with the figures when the runs of ``config`` would not fit in memory."""
    needed, available = estimated_bytes(config, state, num_train_images), available_bytes()
    if available is not None and needed > available:
        raise RunError(
            f"{num_runs(config):,} runs in one program need about {needed / 2**30:.1f} GiB, more than the "
            f"{available / 2**30:.1f} GiB free: give fewer values or `seeds`"
        )


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
