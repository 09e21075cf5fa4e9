"""Every optimizer and schedule the docs give a PyTorch counterpart equals ``torch.optim`` / ``lr_scheduler``
step for step on the lesson's network in float64: same weights, same batches, same losses and rates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: see the README (its CPU build)")

from torch.optim import lr_scheduler  # noqa: E402

from jaxmnist.config import TrainConfig  # noqa: E402
from jaxmnist.model import MLP  # noqa: E402
from jaxmnist.recipe import build_optimizer  # noqa: E402
from jaxmnist.torch_compat import lesson_model, normalize_torch, params_from_torch  # noqa: E402
from jaxmnist.train import create_train_state, epoch_batch_indices, train_epoch  # noqa: E402

from conftest import make_digits  # noqa: E402

EPOCHS, IMAGES = 3, 640  # 10 steps an epoch at batch 64


@pytest.fixture(autouse=True)
def standard_promotion():
    """optax's optimizers and schedules mix Python floats and integer counts, which strict promotion refuses."""
    with jax.numpy_dtype_promotion("standard"):
        yield


# name: (jaxmnist settings, torch optimizer, torch scheduler or None, whether it steps every batch)
CASES = {
    "sgd": (dict(optimizer="sgd", learning_rate=0.05), lambda p: torch.optim.SGD(p, lr=0.05), None, False),
    "momentum": (
        dict(optimizer="momentum", momentum=0.8, learning_rate=0.05),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8), None, False,
    ),
    "nesterov": (
        dict(optimizer="nesterov", momentum=0.9, learning_rate=0.02),
        lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, nesterov=True), None, False,
    ),
    "adam": (dict(optimizer="adam", learning_rate=1e-3), lambda p: torch.optim.Adam(p, lr=1e-3), None, False),
    "adamw": (
        dict(optimizer="adamw", weight_decay=0.01, learning_rate=1e-3),
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01), None, False,
    ),
    "adadelta": (
        dict(optimizer="adadelta", optimizer_args="rho=0.9,eps=1e-6", learning_rate=1.0),
        lambda p: torch.optim.Adadelta(p, lr=1.0, rho=0.9, eps=1e-6), None, False,
    ),
    "rmsprop": (
        dict(optimizer="rmsprop", optimizer_args="decay=0.99,eps=1e-8,eps_in_sqrt=False", learning_rate=1e-3),
        lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.99, eps=1e-8), None, False,
    ),
    "adagrad": (
        dict(optimizer="torch_adagrad", learning_rate=0.05),
        lambda p: torch.optim.Adagrad(p, lr=0.05), None, False,
    ),
    "adagrad-decays": (
        dict(optimizer="torch_adagrad", optimizer_args="lr_decay=0.01,weight_decay=0.001,initial_accumulator_value=0.1",
             learning_rate=0.05),
        lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.01, weight_decay=0.001, initial_accumulator_value=0.1),
        None, False,
    ),
    "step": (
        dict(schedule="step", schedule_args="step_size=1,gamma=0.7", learning_rate=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1), lambda o: lr_scheduler.StepLR(o, step_size=1, gamma=0.7), False,
    ),
    "exponential": (
        dict(schedule="exponential", schedule_args="gamma=0.9", learning_rate=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1), lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9), False,
    ),
    "multistep": (
        dict(schedule="multistep", schedule_args="milestones=[1,2],gamma=0.5", learning_rate=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1), lambda o: lr_scheduler.MultiStepLR(o, [1, 2], gamma=0.5), False,
    ),
    "cosine": (
        dict(schedule="cosine", learning_rate=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1), lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=EPOCHS * 10), True,
    ),
    "linear": (
        dict(schedule="linear", schedule_args="start_factor=1.0,end_factor=0.1", learning_rate=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda o: lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=EPOCHS * 10), True,
    ),
    "one-cycle": (
        dict(schedule="one-cycle", optimizer="adam", learning_rate=0.01),
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.01, total_steps=EPOCHS * 10, cycle_momentum=False), True,
    ),
}  # fmt: skip


def _torch_run(make_optimizer, make_scheduler, every_batch, model, images, labels, batches):
    """The reference loop: PyTorch's optimizer and scheduler on the given batches; losses and rates per step."""
    optimizer = make_optimizer(model.parameters())
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    inputs = normalize_torch(images, torch.float64).reshape(len(images), -1)
    targets = torch.from_numpy(labels.astype(np.int64))
    losses, rates = [], []
    for indices, mask in batches:
        for rows, real in zip(indices, mask):
            chosen = torch.from_numpy(rows[real])
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad()
            loss = torch.nn.functional.nll_loss(model(inputs[chosen]), targets[chosen])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if scheduler is not None and every_batch:
                scheduler.step()
        if scheduler is not None and not every_batch:
            scheduler.step()
    return np.array(losses), np.array(rates)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_optimizer_and_schedule_equal_pytorch_step_for_step_in_float64(name):
    settings, make_optimizer, make_scheduler, every_batch = CASES[name]
    images, labels = make_digits(IMAGES, seed=4)
    keys = [jax.random.key(epoch) for epoch in range(EPOCHS)]
    batches = [tuple(np.asarray(part) for part in epoch_batch_indices(key, IMAGES, 64)) for key in keys]
    with jax.enable_x64(True):
        torch.manual_seed(0)
        model = lesson_model().to(torch.float64)
        config = TrainConfig(epochs=EPOCHS, dtype="float64", **settings)
        optimizer = build_optimizer(config, IMAGES, per_run_hyperparameters=True)  # every step reports its rate
        state = create_train_state(jax.random.key(0), MLP(param_dtype=jnp.float64), optimizer,
                                   params=params_from_torch(model.state_dict()))  # fmt: skip
        losses, rates = [], []
        for key in keys:
            state, metrics = train_epoch(state, jnp.asarray(images), jnp.asarray(labels, jnp.int32), key)
            losses.append(np.asarray(metrics["loss"]))
            rates.append(np.asarray(metrics["learning_rate"]))
    torch_losses, torch_rates = _torch_run(make_optimizer, make_scheduler, every_batch, model, images, labels, batches)
    # The rate each step used: optax reports the one it has just applied, PyTorch holds it before the step.
    np.testing.assert_allclose(np.concatenate(rates), torch_rates, rtol=1e-12)
    relative = np.abs(np.concatenate(losses) - torch_losses) / np.abs(torch_losses)
    assert relative.max() <= 1e-12, f"largest per-step relative difference {relative.max():.3e}"
