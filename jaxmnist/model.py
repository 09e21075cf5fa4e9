"""The lesson's network: a multilayer perceptron 784 -> 128 -> 64 -> 10 with ReLU, returning logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

Init = Literal["torch", "flax"]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": nn.tanh,
}

# PyTorch's nn.Linear draws its weight with kaiming_uniform(a=sqrt(5)): bound = sqrt(6 / ((1 + 5) fan_in)),
# which is exactly variance_scaling(1/3, "fan_in", "uniform"): bound = sqrt(3 * (1/3) / fan_in).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's nn.Linear bias: uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


class MLP(nn.Module):
    """Fully connected network on flattened images; returns logits (apply ``log_softmax`` for NLL).

    Attributes:
        hidden_sizes: widths of the hidden layers (the lesson's 128, 64).
        num_classes: outputs.
        activation: the hidden activation.
        weight_init: ``"torch"`` (default) draws weights and biases as PyTorch's ``nn.Linear`` does,
            uniform in ``±1/sqrt(fan_in)``, so the lesson's loss curve is reproduced; ``"flax"`` uses
            flax's lecun-normal kernels and zero biases.
        param_dtype: float32, or float64 for exactness checks.
        dropout_rate: dropout after every hidden activation when called with ``train=True`` (0: none,
            the lesson's).
        dropout_rate_per_run: keep the rate in the ``hyperparameters`` collection instead of the program,
            so runs stacked along an axis (a grid of rates) share one program; the same masks as ``nn.Dropout``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = MLP()
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28)))
        >>> model.apply(variables, jnp.zeros((2, 28, 28))).shape
        (2, 10)
    """

    hidden_sizes: Sequence[int] = (128, 64)
    num_classes: int = 10
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    weight_init: Init = "torch"
    param_dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0
    dropout_rate_per_run: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        hidden = images.reshape((images.shape[0], -1))
        sizes = (*self.hidden_sizes, self.num_classes)
        if self.dropout_rate_per_run:
            keep = self.variable(
                "hyperparameters", "dropout_keep_probability", jnp.asarray, 1.0 - self.dropout_rate, self.param_dtype
            )
        for index, features in enumerate(sizes):
            hidden = self._dense(features, fan_in=hidden.shape[-1], name=f"Dense_{index}")(hidden)
            if index < len(sizes) - 1:
                hidden = self.activation(hidden)
                if self.dropout_rate_per_run:
                    hidden = KeepProbabilityDropout(name=f"Dropout_{index}")(hidden, keep.value, not train)
                elif self.dropout_rate > 0:
                    hidden = nn.Dropout(self.dropout_rate, deterministic=not train)(hidden)
        return hidden

    def _dense(self, features: int, fan_in: int, name: str) -> nn.Dense:
        if self.weight_init == "torch":
            inits = {"kernel_init": torch_kernel_init, "bias_init": torch_bias_init(fan_in)}
        elif self.weight_init == "flax":
            inits = {}
        else:
            raise ValueError(f"`weight_init` must be 'torch' or 'flax', got {self.weight_init!r}")
        return nn.Dense(features, param_dtype=self.param_dtype, name=name, **inits)


class KeepProbabilityDropout(nn.Module):
    """``nn.Dropout`` with the keep probability as an array: the same key (by its name), mask and scaling,
    for a probability that is a value in the state rather than a constant of the program."""

    @nn.compact
    def __call__(self, inputs: jax.Array, keep_probability: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic:
            return inputs
        mask = jax.random.bernoulli(self.make_rng("dropout"), p=keep_probability, shape=inputs.shape)
        # XLA compiles ``nn.Dropout``'s division by its constant rate as a product with the reciprocal; a
        # division by an array it may keep as one (it does over several devices), which rounds differently.
        return jax.lax.select(mask, inputs * (1 / keep_probability), jnp.zeros_like(inputs))


def count_params(params) -> int:
    """Number of scalars in a parameter tree (the lesson's MLP has 109,386)."""
    return sum(leaf.size for leaf in jax.tree.leaves(params))
