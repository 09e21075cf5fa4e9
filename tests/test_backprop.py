from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmnist import backprop
from jaxmnist.commands.backprop import main
from jaxmnist.losses import log_softmax_nll_loss
from jaxmnist.model import MLP
from jaxmnist.train import create_train_state

METHODS = {
    "chain_rule": lambda *args: backprop.chain_rule_grads(*args)[0],
    "manual": backprop.manual_grads,
    "autodiff": backprop.autodiff_grads,
}


def _problem(dtype, sizes=(784, 32, 10), batch=16, seed=0):
    key_params, key_inputs, key_labels = jax.random.split(jax.random.key(seed), 3)
    params = backprop.init_params(key_params, sizes, dtype)
    inputs = jax.random.uniform(key_inputs, (batch, sizes[0]), dtype, -1, 1)
    labels = jax.random.randint(key_labels, (batch,), 0, sizes[2])
    return params, inputs, labels


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_shaped_finite_gradients(loss: str, method: str):
    params, inputs, labels = _problem(jnp.float32)
    grads = METHODS[method](params, inputs, labels, loss)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
    chex.assert_tree_all_finite(grads)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float64, 1e-12), (jnp.float32, 1e-5)])
def test_chain_rule_manual_and_autodiff_agree(loss: str, dtype, tolerance: float):
    with jax.enable_x64(dtype == jnp.float64):
        params, inputs, labels = _problem(dtype)
        reference = backprop.autodiff_grads(params, inputs, labels, loss)
        for method in ("chain_rule", "manual"):
            grads = METHODS[method](params, inputs, labels, loss)
            chex.assert_trees_all_close(grads, reference, rtol=tolerance, atol=tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_gradients_match_central_finite_differences(loss: str):
    with jax.enable_x64(True):
        params, inputs, labels = _problem(jnp.float64, sizes=(6, 4, 3), batch=5, seed=3)
        grads = backprop.manual_grads(params, inputs, labels, loss)

        def loss_at(p):
            return float(backprop.forward(p, inputs, labels, loss)["loss"])

        step = 1e-6
        for name, value in params.items():
            flat = np.asarray(value).ravel()
            estimate = np.empty_like(flat)
            for index in range(flat.size):
                shifted = [flat.copy(), flat.copy()]
                shifted[0][index] += step
                shifted[1][index] -= step
                up, down = ({**params, name: jnp.asarray(s.reshape(value.shape))} for s in shifted)
                estimate[index] = (loss_at(up) - loss_at(down)) / (2 * step)
            np.testing.assert_allclose(np.asarray(grads[name]).ravel(), estimate, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_chain_rule_intermediates_are_the_upstream_gradients_at_each_node():
    params, inputs, labels = _problem(jnp.float32)
    _, upstream = backprop.chain_rule_grads(params, inputs, labels, "mse")
    values = backprop.forward(params, inputs, labels, "mse")
    chex.assert_shape([upstream["dl/dL2"], upstream["dl/dS"], upstream["dl/dL1"]], [(16, 10), (16, 32), (16, 32)])
    # dl/dL2 of the lesson's MSE is (yhat - y) / n; dl/dL1 = dl/dS * S (1 - S).
    targets = jax.nn.one_hot(labels, 10)
    np.testing.assert_allclose(upstream["dl/dL2"], (values["L2"] - targets) / 16, rtol=1e-6, atol=1e-8)
    s = values["S"]
    np.testing.assert_allclose(upstream["dl/dL1"], upstream["dl/dS"] * s * (1 - s), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_a_small_sgd_update_lowers_the_loss(loss: str):
    params, inputs, labels = _problem(jnp.float32)
    before = backprop.forward(params, inputs, labels, loss)["loss"]
    updated = backprop.sgd_update(params, backprop.autodiff_grads(params, inputs, labels, loss), 0.01)
    chex.assert_trees_all_equal_shapes_and_dtypes(updated, params)
    assert float(backprop.forward(updated, inputs, labels, loss)["loss"]) < float(before)
    np.testing.assert_allclose(
        updated["W2"],
        params["W2"] - 0.01 * backprop.manual_grads(params, inputs, labels, loss)["W2"],
        rtol=1e-5,
        atol=1e-7,
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float64, 1e-12), (jnp.float32, 1e-5)])
def test_lesson_mlp_layerwise_vjps_equal_jax_grad_of_the_flax_model(dtype, tolerance: float):
    with jax.enable_x64(dtype == jnp.float64):
        state = create_train_state(jax.random.key(1), MLP(param_dtype=dtype))
        images = jax.random.uniform(jax.random.key(2), (8, 28, 28), dtype, -1, 1)
        labels = jnp.arange(8) % 10
        layerwise = backprop.mlp_layerwise_grads(state.params, images, labels, log_softmax_nll_loss)
        whole = jax.grad(lambda p: log_softmax_nll_loss(state.apply_fn({"params": p}, images), labels))(state.params)
        chex.assert_trees_all_close(layerwise, whole, rtol=tolerance, atol=tolerance)


def test_unknown_loss_is_refused():
    params, inputs, labels = _problem(jnp.float32)
    with pytest.raises(ValueError, match="mse"):
        backprop.forward(params, inputs, labels, "hinge")


@pytest.mark.slow
def test_walk_through_prints_agreeing_methods(tiny_mnist_dir, capsys: pytest.CaptureFixture):
    assert main(["--data-dir", str(tiny_mnist_dir), "--no-verify", "--hidden", "16", "--batch-size", "8"]) == 0
    output = capsys.readouterr().out
    assert "dl/dW1" in output and "(784, 16)" in output
    differences = [
        float(value)
        for value in re.findall(r"vs jax\.grad (?:of the flax model, largest difference )?([0-9.e+-]+[0-9])", output)
    ]
    assert len(differences) == 3 and max(differences) < 1e-5


def test_walk_through_without_data_is_one_line_exit_2(tmp_path, capsys: pytest.CaptureFixture):
    assert main(["--data-dir", str(tmp_path), "--no-download"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
