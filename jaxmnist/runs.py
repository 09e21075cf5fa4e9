"""What a run trains: its plan of runs (``jaxmnist.plan``), the held-out split, and the model, optimizer and
loss (the caller's, or those the settings describe) built into every run's initial state.

``fit`` builds a ``Run`` from its arguments, or takes the caller's (the train command builds one to
restore a checkpoint onto the run's own state and to name the model in its header).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmnist.config import TrainConfig, check_against_data, held_out_images, steps_per_epoch
from jaxmnist.model_source import Model, ModelSource, from_object, load_model
from jaxmnist.plan import GridRun, RunPlan, plan_of, run_keys
from jaxmnist.recipe import build_model, build_optimizer
from jaxmnist.train import ModelCallError, TrainState, create_train_state, param_dtype
from jaxmnist.train.state import NEEDS_VALUES, LossFn
from jaxmnist.train.steps import saved_for_backward

# The held-out images' key, one for every seed: the one seed 0 drew when it came from the seed (format
# version 2 checkpoints), apart from the init and data keys (which stay split(key(seed))).
_VALIDATION_SALT = 0x76616C  # "val"


class RunError(ValueError):
    """The model, the data and the settings do not fit together; raised before the first step.

    Example:
        >>> from jaxmnist.model import MLP
        >>> try:
        ...     build_run(TrainConfig(dropout=(0.1, 0.2)), (28, 28), 100, model=MLP())
        ... except RunError as error:
        ...     print(error)
        `dropout` lists rates for the lesson's MLP, and `model` is given: give one value
    """


def hold_out(config: TrainConfig, images: np.ndarray, labels: np.ndarray) -> tuple[tuple, tuple]:
    """The training images split into ``(train, validation)``: ``val_split`` of them (or that fraction) held out.

    The same images for every seed (drawn from a key of their own, so the init and shuffle keys do not
    move): the runs of a grid or of several seeds are each their run alone, and all are validated on the
    same images. Both parts keep the data set's order.

    Example:
        >>> images, labels = np.zeros((10, 28, 28), np.uint8), np.arange(10)
        >>> (train, _), (validation, held_labels) = hold_out(TrainConfig(val_split=3), images, labels)
        >>> len(train), len(validation), sorted(set(held_labels) & set(_))
        (7, 3, [])
    """
    check_against_data(config, len(images))
    if not config.val_split:  # nothing held out: no permutation to draw (or compile)
        return (images, labels), (images[:0], labels[:0])
    order = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(0), _VALIDATION_SALT), len(images)))
    count = held_out_images(config, len(images))
    held, kept = np.sort(order[:count]), np.sort(order[count:])
    return (images[kept], labels[kept]), (images[held], labels[held])


@dataclasses.dataclass(frozen=True)
class Run:
    """What a run trains, whatever its source.

    Attributes:
        plan: the runs trained together (grid rows × seeds), their values, seeds and keys.
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

    plan: RunPlan
    model: ModelSource
    optimizer: optax.GradientTransformation
    loss: str | LossFn
    image_shape: tuple[int, ...]
    optimizer_from_config: bool
    row_optimizers: tuple[optax.GradientTransformation, ...] = ()
    num_train_images: int = 0

    def learning_rates(self) -> list[float] | None:
        """Every run's learning rate as the settings give it, when they give it exactly (their optimizer,
        at a constant rate); None otherwise: then the rate is the one the optimizer reports, if any."""
        config = self.plan.config
        if not self.optimizer_from_config or config.schedule != "constant":
            return None
        return [run.values.get("learning_rate", config.learning_rate) for run in self.plan.runs]


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
    config: TrainConfig | RunPlan,
    image_shape: tuple[int, ...],
    num_train_images: int,
    model: Model | ModelSource | Callable[..., Model] | None = None,
    optimizer: optax.GradientTransformation | None = None,
    loss: str | LossFn | None = None,
) -> Run:
    """The run's model, optimizer and loss: the given ones, else those ``config`` describes.

    Args:
        config: the run's settings, or their ``RunPlan``.
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
        >>> run.model.name, run.loss, run.learning_rates()
        ('MLP', 'nll', [0.003])
    """
    plan = plan_of(config)
    config = plan.config
    if config.dtype == "float64" and jax.dtypes.canonicalize_dtype(np.float64) != np.float64:
        # else JAX truncates every float64 to float32 with a warning, and the run trains in float32
        raise RunError(
            "`dtype`='float64' needs JAX's 64-bit mode, which is off: call "
            "jax.config.update('jax_enable_x64', True) before creating any array"
        )
    if model is None:
        source = settings_model(config)
    else:
        source = model if isinstance(model, ModelSource) else from_object(model)
    if config.seeds > 1 and not source.per_seed:
        raise RunError(
            f"`model` {source.name} is built without `rngs`: every seed would start from the same weights; for "
            "`seeds` > 1 give its class or a function that builds it from `rngs`"
        )
    swept = plan.swept
    if optimizer is not None and set(swept) - {"dropout"}:
        raise RunError(
            f"`{next(iter(swept))}` lists values for the optimizer the settings describe, and `optimizer` is "
            "given: sweep with the settings' optimizer, or give one value"
        )
    if model is not None and "dropout" in swept:
        raise RunError("`dropout` lists rates for the lesson's MLP, and `model` is given: give one value")
    if optimizer is None:
        row_optimizers = tuple(
            build_optimizer(plan.row_config(row), num_train_images, per_run_hyperparameters=bool(swept))
            for row in range(len(plan.rows))
        )
    else:  # one optimizer for every row (a dropout grid): its rows differ in the model alone
        row_optimizers = (optimizer,) * len(plan.rows)
    return Run(
        plan=plan,
        model=source,
        optimizer=row_optimizers[0],
        loss=config.loss if loss is None else loss,
        image_shape=tuple(image_shape),
        optimizer_from_config=optimizer is None,
        row_optimizers=row_optimizers,
        num_train_images=num_train_images,
    )


def initial_state(run: Run, runs_sharding: jax.sharding.Sharding | None = None) -> TrainState:
    """The freshly initialized train state of every run (grid rows × seeds).

    With several runs, the states stacked along a leading axis, each exactly the state its values and
    seed give alone: a linen model is initialized from the seed's key, an NNX model built from
    ``nnx.Rngs`` of it; the optimizer holds the row's hyperparameters. Before the second run is built,
    the memory the program needs is estimated from the first, and a grid too large is refused
    (``RunError``). ``runs_sharding`` places several runs' states where they will train (e.g. split over
    the devices along the run axis).
    """
    plan = run.plan
    with _model_errors(run):
        first = _state_of(run, plan.first_run)
        if not plan.stacked:
            return first
        check_memory(plan, first, run.num_train_images)  # before the other runs are built
        states = [first, *(_state_of(run, grid_run) for grid_run in plan.runs[1:])]
    return jax.device_put(_stacked(states), runs_sharding)


def initial_shapes(run: Run) -> TrainState:
    """The shapes and dtypes of ``initial_state(run)`` (``jax.ShapeDtypeStruct`` leaves), found by tracing
    alone; its errors (a grid too large for memory, a model that cannot be initialized) as its own."""
    try:
        return jax.eval_shape(lambda: initial_state(run))
    except NEEDS_VALUES:  # a model whose initialization needs values cannot be traced: from the state itself
        return jax.eval_shape(lambda state: state, initial_state(run))


def _module(run: Run, grid_run: GridRun) -> Model:
    """The model of one run: its seed's (an NNX model is built from it), with its row's dropout rate."""
    module = run.model.build(run_keys(grid_run.seed)[0])
    return module.clone(dropout_rate=grid_run.values["dropout"]) if "dropout" in grid_run.values else module


def _creation(run: Run, grid_run: GridRun) -> Callable[[jax.Array], TrainState]:
    """``create_train_state`` of one run's model, loss and row's optimizer, taking the run's init key."""
    optimizer = run.row_optimizers[grid_run.row] if run.row_optimizers else run.optimizer
    return partial(create_train_state, model=_module(run, grid_run), optimizer=optimizer, loss=run.loss,
                   input_shape=(1, *run.image_shape))  # fmt: skip


def _state_of(run: Run, grid_run: GridRun) -> TrainState:
    """One run's initial state: ``create_train_state`` of its model, loss and row's optimizer from its init key."""
    return _creation(run, grid_run)(run_keys(grid_run.seed)[0])


def _stacked(states: list[TrainState]) -> TrainState:
    """The states of several runs as one, along a new leading axis. One program serves every run: the
    first's calling convention and optimizer, whose update reads each run's hyperparameters from its own
    state (each run's model convention and optimizer are objects of their own)."""
    first = states[0]
    shared = {"apply_fn": first.apply_fn, "model_call": first.model_call, "tx": first.tx}
    states = [state.replace(**shared) for state in states]
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(first)):  # traced for their shapes
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    # On the host: on a device, every leaf shape would compile a program of its own.
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(leaf) for leaf in leaves]), *states)


@contextlib.contextmanager
def _model_errors(run: Run) -> Iterator[None]:
    """The model's or the loss's own errors while a state is created, as one-line ``RunError``s."""
    try:
        yield
    except (RunError, *NEEDS_VALUES):  # ours, and the sign to initialize eagerly
        raise
    except (ModelCallError, TypeError) as error:  # a __call__ or a loss that cannot be called as asked
        raise RunError(str(error)) from error
    except Exception as error:  # the model's own code raised on images of the data's shape
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise RunError(
            f"{run.model.name} raised {type(error).__name__} when initialized on images of shape "
            f"{run.image_shape}: {first_line}"
        ) from error


def estimated_bytes(plan: RunPlan, state: TrainState, num_train_images: int) -> int:
    """About how much memory the compiled epoch of the plan's runs, each like ``state`` (one run's, or its
    shapes), needs.

    Per run: the state twice (the donated one and the updated one), the values a training step keeps
    from its forward pass for its backward pass and its gradients (traced on shapes, not compiled), and
    the epoch's per-step metrics. A figure meant to refuse what cannot fit, before anything is compiled.
    """
    state_bytes = _bytes((state.params, state.opt_state, state.collections))
    metric_bytes = 4 * 8 * steps_per_epoch(plan.config, num_train_images) + 64
    return plan.num_runs * (2 * state_bytes + _step_bytes(plan.config, state) + metric_bytes)


def _step_bytes(config: TrainConfig, state: TrainState) -> int:
    """What one training step of one run like ``state`` holds at its peak, on shapes alone: the values its
    forward pass keeps for the backward pass (a convolution's activations, say) and the gradients."""
    images = jax.ShapeDtypeStruct((config.batch_size, *state.image_shape), param_dtype(state))
    return _kept_for_backward_bytes(state, images) + _bytes(state.params)


def evaluation_bytes(state: TrainState, images: jax.Array | jax.ShapeDtypeStruct) -> int:
    """About what evaluating one run like ``state`` (one run's, or its shapes) on ``images`` holds at its peak:
    the activations of its forward pass over every image, traced on shapes (an upper bound: they are what
    a training step would keep for its backward pass); at least the images' own size."""
    return _kept_for_backward_bytes(state, images) or images.size * images.dtype.itemsize


def _kept_for_backward_bytes(state: TrainState, images: jax.Array | jax.ShapeDtypeStruct) -> int:
    """The bytes a training step's forward pass over ``images`` keeps for its backward pass, on shapes alone;
    0 for a model that cannot be traced on shapes (its compilation, which cannot trace it either, says why)."""
    examples = images.shape[:1]
    batch = {
        "image": jax.ShapeDtypeStruct(images.shape, images.dtype),
        "label": jax.ShapeDtypeStruct(examples, jnp.int32),
        "mask": jax.ShapeDtypeStruct(examples, jnp.bool_),
    }
    try:
        return _bytes(jax.eval_shape(saved_for_backward, state, batch))
    except NEEDS_VALUES:
        return 0


def first_run_shapes(state: TrainState) -> TrainState:
    """The shapes (``jax.ShapeDtypeStruct`` leaves) of the first run of a state stacked over runs: what checks
    and estimates need of one run, without slicing it out."""
    return jax.eval_shape(partial(jax.tree.map, lambda leaf: leaf[0]), state)


def _bytes(tree) -> int:
    """The bytes of the arrays (or their shapes alone) of ``tree``."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def available_bytes() -> int | None:
    """Memory free for the program: the default device's free memory, else the host's available memory
    (free pages and the caches the system gives back); None when unknown."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every system reports it
        return None


def check_memory(plan: RunPlan, state: TrainState, num_train_images: int) -> None:
    """``RunError`` with the figures when the plan's runs would not fit in memory."""
    needed, available = estimated_bytes(plan, state, num_train_images), available_bytes()
    if available is not None and needed > available:
        raise RunError(
            f"{plan.num_runs:,} runs in one program need about {needed / 2**30:.1f} GiB, more than the "
            f"{available / 2**30:.1f} GiB free: give fewer values or `seeds`"
        )


def count_classes(state: TrainState, image_shape: tuple[int, ...]) -> int:
    """The number of classes the model of ``state`` (one seed's, or its shapes) scores; ``RunError`` unless its
    output is ``(batch, classes)`` logits. Found by shape alone (``jax.eval_shape``): nothing is computed."""
    dtype = jax.tree.leaves(state.params)[0].dtype
    sample = jax.ShapeDtypeStruct((2, *image_shape), dtype)
    try:
        output = jax.eval_shape(lambda state, images: state.apply_model(images)[0], state, sample)
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
