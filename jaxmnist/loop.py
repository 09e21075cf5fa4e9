"""The training loop as a library call, ``fit``: config in, progress and one result per epoch out.

``fit`` places the data on the device once, compiles ahead of time (timed on its own), and runs each
epoch as one compiled call, or in chunks of ``steps_per_call`` steps when the caller wants to
checkpoint or stop inside an epoch. It yields a ``Progress`` after every call (one host
synchronisation each) that holds everything needed to continue exactly; printing, files and signals
are the caller's job.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxmnist.config import TrainConfig, epoch_key, hold_out, initial_state, run_keys
from jaxmnist.normalization import normalize
from jaxmnist.parallel import batch_sharded, padded_batch_width, replicate
from jaxmnist.train import (
    TrainState,
    epoch_batch_indices,
    evaluate,
    gather_batch,
    num_batches,
    param_dtype,
    train_chunk,
    train_epoch,
    train_step,
)
from jaxmnist.train.steps import Metrics

ArrayPair = tuple[np.ndarray, np.ndarray]

# A batch cross-entropy above this means the true class got probability below e^-1000: diverged.
DEFAULT_MAX_LOSS = 1000.0


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
    learning_rate: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None


def best_epoch(history: Sequence[EpochResult]) -> EpochResult | None:
    """The epoch with the lowest validation loss (the first of equals); None without validation."""
    validated = [result for result in history if result.val_loss is not None]
    return min(validated, key=lambda result: result.val_loss) if validated else None


def early_stop_due(history: Sequence[EpochResult], patience: int) -> bool:
    """Whether the validation loss has not improved for ``patience`` epochs (0: never stop early).

    Example:
        >>> losses = [3.0, 2.0, 2.5, 2.1]
        >>> results = [EpochResult(epoch, 0, 0, 0, 0, 1, 0, 0, val_loss=loss) for epoch, loss in enumerate(losses, 1)]
        >>> early_stop_due(results, 2), early_stop_due(results, 3)
        (True, False)
    """
    best = best_epoch(history)
    return bool(patience and best is not None and history[-1].epoch - best.epoch >= patience)


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a run stands after a compiled call: enough to continue it exactly.

    ``epoch`` is the epoch in progress (from 1), ``position`` the number of its steps done, and
    ``step_losses``/``step_accuracies`` its per-step metrics so far. ``result`` is set when the call
    ended the epoch (then ``position`` equals the epoch's number of batches); ``history`` holds the
    results of every finished epoch, this one included.
    """

    state: TrainState
    epoch: int
    position: int
    step_losses: np.ndarray
    step_accuracies: np.ndarray
    result: EpochResult | None = None
    history: tuple[EpochResult, ...] = ()

    @property
    def epoch_done(self) -> bool:
        return self.result is not None

    def continuation(self) -> Progress:
        """The same point as the start of what comes next: a finished epoch becomes the next one's start."""
        if not self.epoch_done:
            return self
        empty = self.step_losses[:0]
        return Progress(self.state, self.epoch + 1, 0, empty, self.step_accuracies[:0], history=self.history)


class DivergenceError(ArithmeticError):
    """The training loss became NaN, infinite or absurdly large; ``epoch`` and ``step`` say where (from 1)."""

    def __init__(self, epoch: int, step: int, loss: float):
        super().__init__(
            f"training diverged: the loss became {loss:.6g} at epoch {epoch}, step {step}; "
            "try a lower `learning_rate` (the lesson uses 0.003)"
        )
        self.epoch, self.step, self.loss = epoch, step, loss


def start_of_run(config: TrainConfig, num_train_images: int) -> Progress:
    """The progress of a run over ``num_train_images`` (before the held-out ones) that has not taken a step."""
    empty = np.zeros(0, np.dtype(config.dtype))
    state = initial_state(config, num_train_images)
    return Progress(state, epoch=1, position=0, step_losses=empty, step_accuracies=empty)


_batch_indices = jax.jit(epoch_batch_indices, static_argnums=(1, 2, 3))


class _Programs:
    """The run's compiled calls: a whole epoch, a chunk of steps, or one step at a time (``loop="step"``)."""

    def __init__(
        self,
        config: TrainConfig,
        state: TrainState,
        images: jax.Array,
        labels: jax.Array,
        chunk: int,
        mesh: Mesh | None,
    ):
        if config.loop not in ("scan", "step"):
            raise ValueError(f"`loop` must be 'scan' or 'step', got {config.loop!r}")
        self.config, self.images, self.labels, self.chunk, self.mesh = config, images, labels, chunk, mesh
        self.steps_per_epoch = num_batches(images.shape[0], config.batch_size)
        self.width = padded_batch_width(config.batch_size, mesh)
        first_key = epoch_key(run_keys(config.seed)[1], 1)
        indices, mask = self.batch_indices(first_key)
        started = time.perf_counter()
        if config.loop == "step":
            first_batch = self._batch(state, indices[0], mask[0])
            self.step = train_step.lower(state, first_batch).compile()
        elif chunk == self.steps_per_epoch:
            self.epoch = train_epoch.lower(
                state, images, labels, first_key, batch_size=config.batch_size, mesh=mesh
            ).compile()
        else:
            self.chunk_call = train_chunk.lower(state, images, labels, indices, mask, 0, chunk, mesh).compile()
        self.compile_seconds = time.perf_counter() - started

    def batch_indices(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The epoch's batches, drawn once for all its calls."""
        return _batch_indices(key, self.images.shape[0], self.config.batch_size, self.width)

    def _batch(self, state: TrainState, indices: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
        batch = gather_batch(self.images, self.labels, indices, mask, param_dtype(state))
        return batch if self.mesh is None else jax.device_put(batch, batch_sharded(self.mesh))

    def run(
        self,
        state: TrainState,
        key: jax.Array,
        batches: tuple[jax.Array, jax.Array] | None,
        first_step: int,
        num_steps: int,
    ) -> tuple[TrainState, Metrics]:
        """Steps ``first_step ..`` of the epoch shuffled by ``key``; ``batches`` are its indices and mask."""
        if self.config.loop == "step":
            history = []
            for step in range(first_step, first_step + num_steps):
                state, metrics = self.step(state, self._batch(state, batches[0][step], batches[1][step]))
                history.append(metrics)
            return state, jax.tree.map(lambda *values: jnp.stack(values), *history)
        if num_steps == self.steps_per_epoch:
            return self.epoch(state, self.images, self.labels, key)
        if num_steps == self.chunk:
            return self.chunk_call(state, self.images, self.labels, *batches, first_step)
        return train_chunk(state, self.images, self.labels, *batches, first_step, num_steps, self.mesh)


def _check_divergence(losses: np.ndarray, max_loss: float, epoch: int, position: int) -> None:
    diverged = ~(np.abs(losses) <= max_loss)  # NaN compares False: it counts as diverged
    if diverged.any():
        bad = int(np.argmax(diverged))
        raise DivergenceError(epoch, position + bad + 1, float(losses[bad]))


def _epoch_result(
    progress: Progress,
    evaluations: dict[str, Metrics],
    learning_rate: float,
    seconds: float,
    compile_seconds: float,
    images_trained: int,
) -> EpochResult:
    val = evaluations.get("val", {})
    return EpochResult(
        epoch=progress.epoch,
        train_loss=float(np.mean(progress.step_losses, dtype=np.float64)),
        train_accuracy=float(np.mean(progress.step_accuracies, dtype=np.float64)),
        test_loss=float(evaluations["test"]["loss"]),
        test_accuracy=float(evaluations["test"]["accuracy"]),
        seconds=seconds,
        compile_seconds=compile_seconds,
        samples_per_second=images_trained / seconds,
        learning_rate=learning_rate,
        val_loss=float(val["loss"]) if val else None,
        val_accuracy=float(val["accuracy"]) if val else None,
    )


def fit(
    config: TrainConfig,
    train_data: ArrayPair,
    test_data: ArrayPair,
    start: Progress | None = None,
    steps_per_call: int | None = None,
    max_loss: float = DEFAULT_MAX_LOSS,
    mesh: Mesh | None = None,
) -> Iterator[Progress]:
    """Trains from ``start`` (default: a fresh run) to the end of epoch ``config.epochs``, or earlier when
    ``config.early_stopping`` epochs pass without a better validation loss.

    Args:
        config: the run's settings; ``config.val_split`` of the training images are held out
            (``jaxmnist.config.hold_out``) and evaluated after every epoch.
        train_data: uint8 images ``(N, 28, 28)`` and int labels.
        test_data: the same for evaluation after every epoch.
        start: where to continue from (e.g. a restored checkpoint).
        steps_per_call: run each epoch in compiled calls of this many steps (default: one call per epoch).
        max_loss: a step whose loss is not finite or above this raises ``DivergenceError`` (checked once
            per call, no extra host synchronisation); the call is not yielded.
        mesh: a ``jaxmnist.parallel.make_mesh`` mesh to split every batch over its devices.

    Yields:
        The ``Progress`` after every compiled call; its ``result`` is set when an epoch ends.

    Example:
        >>> import numpy as np
        >>> images, labels = np.zeros((64, 28, 28), np.uint8), np.arange(64) % 10
        >>> [p.result.epoch for p in fit(TrainConfig(epochs=2), (images, labels), (images, labels))]
        [1, 2]
    """
    progress = start_of_run(config, len(train_data[0])) if start is None else start
    train_data, val_data = hold_out(config, *train_data)
    place = jax.device_put if mesh is None else partial(replicate, mesh=mesh)
    state = place(progress.state)
    images, labels = place(train_data)
    dtype = param_dtype(state)
    evaluation_sets = {"test": test_data, "val": val_data} if config.val_split else {"test": test_data}
    evaluation_sets = {
        name: (normalize(place(data[0]), dtype), place(data[1])) for name, data in evaluation_sets.items()
    }
    steps_per_epoch = num_batches(len(images), config.batch_size)
    programs = _Programs(config, state, images, labels, min(steps_per_call or steps_per_epoch, steps_per_epoch), mesh)
    compile_seconds = programs.compile_seconds
    data_key = run_keys(config.seed)[1]
    while progress.epoch <= config.epochs and not early_stop_due(progress.history, config.early_stopping):
        key = epoch_key(data_key, progress.epoch)
        whole_epoch = config.loop == "scan" and progress.position == 0 and programs.chunk == steps_per_epoch
        batches = None if whole_epoch else programs.batch_indices(key)
        seconds, first_position = 0.0, progress.position
        while progress.position < steps_per_epoch:
            started = time.perf_counter()
            num_steps = min(programs.chunk, steps_per_epoch - progress.position)
            # The compiled calls donate their input state; copy it so every yielded Progress stays valid.
            state, metrics = programs.run(jax.tree.map(jnp.copy, state), key, batches, progress.position, num_steps)
            losses = np.asarray(metrics["loss"])
            seconds += time.perf_counter() - started
            _check_divergence(losses, max_loss, progress.epoch, progress.position)
            progress = Progress(
                state,
                progress.epoch,
                progress.position + num_steps,
                np.concatenate([progress.step_losses, losses]),
                np.concatenate([progress.step_accuracies, np.asarray(metrics["accuracy"])]),
                history=progress.history,
            )
            if progress.position == steps_per_epoch:
                images_trained = min((steps_per_epoch - first_position) * config.batch_size, len(images))
                evaluations = {name: evaluate(state, *data) for name, data in evaluation_sets.items()}
                learning_rate = (
                    float(metrics["learning_rate"][-1]) if "learning_rate" in metrics else config.learning_rate
                )
                result = _epoch_result(progress, evaluations, learning_rate, seconds, compile_seconds, images_trained)
                progress = dataclasses.replace(progress, result=result, history=(*progress.history, result))
                compile_seconds = 0.0
            yield progress
        progress = progress.continuation()
