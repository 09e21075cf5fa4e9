from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmnist.model import MLP, count_params


def _init(model: MLP, seed: int = 0, dtype=jnp.float32):
    return model.init(jax.random.key(seed), jnp.zeros((1, 28, 28), dtype))["params"]


def test_lesson_mlp_has_109386_parameters_in_three_layers():
    params = _init(MLP())
    assert count_params(params) == 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10 == 109_386
    chex.assert_shape(
        [params["Dense_0"]["kernel"], params["Dense_1"]["kernel"], params["Dense_2"]["kernel"]],
        [(784, 128), (128, 64), (64, 10)],
    )


def test_returns_float32_logits_for_square_or_flat_images():
    model = MLP()
    params = _init(model)
    images = jax.random.normal(jax.random.key(1), (5, 28, 28))
    logits = model.apply({"params": params}, images)
    chex.assert_shape(logits, (5, 10))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    np.testing.assert_array_equal(logits, model.apply({"params": params}, images.reshape(5, 784)))


@pytest.mark.parametrize("layer, fan_in", [("Dense_0", 784), ("Dense_1", 128), ("Dense_2", 64)])
def test_torch_init_is_uniform_within_one_over_sqrt_fan_in(layer: str, fan_in: int):
    params = _init(MLP())[layer]
    bound = 1 / np.sqrt(fan_in)
    kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
    # Uniform on (-b, b): the 640+ kernel entries reach close to both ends, with variance b^2 / 3.
    assert kernel.max() > 0.95 * bound and kernel.min() < -0.95 * bound
    np.testing.assert_allclose(kernel.var(), bound**2 / 3, rtol=0.1)
    assert len(np.unique(bias)) == bias.size and bias.std() > 0.2 * bound


def test_flax_init_has_zero_biases_and_lecun_normal_kernels():
    params = _init(MLP(weight_init="flax"))
    chex.assert_trees_all_equal(params["Dense_1"]["bias"], jnp.zeros(64))
    np.testing.assert_allclose(np.asarray(params["Dense_0"]["kernel"]).std(), 1 / np.sqrt(784), rtol=0.1)


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="weight_init"):
        _init(MLP(weight_init="xavier"))


def test_hidden_sizes_and_activation_are_configurable():
    model = MLP(hidden_sizes=(32,), activation=nn.sigmoid)
    params = _init(model)
    assert count_params(params) == 784 * 32 + 32 + 32 * 10 + 10
    images = jnp.ones((2, 784))
    hidden = nn.sigmoid(images @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    expected = hidden @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
    np.testing.assert_allclose(model.apply({"params": params}, images), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_float64_parameters_compute_in_float64():
    with jax.enable_x64(True):
        model = MLP(param_dtype=jnp.float64)
        params = _init(model, dtype=jnp.float64)
        chex.assert_trees_all_equal_dtypes(params, jax.tree.map(lambda p: p.astype(jnp.float64), params))
        logits = model.apply({"params": params}, jnp.ones((3, 28, 28), jnp.float64))
        chex.assert_type(logits, jnp.float64)
