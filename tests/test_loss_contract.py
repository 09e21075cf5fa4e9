"""The loss contract: the keywords ``params``, ``batch``, ``outputs`` and ``sown``, metrics from the loss,
and no silent wrong numbers — each checked against the same training written by hand with
``jax.value_and_grad``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmnist.config import TrainConfig
from jaxmnist.loop import fit
from jaxmnist.losses import cross_entropy_loss, log_softmax_nll_loss
from jaxmnist.model import MLP
from jaxmnist.normalization import normalize
from jaxmnist.train import create_train_state, evaluate, train_epoch, train_step

from conftest import make_digits, with_xla_flags

STEPS = 6


@pytest.fixture(scope="module")
def batches():
    images, labels = make_digits(STEPS * 16, seed=21)
    images = normalize(images)
    return [
        {"image": images[i * 16 : (i + 1) * 16], "label": jnp.asarray(labels[i * 16 : (i + 1) * 16], jnp.int32)}
        for i in range(STEPS)
    ]


def _by_hand(model: nn.Module, loss_of, batches, learning_rate: float = 0.05):
    """Plain JAX: ``value_and_grad`` of ``loss_of(params, batch)`` and SGD, step by step."""
    params = model.init(jax.random.key(0), batches[0]["image"][:1])["params"]
    optimizer = optax.sgd(learning_rate)
    opt_state = optimizer.init(params)
    losses = []
    for batch in batches:
        loss, grads = jax.value_and_grad(loss_of)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(loss)
    return params, jnp.stack(losses)


def _with_train_step(model, loss, batches, learning_rate: float = 0.05):
    state = create_train_state(jax.random.key(0), model, optax.sgd(learning_rate), loss=loss)
    history = []
    for batch in batches:
        state, metrics = train_step(state, batch)
        history.append(metrics)
    return state, jax.tree.map(lambda *values: jnp.stack(values), *history)


@pytest.mark.slow
def test_a_parameter_penalty_through_params_trains_as_by_hand(batches):
    def l1_penalized(logits, labels, mask=None, *, params):
        penalty = sum(jnp.sum(jnp.abs(leaf)) for leaf in jax.tree.leaves(params))
        return log_softmax_nll_loss(logits, labels, mask) + 1e-4 * penalty, {"l1": penalty}

    model = MLP(hidden_sizes=(32,))
    state, metrics = _with_train_step(model, l1_penalized, batches)

    def loss_of(params, batch):
        logits = model.apply({"params": params}, batch["image"])
        penalty = sum(jnp.sum(jnp.abs(leaf)) for leaf in jax.tree.leaves(params))
        return log_softmax_nll_loss(logits, batch["label"]) + 1e-4 * penalty

    params, losses = _by_hand(model, loss_of, batches)
    chex.assert_trees_all_close(state.params, params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(metrics["loss"], losses, rtol=1e-6)
    assert metrics["l1"].shape == (STEPS,) and float(metrics["l1"][0]) > 0


class WithAux(nn.Module):
    """Returns ``(logits, aux)``: the hidden activations' mean square beside the logits."""

    @nn.compact
    def __call__(self, images):
        hidden = nn.relu(nn.Dense(32)(images.reshape((images.shape[0], -1))))
        return nn.Dense(10)(hidden), {"activity": jnp.mean(hidden**2)}


@pytest.mark.slow
def test_an_auxiliary_output_reaches_the_loss_and_evaluate_uses_the_logits(batches):
    def with_activity(logits, labels, mask=None, *, outputs):
        return cross_entropy_loss(logits, labels, mask) + 0.01 * outputs["activity"]

    state, metrics = _with_train_step(WithAux(), with_activity, batches)

    def loss_of(params, batch):
        logits, aux = WithAux().apply({"params": params}, batch["image"])
        return cross_entropy_loss(logits, batch["label"]) + 0.01 * aux["activity"]

    params, losses = _by_hand(WithAux(), loss_of, batches)
    chex.assert_trees_all_close(state.params, params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(metrics["loss"], losses, rtol=1e-6)
    logits, aux = WithAux().apply({"params": params}, batches[0]["image"])
    expected = cross_entropy_loss(logits, batches[0]["label"]) + 0.01 * aux["activity"]
    assert float(evaluate(state, batches[0]["image"], batches[0]["label"])["loss"]) == pytest.approx(float(expected))


class Sowing(nn.Module):
    """Sows an activity penalty into ``losses`` at every call, the flax idiom."""

    @nn.compact
    def __call__(self, images):
        hidden = nn.relu(nn.Dense(32)(images.reshape((images.shape[0], -1))))
        self.sow("losses", "activity", jnp.mean(hidden**2))
        return nn.Dense(10)(hidden)


def _sown_loss(logits, labels, mask=None, *, sown):
    return cross_entropy_loss(logits, labels, mask) + 0.01 * sum(jax.tree.leaves(sown["losses"]))


def test_a_sown_loss_is_a_per_step_output_never_carried_and_trains_as_by_hand(batches):
    state, metrics = _with_train_step(Sowing(), _sown_loss, batches)
    assert state.collections == {}  # nothing grows from step to step

    def loss_of(params, batch):
        logits, sown = Sowing().apply({"params": params}, batch["image"], mutable=["losses"])
        return cross_entropy_loss(logits, batch["label"]) + 0.01 * sown["losses"]["activity"][0]

    params, losses = _by_hand(Sowing(), loss_of, batches)
    chex.assert_trees_all_close(state.params, params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(metrics["loss"], losses, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.filterwarnings("error::DeprecationWarning")  # flax deprecates a sow outside nnx.capture
def test_sowing_models_run_through_train_epoch_linen_and_nnx():
    images, labels = make_digits(100, seed=22)
    images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)

    class NnxSowing(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.hidden, self.out = nnx.Linear(784, 16, rngs=rngs), nnx.Linear(16, 10, rngs=rngs)

        def __call__(self, images):
            hidden = nnx.relu(self.hidden(images.reshape((images.shape[0], -1))))
            self.sow(nnx.Intermediate, "activity", jnp.mean(hidden**2))
            return self.out(hidden)

    def nnx_loss(logits, labels, mask=None, *, sown):
        return cross_entropy_loss(logits, labels, mask) + 0.01 * sum(jax.tree.leaves(sown))

    for model, loss in ((Sowing(), _sown_loss), (NnxSowing(nnx.Rngs(0)), nnx_loss)):
        state = create_train_state(jax.random.key(0), model, optax.sgd(0.05), loss=loss)
        for epoch in (1, 2):  # the carry keeps its structure: a second epoch runs the same program
            state, metrics = train_epoch(state, images, labels, jax.random.key(epoch), batch_size=32)
        assert metrics["loss"].shape == (4,) and bool(jnp.all(jnp.isfinite(metrics["loss"])))


def test_extra_batch_keys_go_to_the_model_that_takes_them_and_to_the_loss(batches):
    class Tempered(nn.Module):
        @nn.compact
        def __call__(self, images, temperature=1.0):
            return nn.Dense(10)(images.reshape((images.shape[0], -1))) / temperature

    def weighted(logits, labels, mask=None, *, batch):
        per_example = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(per_example * batch["weight"]) / jnp.sum(batch["weight"])

    weights = [jnp.linspace(0.5, 1.5, 16) for _ in batches]
    extended = [{**batch, "weight": w, "temperature": jnp.float32(2.0)} for batch, w in zip(batches, weights)]
    state, metrics = _with_train_step(Tempered(), weighted, extended)

    def loss_of(params, batch):
        logits = Tempered().apply({"params": params}, batch["image"], temperature=batch["temperature"])
        per_example = optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return jnp.sum(per_example * batch["weight"]) / jnp.sum(batch["weight"])

    params, losses = _by_hand(Tempered(), loss_of, extended)
    chex.assert_trees_all_close(state.params, params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(metrics["loss"], losses, rtol=1e-6)
    with pytest.raises(ValueError, match=r"batch\['typo'\] is taken neither by the model"):
        train_step(create_train_state(jax.random.key(0), Tempered()), {**batches[0], "typo": jnp.ones(16)})


def test_a_loss_parameter_that_cannot_be_given_is_refused_when_the_state_is_created():
    def needs_teacher(logits, labels, mask, teacher_logits):
        return cross_entropy_loss(logits, labels, mask)

    with pytest.raises(TypeError, match="`loss` parameter 'teacher_logits' cannot be given"):
        create_train_state(jax.random.key(0), MLP(), loss=needs_teacher)

    def without_mask(logits, labels, *, params):
        return cross_entropy_loss(logits, labels)

    with pytest.raises(TypeError, match=r"must take \(logits, labels, mask\) positionally"):
        create_train_state(jax.random.key(0), MLP(), loss=without_mask)

    def takes_everything(logits, labels, mask=None, **keywords):
        return cross_entropy_loss(logits, labels, mask)

    state = create_train_state(jax.random.key(0), MLP(), loss=takes_everything)
    assert state.loss_keywords == ("params", "batch", "outputs", "sown")


def test_a_loss_metric_must_be_a_scalar_with_a_name_of_its_own(batches):
    def vector_metric(logits, labels, mask=None):
        return cross_entropy_loss(logits, labels, mask), {"per_class": jnp.mean(logits, axis=0)}

    with pytest.raises(ValueError, match=r"metric 'per_class' must be a scalar, got shape \(10,\)"):
        train_step(create_train_state(jax.random.key(0), MLP(), loss=vector_metric), batches[0])


@pytest.mark.slow
def test_the_loss_s_metrics_reach_the_epoch_result_as_epoch_means():
    def penalized(logits, labels, mask=None, *, params):
        penalty = sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(params))
        return cross_entropy_loss(logits, labels, mask), {"l2": penalty}

    data = make_digits(96, seed=23), make_digits(20, seed=24)
    progresses = list(fit(TrainConfig(epochs=1, batch_size=32), *data, loss=penalized, steps_per_call=1))
    steps = np.concatenate([[p.step_metrics["l2"][-1]] for p in progresses])
    assert progresses[-1].result.metrics["l2"] == pytest.approx(float(np.mean(steps, dtype=np.float64)))


@pytest.mark.slow
def test_a_bfloat16_model_s_loss_and_accuracy_are_taken_in_float32():
    images, labels = make_digits(300, seed=25)
    model = MLP(hidden_sizes=(32,), param_dtype=jnp.bfloat16)
    state = create_train_state(jax.random.key(0), model, optax.sgd(0.05), input_shape=(1, 28, 28))
    batch = {"image": normalize(images, jnp.bfloat16), "label": jnp.asarray(labels, jnp.int32)}
    _, metrics = train_step(state, batch)
    assert metrics["loss"].dtype == jnp.float32 and metrics["accuracy"].dtype == jnp.float32
    logits = model.apply({"params": state.params}, batch["image"]).astype(jnp.float32)
    correct = int(jnp.sum(jnp.argmax(logits, axis=1) == batch["label"]))
    assert float(metrics["accuracy"]) == pytest.approx(correct / 300, abs=1e-7)  # bfloat16 could not say it


def test_float_images_handed_to_train_epoch_are_refused_not_normalized_twice():
    images, labels = make_digits(64, seed=26)
    state = create_train_state(jax.random.key(0))
    with pytest.raises(TypeError, match="`images` must be the uint8 data set, got float32"):
        train_epoch(state, normalize(images), jnp.asarray(labels), jax.random.key(1))


@pytest.mark.slow
def test_batchnorm_on_4_devices_is_exact_or_refused_when_the_batch_does_not_divide():
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
        from jaxmnist.config import TrainConfig
        from jaxmnist.loop import fit
        from jaxmnist.parallel import make_mesh
        from jaxmnist.runs import RunError
        from conftest import make_digits, with_xla_flags

        class Normed(nn.Module):
            @nn.compact
            def __call__(self, images, train: bool = False):
                x = nn.Dense(16)(images.reshape((images.shape[0], -1)))
                return nn.Dense(10)(nn.relu(nn.BatchNorm(use_running_average=not train)(x)))

        data = make_digits(256, seed=27), make_digits(32, seed=28)
        config = TrainConfig(epochs=1, batch_size=32, dtype="float32")
        one = list(fit(config, *data, model=Normed()))[-1]
        four = list(fit(config, *data, model=Normed(), mesh=make_mesh(4)))[-1]
        np.testing.assert_allclose(four.step_losses, one.step_losses, rtol=2e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                     four.state.collections, one.state.collections)
        try:
            next(fit(TrainConfig(epochs=1, batch_size=30), *data, model=Normed(), mesh=make_mesh(4)))
        except RunError as error:
            print("refused:", error)
        """
    )
    env = {**with_xla_flags("--xla_force_host_platform_device_count=4"), "PYTHONPATH": os.path.dirname(__file__)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "refused: `batch_size`=30 does not divide over `num_devices`=4" in result.stdout
