"""The train step with models written elsewhere: linen CNNs, BatchNorm and Dropout, NNX modules, any optax."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization

from jaxmnist.model import MLP
from jaxmnist.normalization import normalize
from jaxmnist.train import (
    ModelCallError,
    create_train_state,
    epoch_batch_indices,
    evaluate,
    train_chunk,
    train_epoch,
    train_step,
)

from conftest import make_digits, step_loop


@pytest.fixture(autouse=True)
def standard_promotion():
    """Models and optimizers written elsewhere (flax's avg_pool, optax's adam) mix dtypes that the suite's
    strict promotion forbids; jaxmnist's own code is checked strictly by the other test files."""
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="module")
def digits() -> tuple[jax.Array, jax.Array]:
    images, labels = make_digits(256, seed=3)
    return jnp.asarray(images), jnp.asarray(labels, jnp.int32)


class FlaxExampleCNN(nn.Module):
    """flax's linen MNIST example CNN, as published there (images ``(B, 28, 28, 1)``)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=32, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=64, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(features=256)(x)
        x = nn.relu(x)
        return nn.Dense(features=10)(x)


class BatchNormDropoutNet(nn.Module):
    """A linen model with state (BatchNorm) and randomness (Dropout), in flax's ``train`` convention."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(64)(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
        return nn.Dense(10)(x)


class NnxBatchNormDropoutNet(nnx.Module):
    """The same in flax NNX, the way flax's own NNX MNIST example writes models."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(784, 64, rngs=rngs)
        self.norm = nnx.BatchNorm(64, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = self.dense(x.reshape((x.shape[0], -1)))
        return self.out(self.dropout(nnx.relu(self.norm(x))))


class NnxLessonMLP(nnx.Module):
    """The lesson's MLP in NNX; its weights are copied in from the linen ``MLP``."""

    def __init__(self, linen_params, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                nnx.Linear(fan_in, fan_out, param_dtype=dtype, rngs=rngs)
                for fan_in, fan_out in ((784, 128), (128, 64), (64, 10))
            ]
        )
        for index, layer in enumerate(self.layers):
            layer.kernel[...] = linen_params[f"Dense_{index}"]["kernel"]
            layer.bias[...] = linen_params[f"Dense_{index}"]["bias"]

    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


def _epoch_losses(state, digits, epochs: int = 3, batch_size: int = 32):
    images, labels = digits
    means = []
    for epoch in range(epochs):
        state, metrics = train_epoch(state, images, labels, jax.random.key(epoch), batch_size=batch_size)
        means.append(float(metrics["loss"].mean()))
    return state, means


@pytest.mark.slow
def test_flax_example_cnn_trains_through_train_step_and_train_epoch(digits):
    state = create_train_state(
        jax.random.key(0), FlaxExampleCNN(), optax.sgd(0.05, momentum=0.9), loss="ce", input_shape=(1, 28, 28, 1)
    )
    images, labels = digits
    state, _metrics = train_step(state, {"image": normalize(images[:32]), "label": labels[:32]})
    assert state.params["Conv_0"]["kernel"].shape == (3, 3, 1, 32)
    state, losses = _epoch_losses(state, digits)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_batch_stats_update_in_training_and_are_used_in_evaluation(digits):
    images, labels = digits
    state = create_train_state(jax.random.key(0), BatchNormDropoutNet(), optax.adam(1e-2), loss="ce")
    before = state.collections["batch_stats"]
    chex.assert_trees_all_equal(before["BatchNorm_0"]["mean"], jnp.zeros(64))
    trained, _ = train_epoch(jax.tree.map(jnp.copy, state), images, labels, jax.random.key(1), batch_size=32)
    after = trained.collections["batch_stats"]["BatchNorm_0"]
    assert float(jnp.abs(after["mean"]).max()) > 1e-3 and float(jnp.abs(after["var"] - 1).max()) > 1e-3
    # Evaluation uses the running averages: replacing them changes its result.
    test_images = normalize(images[:64])
    used = evaluate(trained, test_images, labels[:64])
    zeroed = trained.replace(collections=jax.tree.map(jnp.zeros_like, trained.collections))
    assert float(evaluate(zeroed, test_images, labels[:64])["loss"]) != float(used["loss"])


@pytest.mark.slow
def test_evaluation_is_deterministic_and_dropout_free(digits):
    images, labels = digits
    state = create_train_state(jax.random.key(0), BatchNormDropoutNet(), optax.adam(1e-2), loss="ce")
    state, _ = train_epoch(state, images, labels, jax.random.key(1), batch_size=32)
    test_images = normalize(images)
    first, second = (
        evaluate(state, test_images, labels),
        evaluate(state.replace(key=state.key + 1), test_images, labels),
    )
    chex.assert_trees_all_equal(first, second)
    logits, _ = state.apply_model(test_images)
    expected = state.apply_fn({"params": state.params, **state.collections}, test_images, train=False)
    chex.assert_trees_all_close(logits, expected, rtol=1e-6)


@pytest.mark.slow
def test_dropout_masks_differ_across_steps_and_repeat_with_the_seed(digits):
    images, labels = digits
    state = create_train_state(jax.random.key(0), MLP(dropout_rate=0.5))
    batch = normalize(images[:16])
    masks = [
        state.replace(step=jnp.int32(step)).apply_model(
            batch, train=True, key=state.replace(step=jnp.int32(step)).step_key()
        )[0]
        for step in (0, 1, 0)
    ]
    assert not np.allclose(masks[0], masks[1])
    chex.assert_trees_all_equal(masks[0], masks[2])
    run = lambda seed: train_epoch(
        create_train_state(jax.random.key(seed), MLP(dropout_rate=0.5)),
        images,
        labels,
        jax.random.key(9),
        batch_size=32,
    )[1]["loss"]
    chex.assert_trees_all_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))
    no_dropout = train_epoch(
        create_train_state(jax.random.key(0), MLP()), images, labels, jax.random.key(9), batch_size=32
    )
    assert not np.array_equal(run(0), no_dropout[1]["loss"])


def test_the_dropout_key_leaves_the_initial_parameters_alone():
    plain = create_train_state(jax.random.key(0), MLP())
    chex.assert_trees_all_equal(plain.params, MLP().init(jax.random.key(0), jnp.zeros((1, 28, 28)))["params"])
    chex.assert_trees_all_equal(create_train_state(jax.random.key(0), MLP(dropout_rate=0.2)).params, plain.params)


@pytest.mark.slow
@pytest.mark.parametrize(
    "make_model", [BatchNormDropoutNet, lambda: NnxBatchNormDropoutNet(nnx.Rngs(0))], ids=["linen", "nnx"]
)
def test_train_epoch_equals_a_loop_of_train_step_for_a_stateful_model(digits, make_model):
    images, labels = digits
    key = jax.random.key(5)
    # SGD: adam's first steps divide by tiny gradient moments and would amplify float rounding.
    make_state = lambda: create_train_state(jax.random.key(0), make_model(), optax.sgd(1e-2), loss="ce")
    scanned_state, scanned = train_epoch(make_state(), images, labels, key, batch_size=32)
    indices, mask = epoch_batch_indices(key, len(images), 32)
    looped_state, looped = step_loop(make_state(), images, labels, indices, mask)
    chex.assert_trees_all_close(scanned, looped, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(scanned_state.params, looped_state.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(scanned_state.collections, looped_state.collections, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_nnx_model_with_batchnorm_dropout_and_adamw_trains_and_comes_back_as_nnx(digits):
    images, labels = digits
    model = NnxBatchNormDropoutNet(nnx.Rngs(0))
    state = create_train_state(jax.random.key(0), model, optax.adamw(1e-2, weight_decay=1e-4), loss="ce")
    assert set(state.params) == {"dense", "norm", "out"} and "norm" in state.collections
    state, losses = _epoch_losses(state, digits)
    assert losses[-1] < 0.5 * losses[0]
    trained = state.nnx_module()
    assert isinstance(trained, NnxBatchNormDropoutNet)
    trained.eval()
    test_images = normalize(images)
    chex.assert_trees_all_close(trained(test_images), state.apply_model(test_images)[0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(trained.norm.mean[...]), np.asarray(state.collections["norm"]["mean"]))
    # NNX's own eval mode is deterministic, and the state's evaluation is too.
    chex.assert_trees_all_equal(evaluate(state, test_images, labels), evaluate(state, test_images, labels))


@pytest.mark.slow
@pytest.mark.parametrize("dtype, steps, tolerance", [("float32", 100, 1e-6), ("float64", 200, 1e-12)])
def test_the_lesson_mlp_in_nnx_gives_the_linen_losses(dtype, steps, tolerance):
    images, labels = (jnp.asarray(array) for array in make_digits(steps * 8, seed=4))
    labels = labels.astype(jnp.int32)
    with jax.enable_x64(dtype == "float64"):
        linen = create_train_state(jax.random.key(0), MLP(param_dtype=jnp.dtype(dtype)))
        nnx_model = NnxLessonMLP(jax.tree.map(jnp.copy, linen.params), jnp.dtype(dtype), nnx.Rngs(0))
        twin = create_train_state(jax.random.key(0), nnx_model)
        key = jax.random.key(3)
        _, ours = train_epoch(linen, images, labels, key, batch_size=8)
        _, theirs = train_epoch(twin, images, labels, key, batch_size=8)
        assert ours["loss"].shape == (steps,)
        relative = np.abs(np.asarray(ours["loss"]) - np.asarray(theirs["loss"])) / np.asarray(ours["loss"])
        assert relative.max() <= tolerance


@pytest.mark.slow
def test_resuming_a_dropout_batchnorm_run_from_bytes_is_bit_exact(digits):
    images, labels = digits
    key = jax.random.key(2)
    indices, mask = epoch_batch_indices(key, len(images), 32)
    make_state = lambda: create_train_state(
        jax.random.key(0), NnxBatchNormDropoutNet(nnx.Rngs(0)), optax.adam(1e-2), loss="ce"
    )
    uninterrupted, _ = train_epoch(make_state(), images, labels, key, batch_size=32)
    half, _ = train_chunk(make_state(), images, labels, indices, mask, 0, 3)
    restored = serialization.from_bytes(make_state(), serialization.to_bytes(half))
    resumed, _ = train_chunk(restored, images, labels, indices, mask, 3, 5)
    chex.assert_trees_all_equal(resumed.params, uninterrupted.params)
    chex.assert_trees_all_equal(resumed.collections, uninterrupted.collections)


def test_injected_schedule_reports_the_learning_rate_of_each_step(digits):
    images, labels = digits
    schedule = optax.linear_schedule(0.1, 0.0, transition_steps=8)
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    _state, metrics = train_epoch(
        create_train_state(jax.random.key(0), MLP(), optimizer), images, labels, jax.random.key(0), batch_size=32
    )
    np.testing.assert_allclose(metrics["learning_rate"], [schedule(step) for step in range(8)], rtol=1e-6)


@pytest.mark.slow
def test_clipping_chain_and_gradient_accumulation_work(digits):
    images, labels = digits
    clipped = optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0))
    state = create_train_state(jax.random.key(0), MLP(), clipped)
    batch = {"image": normalize(images[:32]), "label": labels[:32]}
    new_state, _ = train_step(state, batch)
    moved = jnp.sqrt(
        sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params)))
    )
    assert float(moved) == pytest.approx(1e-3, rel=1e-3)

    accumulated = create_train_state(jax.random.key(0), MLP(), optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2))
    once, _ = train_step(accumulated, batch)
    chex.assert_trees_all_equal(once.params, accumulated.params)  # the first of two micro-batches: no update yet
    twice, _ = train_step(once, batch)
    single = train_step(create_train_state(jax.random.key(0), MLP(), optax.sgd(0.1)), batch)[0]
    chex.assert_trees_all_close(twice.params, single.params, rtol=1e-6, atol=1e-7)


def test_a_model_needing_an_argument_jaxmnist_cannot_give_is_refused_by_name():
    class NeedsContext(nn.Module):
        @nn.compact
        def __call__(self, x, context):
            return nn.Dense(10)(x)

    with pytest.raises(ModelCallError, match="needs argument 'context'"):
        create_train_state(jax.random.key(0), NeedsContext())


@pytest.mark.slow
def test_a_batch_of_the_wrong_shape_names_the_expected_shape():
    state = create_train_state(jax.random.key(0), FlaxExampleCNN(), input_shape=(1, 28, 28, 1))
    with pytest.raises(ValueError, match=r"\(B, 28, 28, 1\).*got shape \(4, 32, 32\)"):
        train_step(state, {"image": jnp.zeros((4, 32, 32)), "label": jnp.zeros(4, jnp.int32)})
