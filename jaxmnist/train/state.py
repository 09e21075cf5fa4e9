"""The train state: everything a step reads and writes, as one pytree.

Besides flax's ``params``, ``opt_state`` and ``step``, it carries the model's other variable collections
(BatchNorm statistics, ...), a PRNG key for stochastic layers, the loss, and how to call the model (a
flax linen module or an NNX module, see ``jaxmnist.train.adapters``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from flax.training import train_state

from jaxmnist.losses import LOSSES
from jaxmnist.model import MLP
from jaxmnist.train.adapters import Collections, LinenModel, ModelCall, NnxModel, Params, split_outputs

LossFn = Callable[..., "jax.Array | tuple[jax.Array, dict[str, jax.Array]]"]
# What a loss may take besides (logits, labels, mask), by keyword.
LOSS_KEYWORDS = ("params", "batch", "outputs", "sown")

# The state's key is fold_in(rng, STEP_KEY_SALT): the init key itself is left to the parameters.
STEP_KEY_SALT = 2
# What tracing raises for a model whose initialization needs concrete values: such a model is initialized
# eagerly.
NEEDS_VALUES = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
)


class TrainState(train_state.TrainState):
    """flax's TrainState plus the model's other state, a PRNG key, the loss and the model's calling convention.

    Attributes:
        collections: the model's variables other than ``params`` (e.g. ``{"batch_stats": ...}`` for linen,
            the non-parameter state for NNX); updated by every training step.
        key: raw PRNG key data (``uint32``); step ``s`` gives its stochastic layers
            ``fold_in(key, s)``, so a run is reproducible and no key is used twice.
        loss_fn: ``loss_fn(logits, labels, mask, **keywords)``, the (masked) mean loss of a batch, or
            ``(loss, metrics)`` with a dict of scalar metrics.
        loss_keywords: which of ``params``, ``batch``, ``outputs``, ``sown`` the loss takes.
        model_call: how to call the model (``LinenModel`` or ``NnxModel``).
        image_shape: the shape of one input image the model was initialized with; batches are reshaped to it.

    Example:
        >>> import jax
        >>> state = create_train_state(jax.random.key(0), MLP(dropout_rate=0.2))
        >>> state.collections, state.key.dtype, state.step_key().dtype
        ({}, dtype('uint32'), key<fry>)
    """

    collections: Collections = struct.field(default_factory=dict)
    key: jax.Array | None = None
    loss_fn: LossFn = struct.field(pytree_node=False, default=LOSSES["nll"])
    loss_keywords: tuple[str, ...] = struct.field(pytree_node=False, default=())
    model_call: ModelCall | None = struct.field(pytree_node=False, default=None)
    image_shape: tuple[int, ...] = struct.field(pytree_node=False, default=(28, 28))

    def step_key(self) -> jax.Array:
        """The key of this step's stochastic layers: ``fold_in(key, step)``."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.key), self.step)

    def apply_model(
        self, images: jax.Array, *, train: bool = False, key: jax.Array | None = None
    ) -> tuple[jax.Array, Collections]:
        """The model's logits on ``images`` and its updated collections (unchanged unless ``train``); a
        model's extra outputs and sown values are left out (``train_step`` gives them to the loss)."""
        outputs, collections, _ = self.model_call(self.params, self.collections, images, train=train, key=key)
        return split_outputs(outputs)[0], collections

    def nnx_module(self) -> nnx.Module:
        """The trained NNX module (for research code that continues in NNX); only for NNX models."""
        if not isinstance(self.model_call, NnxModel):
            raise TypeError("nnx_module() needs a state created from an nnx.Module")
        return self.model_call.module(self.params, self.collections)


def _typed_key(rng: jax.Array) -> jax.Array:
    return rng if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)


def linen_sample(module: nn.Module, input_shape: tuple[int, ...]) -> jax.Array:
    """The batch of zeros a linen model is initialized on: in its parameters' dtype (float64 models see
    float64 images)."""
    return jnp.zeros(input_shape, getattr(module, "param_dtype", jnp.float32))


def _initialize(module: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> Collections:
    return LinenModel.wrap(module).initial_variables(key, linen_sample(module, input_shape))


# A linen model's initialization, compiled once per model and input shape: eagerly, each initializer
# operation would compile on its first use (most of a short command's start-up); one program serves every
# key. On a CPU, LLVM's O1 compiles it in a third of the time with the numbers of eager initialization
# (tested: uniform, truncated normal); O0 changes them.
_COMPILED_INITIALIZATIONS = {
    platform: jax.jit(_initialize, static_argnames=("module", "input_shape"), compiler_options=options)
    for platform, options in (("cpu", {"xla_backend_optimization_level": 1}), ("other", None))
}


def _compiled_variables(module: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> Collections | None:
    """``module``'s variables drawn from ``key`` by its compiled initialization; None for a model that cannot
    be a static argument (a list among its fields) or whose initialization needs values."""
    try:
        hash(module)
    except TypeError:
        return None
    # Traced inside another function (``jax.eval_shape``, say), it is compiled as a part of that, if ever.
    top_level_cpu = jax.default_backend() == "cpu" and not isinstance(key, jax.core.Tracer)
    try:
        return _COMPILED_INITIALIZATIONS["cpu" if top_level_cpu else "other"](module, key, input_shape=input_shape)
    except NEEDS_VALUES:
        return None


def loss_keywords(loss_fn: Callable) -> tuple[str, ...]:
    """Which of ``LOSS_KEYWORDS`` ``loss_fn`` takes, from its signature; ``TypeError`` naming a parameter
    beyond ``(logits, labels, mask)`` that is none of them and has no default.

    Example:
        >>> def penalized(logits, labels, mask=None, *, params): ...
        >>> loss_keywords(penalized)
        ('params',)
    """
    try:
        parameters = list(inspect.signature(loss_fn).parameters.values())
    except (TypeError, ValueError):  # builtins and some C callables: called with (logits, labels, mask)
        return ()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 3 and not any(p.kind == p.VAR_POSITIONAL for p in parameters):
        raise TypeError("`loss` must take (logits, labels, mask) positionally; give it a `mask=None` parameter")
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return LOSS_KEYWORDS  # **kwargs: every keyword
    taken = []
    for parameter in parameters[3:]:
        if parameter.name in LOSS_KEYWORDS:
            taken.append(parameter.name)
        elif parameter.default is parameter.empty and parameter.kind not in (
            parameter.VAR_POSITIONAL,
            parameter.VAR_KEYWORD,
        ):
            raise TypeError(
                f"`loss` parameter {parameter.name!r} cannot be given: a loss takes (logits, labels, mask) and "
                f"any of the keywords {', '.join(LOSS_KEYWORDS)}"
            )
    return tuple(taken)


def create_train_state(
    rng: jax.Array,
    model: nn.Module | nnx.Module | None = None,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = 0.003,
    loss: str | LossFn = "nll",
    input_shape: tuple[int, ...] = (1, 28, 28),
    params: Params | None = None,
    variables: Collections | None = None,
) -> TrainState:
    """The initial train state of ``model`` under ``optimizer``.

    Args:
        rng: PRNG key. A linen model's variables are drawn from it by ``model.init(rng, ...)`` compiled as
            one call (once per model and ``input_shape``; eagerly for a model whose initialization needs
            values): eager ``model.init``'s numbers for uniform and truncated normal initializers, within
            a few ulp for scaled normal ones (XLA folds the scale into the draw); the state's key for
            stochastic layers is ``fold_in(rng, 2)``.
        model: a ``flax.linen.Module`` (initialized here, with ``train=False`` if its ``__call__`` takes
            ``train``) or an ``nnx.Module`` instance (already initialized; its state is split off here).
            Default: the lesson's ``MLP``.
        optimizer: any ``optax.GradientTransformation`` (chains, schedules, ``inject_hyperparams``,
            ``MultiSteps``); default ``optax.sgd(learning_rate)``.
        learning_rate: the default optimizer's learning rate.
        loss: ``"nll"`` (LogSoftmax + NLLLoss, the lesson's), ``"ce"`` (CrossEntropyLoss on logits) or any
            ``loss_fn(logits, labels, mask)``, which may also take the keywords ``params`` (the parameters
            being differentiated), ``batch`` (the whole batch dict), ``outputs`` (what the model returns
            beside its logits when it returns ``(logits, extra)``) and ``sown`` (the collections it sowed
            in this step), found here from its signature; it returns the loss, or ``(loss, metrics)``
            with a dict of scalars that join the step's metrics.
        input_shape: the shape of a batch of images the model takes, e.g. ``(1, 28, 28, 1)`` for a CNN.
        params: parameters to use instead of the model's own (e.g. weights copied from PyTorch).
        variables: a linen model's variables as its ``init`` drew them from ``rng`` (e.g. eagerly), used
            instead of initializing it here; ``params`` still replaces their parameters.

    Returns:
        A ``TrainState`` at step 0.

    Raises:
        ModelCallError: the model's ``__call__`` needs an argument jaxmnist cannot give.
        TypeError: the loss takes a parameter that cannot be given (named).

    Example:
        >>> import jax, optax
        >>> state = create_train_state(jax.random.key(0), MLP(), optax.adam(1e-3))
        >>> int(state.step), sorted(state.params)
        (0, ['Dense_0', 'Dense_1', 'Dense_2'])
    """
    rng = _typed_key(rng)
    model = MLP() if model is None else model
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise TypeError("`variables` are a linen model's: an nnx.Module holds its own")
        model_call, own_params, collections = NnxModel.wrap(model)
    elif isinstance(model, nn.Module):
        if variables is None:
            variables = _compiled_variables(model, rng, tuple(input_shape))
        model_call, own_params, collections = LinenModel.wrap(model).init(
            rng, linen_sample(model, input_shape), variables
        )
    else:
        raise TypeError(f"`model` must be a flax.linen.Module or an nnx.Module, got {type(model).__name__}")
    loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
    state = TrainState.create(
        apply_fn=model_call.apply_fn,
        params=own_params if params is None else params,
        tx=optax.sgd(learning_rate) if optimizer is None else optimizer,
        collections=collections,
        key=jax.random.key_data(jax.random.fold_in(rng, STEP_KEY_SALT)),
        loss_fn=loss_fn,
        loss_keywords=loss_keywords(loss_fn),
        model_call=model_call,
        image_shape=tuple(input_shape[1:]),
    )
    # An explicit int32 step keeps the state's types fixed from the first step on (no retrace).
    return state.replace(step=jnp.zeros((), jnp.int32))


def param_dtype(state: TrainState) -> jnp.dtype:
    """The floating dtype the model computes in (float32, or float64 for exactness checks)."""
    return jax.tree.leaves(state.params)[0].dtype


def current_learning_rate(opt_state: optax.OptState) -> jax.Array | None:
    """The learning rate an ``optax.inject_hyperparams`` optimizer holds in ``opt_state``, else None.

    Found anywhere inside chains and wrappers (e.g. ``optax.MultiSteps``); None when there is none or
    more than one.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
        >>> float(current_learning_rate(optimizer.init(jnp.zeros(3))))
        0.1
    """
    injected = [
        node.hyperparams["learning_rate"]
        for node in jax.tree.leaves(opt_state, is_leaf=lambda node: hasattr(node, "hyperparams"))
        if isinstance(getattr(node, "hyperparams", None), dict) and "learning_rate" in node.hyperparams
    ]
    return injected[0] if len(injected) == 1 else None
