"""Settings -> objects: the lesson's model and the optax optimizer that a ``TrainConfig`` describes.

The one bridge from settings to objects; ``jaxmnist.runs`` uses it when the caller gives no model or
optimizer of its own.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxmnist.arguments import parse_arguments
from jaxmnist.config import SettingsError, TrainConfig, steps_per_epoch
from jaxmnist.model import ACTIVATIONS, MLP
from jaxmnist.optimizers import build_optimizer_by_name
from jaxmnist.schedules import build_schedule


def build_model(config: TrainConfig) -> MLP:
    """The MLP that ``config`` describes; with a list of dropout rates, one that holds its rate in its
    variables (built with the first rate; each run's model is given its own with ``clone``).

    Example:
        >>> build_model(TrainConfig(hidden_sizes=(32,))).hidden_sizes
        (32,)
    """
    return MLP(
        hidden_sizes=config.hidden_sizes,
        activation=ACTIVATIONS[config.activation],
        weight_init=config.weight_init,
        param_dtype=jnp.dtype(config.dtype),
        dropout_rate=config.dropout[0] if isinstance(config.dropout, tuple) else config.dropout,
        dropout_rate_per_run=isinstance(config.dropout, tuple),
    )


def learning_rate_schedule(config: TrainConfig, num_train_images: int) -> float | optax.Schedule:
    """The learning rate, or its schedule over the run's steps."""
    per_epoch = steps_per_epoch(config, num_train_images)
    arguments = parse_arguments(config.schedule_args, "schedule_args")
    return build_schedule(config.schedule, arguments, config.learning_rate, config.epochs * per_epoch, per_epoch,
                          config.warmup_steps)  # fmt: skip


def build_optimizer(
    config: TrainConfig, num_train_images: int, per_run_hyperparameters: bool = False
) -> optax.GradientTransformation:
    """The optax optimizer that ``config`` (one value per setting) describes.

    Args:
        config: the run's settings.
        num_train_images: the training set's size before the held-out images (schedules span the run).
        per_run_hyperparameters: hold the learning rate, momentum and weight decay in the optimizer state
            (``optax.inject_hyperparams``), so that runs stacked along an axis may each have their own.

    Returns:
        The optimizer; with a schedule or ``per_run_hyperparameters``, ``optax.inject_hyperparams`` of it,
        so every step reports its rate.

    Raises:
        SettingsError: ``optimizer`` names no optimizer, or ``optimizer_args`` do not fit its signature.

    Example:
        >>> optimizer = build_optimizer(TrainConfig(optimizer="adam", schedule="cosine"), 60_000)
        >>> float(optimizer.init({"w": jnp.zeros(2)}).hyperparams["learning_rate"])
        0.003
    """
    hyperparameters = {"learning_rate": learning_rate_schedule(config, num_train_images)}
    config = config.with_optimizer_defaults()
    if config.momentum is not None:
        hyperparameters["momentum"] = config.momentum
    if config.weight_decay is not None:
        hyperparameters["weight_decay"] = config.weight_decay
    arguments = parse_arguments(config.optimizer_args, "optimizer_args")

    def make(learning_rate, momentum=None, weight_decay=None) -> optax.GradientTransformation:
        own = {"momentum": momentum} if momentum is not None else {}
        own.update({"weight_decay": weight_decay} if weight_decay is not None else {})
        return build_optimizer_by_name(config.optimizer, learning_rate, arguments, own)

    try:
        make(**hyperparameters)  # its arguments checked here, once, before any state exists
    except ValueError as error:
        raise SettingsError(str(error)) from error
    if config.schedule == "constant" and not per_run_hyperparameters:
        return make(**hyperparameters)
    # A schedule alone injects the learning rate only; the other values stay constants of the program.
    static = () if per_run_hyperparameters else tuple(name for name in hyperparameters if name != "learning_rate")
    return optax.inject_hyperparams(make, static_args=static)(**hyperparameters)
