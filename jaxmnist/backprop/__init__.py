"""Backpropagation made visible: the lesson's chain rule, factor by factor, beside ``jax.grad``.

The lesson's two-layer graph is ``x -> L1(W1, b1) -> S (sigmoid) -> L2(W2, b2) -> l`` and

    dl/dW1 = dL1/dW1 . dS/dL1 . dL2/dS . dl/dL2,        then        W1' = W1 - alpha dl/dW1.

Three ways to get every gradient, which must agree:

- ``chain_rule_grads``: each factor is the VJP (``jax.vjp``) of one piece taken in isolation, applied
  backwards in the formula's order: dl/dL2 first, then through L2, S and L1;
- ``manual_grads``: the closed forms by hand (sigma' = sigma (1 - sigma), dl/dW = x^T delta, ...);
- ``autodiff_grads``: ``jax.grad`` of the composed function.

``mlp_layerwise_grads`` does the same for the lesson's 3-layer ReLU MLP (``jaxmnist.MLP``): each layer's
VJP composed backwards equals ``jax.grad`` of the whole flax model.
``python -m jaxmnist.backprop`` prints a walk-through on one real MNIST batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxmnist.losses import cross_entropy_loss, mse_loss

Params = dict[str, jax.Array]
LossName = Literal["mse", "ce"]


def linear(inputs: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
    """``L(x) = x W + b`` for a batch of row vectors ``x``."""
    return inputs @ weight + bias


def sigmoid(values: jax.Array) -> jax.Array:
    """``S(z) = 1 / (1 + exp(-z))``."""
    return jax.nn.sigmoid(values)


def loss_of_outputs(outputs: jax.Array, labels: jax.Array, loss: LossName) -> jax.Array:
    """``mse``: the lesson's ``1/(2n) sum (y - yhat)^2`` against one-hot targets; ``ce``: cross-entropy."""
    if loss == "mse":
        return mse_loss(outputs, jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype))
    if loss == "ce":
        return cross_entropy_loss(outputs, labels)
    raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}")


def init_params(key: jax.Array, sizes: tuple[int, int, int] = (784, 128, 10), dtype: Any = jnp.float32) -> Params:
    """W1, b1, W2, b2 drawn as PyTorch's nn.Linear does: uniform in ``±1/sqrt(fan_in)``."""
    keys = iter(jax.random.split(key, 4))
    params = {}
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
        bound = 1 / fan_in**0.5
        params[f"W{index}"] = jax.random.uniform(next(keys), (fan_in, fan_out), dtype, -bound, bound)
        params[f"b{index}"] = jax.random.uniform(next(keys), (fan_out,), dtype, -bound, bound)
    return params


def forward(params: Params, inputs: jax.Array, labels: jax.Array, loss: LossName = "mse") -> dict[str, jax.Array]:
    """The composed graph, keeping every intermediate: ``L1``, ``S``, ``L2`` and the loss ``l``."""
    l1 = linear(inputs, params["W1"], params["b1"])
    s = sigmoid(l1)
    l2 = linear(s, params["W2"], params["b2"])
    return {"L1": l1, "S": s, "L2": l2, "loss": loss_of_outputs(l2, labels, loss)}


def chain_rule_grads(
    params: Params, inputs: jax.Array, labels: jax.Array, loss: LossName = "mse"
) -> tuple[Params, dict[str, jax.Array]]:
    """Every gradient as the formula's product, each factor the VJP of one piece on its own.

    Returns the gradients and the upstream gradient at each node (dl/dL2, dl/dS, dl/dL1), the
    running product after each factor.
    """
    l1, vjp_l1 = jax.vjp(lambda w, b: linear(inputs, w, b), params["W1"], params["b1"])
    s, vjp_s = jax.vjp(sigmoid, l1)
    l2, vjp_l2 = jax.vjp(linear, s, params["W2"], params["b2"])
    dl_dl2 = jax.grad(loss_of_outputs)(l2, labels, loss)  # factor dl/dL2
    dl_ds, dl_dw2, dl_db2 = vjp_l2(dl_dl2)  # . dL2/dS  (and dL2/dW2, dL2/db2)
    (dl_dl1,) = vjp_s(dl_ds)  # . dS/dL1
    dl_dw1, dl_db1 = vjp_l1(dl_dl1)  # . dL1/dW1, dL1/db1
    grads = {"W1": dl_dw1, "b1": dl_db1, "W2": dl_dw2, "b2": dl_db2}
    return grads, {"dl/dL2": dl_dl2, "dl/dS": dl_ds, "dl/dL1": dl_dl1}


def manual_grads(params: Params, inputs: jax.Array, labels: jax.Array, loss: LossName = "mse") -> Params:
    """The closed forms, written by hand.

    delta2 = dl/dL2 = (yhat - y) / n for MSE, (softmax(L2) - onehot(y)) / n for cross-entropy;
    dl/dW2 = S^T delta2, dl/db2 = sum_rows delta2; delta1 = (delta2 W2^T) * S (1 - S);
    dl/dW1 = x^T delta1, dl/db1 = sum_rows delta1.
    """
    values = forward(params, inputs, labels, loss)
    s, l2 = values["S"], values["L2"]
    count = inputs.shape[0]
    targets = jax.nn.one_hot(labels, l2.shape[-1], dtype=l2.dtype)
    outputs = l2 if loss == "mse" else jax.nn.softmax(l2)
    delta2 = (outputs - targets) / count
    delta1 = (delta2 @ params["W2"].T) * s * (1 - s)
    return {"W1": inputs.T @ delta1, "b1": delta1.sum(axis=0), "W2": s.T @ delta2, "b2": delta2.sum(axis=0)}


def autodiff_grads(params: Params, inputs: jax.Array, labels: jax.Array, loss: LossName = "mse") -> Params:
    """``jax.grad`` of the composed function: what ``loss.backward()`` does in PyTorch."""
    return jax.grad(lambda p: forward(p, inputs, labels, loss)["loss"])(params)


def sgd_update(params: Any, grads: Any, learning_rate: float) -> Any:
    """``W' = W - alpha dl/dW`` for every parameter."""
    return jax.tree.map(lambda param, grad: param - learning_rate * grad, params, grads)


def _dense_layer(inputs: jax.Array, kernel: jax.Array, bias: jax.Array, activate: bool) -> jax.Array:
    outputs = inputs @ kernel + bias
    return jax.nn.relu(outputs) if activate else outputs


def mlp_layerwise_grads(
    params: Mapping[str, Mapping[str, jax.Array]], images: jax.Array, labels: jax.Array, loss_fn: Any
) -> dict[str, dict[str, jax.Array]]:
    """Backprop through ``jaxmnist.MLP`` (ReLU) layer by layer: each layer's VJP, composed backwards.

    ``loss_fn(logits, labels, mask)`` is e.g. ``jaxmnist.losses.log_softmax_nll_loss``.
    """
    names = sorted(params, key=lambda name: int(name.split("_")[1]))
    hidden = images.reshape(images.shape[0], -1)
    layer_vjps = []
    for index, name in enumerate(names):
        activate = index < len(names) - 1
        hidden, vjp = jax.vjp(
            lambda h, k, b, activate=activate: _dense_layer(h, k, b, activate),
            hidden,
            params[name]["kernel"],
            params[name]["bias"],
        )
        layer_vjps.append(vjp)
    upstream = jax.grad(loss_fn)(hidden, labels, None)
    grads = {}
    for name, vjp in reversed(list(zip(names, layer_vjps))):
        upstream, kernel_grad, bias_grad = vjp(upstream)
        grads[name] = {"kernel": kernel_grad, "bias": bias_grad}
    return grads


def largest_difference(first: Any, second: Any) -> float:
    """The largest absolute entry-wise difference between two gradient trees."""
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))
