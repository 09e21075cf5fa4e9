"""The lesson's training run as a library call: config in, progress and one result per epoch out.

``fit`` places the data on the device once, compiles ahead of time (timed on its own), and runs each
epoch as one compiled call, or in chunks of ``steps_per_call`` steps when the caller wants to
checkpoint or stop inside an epoch. It yields a ``Progress`` after every call (one host
synchronisation each) that holds everything needed to continue exactly; printing, files and signals
are the caller's job.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxmnist.data import normalize
from jaxmnist.model import ACTIVATIONS, MLP
from jaxmnist.parallel import batch_sharded, padded_batch_width, replicate
from jaxmnist.train import (
    TrainState,
    create_train_state,
    epoch_batch_indices,
    evaluate,
    gather_batch,
    num_batches,
    param_dtype,
    train_epoch,
    train_step,
    train_steps,
    train_steps_stepwise,
)

ArrayPair = tuple[np.ndarray, np.ndarray]


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


# Settings a run may change when it resumes another's checkpoint: they do not change the mathematics.
RESUMABLE_CHANGES = frozenset({"epochs", "loop"})


@dataclasses.dataclass(frozen=True)
class EpochResult:
    """What one epoch produced; ``train_loss`` is the lesson's mean of the batch losses."""

    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    seconds: float
    compile_seconds: float
    samples_per_second: float


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a run stands after a compiled call: enough to continue it exactly.

    ``epoch`` is the epoch in progress (from 1), ``position`` the number of its steps done, and
    ``step_losses``/``step_accuracies`` its per-step metrics so far. ``result`` is set when the call
    ended the epoch (then ``position`` equals the epoch's number of batches).
    """

    state: TrainState
    epoch: int
    position: int
    step_losses: np.ndarray
    step_accuracies: np.ndarray
    result: EpochResult | None = None

    @property
    def epoch_done(self) -> bool:
        return self.result is not None

    def continuation(self) -> Progress:
        """The same point as the start of what comes next: a finished epoch becomes the next one's start."""
        if not self.epoch_done:
            return self
        empty = self.step_losses[:0]
        return Progress(self.state, self.epoch + 1, 0, empty, self.step_accuracies[:0])


class DivergenceError(ArithmeticError):
    """The training loss became NaN, infinite or absurdly large; ``epoch`` and ``step`` say where (from 1)."""

    def __init__(self, epoch: int, step: int, loss: float):
        super().__init__(
            f"training diverged: the loss became {loss:.6g} at epoch {epoch}, step {step}; "
            "try a lower learning rate (--lr; the lesson uses 0.003)"
        )
        self.epoch, self.step, self.loss = epoch, step, loss


# A batch cross-entropy above this means the true class got probability below e^-1000: diverged.
DEFAULT_MAX_LOSS = 1000.0


def build_model(config: TrainConfig) -> MLP:
    """The MLP that ``config`` describes."""
    return MLP(
        hidden_sizes=config.hidden_sizes,
        activation=ACTIVATIONS[config.activation],
        weight_init=config.weight_init,
        param_dtype=jnp.dtype(config.dtype),
    )


def initial_state(config: TrainConfig) -> TrainState:
    """The freshly initialized train state of a run."""
    init_key, _ = run_keys(config.seed)
    return create_train_state(init_key, build_model(config), learning_rate=config.learning_rate, loss=config.loss)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """The initialization key and the data-order key of a run, both derived from its seed."""
    init_key, data_key = jax.random.split(jax.random.key(seed))
    return init_key, data_key


def epoch_key(data_key: jax.Array, epoch: int) -> jax.Array:
    """The key of one epoch's shuffle (epochs count from 1): reproducible without replaying earlier ones."""
    return jax.random.fold_in(data_key, epoch)


def start_of_run(config: TrainConfig) -> Progress:
    """The progress of a run that has not taken a step yet."""
    empty = np.zeros(0, np.dtype(config.dtype))
    return Progress(initial_state(config), epoch=1, position=0, step_losses=empty, step_accuracies=empty)


_batch_indices = jax.jit(epoch_batch_indices, static_argnums=(1, 2, 3))


def fit(
    config: TrainConfig,
    train_data: ArrayPair,
    test_data: ArrayPair,
    start: Progress | None = None,
    steps_per_call: int | None = None,
    max_loss: float = DEFAULT_MAX_LOSS,
    mesh: Mesh | None = None,
) -> Iterator[Progress]:
    """Trains from ``start`` (default: a fresh run) to the end of epoch ``config.epochs``.

    Each epoch runs as one compiled call, or in calls of ``steps_per_call`` steps. Yields the
    ``Progress`` after every call. Raises ``DivergenceError`` instead of yielding a call in which a
    step's loss was not finite or above ``max_loss`` (checked once per call, no extra host sync).
    With a ``mesh`` (``jaxmnist.parallel.make_mesh``), every batch is split over its devices.
    """
    progress = start_of_run(config) if start is None else start
    place = jax.device_put if mesh is None else partial(replicate, mesh=mesh)
    state = place(progress.state)
    images, labels, test_images, test_labels = place((*train_data, *test_data))
    test_images = normalize(test_images, param_dtype(state))
    width = padded_batch_width(config.batch_size, mesh)
    steps_per_epoch = num_batches(len(train_data[0]), config.batch_size)
    chunk = min(steps_per_call or steps_per_epoch, steps_per_epoch)
    data_key = run_keys(config.seed)[1]

    started = time.perf_counter()
    run_whole_epoch, run_steps = _compile(config, state, images, labels, chunk, mesh)
    compile_seconds = time.perf_counter() - started

    epoch, position = progress.epoch, progress.position
    losses, accuracies = [progress.step_losses], [progress.step_accuracies]
    epoch_seconds, steps_run, epoch_batches = 0.0, 0, None
    while epoch <= config.epochs:
        call_started = time.perf_counter()
        # The compiled calls donate their input state; copy it so every yielded Progress stays valid.
        state = jax.tree.map(jnp.copy, state)
        key = epoch_key(data_key, epoch)
        num_steps = min(chunk, steps_per_epoch - position)
        if position == 0 and num_steps == steps_per_epoch and run_whole_epoch is not None:
            state, metrics = run_whole_epoch(state, key)
        else:
            if epoch_batches is None:  # the epoch's permutation, drawn once for all its calls
                epoch_batches = _batch_indices(key, len(train_data[0]), config.batch_size, width)
            state, metrics = run_steps(state, *epoch_batches, position, num_steps)
        call_losses = np.asarray(metrics["loss"])
        epoch_seconds += time.perf_counter() - call_started
        diverged = ~(np.abs(call_losses) <= max_loss)  # NaN compares False: it counts as diverged
        if diverged.any():
            bad = int(np.argmax(diverged))
            raise DivergenceError(epoch, position + bad + 1, float(call_losses[bad]))
        losses.append(call_losses)
        accuracies.append(np.asarray(metrics["accuracy"]))
        position += num_steps
        steps_run += num_steps
        step_losses, step_accuracies = np.concatenate(losses), np.concatenate(accuracies)
        result = None
        if position == steps_per_epoch:
            test_metrics = evaluate(state, test_images, test_labels)
            result = EpochResult(
                epoch=epoch,
                train_loss=float(np.mean(step_losses, dtype=np.float64)),
                train_accuracy=float(np.mean(step_accuracies, dtype=np.float64)),
                test_loss=float(test_metrics["loss"]),
                test_accuracy=float(test_metrics["accuracy"]),
                seconds=epoch_seconds,
                compile_seconds=compile_seconds,
                samples_per_second=min(steps_run * config.batch_size, len(train_data[0])) / epoch_seconds,
            )
        yield Progress(state, epoch, position, step_losses, step_accuracies, result)
        if result is not None:
            epoch, position, epoch_seconds, steps_run, compile_seconds = epoch + 1, 0, 0.0, 0, 0.0
            losses, accuracies, epoch_batches = [], [], None


def _compile(config: TrainConfig, state: TrainState, images: jax.Array, labels: jax.Array, chunk: int, mesh):
    """Ahead-of-time compiled callables: the whole epoch (scan loop only) and a run of steps."""
    first_key = epoch_key(run_keys(config.seed)[1], 1)
    indices, mask = _batch_indices(first_key, images.shape[0], config.batch_size, padded_batch_width(config.batch_size, mesh))
    if config.loop == "step":
        first_batch = gather_batch(images, labels, indices[0], mask[0], param_dtype(state))
        if mesh is not None:
            first_batch = jax.device_put(first_batch, batch_sharded(mesh))
        compiled_step = train_step.lower(state, first_batch).compile()
        run_steps = partial(_stepwise, images=images, labels=labels, step_fn=compiled_step, mesh=mesh)
        return None, run_steps
    if config.loop != "scan":
        raise ValueError(f"loop must be 'scan' or 'step', got {config.loop!r}")
    steps_per_epoch = num_batches(images.shape[0], config.batch_size)
    if chunk == steps_per_epoch:
        compiled_epoch = train_epoch.lower(state, images, labels, first_key, batch_size=config.batch_size, mesh=mesh).compile()
    else:
        compiled_epoch = None
        compiled_chunk = train_steps.lower(state, images, labels, indices, mask, 0, chunk, mesh).compile()

    def run_steps(state, indices, mask, first_step, num_steps):
        if compiled_epoch is None and num_steps == chunk:
            return compiled_chunk(state, images, labels, indices, mask, first_step)
        return train_steps(state, images, labels, indices, mask, first_step, num_steps, mesh)

    if compiled_epoch is None:
        return None, run_steps
    return (lambda state, key: compiled_epoch(state, images, labels, key)), run_steps


def _stepwise(state, indices, mask, first_step, num_steps, *, images, labels, step_fn, mesh):
    return train_steps_stepwise(state, images, labels, indices, mask, first_step, num_steps, step_fn, mesh)
