"""Run in a subprocess with 8 host CPU devices: one epoch on 1, 8 and 3 devices, per-step losses compared.

Prints one JSON line: for each dtype and device count, the largest relative per-step loss difference
from the single-device run (float32: over the first 100 steps and over the whole epoch).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_digits  # noqa: E402

from jaxmnist.data import DATA_DIR_ENV, load_mnist  # noqa: E402
from jaxmnist.fit import TrainConfig, fit  # noqa: E402
from jaxmnist.parallel import make_mesh  # noqa: E402


def epoch_losses(images, labels, devices: int, dtype: str) -> np.ndarray:
    mesh = make_mesh(devices) if devices > 1 else None
    (progress,) = fit(TrainConfig(epochs=1, dtype=dtype), (images, labels), (images[:1000], labels[:1000]), mesh=mesh)
    return progress.step_losses


def main() -> None:
    folder = os.environ.get(DATA_DIR_ENV)
    images, labels = load_mnist("train", folder) if folder else make_digits(60_000)
    report = {"devices_seen": jax.device_count()}
    for dtype in ("float32", "float64"):
        jax.config.update("jax_enable_x64", dtype == "float64")
        reference = epoch_losses(images, labels, 1, dtype)
        for devices in (8, 3):
            losses = epoch_losses(images, labels, devices, dtype)
            relative = np.abs(losses - reference) / np.abs(reference)
            report[f"{dtype}_{devices}"] = {
                "steps": len(losses), "first_100": float(relative[:100].max()), "epoch": float(relative.max()),
                "epoch_loss_relative": float(abs(losses.mean(dtype=np.float64) / reference.mean(dtype=np.float64) - 1)),
            }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
