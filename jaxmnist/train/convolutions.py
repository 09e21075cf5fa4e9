"""Convolutions in the one form XLA:CPU runs fast, inside compiled loops as well as outside them.

XLA:CPU computes a convolution with its optimized kernels only in the canonical layout: images
``(batch, *spatial, feature)``, kernels ``(*spatial, in_feature, out_feature)``, outputs like the images
(NHWC / HWIO / NHWC in two dimensions). Its compiler rewrites other layouts into that one with transposes,
but only in a program's entry computation: a convolution inside a ``lax.scan`` (a while loop) keeps its
layout and falls back to a naive elemental loop. The backward pass of every convolution is such a
layout — JAX's gradients swap the batch and feature roles (``f01b_i01o->01bf`` for a weight gradient) —
so a CNN's epoch as one scan ran 8–10× slower per step than the same step compiled alone.

``canonical_convolutions`` makes the rewrite at the level of JAX, where it reaches loop bodies too: on a
CPU, every convolution that is not canonical becomes transposes around a canonical convolution, the
rewrite XLA would make itself in an entry computation, so the numbers are those of the step compiled
alone. Programs lowered for other platforms keep their convolutions as they were.

``COMPILER_OPTIONS`` then keeps XLA:CPU's default YNNPACK fusions of dots and reductions but leaves
convolutions to its Eigen kernels, which ran the convolutions of MNIST's CNNs 3–10× faster on the
two-core x86-64 CPUs measured (docs/performance.md). A model without convolutions compiles to the same
program with or without it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
from jax import lax
from jax.extend import core

_Function = TypeVar("_Function", bound=Callable[..., Any])

# XLA:CPU's default YNNPACK fusions are individual dots, individual convolutions and reductions; the
# convolutions are left out. The option is a debug option of every XLA backend: other backends ignore it.
COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}


def canonical_dimension_numbers(num_dims: int) -> lax.ConvDimensionNumbers:
    """The dimension numbers of XLA:CPU's fast convolutions with ``num_dims``-dimensional operands.

    Example:
        >>> canonical_dimension_numbers(4)
        ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
    """
    spatial = tuple(range(1, num_dims - 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, num_dims - 1, *spatial),
        rhs_spec=(num_dims - 1, num_dims - 2, *range(num_dims - 2)),
        out_spec=(0, num_dims - 1, *spatial),
    )


def _is_canonical(equation: core.JaxprEqn) -> bool:
    numbers = equation.params["dimension_numbers"]
    return numbers == canonical_dimension_numbers(len(numbers.lhs_spec))


def _needs_rewrite(jaxpr: core.Jaxpr) -> bool:
    """Whether ``jaxpr`` has a convolution that is not canonical, in it or in a function it calls."""
    for equation in jaxpr.eqns:
        if equation.primitive is core.primitives.conv_general_dilated_p and not _is_canonical(equation):
            return True
        if equation.primitive is core.primitives.jit_p and _needs_rewrite(equation.params["jaxpr"].jaxpr):
            return True
    return False


def _canonical_convolution(lhs: jax.Array, rhs: jax.Array, *, dimension_numbers: lax.ConvDimensionNumbers,
                           **params: Any) -> jax.Array:  # fmt: skip
    """The convolution of ``lhs`` and ``rhs`` computed in the canonical layout, returned in the given one."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    lhs = lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    rhs = lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    canonical = canonical_dimension_numbers(lhs.ndim)
    out = core.primitives.conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=canonical, **params)
    # The canonical output's axis for each axis of the output asked for.
    source = {out_spec[0]: 0, out_spec[1]: lhs.ndim - 1}
    source.update({axis: 1 + index for index, axis in enumerate(out_spec[2:])})
    return lax.transpose(out, tuple(source[axis] for axis in range(lhs.ndim)))


def _evaluate(jaxpr: core.Jaxpr, consts: Sequence[Any], *args: Any) -> list[Any]:
    """``jaxpr`` evaluated equation by equation, its convolutions made canonical (those in the functions it
    calls too: such a call is inlined, as XLA inlines it anyway)."""
    values: dict[core.Var, Any] = dict(zip(jaxpr.constvars, consts))
    values.update(zip(jaxpr.invars, args))

    def read(atom):
        return atom.val if isinstance(atom, core.Literal) else values[atom]

    for equation in jaxpr.eqns:
        inputs = [read(atom) for atom in equation.invars]
        primitive = equation.primitive
        with equation.ctx.manager:
            if primitive is core.primitives.conv_general_dilated_p and not _is_canonical(equation):
                # Other backends keep the convolution as it was: theirs find fast kernels for any layout.
                as_given = functools.partial(primitive.bind, **equation.params)
                canonical = functools.partial(_canonical_convolution, **equation.params)
                outputs = [lax.platform_dependent(*inputs, cpu=canonical, default=as_given)]
            elif primitive is core.primitives.jit_p and _needs_rewrite(equation.params["jaxpr"].jaxpr):
                called = equation.params["jaxpr"]
                outputs = _evaluate(called.jaxpr, called.consts, *inputs)
            else:
                result = primitive.bind(*inputs, **primitive.get_bind_params(equation.params))
                outputs = result if primitive.multiple_results else [result]
        for var, value in zip(equation.outvars, outputs):
            if not isinstance(var, core.DropVar):
                values[var] = value
    return [read(atom) for atom in jaxpr.outvars]


def canonical_convolutions(function: _Function) -> _Function:
    """``function`` with every convolution it computes, gradients included, in XLA:CPU's fast layout.

    The result is the same function: each convolution that is not canonical is computed as transposes
    around a canonical one, exactly as XLA:CPU computes it in a program's entry computation; every other
    equation is bound as traced, so a function without such a convolution gives the very program it gives
    alone. ``function`` is traced once a call. Convolutions inside a loop or branch of the function itself
    (``lax.scan`` inside a model) are left as they are.

    Args:
        function: any function of arrays (pytrees of them), e.g. a training step that takes gradients.

    Returns:
        A function of the same arguments returning the same values.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> def loss(kernel, images):
        ...     return jax.lax.conv_general_dilated(images, kernel, (1, 1), "SAME").sum()
        >>> grad = canonical_convolutions(jax.grad(loss))
        >>> kernel, images = jnp.ones((8, 1, 3, 3)), jnp.ones((2, 1, 5, 5))  # NCHW and OIHW
        >>> bool(jnp.allclose(grad(kernel, images), jax.grad(loss)(kernel, images)))
        True
    """

    @functools.wraps(function)
    def with_canonical_convolutions(*args: Any, **kwargs: Any) -> Any:
        closed, out_shapes = jax.make_jaxpr(lambda args, kwargs: function(*args, **kwargs), return_shape=True)(
            args, kwargs
        )
        # The traced equations themselves, not a second call of ``function``: tracing a training step is a
        # good part of a program's start-up, and its equations bound again make the same program.
        outputs = _evaluate(closed.jaxpr, closed.consts, *jax.tree.leaves((args, kwargs)))
        return jax.tree.unflatten(jax.tree.structure(out_shapes), outputs)

    return with_canonical_convolutions  # type: ignore[return-value]
