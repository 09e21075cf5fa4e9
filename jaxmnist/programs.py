"""A run's compiled calls: a whole epoch, a chunk of steps, or one step at a time, for one run or many.

With several runs (``seeds`` > 1 or a grid of values) every call is the single-run call under
``jax.vmap``: the runs share one compiled program, each with its own state (hyperparameters included),
initialization and shuffle. The calls of a single run are the plain ones, unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxmnist.parallel import BATCH_AXIS, batch_sharded, padded_batch_width
from jaxmnist.plan import RunPlan
from jaxmnist.runs import available_bytes, evaluation_bytes, first_run_shapes
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
from jaxmnist.train.convolutions import COMPILER_OPTIONS
from jaxmnist.train.steps import Metrics

_batch_indices = jax.jit(epoch_batch_indices, static_argnums=(1, 2, 3))

# On a CPU, runs train in groups of this many, one group after another inside each call: a group's
# weights and gradients stay in the core's cache through the whole call, and the per-step cost of the
# program is still shared by the group (see docs/performance.md: 64 runs, 0.37 s per run-epoch as one
# group, 0.23 s in groups of 4).
CPU_RUNS_PER_GROUP = 4


class Programs:
    """The compiled calls of the plan's runs over ``images`` (uint8, on the device), compiled ahead of time."""

    def __init__(self, plan: RunPlan, state: TrainState, images: jax.Array, labels: jax.Array, chunk: int,
                 mesh: Mesh | None):  # fmt: skip
        config = plan.config
        if config.loop not in ("scan", "step"):
            raise ValueError(f"`loop` must be 'scan' or 'step', got {config.loop!r}")
        self.config, self.images, self.labels, self.chunk = config, images, labels, chunk
        self.plan, self.vmapped = plan, plan.stacked
        # Several runs spread over the devices along their own axis; one run splits its batches.
        self.mesh = None if self.vmapped else mesh
        self.runs_mesh = mesh if self.vmapped else None
        # (``devices()`` may be the sharding's own set: read it, never pop it)
        self.on_cpu = next(iter(jax.tree.leaves(state)[0].devices())).platform == "cpu"
        # An accelerator trains a device's runs side by side, as one vmapped group.
        self.training_group = CPU_RUNS_PER_GROUP if self.on_cpu else None
        self.steps_per_epoch = num_batches(images.shape[0], config.batch_size)
        self.width = padded_batch_width(config.batch_size, self.mesh)
        # One program per chunk length, kept for the run: an epoch's shorter last chunk (938 steps in chunks of
        # 100 end with 38) would otherwise be traced and compiled again every epoch.
        self._chunk_calls: dict[int, Callable] = {}
        first_keys = plan.epoch_keys(1)
        whole_epochs = config.loop == "scan" and chunk == self.steps_per_epoch  # the batches drawn inside
        indices, mask = (None, None) if whole_epochs else self.batch_indices(first_keys)
        started = time.perf_counter()
        if config.loop == "step":
            step = jax.vmap(train_step) if self.vmapped else train_step
            self.step = jax.jit(step, donate_argnums=0 if self.vmapped else (), compiler_options=COMPILER_OPTIONS)
            self.step = self.step.lower(state, self._batch(state, indices, mask, 0)).compile()
        elif whole_epochs:
            self.epoch = self._epoch_program().lower(state, images, labels, first_keys).compile()
        else:  # the calls' length and the epoch's shorter last call, if any: both before the first step
            last = self.steps_per_epoch % chunk
            for length in (chunk, last) if last else (chunk,):
                program = self._chunk_program(length)
                self._chunk_calls[length] = program.lower(state, images, labels, indices, mask, 0).compile()
        self.compile_seconds = time.perf_counter() - started
        self._evaluations: dict[tuple[int, ...], Callable] = {}  # by the evaluation images' shape

    def evaluate(self, state: TrainState, images: jax.Array, labels: jax.Array) -> Metrics:
        """``evaluate`` of every run on ``images`` (normalized) and ``labels``."""
        if images.shape not in self._evaluations:  # traced and sized once per evaluation set
            call = evaluate
            if self.vmapped:
                call = self._over_runs(evaluate, (0, None, None), self.runs_evaluated_together(state, images))
            self._evaluations[images.shape] = jax.jit(call, compiler_options=COMPILER_OPTIONS)
        return self._evaluations[images.shape](state, images, labels)

    def runs_evaluated_together(self, state: TrainState, images: jax.Array) -> int | None:
        """How many runs one vmapped evaluation takes at once (None: all of a device's runs).

        On a CPU one after another: a run's own large GEMM beats the runs' batched GEMMs and their
        transposes (8 runs on 10,000 images: 0.25 s against 0.32 s). On an accelerator as many as half its
        free memory holds: every run's activations over the whole test set may not fit at once.
        """
        if self.on_cpu:
            return 1
        free = available_bytes()
        return None if free is None else max(1, free // 2 // evaluation_bytes(first_run_shapes(state), images))

    def batch_indices(self, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The epoch's batches (one set per run), drawn once for all its calls."""
        draw = partial(_batch_indices, num_examples=self.images.shape[0], batch_size=self.config.batch_size,
                       width=self.width)  # fmt: skip
        return jax.vmap(draw)(keys) if self.vmapped else draw(keys)

    def _batch(self, state: TrainState, indices: jax.Array, mask: jax.Array, step: int) -> dict[str, jax.Array]:
        gather = partial(gather_batch, self.images, self.labels, dtype=param_dtype(state),
                         normalization=self.config.normalize)  # fmt: skip
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
        if num_steps not in self._chunk_calls:
            self._chunk_calls[num_steps] = self._chunk_program(num_steps)
        return self._chunk_calls[num_steps](state, self.images, self.labels, *batches, first_step)

    def _epoch_program(self):
        """``train_epoch`` taking ``(state, images, labels, keys)``; under ``vmap`` for several runs."""
        epoch = partial(train_epoch, batch_size=self.config.batch_size, mesh=self.mesh,
                        normalization=self.config.normalize)  # fmt: skip
        if not self.vmapped:
            return jax.jit(epoch, donate_argnums=0, compiler_options=COMPILER_OPTIONS)
        return jax.jit(
            self._over_runs(epoch, (0, None, None, 0), self.training_group),
            donate_argnums=0,
            compiler_options=COMPILER_OPTIONS,
        )

    def _chunk_program(self, num_steps: int):
        """``train_chunk`` of ``num_steps`` taking ``(state, images, labels, indices, mask, first_step)``."""
        chunk = partial(train_chunk, num_steps=num_steps, mesh=self.mesh, normalization=self.config.normalize)
        if not self.vmapped:
            return jax.jit(chunk, donate_argnums=0, compiler_options=COMPILER_OPTIONS)
        return jax.jit(
            self._over_runs(chunk, (0, None, None, 0, 0, None), self.training_group),
            donate_argnums=0,
            compiler_options=COMPILER_OPTIONS,
        )

    def _over_runs(self, call, in_axes: tuple[int | None, ...], runs_per_group: int | None):
        """``call`` of one run over every run: under ``vmap``, in groups of ``runs_per_group`` runs, one group
        after another (None: all at once); over several devices, each device's own runs (``shard_map``)."""
        vmapped = jax.vmap(call, in_axes=in_axes)
        per_run = [index for index, axis in enumerate(in_axes) if axis == 0]

        def grouped(*args):
            runs = jax.tree.leaves(args[per_run[0]])[0].shape[0]
            largest = runs if runs_per_group is None else min(runs_per_group, runs)
            group = max(size for size in range(1, largest + 1) if runs % size == 0)
            if group == runs > 1:
                return vmapped(*args)

            def with_runs(group_args, function):
                full = list(args)
                for index, value in zip(per_run, group_args, strict=True):
                    full[index] = value
                return function(*full)

            if group == 1:  # each run by the single run's own program: a vmap of one rounds differently
                return jax.lax.map(partial(with_runs, function=call), [args[index] for index in per_run])
            split = partial(jax.tree.map, lambda leaf: leaf.reshape(runs // group, group, *leaf.shape[1:]))
            out = jax.lax.map(partial(with_runs, function=vmapped), [split(args[index]) for index in per_run])
            return jax.tree.map(lambda leaf: leaf.reshape(runs, *leaf.shape[2:]), out)

        if self.runs_mesh is None:
            return grouped
        specs = tuple(PartitionSpec(BATCH_AXIS) if axis == 0 else PartitionSpec() for axis in in_axes)
        return jax.shard_map(grouped, mesh=self.runs_mesh, in_specs=specs, out_specs=PartitionSpec(BATCH_AXIS))


def per_run(values: jax.Array | np.ndarray, runs: int) -> np.ndarray:
    """``values`` as a numpy array with one row per run."""
    return np.asarray(values).reshape(runs, -1)
