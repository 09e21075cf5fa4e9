"""Training as pure, jitted functions: one step, a chunk of steps, a whole epoch, and evaluation.

Every function takes a ``TrainState`` and works for any model it holds: flax linen or NNX, with or
without BatchNorm statistics and dropout, under any optax optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxmnist.losses import accuracy
from jaxmnist.normalization import LESSON_NORMALIZATION, normalize
from jaxmnist.parallel import padded_batch_width, shard_batch
from jaxmnist.train.adapters import ANY_KEYWORD, split_outputs
from jaxmnist.train.convolutions import canonical_convolutions
from jaxmnist.train.state import TrainState, current_learning_rate, param_dtype

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
# Keys of a batch that train_step itself reads; any other goes to the model (by keyword) or the loss.
_BATCH_KEYS = ("image", "label", "mask")
# The metrics train_step itself reports; a loss's own metrics take other names.
STEP_METRICS = ("loss", "accuracy", "learning_rate")


def metric_precision(logits: jax.Array) -> jax.Array:
    """``logits`` in float32 at least (float64 stays): losses, accuracies and their means are never taken in a
    low-precision compute dtype such as bfloat16, whose accuracy would move in steps of 1/256."""
    return logits if jnp.finfo(logits.dtype).bits >= 32 else logits.astype(jnp.float32)


def _model_inputs(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """The batch's other entries: each goes to the model when its ``__call__`` takes it by keyword, and to a
    loss that takes ``batch``; one that neither takes is refused (at trace time), never dropped."""
    extra = {name: value for name, value in batch.items() if name not in _BATCH_KEYS}
    signature = getattr(state.model_call, "signature", None)
    model_takes = frozenset() if signature is None else signature.keywords
    for name in extra:
        if model_takes != ANY_KEYWORD and name not in model_takes and "batch" not in state.loss_keywords:
            raise ValueError(
                f"batch[{name!r}] is taken neither by the model's __call__ (as a keyword) nor by the loss "
                "(give the loss a `batch` keyword to see it); remove it or use it"
            )
    return extra


def _loss_and_metrics(result) -> tuple[jax.Array, Metrics]:
    """A loss's return value, ``loss`` or ``(loss, metrics)``, as both, the metrics as float32-or-wider scalars."""
    loss, metrics = result if isinstance(result, tuple) else (result, {})
    for name, value in metrics.items():
        if name in STEP_METRICS:
            raise ValueError(f"the loss's metric {name!r} has the name of a step metric: call it something else")
        if jnp.shape(value) != ():
            raise ValueError(f"the loss's metric {name!r} must be a scalar, got shape {jnp.shape(value)}")
    return loss, {name: _as_metric(value) for name, value in metrics.items()}


def _as_metric(value) -> jax.Array:
    value = jnp.asarray(value)
    return metric_precision(value) if jnp.issubdtype(value.dtype, jnp.floating) else value.astype(jnp.float32)


def _check_batch(batch: Batch, image_shape: tuple[int, ...]) -> jax.Array:
    """The batch's images in the model's input shape; fails at trace time naming the expected shapes."""
    images, labels = batch["image"], batch["label"]
    expected_images = f"(B, {', '.join(map(str, image_shape))})"
    if images.ndim < 2 or math.prod(images.shape[1:]) != math.prod(image_shape):
        raise ValueError(f"batch['image'] must be {expected_images} or (B, 784) images, got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(
            f"batch['image'] must be floating point (normalized), got {images.dtype}; use jaxmnist.normalize(images)"
        )
    expected = (images.shape[0],)
    if labels.shape != expected or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"batch['label'] must be integer of shape {expected}, got {labels.dtype}{labels.shape}")
    mask = batch.get("mask")
    if mask is not None and mask.shape != expected:
        raise ValueError(f"batch['mask'] must have shape {expected}, got {mask.shape}")
    return images.reshape((images.shape[0], *image_shape)) if images.shape[1:] != image_shape else images


@jax.jit
@canonical_convolutions
def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One optimizer step: ``jax.value_and_grad`` of the batch loss, then the optimizer's update.

    The model runs in training mode: its carried collections (e.g. BatchNorm statistics) are updated,
    its stochastic layers get ``state.step_key()``, and what it sows in this step goes to the loss
    (``sown``), never into the state. A model may return its logits or ``(logits, extra)``. The loss,
    accuracy and metric values are computed in float32 or wider whatever the model's compute dtype.

    The step cannot check the labels against the model's classes (a label out of range gives a NaN
    loss here): ``fit`` and the train command check them before the first step.

    Args:
        state: the train state.
        batch: ``image`` (normalized, ``(B, 28, 28)`` or ``(B, 784)``, or the shape the model was
            initialized with), ``label`` (int ``(B,)``), optionally ``mask`` (``(B,)``, 0 for padding),
            and any other entry: given to the model when its ``__call__`` takes it as a keyword, and to a
            loss that takes ``batch``; one that neither takes is refused, naming it.

    Returns:
        The new state and the batch's ``loss`` and ``accuracy`` (with the parameters before the update,
        as PyTorch's loop reports them), plus ``learning_rate`` when the optimizer exposes it
        (``optax.inject_hyperparams``), plus the metrics a loss returns as ``(loss, metrics)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxmnist import create_train_state
        >>> state = create_train_state(jax.random.key(0))
        >>> batch = {"image": jnp.zeros((8, 28, 28)), "label": jnp.arange(8)}
        >>> state, metrics = train_step(state, batch)
        >>> int(state.step), sorted(metrics)
        (1, ['accuracy', 'loss'])
    """
    images = _check_batch(batch, state.image_shape)
    labels, mask = batch["label"], batch.get("mask")
    inputs = _model_inputs(state, batch)
    key = state.step_key()

    def loss_and_outputs(params):
        loss, logits, collections, loss_metrics = _forward(state, params, images, batch, train=True, key=key,
                                                           inputs=inputs)  # fmt: skip
        return loss, (logits, collections, loss_metrics)

    (loss, (logits, collections, loss_metrics)), grads = jax.value_and_grad(loss_and_outputs, has_aux=True)(
        state.params
    )
    metrics = {"loss": loss, "accuracy": accuracy(logits, labels, mask), **loss_metrics}
    new_state = state.apply_gradients(grads=grads, collections=collections)
    # inject_hyperparams stores the value it has just used in the updated optimizer state.
    learning_rate = current_learning_rate(new_state.opt_state)
    if learning_rate is not None:
        metrics["learning_rate"] = jnp.asarray(learning_rate)
    return new_state, metrics


@jax.jit
@canonical_convolutions
def evaluate(state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> Metrics:
    """Mean loss and accuracy in inference mode (running statistics, no dropout): deterministic.

    Args:
        state: the train state.
        images: normalized images, e.g. the 10,000 test images.
        labels: int labels ``(N,)``.
        mask: optional ``(N,)``, 0 for examples to leave out.

    Returns:
        ``{"loss": ..., "accuracy": ...}``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxmnist import create_train_state
        >>> metrics = evaluate(create_train_state(jax.random.key(0)), jnp.zeros((4, 28, 28)), jnp.arange(4))
        >>> sorted(metrics)
        ['accuracy', 'loss']
    """
    batch = {"image": images, "label": labels, **({} if mask is None else {"mask": mask})}
    images = _check_batch(batch, state.image_shape)
    loss, logits, _, _ = _forward(state, state.params, images, batch, train=False, key=None, inputs={})
    return {"loss": loss, "accuracy": accuracy(logits, labels, mask)}


def _forward(state: TrainState, params, images: jax.Array, batch: Batch, *, train: bool, key: jax.Array | None,
             inputs: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, dict, Metrics]:  # fmt: skip
    """The model on ``images``, then the loss with the keywords it takes: ``(loss, logits, collections,
    loss metrics)``, the logits in float32 or wider."""
    outputs, collections, sown = state.model_call(params, state.collections, images, train=train, key=key,
                                                  inputs=inputs)  # fmt: skip
    if jax.tree.structure(collections) == jax.tree.structure(state.collections):
        # Carried values keep their dtype: flax's BatchNorm keeps float32 statistics and updates them in
        # the activations' dtype, float64 under --dtype float64; a step's carry must not change type.
        collections = jax.tree.map(lambda new, old: new.astype(old.dtype), collections, state.collections)
    logits, extra = split_outputs(outputs)
    logits = metric_precision(logits)
    given = {"params": params, "batch": batch, "outputs": extra, "sown": sown}
    result = state.loss_fn(
        logits, batch["label"], batch.get("mask"), **{name: given[name] for name in state.loss_keywords}
    )
    loss, loss_metrics = _loss_and_metrics(result)
    return loss, logits, collections, loss_metrics


def saved_for_backward(state: TrainState, batch: Batch) -> Any:
    """The values a training step's forward pass keeps for its backward pass (layers' activations among
    them): the leaves of its ``jax.vjp`` function. Meant for ``jax.eval_shape``, to size a step's memory."""
    images = _check_batch(batch, state.image_shape)
    inputs, key = _model_inputs(state, batch), state.step_key()

    def loss(params):
        return _forward(state, params, images, batch, train=True, key=key, inputs=inputs)[0]

    return jax.vjp(loss, state.params)[1]


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


def gather_batch(images: jax.Array, labels: jax.Array, indices: jax.Array, mask: jax.Array, dtype: jnp.dtype,
                 normalization: tuple[float, float] = LESSON_NORMALIZATION) -> dict[str, jax.Array]:  # fmt: skip
    """A training batch from uint8 ``images`` held on the device: gathered, then normalized."""
    return {"image": normalize(images[indices], dtype, normalization), "label": labels[indices], "mask": mask}


def _scan_steps(state: TrainState, images: jax.Array, labels: jax.Array, indices: jax.Array, mask: jax.Array,
                mesh: Mesh | None, normalization: tuple[float, float]) -> tuple[TrainState, Metrics]:  # fmt: skip
    """``lax.scan`` of ``train_step`` over batches given as rows of ``indices`` into the device data."""
    if images.dtype != jnp.uint8:
        raise TypeError(
            f"`images` must be the uint8 data set, got {images.dtype}: each batch is gathered and normalized "
            "here (float images would be normalized twice); for batches you normalized, call train_step"
        )
    dtype = param_dtype(state)

    def step(state, batch_indices_and_mask):
        batch = gather_batch(images, labels, *batch_indices_and_mask, dtype, normalization)
        return train_step(state, shard_batch(batch, mesh))

    return jax.lax.scan(step, state, (indices, mask))


@partial(jax.jit, static_argnames=("batch_size", "mesh", "normalization"), donate_argnames="state")
def train_epoch(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    batch_size: int = 64,
    mesh: Mesh | None = None,
    normalization: tuple[float, float] = LESSON_NORMALIZATION,
) -> tuple[TrainState, Metrics]:
    """One epoch as one compiled call: a ``lax.scan`` of ``train_step`` over the shuffled batches.

    Args:
        state: the train state; donated, use the returned one.
        images: the uint8 ``(N, H, W[, C])`` data set resident on the device; each batch is gathered and
            normalized inside the compiled program (float images are refused: they would be normalized
            twice).
        labels: int labels ``(N,)``.
        key: the key of this epoch's shuffle.
        batch_size: images per step; the last batch is padded and masked.
        mesh: a ``jaxmnist.parallel`` mesh to split every batch over its devices.
        normalization: ``(mean, std)`` of the input transform (``jaxmnist.normalize``), the lesson's by default.

    Returns:
        The new state and the per-step metrics (shape ``(num_batches,)``); the lesson's "Training loss"
        is the mean of ``loss``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxmnist import create_train_state
        >>> images, labels = jnp.zeros((100, 28, 28), jnp.uint8), jnp.arange(100) % 10
        >>> state, metrics = train_epoch(create_train_state(jax.random.key(0)), images, labels, jax.random.key(1))
        >>> metrics["loss"].shape
        (2,)
    """
    check_padding_leaves_statistics_exact(state, batch_size, mesh)
    width = padded_batch_width(batch_size, mesh)
    batches = epoch_batch_indices(key, images.shape[0], batch_size, width)
    return _scan_steps(state, images, labels, *batches, mesh, normalization)


def check_padding_leaves_statistics_exact(state: TrainState, batch_size: int, mesh: Mesh | None) -> None:
    """``ValueError`` when a batch padded to divide over the devices would feed padding slots into the model's
    carried statistics (BatchNorm's batch mean and variance see every slot, masked or not)."""
    if mesh is not None and batch_size % mesh.size and state.collections:
        raise ValueError(
            f"`batch_size`={batch_size} does not divide over `num_devices`={mesh.size}: its padding slots would "
            f"enter the model's carried statistics (e.g. BatchNorm); use a batch size divisible by {mesh.size}"
        )


@partial(jax.jit, static_argnames=("num_steps", "mesh", "normalization"), donate_argnames="state")
def train_chunk(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    mask: jax.Array,
    first_step: jax.Array | int,
    num_steps: int,
    mesh: Mesh | None = None,
    normalization: tuple[float, float] = LESSON_NORMALIZATION,
) -> tuple[TrainState, Metrics]:
    """Steps ``first_step .. first_step + num_steps - 1`` of an epoch as one compiled call.

    Used to checkpoint or stop inside an epoch and to resume exactly where a run stopped.

    Args:
        state: the train state; donated, use the returned one.
        images: the uint8 data set resident on the device (float images are refused, as by ``train_epoch``).
        labels: int labels ``(N,)``.
        indices: the epoch's batches as rows of example indices (``epoch_batch_indices``).
        mask: their padding mask.
        first_step: the first row to train on.
        num_steps: how many rows (static: one compilation per chunk length).
        mesh: a ``jaxmnist.parallel`` mesh to split every batch over its devices.
        normalization: ``(mean, std)`` of the input transform, the lesson's by default.

    Returns:
        The new state and the per-step metrics of the chunk (shape ``(num_steps,)``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxmnist import create_train_state
        >>> images, labels = jnp.zeros((100, 28, 28), jnp.uint8), jnp.arange(100) % 10
        >>> indices, mask = epoch_batch_indices(jax.random.key(1), 100, 10)
        >>> state, metrics = train_chunk(create_train_state(jax.random.key(0)), images, labels, indices, mask, 4, 3)
        >>> int(state.step), metrics["loss"].shape
        (3, (3,))
    """
    window = (
        jax.lax.dynamic_slice_in_dim(indices, first_step, num_steps),
        jax.lax.dynamic_slice_in_dim(mask, first_step, num_steps),
    )
    return _scan_steps(state, images, labels, *window, mesh, normalization)
