"""jaxmnist against PyTorch itself: same weights, same batches, same losses at every step."""

from __future__ import annotations

import os
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: see the README (its CPU build)")

from jaxmnist.data import load_mnist  # noqa: E402
from jaxmnist.model import MLP  # noqa: E402
from jaxmnist.normalization import normalize  # noqa: E402
from jaxmnist.paths import DATA_DIR_ENV  # noqa: E402
from jaxmnist.torch_compat import lesson_model, params_from_torch, params_to_torch, side_by_side_epoch  # noqa: E402
from jaxmnist.train import create_train_state  # noqa: E402

from conftest import make_digits  # noqa: E402

TORCH_DTYPES = {jnp.float32: torch.float32, jnp.float64: torch.float64}


@pytest.fixture(scope="module")
def training_set() -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST when $JAXMNIST_DATA_DIR is set, else a generated set of the same size (938 batches)."""
    folder = os.environ.get(DATA_DIR_ENV)
    if folder and Path(folder).is_dir():
        return load_mnist("train", folder)
    return make_digits(60_000)


def _twins(seed: int, dtype, loss: str):
    torch.manual_seed(seed)
    model = lesson_model(log_softmax=(loss == "nll")).to(TORCH_DTYPES[dtype])
    params = params_from_torch(model.state_dict())
    state = create_train_state(jax.random.key(0), MLP(param_dtype=dtype), loss=loss, params=params)
    return model, state


def test_weight_conversion_round_trips_exactly():
    torch.manual_seed(0)
    model = lesson_model()
    params = params_from_torch(model.state_dict())
    chex.assert_shape([params["Dense_0"]["kernel"], params["Dense_2"]["kernel"]], [(784, 128), (64, 10)])
    np.testing.assert_array_equal(params["Dense_1"]["kernel"], model[2].weight.detach().numpy().T)
    back = params_to_torch(params)
    assert set(back) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(back[name], tensor), name
    twin = lesson_model()
    twin.load_state_dict(back)
    chex.assert_trees_all_equal(params_from_torch(twin.state_dict()), params)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.float64, 1e-14)])
def test_forward_logits_and_initial_loss_are_identical(dtype, tolerance):
    images, labels = make_digits(64)
    with jax.enable_x64(dtype == jnp.float64):
        model, state = _twins(seed=1, dtype=dtype, loss="ce")
        inputs = torch.tensor(np.asarray(normalize(images, dtype))).reshape(64, -1)
        torch_logits = model(inputs).detach().numpy()
        jax_logits = state.apply_fn({"params": state.params}, normalize(images, dtype))
        chex.assert_type(jax_logits, dtype)
        np.testing.assert_allclose(jax_logits, torch_logits, rtol=tolerance, atol=tolerance)
        torch_loss = torch.nn.functional.cross_entropy(model(inputs), torch.from_numpy(labels.astype(np.int64)))
        jax_loss = state.loss_fn(jax_logits, jnp.asarray(labels, jnp.int32), None)
        np.testing.assert_allclose(jax_loss, torch_loss.item(), rtol=tolerance)
        # An untrained model is close to chance, as the lesson shows (about 2.30).
        assert 2.2 < float(jax_loss) < 2.4


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["nll", "ce"])
def test_full_epoch_in_float64_matches_pytorch_to_1e12_at_every_step(training_set, loss: str):
    images, labels = training_set
    with jax.enable_x64(True):
        model, state = _twins(seed=0, dtype=jnp.float64, loss=loss)
        state, jax_losses, torch_losses = side_by_side_epoch(
            model, state, jnp.asarray(images), jnp.asarray(labels, jnp.int32), jax.random.key(0), loss=loss
        )
        assert len(jax_losses) == len(torch_losses) == 938
        relative = np.abs(jax_losses - torch_losses) / np.abs(torch_losses)
        assert relative.max() < 1e-12, f"largest per-step relative difference {relative.max():.3e}"
        chex.assert_trees_all_close(state.params, params_from_torch(model.state_dict()), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["nll", "ce"])
def test_first_100_steps_in_float32_match_pytorch_to_1e5(training_set, loss: str):
    images, labels = training_set
    images, labels = images[:6400], labels[:6400]
    model, state = _twins(seed=0, dtype=jnp.float32, loss=loss)
    _, jax_losses, torch_losses = side_by_side_epoch(
        model, state, jnp.asarray(images), jnp.asarray(labels, jnp.int32), jax.random.key(0), loss=loss
    )
    assert len(jax_losses) == 100
    relative = np.abs(jax_losses - torch_losses) / np.abs(torch_losses)
    assert relative.max() < 1e-5, f"largest per-step relative difference {relative.max():.3e}"
