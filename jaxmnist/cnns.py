"""The field's reference MNIST convolutional networks, written for jaxmnist: for ``--model`` and ``fit(model=)``.

Each is the network of a well-known MNIST recipe, layer for layer, in flax linen with images ``(B, 28, 28)``
or ``(B, 28, 28, 1)``:

- ``PyTorchExampleNet``: PyTorch's ``examples/mnist`` ``Net`` (two 3×3 convolutions, max pooling,
  Dropout 0.25 and 0.5, a 128-unit hidden layer), returning log-probabilities as it does (``--loss nll``);
- ``FlaxExampleCNN``: flax's ``examples/mnist`` ``CNN`` (two 3×3 convolutions with average pooling, a
  256-unit hidden layer), returning logits (``--loss ce``);
- ``KerasExampleConvnet``: Keras's "simple MNIST convnet" (two 3×3 convolutions with max pooling, Dropout
  0.5), returning logits (``--loss ce``; Keras puts the softmax in the last layer instead).

Their initializations are flax's defaults, not the originals' (PyTorch's Kaiming-uniform, Keras's
Glorot-uniform): the recipes' accuracies do not depend on that (docs/your-model.md). Their sizes are the
originals':

    >>> import jax, jax.numpy as jnp
    >>> def size(model):
    ...     return sum(leaf.size for leaf in jax.tree.leaves(model.init(jax.random.key(0), jnp.zeros((1, 28, 28)))))
    >>> size(PyTorchExampleNet()), size(FlaxExampleCNN()), size(KerasExampleConvnet())
    (1199882, 824458, 34826)
"""

from __future__ import annotations

import flax.linen as nn
import jax


def _as_images(images: jax.Array) -> jax.Array:
    return images.reshape((images.shape[0], 28, 28, 1))


class PyTorchExampleNet(nn.Module):
    """PyTorch's ``examples/mnist`` network: 1,199,882 parameters, log-probabilities out."""

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(_as_images(images)))
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Dropout(0.25, deterministic=not train)(x)
        x = nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.log_softmax(nn.Dense(10)(x))


class FlaxExampleCNN(nn.Module):
    """flax's ``examples/mnist`` CNN: 824,458 parameters, logits out."""

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(32, (3, 3))(_as_images(images)))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(256)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(x)


class KerasExampleConvnet(nn.Module):
    """Keras's "simple MNIST convnet": 34,826 parameters, logits out."""

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(_as_images(images)))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Dropout(0.5, deterministic=not train)(x.reshape((x.shape[0], -1)))
        return nn.Dense(10)(x)
