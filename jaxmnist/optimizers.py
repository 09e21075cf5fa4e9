"""Optimizers by name: any optax optimizer, the lesson's shortcuts, or a factory of the caller's.

A name is one of

- ``momentum`` or ``nesterov``: optax's ``sgd`` with (Nesterov) momentum, as the lesson's flags offer;
- ``torch_adagrad``: Adagrad as ``torch.optim.Adagrad`` computes it (optax's ``adagrad`` differs);
- any optimizer function of optax (``sgd``, ``adam``, ``adamw``, ``adadelta``, ``rmsprop``, ``lion``, ...):
  one that takes ``learning_rate`` and returns a ``GradientTransformation``;
- ``FILE.py:NAME`` or ``package.module:NAME``: such a function of the caller's.

Its other keyword arguments are checked against its signature before anything is built.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxmnist.arguments import Arguments, check_arguments
from jaxmnist.model_source import ModelSpecError, load_attribute

OptimizerFactory = Callable[..., optax.GradientTransformation]
SHORTCUTS = {"momentum": {"nesterov": False}, "nesterov": {"nesterov": True}}


def scale_by_root_sum_of_squares(initial_accumulator_value: float = 0.0, eps: float = 1e-10
                                 ) -> optax.GradientTransformation:  # fmt: skip
    """Divides each update by the root of the sum of its squares to date plus ``eps``: Adagrad's scaling as
    PyTorch computes it (optax's ``scale_by_rss`` adds ``eps`` under the root, which rescales small sums).

    Args:
        initial_accumulator_value: the sums' starting value.
        eps: added to the root, so a gradient that has always been 0 stays 0.

    Returns:
        The ``optax.GradientTransformation``; its state holds the sums (``sum_of_squares``).

    Example:
        >>> transform = scale_by_root_sum_of_squares()
        >>> updates, state = transform.update(jnp.array([3.0, 0.0]), transform.init(jnp.zeros(2)))
        >>> updates.tolist(), state.sum_of_squares.tolist()
        ([1.0, 0.0], [9.0, 0.0])
    """

    def init(params: optax.Params) -> optax.ScaleByRssState:
        return optax.ScaleByRssState(jax.tree.map(lambda leaf: jnp.full_like(leaf, initial_accumulator_value), params))

    def update(updates: optax.Updates, state: optax.ScaleByRssState, params: optax.Params | None = None):
        del params
        sums = jax.tree.map(lambda update, total: total + update * update, updates, state.sum_of_squares)
        updates = jax.tree.map(lambda update, total: update / (jnp.sqrt(total) + eps), updates, sums)
        return updates, optax.ScaleByRssState(sums)

    return optax.GradientTransformation(init, update)


def torch_adagrad(
    learning_rate: optax.ScalarOrSchedule,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
) -> optax.GradientTransformation:
    """Adagrad as ``torch.optim.Adagrad`` computes it, with its arguments and defaults.

    Args:
        learning_rate: the rate, or an optax schedule of it.
        lr_decay: step ``t`` (from 1) uses ``learning_rate / (1 + (t - 1) * lr_decay)``.
        weight_decay: adds ``weight_decay * param`` to the gradient first.
        initial_accumulator_value: the sums of squares' starting value.
        eps: added to their root.

    Returns:
        The ``optax.GradientTransformation``.

    Raises:
        ValueError: a negative value, which PyTorch refuses too.

    Example:
        >>> optimizer = torch_adagrad(0.5)  # the first step moves each weight by the rate
        >>> updates, _ = optimizer.update(jnp.array([2.0, -0.5]), optimizer.init(jnp.zeros(2)))
        >>> updates.tolist()
        [-0.5, 0.5]
    """
    arguments = {"lr_decay": lr_decay, "weight_decay": weight_decay,
                 "initial_accumulator_value": initial_accumulator_value, "eps": eps}  # fmt: skip
    for name, value in arguments.items():  # refused as torch.optim.Adagrad refuses them
        if value < 0:
            raise ValueError(f"`{name}` must be at least 0, got {value}")
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    rate_decay = [optax.scale_by_schedule(lambda count: 1 / (1 + count * lr_decay))] if lr_decay else []
    return optax.chain(*decay, scale_by_root_sum_of_squares(initial_accumulator_value, eps), *rate_decay,
                       optax.scale_by_learning_rate(learning_rate))  # fmt: skip


OWN_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {"torch_adagrad": torch_adagrad}


def _takes_learning_rate(function: Any) -> bool:
    try:
        return "learning_rate" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


@functools.cache  # optax's module does not change while it runs; a grid's every run asks
def optax_optimizer_names() -> tuple[str, ...]:
    """The names of optax's optimizer functions: its public functions that take ``learning_rate``.

    Example:
        >>> {"adadelta", "rmsprop", "lion"} <= set(optax_optimizer_names())
        True
    """
    functions = {name: getattr(optax, name) for name in dir(optax) if not name.startswith("_")}
    return tuple(
        sorted(
            name
            for name, function in functions.items()
            if inspect.isfunction(function) and not name.endswith("_schedule") and _takes_learning_rate(function)
        )
    )


def optimizer_factory(name: str) -> OptimizerFactory:
    """The function ``name`` stands for, taking ``learning_rate`` and keyword arguments.

    Args:
        name: ``momentum``, ``nesterov``, ``torch_adagrad``, an optax optimizer's name, or ``FILE.py:NAME`` /
            ``package.module:NAME``.

    Returns:
        The function (for the shortcuts, optax's ``sgd`` with their ``nesterov``).

    Raises:
        ValueError: ``name`` names no optimizer (the closest optax names suggested), or a spec that cannot be
            loaded or names something that takes no ``learning_rate``.

    Example:
        >>> optimizer_factory("adadelta").__name__
        'adadelta'
    """
    if name in SHORTCUTS:
        return functools.partial(optax.sgd, **SHORTCUTS[name])
    if name in OWN_OPTIMIZERS:
        return OWN_OPTIMIZERS[name]
    if ":" in name:
        try:
            factory = load_attribute(name, "optimizer")
        except ModelSpecError as error:
            raise ValueError(str(error)) from error
        if not callable(factory) or not _takes_learning_rate(factory):
            raise ValueError(f"`optimizer`={name} must be a function taking `learning_rate` and returning an optax "
                             "GradientTransformation")  # fmt: skip
        return factory
    names = optax_optimizer_names()
    if name not in names:
        close = difflib.get_close_matches(name, (*SHORTCUTS, *OWN_OPTIMIZERS, *names), n=3)
        suggestion = f"; did you mean {' or '.join(close)}?" if close else "; any optax optimizer's name"
        raise ValueError(f"`optimizer`={name!r} is not an optax optimizer{suggestion}")
    return getattr(optax, name)


def build_optimizer_by_name(name: str, learning_rate: Any, arguments: Arguments, own: Arguments | None = None
                            ) -> optax.GradientTransformation:  # fmt: skip
    """``optimizer_factory(name)(learning_rate, **own, **arguments)``, ``arguments`` checked first.

    ``own`` are values that settings of their own give (``momentum``, ``weight_decay``): ``arguments`` may
    not give them again.

    Example:
        >>> import jax.numpy as jnp
        >>> optimizer = build_optimizer_by_name("rmsprop", 0.01, {"decay": 0.99, "eps_in_sqrt": False})
        >>> sorted(optimizer.init(jnp.zeros(2))[0]._fields)
        ['nu']
    """
    factory = optimizer_factory(name)
    own = own or {}
    # What other settings give: the rate, momentum and weight decay, and a shortcut's nesterov (its name's)
    fixed = {"learning_rate": "learning_rate", **{name: name for name in own},
             **{name: "optimizer" for name in getattr(factory, "keywords", {})}}  # fmt: skip
    check_arguments(getattr(factory, "func", factory), arguments, "optimizer_args", fixed)
    try:
        optimizer = factory(learning_rate=learning_rate, **own, **arguments)
    except Exception as error:  # the factory's own checks: say what it raised, in one line
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"`optimizer`={name} with `optimizer_args` raised {type(error).__name__}: {message}"
        ) from error
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(
            f"`optimizer`={name} returned a {type(optimizer).__name__}, not an optax GradientTransformation"
        )
    return optimizer
