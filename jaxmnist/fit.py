"""The lesson's training run as a library call: config in, one result per epoch out.

``fit`` places the data on the device once, compiles one epoch (timed on its own), then yields an
``EpochResult`` per epoch with one host synchronisation each; printing and files are the caller's job.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxmnist.data import normalize
from jaxmnist.model import ACTIVATIONS, MLP
from jaxmnist.train import (
    Metrics,
    TrainState,
    create_train_state,
    evaluate,
    gather_batch,
    param_dtype,
    train_epoch,
    train_epoch_stepwise,
    train_step,
)

ArrayPair = tuple[np.ndarray, np.ndarray]
EpochFn = Callable[[TrainState, jax.Array], tuple[TrainState, Metrics]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; the defaults are the lesson's."""

    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 0.003
    seed: int = 0
    hidden_sizes: tuple[int, ...] = (128, 64)
    activation: str = "relu"
    weight_init: Literal["torch", "flax"] = "torch"
    loss: Literal["nll", "ce"] = "nll"
    loop: Literal["scan", "step"] = "scan"
    dtype: Literal["float32", "float64"] = "float32"


@dataclasses.dataclass(frozen=True)
class EpochResult:
    """What one epoch produced; ``train_loss`` is the lesson's mean of the batch losses."""

    epoch: int
    state: TrainState
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    seconds: float
    compile_seconds: float
    samples_per_second: float
    step_losses: np.ndarray = dataclasses.field(repr=False)


def build_model(config: TrainConfig) -> MLP:
    """The MLP that ``config`` describes."""
    return MLP(
        hidden_sizes=config.hidden_sizes,
        activation=ACTIVATIONS[config.activation],
        weight_init=config.weight_init,
        param_dtype=jnp.dtype(config.dtype),
    )


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """The initialization key and the data-order key of a run, both derived from its seed."""
    init_key, data_key = jax.random.split(jax.random.key(seed))
    return init_key, data_key


def epoch_key(data_key: jax.Array, epoch: int) -> jax.Array:
    """The key of one epoch's shuffle (epochs count from 1): reproducible without replaying earlier ones."""
    return jax.random.fold_in(data_key, epoch)


def compile_epoch(config: TrainConfig, state: TrainState, images: jax.Array, labels: jax.Array) -> EpochFn:
    """Compiles one epoch ahead of time, so that compile time is measured apart from training time."""
    key = epoch_key(run_keys(config.seed)[1], 1)
    if config.loop == "scan":
        compiled = train_epoch.lower(state, images, labels, key, batch_size=config.batch_size).compile()
        return lambda state, key: compiled(state, images, labels, key)
    if config.loop == "step":
        first_batch = gather_batch(
            images, labels, jnp.zeros(config.batch_size, jnp.int32), jnp.ones(config.batch_size, bool),
            param_dtype(state),
        )
        compiled_step = train_step.lower(state, first_batch).compile()
        return lambda state, key: train_epoch_stepwise(
            state, images, labels, key, config.batch_size, step_fn=compiled_step
        )
    raise ValueError(f"loop must be 'scan' or 'step', got {config.loop!r}")


def fit(
    config: TrainConfig, train_data: ArrayPair, test_data: ArrayPair, state: TrainState | None = None
) -> Iterator[EpochResult]:
    """Trains for ``config.epochs`` epochs, yielding each epoch's losses, test metrics and timing."""
    init_key, data_key = run_keys(config.seed)
    if state is None:
        state = create_train_state(
            init_key, build_model(config), learning_rate=config.learning_rate, loss=config.loss
        )
    images, labels = jax.device_put(train_data[0]), jax.device_put(train_data[1])
    test_images = normalize(jax.device_put(test_data[0]), jnp.dtype(config.dtype))
    test_labels = jax.device_put(test_data[1])

    started = time.perf_counter()
    run_epoch = compile_epoch(config, state, images, labels)
    compile_seconds = time.perf_counter() - started

    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        state, metrics = run_epoch(state, epoch_key(data_key, epoch))
        step_losses = np.asarray(metrics["loss"])
        seconds = time.perf_counter() - started
        test_metrics = evaluate(state, test_images, test_labels)
        yield EpochResult(
            epoch=epoch,
            state=state,
            train_loss=float(np.mean(step_losses, dtype=np.float64)),
            train_accuracy=float(np.mean(np.asarray(metrics["accuracy"]), dtype=np.float64)),
            test_loss=float(test_metrics["loss"]),
            test_accuracy=float(test_metrics["accuracy"]),
            seconds=seconds,
            compile_seconds=compile_seconds if epoch == 1 else 0.0,
            samples_per_second=len(train_data[0]) / seconds,
            step_losses=step_losses,
        )
