"""Training as pure, jitted functions: the train state, one SGD step, a whole epoch, and evaluation.

``python -m jaxmnist.train`` runs the command-line trainer (``jaxmnist.cli``) on top of these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh

from jaxmnist.data import normalize
from jaxmnist.losses import LOSSES, accuracy
from jaxmnist.model import MLP
from jaxmnist.parallel import batch_sharded, padded_batch_width, shard_batch

LossFn = Callable[[jax.Array, jax.Array, "jax.Array | None"], jax.Array]
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """flax's TrainState plus the loss, so ``train_step`` works for any model, optimizer and loss.

    ``loss_fn(logits, labels, mask)`` returns the (masked) mean loss of a batch.
    """

    loss_fn: LossFn = struct.field(pytree_node=False, default=LOSSES["nll"])


def create_train_state(
    rng: jax.Array,
    model: nn.Module | None = None,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = 0.003,
    loss: str | LossFn = "nll",
    input_shape: tuple[int, ...] = (1, 28, 28),
    params: Any = None,
) -> TrainState:
    """Initializes ``model`` (default: the lesson's MLP) and ``optimizer`` (default: ``optax.sgd(lr)``).

    ``loss`` is ``"nll"`` (LogSoftmax + NLLLoss, the lesson's), ``"ce"`` (CrossEntropyLoss on logits)
    or any ``loss_fn(logits, labels, mask)``. Given ``params`` (e.g. weights copied from PyTorch), they
    are used instead of a fresh initialization.
    """
    model = MLP() if model is None else model
    optimizer = optax.sgd(learning_rate) if optimizer is None else optimizer
    loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
    if params is None:
        input_dtype = getattr(model, "param_dtype", jnp.float32)
        params = model.init(rng, jnp.zeros(input_shape, input_dtype))["params"]
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optimizer, loss_fn=loss_fn)
    # An explicit int32 step keeps the state's types fixed from the first step on (no retrace).
    return state.replace(step=jnp.zeros((), jnp.int32))


def _check_batch(batch: Batch) -> None:
    """Fails at trace time, naming the expected shapes, instead of deep inside the model."""
    images, labels = batch["image"], batch["label"]
    if images.ndim < 2:
        raise ValueError(f"batch['image'] must be (B, 28, 28) or (B, 784), got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(
            f"batch['image'] must be floating point (normalized), got {images.dtype}; "
            "use jaxmnist.normalize(images)"
        )
    expected = (images.shape[0],)
    if labels.shape != expected or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"batch['label'] must be integer of shape {expected}, got {labels.dtype}{labels.shape}")
    mask = batch.get("mask")
    if mask is not None and mask.shape != expected:
        raise ValueError(f"batch['mask'] must have shape {expected}, got {mask.shape}")


@jax.jit
def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One SGD step: ``jax.value_and_grad`` of the batch loss, then the optimizer's update.

    ``batch`` holds ``image`` (normalized, ``(B, 28, 28)`` or ``(B, 784)``), ``label`` (int ``(B,)``) and
    optionally ``mask`` (``(B,)``, 0 for padding). Returns the new state and the batch's ``loss`` and
    ``accuracy`` (computed with the parameters before the update, as PyTorch's loop reports them).
    """
    _check_batch(batch)
    mask = batch.get("mask")

    def loss_and_logits(params):
        logits = state.apply_fn({"params": params}, batch["image"])
        return state.loss_fn(logits, batch["label"], mask), logits

    (loss, logits), grads = jax.value_and_grad(loss_and_logits, has_aux=True)(state.params)
    metrics = {"loss": loss, "accuracy": accuracy(logits, batch["label"], mask)}
    return state.apply_gradients(grads=grads), metrics


@jax.jit
def evaluate(state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> Metrics:
    """Mean loss and accuracy of the model on normalized ``images`` (e.g. the 10,000 test images)."""
    logits = state.apply_fn({"params": state.params}, images)
    return {"loss": state.loss_fn(logits, labels, mask), "accuracy": accuracy(logits, labels, mask)}


def param_dtype(state: TrainState) -> jnp.dtype:
    """The floating dtype the model computes in (float32, or float64 for exactness checks)."""
    return jax.tree.leaves(state.params)[0].dtype


def num_batches(num_examples: int, batch_size: int) -> int:
    """Batches per epoch with the final partial batch kept (60,000 / 64 -> 938)."""
    return -(-num_examples // batch_size)


def epoch_batch_indices(
    key: jax.Array, num_examples: int, batch_size: int, width: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """The epoch's shuffled example indices as ``(num_batches, width)``, and the padding mask.

    Like PyTorch's ``DataLoader(shuffle=True)``: every example once, the last batch smaller (here padded
    with index 0 and masked out, so every step has one shape and the math is unchanged). ``width``
    (default ``batch_size``) adds masked slots to every batch, e.g. to divide it among devices.
    """
    order = jax.random.permutation(key, num_examples)
    total = num_batches(num_examples, batch_size) * batch_size
    padded = jnp.concatenate([order, jnp.zeros(total - num_examples, order.dtype)]).reshape(-1, batch_size)
    mask = (jnp.arange(total) < num_examples).reshape(-1, batch_size)
    extra = (0, 0), (0, (width or batch_size) - batch_size)
    return jnp.pad(padded, extra), jnp.pad(mask, extra)


def gather_batch(
    images: jax.Array, labels: jax.Array, indices: jax.Array, mask: jax.Array, dtype: jnp.dtype
) -> dict[str, jax.Array]:
    """A training batch from uint8 ``images`` held on the device: gathered, then normalized."""
    return {"image": normalize(images[indices], dtype), "label": labels[indices], "mask": mask}


def _scan_steps(
    state: TrainState, images: jax.Array, labels: jax.Array, indices: jax.Array, mask: jax.Array, mesh: Mesh | None
) -> tuple[TrainState, Metrics]:
    """``lax.scan`` of ``train_step`` over batches given as rows of ``indices`` into the device data."""
    dtype = param_dtype(state)

    def step(state, batch_indices_and_mask):
        batch = gather_batch(images, labels, *batch_indices_and_mask, dtype)
        return train_step(state, shard_batch(batch, mesh))

    return jax.lax.scan(step, state, (indices, mask))


@partial(jax.jit, static_argnames=("batch_size", "mesh"), donate_argnames="state")
def train_epoch(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    batch_size: int = 64,
    mesh: Mesh | None = None,
) -> tuple[TrainState, Metrics]:
    """One epoch as one compiled call: a ``lax.scan`` of ``train_step`` over the shuffled batches.

    ``images`` are the uint8 ``(N, 28, 28)`` data set resident on the device; each batch is gathered and
    normalized inside the compiled program. Returns the new state and the per-step ``loss`` and
    ``accuracy`` (shape ``(num_batches,)``); the lesson's "Training loss" is the mean of ``loss``.
    The input ``state`` is donated: use the returned one. With a ``mesh`` (``jaxmnist.parallel``)
    every batch is split over its devices, padded with masked slots to a multiple of their count.
    """
    width = padded_batch_width(batch_size, mesh)
    return _scan_steps(state, images, labels, *epoch_batch_indices(key, images.shape[0], batch_size, width), mesh)


@partial(jax.jit, static_argnames=("num_steps", "mesh"), donate_argnames="state")
def train_steps(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    mask: jax.Array,
    first_step: jax.Array | int,
    num_steps: int,
    mesh: Mesh | None = None,
) -> tuple[TrainState, Metrics]:
    """Steps ``first_step .. first_step + num_steps - 1`` of an epoch as one compiled call.

    ``indices``/``mask`` are the epoch's ``epoch_batch_indices``; used to checkpoint or stop inside
    an epoch and to resume exactly where a run stopped.
    """
    window = (
        jax.lax.dynamic_slice_in_dim(indices, first_step, num_steps),
        jax.lax.dynamic_slice_in_dim(mask, first_step, num_steps),
    )
    return _scan_steps(state, images, labels, *window, mesh)


StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]


def train_steps_stepwise(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    mask: jax.Array,
    first_step: int = 0,
    num_steps: int | None = None,
    step_fn: StepFn = train_step,
    mesh: Mesh | None = None,
) -> tuple[TrainState, Metrics]:
    """The same steps as ``train_steps`` (same batches, same math), one ``train_step`` call per batch."""
    dtype = param_dtype(state)
    last_step = len(indices) if num_steps is None else first_step + num_steps
    history = []
    for step in range(first_step, last_step):
        batch = gather_batch(images, labels, indices[step], mask[step], dtype)
        if mesh is not None:
            batch = jax.device_put(batch, batch_sharded(mesh))
        state, metrics = step_fn(state, batch)
        history.append(metrics)
    return state, jax.tree.map(lambda *values: jnp.stack(values), *history)


def train_epoch_stepwise(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    batch_size: int = 64,
    step_fn: StepFn = train_step,
) -> tuple[TrainState, Metrics]:
    """The same epoch as ``train_epoch`` (same batches, same math), one ``train_step`` call per batch."""
    indices, mask = epoch_batch_indices(key, images.shape[0], batch_size)
    return train_steps_stepwise(state, images, labels, indices, mask, step_fn=step_fn)


def _main() -> Any:
    from jaxmnist.cli import main

    return main()


if __name__ == "__main__":
    raise SystemExit(_main())
