"""A run's compiled calls: a whole epoch, a chunk of steps, or one step at a time, for one run or many.

With several runs (``seeds`` > 1 or a grid of values) every call is the single-run call under
``jax.vmap``: the runs share one compiled program, each with its own state (hyperparameters included),
initialization and shuffle. The calls of a single run are the plain ones, unchanged.
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxmnist.config import TrainConfig, num_runs
from jaxmnist.parallel import batch_sharded, padded_batch_width
from jaxmnist.runs import epoch_key, grid_runs, run_keys
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

_batch_indices = jax.jit(epoch_batch_indices, static_argnums=(1, 2, 3))


class Programs:
    """The compiled calls of one run over ``images`` (uint8, on the device), compiled ahead of time."""

    def __init__(self, config: TrainConfig, state: TrainState, images: jax.Array, labels: jax.Array, chunk: int,
                 mesh: Mesh | None):  # fmt: skip
        if config.loop not in ("scan", "step"):
            raise ValueError(f"`loop` must be 'scan' or 'step', got {config.loop!r}")
        self.config, self.images, self.labels, self.chunk = config, images, labels, chunk
        self.vmapped = num_runs(config) > 1
        # Several runs spread over the devices along their own axis; one run splits its batches.
        self.mesh = None if self.vmapped else mesh
        self.steps_per_epoch = num_batches(images.shape[0], config.batch_size)
        self.width = padded_batch_width(config.batch_size, self.mesh)
        self.data_keys = [run_keys(run.seed)[1] for run in grid_runs(config)]
        first_keys = self.epoch_keys(1)
        indices, mask = self.batch_indices(first_keys)
        started = time.perf_counter()
        if config.loop == "step":
            step = jax.jit(jax.vmap(train_step), donate_argnums=0) if self.vmapped else train_step
            self.step = step.lower(state, self._batch(state, indices, mask, 0)).compile()
        elif chunk == self.steps_per_epoch:
            self.epoch = self._epoch_program().lower(state, images, labels, first_keys).compile()
        else:
            self.chunk_call = self._chunk_program(chunk).lower(state, images, labels, indices, mask, 0).compile()
        self.compile_seconds = time.perf_counter() - started
        self.evaluate = jax.jit(jax.vmap(evaluate, in_axes=(0, None, None))) if self.vmapped else evaluate

    def epoch_keys(self, epoch: int) -> jax.Array:
        """The shuffle key of ``epoch`` for every run (stacked when there are several)."""
        keys = [epoch_key(data_key, epoch) for data_key in self.data_keys]
        return jnp.stack(keys) if self.vmapped else keys[0]

    def batch_indices(self, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The epoch's batches (one set per run), drawn once for all its calls."""
        draw = partial(_batch_indices, num_examples=self.images.shape[0], batch_size=self.config.batch_size,
                       width=self.width)  # fmt: skip
        return jax.vmap(draw)(keys) if self.vmapped else draw(keys)

    def _batch(self, state: TrainState, indices: jax.Array, mask: jax.Array, step: int) -> dict[str, jax.Array]:
        gather = partial(gather_batch, self.images, self.labels, dtype=param_dtype(state))
        if self.vmapped:
            return jax.vmap(gather)(indices[:, step], mask[:, step])
        batch = gather(indices[step], mask[step])
        return batch if self.mesh is None else jax.device_put(batch, batch_sharded(self.mesh))

    def run(self, state: TrainState, keys: jax.Array, batches: tuple[jax.Array, jax.Array] | None,
            first_step: int, num_steps: int) -> tuple[TrainState, Metrics]:  # fmt: skip
        """Steps ``first_step ..`` of the epoch shuffled by ``keys``; ``batches`` are its indices and masks.

        Metrics have the steps on their last axis (and the runs on the first, when there are several).
        """
        if self.config.loop == "step":
            history = []
            for step in range(first_step, first_step + num_steps):
                state, metrics = self.step(state, self._batch(state, *batches, step))
                history.append(metrics)
            return state, jax.tree.map(lambda *values: jnp.stack(values, axis=-1), *history)
        if num_steps == self.steps_per_epoch:
            return self.epoch(state, self.images, self.labels, keys)
        if num_steps == self.chunk:
            return self.chunk_call(state, self.images, self.labels, *batches, first_step)
        return self._chunk_program(num_steps)(state, self.images, self.labels, *batches, first_step)

    def _epoch_program(self):
        """``train_epoch`` taking ``(state, images, labels, keys)``; under ``vmap`` for several runs."""
        epoch = partial(train_epoch, batch_size=self.config.batch_size, mesh=self.mesh)
        if not self.vmapped:
            return jax.jit(epoch, donate_argnums=0)
        return jax.jit(jax.vmap(epoch, in_axes=(0, None, None, 0)), donate_argnums=0)

    def _chunk_program(self, num_steps: int):
        """``train_chunk`` of ``num_steps`` taking ``(state, images, labels, indices, mask, first_step)``."""
        chunk = partial(train_chunk, num_steps=num_steps, mesh=self.mesh)
        if not self.vmapped:
            return jax.jit(chunk, donate_argnums=0)
        return jax.jit(jax.vmap(chunk, in_axes=(0, None, None, 0, 0, None)), donate_argnums=0)


def per_run(values: jax.Array | np.ndarray, runs: int) -> np.ndarray:
    """``values`` as a numpy array with one row per run."""
    return np.asarray(values).reshape(runs, -1)
