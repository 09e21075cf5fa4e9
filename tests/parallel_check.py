"""Run in a subprocess with 8 host CPU devices: one epoch of 19,200 images on 1, 8 and 3 devices, per-step losses
compared.

Prints one JSON line: for each dtype and device count, the largest relative per-step loss difference
from the single-device run (float32: over the first 100 steps and over the whole epoch).
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).parent))
from jaxmnist.config import TrainConfig
from jaxmnist.data import load_mnist
from jaxmnist.loop import fit
from jaxmnist.parallel import make_mesh, replicate
from jaxmnist.paths import DATA_DIR_ENV
from jaxmnist.train import create_train_state, train_epoch

from conftest import make_digits

EPOCH_IMAGES = 300 * 64


def epoch_losses(images, labels, devices: int, dtype: str) -> np.ndarray:
    mesh = make_mesh(devices) if devices > 1 else None
    (progress,) = fit(TrainConfig(epochs=1, dtype=dtype), (images, labels), (images[:1000], labels[:1000]), mesh=mesh)
    return progress.step_losses


class BatchNormDropoutNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(64)(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(10)(nn.Dropout(0.3, deterministic=not train)(nn.relu(x)))


def batchnorm_epoch(images, labels, devices: int):
    """One epoch of a BatchNorm + Dropout model: per-step losses and the final running statistics."""
    mesh = make_mesh(devices) if devices > 1 else None
    state = create_train_state(jax.random.key(0), BatchNormDropoutNet(), optax.sgd(0.01), loss="ce")
    place = jax.device_put if mesh is None else partial(replicate, mesh=mesh)
    state, metrics = train_epoch(place(state), *place((images, labels)), jax.random.key(1), batch_size=64, mesh=mesh)
    return np.asarray(metrics["loss"]), jax.device_get(state.collections)


def main() -> None:
    folder = os.environ.get(DATA_DIR_ENV)
    images, labels = load_mnist("train", folder) if folder else make_digits(EPOCH_IMAGES)
    # 300 steps of batch 64 show the float32 drift and float64 identity of a long run at a third of the time.
    images, labels = images[:EPOCH_IMAGES], labels[:EPOCH_IMAGES]
    report = {"devices_seen": jax.device_count()}
    for dtype in ("float32", "float64"):
        jax.config.update("jax_enable_x64", dtype == "float64")
        reference = epoch_losses(images, labels, 1, dtype)
        for devices in (8, 3):
            losses = epoch_losses(images, labels, devices, dtype)
            relative = np.abs(losses - reference) / np.abs(reference)
            report[f"{dtype}_{devices}"] = {
                "steps": len(losses),
                "first_100": float(relative[:100].max()),
                "epoch": float(relative.max()),
                "epoch_loss_relative": float(abs(losses.mean(dtype=np.float64) / reference.mean(dtype=np.float64) - 1)),
            }
    jax.config.update("jax_enable_x64", False)
    reference_losses, reference_stats = batchnorm_epoch(images[:6400], labels[:6400], 1)
    losses, stats = batchnorm_epoch(images[:6400], labels[:6400], 8)
    report["batchnorm_dropout_8"] = {
        "losses": float(np.max(np.abs(losses - reference_losses) / reference_losses)),
        "running_stats": max(
            float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(reference_stats))
        ),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
