from __future__ import annotations

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmnist.losses import cross_entropy_loss
from jaxmnist.model import MLP
from jaxmnist.normalization import normalize
from jaxmnist.train import (
    create_train_state,
    epoch_batch_indices,
    evaluate,
    num_batches,
    train_chunk,
    train_epoch,
    train_step,
)

from conftest import epoch_step_loop, make_digits, step_loop


@pytest.fixture(scope="module")
def digits() -> tuple[jax.Array, jax.Array]:
    images, labels = make_digits(200)
    return jnp.asarray(images), jnp.asarray(labels, jnp.int32)


def _batch(images, labels, size: int = 32) -> dict[str, jax.Array]:
    return {"image": normalize(images[:size]), "label": labels[:size]}


def test_train_step_returns_updated_state_and_scalar_metrics(digits):
    state = create_train_state(jax.random.key(0))
    new_state, metrics = train_step(state, _batch(*digits))
    chex.assert_shape([metrics["loss"], metrics["accuracy"]], [(), ()])
    chex.assert_tree_all_finite(metrics)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state.params, state.params)
    assert int(new_state.step) == 1
    # An untrained lesson MLP is close to chance: about log(10) = 2.30.
    assert 2.1 < float(metrics["loss"]) < 2.5


def test_train_step_is_exactly_one_sgd_update_of_the_loss_gradient(digits):
    state = create_train_state(jax.random.key(0), learning_rate=0.1)
    batch = _batch(*digits)

    def loss_of(params):
        return state.loss_fn(state.apply_fn({"params": params}, batch["image"]), batch["label"], None)

    expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, jax.grad(loss_of)(state.params))
    new_state, metrics = train_step(state, batch)
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(metrics["loss"], loss_of(state.params), rtol=1e-6)


def test_train_step_lowers_the_loss_on_a_fixed_batch(digits):
    state = create_train_state(jax.random.key(0), learning_rate=0.05)
    batch = _batch(*digits)
    losses = []
    for _ in range(20):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.6 * losses[0]
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))


def test_masked_padded_batch_gives_the_real_batch_update(digits):
    state = create_train_state(jax.random.key(0))
    real = _batch(*digits, size=20)
    padded = {
        "image": jnp.concatenate([real["image"], jnp.zeros((12, 28, 28))]),
        "label": jnp.concatenate([real["label"], jnp.full(12, 3, jnp.int32)]),
        "mask": jnp.arange(32) < 20,
    }
    real_state, real_metrics = train_step(state, real)
    padded_state, padded_metrics = train_step(state, padded)
    chex.assert_trees_all_close(padded_state.params, real_state.params, rtol=1e-6, atol=1e-8)
    chex.assert_trees_all_close(padded_metrics, real_metrics, rtol=1e-6)


@pytest.mark.parametrize("optimizer_name", ["sgd_nesterov", "adam"])
def test_any_flax_model_optax_optimizer_and_loss_plug_in(digits, optimizer_name: str):
    class Linear(nn.Module):
        @nn.compact
        def __call__(self, images):
            return nn.Dense(10)(images.reshape(images.shape[0], -1))

    optimizer = {"sgd_nesterov": optax.sgd(0.05, momentum=0.9, nesterov=True), "adam": optax.adam(1e-2)}[optimizer_name]
    state = create_train_state(jax.random.key(0), Linear(), optimizer, loss=cross_entropy_loss)
    batch = _batch(*digits)
    # optax's adam mixes a Python float with its int32 step count, which strict promotion forbids.
    with jax.numpy_dtype_promotion("standard"):
        first = train_step(state, batch)[1]["loss"]
        for _ in range(10):
            state, metrics = train_step(state, batch)
    assert float(metrics["loss"]) < float(first)
    assert set(state.params) == {"Dense_0"}


@pytest.mark.parametrize(
    "batch, message",
    [
        ({"image": jnp.zeros((4,)), "label": jnp.zeros(4, jnp.int32)}, r"\(B, 28, 28\) or \(B, 784\)"),
        ({"image": jnp.zeros((4, 784), jnp.uint8), "label": jnp.zeros(4, jnp.int32)}, "normalize"),
        ({"image": jnp.zeros((4, 784)), "label": jnp.zeros(5, jnp.int32)}, r"integer of shape \(4,\)"),
        ({"image": jnp.zeros((4, 784)), "label": jnp.zeros(4)}, r"integer of shape \(4,\)"),
        ({"image": jnp.zeros((4, 784)), "label": jnp.zeros(4, jnp.int32), "mask": jnp.ones(3)}, r"mask.*\(4,\)"),
    ],
)
def test_misshapen_batches_fail_naming_the_expected_shape(batch, message):
    state = create_train_state(jax.random.key(0))
    with pytest.raises((ValueError, TypeError), match=message):
        train_step(state, batch)


def test_epoch_batches_are_a_permutation_with_pytorch_sized_last_batch():
    indices, mask = epoch_batch_indices(jax.random.key(3), 60_000, 64)
    chex.assert_shape([indices, mask], [(938, 64), (938, 64)])
    assert num_batches(60_000, 64) == 938
    np.testing.assert_array_equal(np.asarray(mask).sum(axis=1)[[0, 936, 937]], [64, 64, 32])
    real = np.asarray(indices)[np.asarray(mask)]
    np.testing.assert_array_equal(np.sort(real), np.arange(60_000))
    other, _ = epoch_batch_indices(jax.random.key(4), 60_000, 64)
    assert not np.array_equal(np.asarray(other), np.asarray(indices))


def test_train_epoch_equals_a_loop_of_train_step(digits):
    images, labels = digits
    key = jax.random.key(7)
    scanned_state, scanned = train_epoch(create_train_state(jax.random.key(0)), images, labels, key, batch_size=64)
    looped_state, looped = epoch_step_loop(create_train_state(jax.random.key(0)), images, labels, key, 64)
    chex.assert_shape(scanned["loss"], (num_batches(200, 64),))
    chex.assert_trees_all_close(scanned, looped, rtol=1e-6)
    chex.assert_trees_all_close(scanned_state.params, looped_state.params, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_train_epoch_equals_train_step_loop_in_float64_to_1e12(digits):
    images, labels = digits
    with jax.enable_x64(True):
        state = create_train_state(jax.random.key(0), MLP(param_dtype=jnp.float64))
        key = jax.random.key(7)
        scanned_state, scanned = train_epoch(state, images, labels, key, batch_size=48)
        state = create_train_state(jax.random.key(0), MLP(param_dtype=jnp.float64))
        looped_state, looped = epoch_step_loop(state, images, labels, key, 48)
        chex.assert_type(scanned["loss"], jnp.float64)
        chex.assert_trees_all_close(scanned, looped, rtol=1e-12)
        chex.assert_trees_all_close(scanned_state.params, looped_state.params, rtol=1e-12, atol=1e-14)


def test_one_trace_across_epochs_and_the_short_last_batch(digits):
    images, labels = digits
    counted_epoch = jax.jit(
        chex.assert_max_traces(train_epoch.__wrapped__, n=1), static_argnames="batch_size", donate_argnames="state"
    )
    counted_step = jax.jit(chex.assert_max_traces(train_step.__wrapped__, n=1))
    state = create_train_state(jax.random.key(0))
    for epoch in range(3):
        state, _ = counted_epoch(state, images, labels, jax.random.key(epoch), batch_size=64)
        state, _ = epoch_step_loop(state, images, labels, jax.random.key(epoch), 64, step_fn=counted_step)


@pytest.mark.slow
def test_same_seed_same_losses_other_seed_other_losses(digits):
    images, labels = digits

    def run(seed: int):
        state = create_train_state(jax.random.key(seed))
        return np.asarray(train_epoch(state, images, labels, jax.random.key(seed), batch_size=64)[1]["loss"])

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))


def test_evaluate_reports_loss_and_accuracy_of_the_current_params(digits):
    images, labels = digits
    state = create_train_state(jax.random.key(0), learning_rate=0.05)
    metrics = evaluate(state, normalize(images), labels)
    logits = state.apply_fn({"params": state.params}, normalize(images))
    np.testing.assert_allclose(metrics["loss"], state.loss_fn(logits, labels, None), rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(np.argmax(logits, -1) == np.asarray(labels)), rtol=1e-6)
    for _ in range(3):
        state, _ = train_epoch(state, images, labels, jax.random.key(1), batch_size=16)
    trained = evaluate(state, normalize(images), labels)
    assert float(trained["loss"]) < float(metrics["loss"]) and float(trained["accuracy"]) > 0.5


@pytest.fixture(scope="module")
def lesson_sized_set() -> tuple[jax.Array, jax.Array]:
    """60,000 generated images: the lesson's 938 batches per epoch."""
    images, labels = make_digits(60_000, seed=5)
    return jnp.asarray(images), jnp.asarray(labels, jnp.int32)


@pytest.mark.slow
def test_scan_epoch_matches_step_loop_over_the_first_100_steps_in_float32(lesson_sized_set):
    images, labels = lesson_sized_set
    key = jax.random.key(11)
    _, scanned = train_epoch(create_train_state(jax.random.key(0)), images, labels, key)
    indices, mask = epoch_batch_indices(key, len(images), 64)
    _, looped = step_loop(create_train_state(jax.random.key(0)), images, labels, indices, mask, 0, 100)
    relative = np.abs(np.asarray(scanned["loss"][:100]) - np.asarray(looped["loss"])) / np.asarray(looped["loss"])
    assert relative.max() <= 1e-6


@pytest.mark.slow
def test_scan_epoch_matches_step_loop_over_a_whole_epoch_in_float64(lesson_sized_set):
    images, labels = lesson_sized_set
    with jax.enable_x64(True):
        make_state = lambda: create_train_state(jax.random.key(0), MLP(param_dtype=jnp.float64))
        key = jax.random.key(12)
        _, scanned = train_epoch(make_state(), images, labels, key)
        _, looped = epoch_step_loop(make_state(), images, labels, key)
        assert scanned["loss"].shape == (938,)
        relative = np.abs(np.asarray(scanned["loss"]) - np.asarray(looped["loss"])) / np.asarray(looped["loss"])
        assert relative.max() <= 1e-12


@pytest.mark.slow
def test_chunks_of_steps_reproduce_the_whole_epoch(digits):
    images, labels = digits
    key = jax.random.key(3)
    whole_state, whole = train_epoch(create_train_state(jax.random.key(0)), images, labels, key, batch_size=16)
    indices, mask = epoch_batch_indices(key, len(images), 16)
    state, losses = create_train_state(jax.random.key(0)), []
    for first in range(0, 13, 5):
        state, metrics = train_chunk(state, images, labels, indices, mask, first, min(5, 13 - first))
        losses.append(metrics["loss"])
    np.testing.assert_allclose(np.concatenate(losses), whole["loss"], rtol=1e-6)
    chex.assert_trees_all_close(state.params, whole_state.params, rtol=1e-6, atol=1e-7)


class _SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, images):
        x = nn.relu(nn.Conv(8, (3, 3))(images.reshape((images.shape[0], 28, 28, 1))))
        x = nn.max_pool(x, (2, 2), (2, 2)).reshape((images.shape[0], -1))
        return nn.Dense(10)(x)


@pytest.mark.parametrize("model", [None, _SmallCNN()], ids=["mlp", "cnn"])
def test_the_suite_s_compile_setting_gives_the_numbers_of_the_programs_users_run(digits, model):
    """The suite compiles with XLA:CPU's loop emitters (conftest.SUITE_XLA_FLAG); an epoch compiled with the
    fusion emitters, as a user's process compiles it, gives the same numbers to the bit."""
    from jaxmnist.train.convolutions import COMPILER_OPTIONS

    options = {} if model is None else {"model": model, "input_shape": (1, 28, 28, 1)}
    state = create_train_state(jax.random.key(0), **options)
    lowered = train_epoch.lower(state, *digits, jax.random.key(1), batch_size=32)
    default_options = {} if model is None else COMPILER_OPTIONS
    results = [
        lowered.compile(compiler_options={**default_options, **extra})(jax.tree.map(jnp.copy, state), *digits,
                                                                       jax.random.key(1))
        for extra in ({}, {"xla_cpu_use_fusion_emitters": True})
    ]  # fmt: skip
    chex.assert_trees_all_equal(*results)
