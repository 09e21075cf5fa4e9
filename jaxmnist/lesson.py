"""The lesson's reference numbers, for comparing a run with PyTorch's.

The lesson's code run with torch 2.14.1 on 100 seeds (``torch.manual_seed(0..99)``), per-epoch training
loss = mean of the 938 batch losses; every run is in ``jaxmnist/reference/torch_100_seeds.csv`` (its
provenance in ``jaxmnist/reference/README.md``), the band below is computed from it.
"""

from __future__ import annotations

import csv
import io
from importlib import resources

import numpy as np

# The lesson's published run (an older software stack, slower than all 100 seeds in epochs 1-3).
PUBLISHED_LOSSES = (2.0666, 1.0482, 0.5778, 0.4490, 0.3963)

# Per epoch: (mean, std, min, max) of the training loss over 100 PyTorch seeds.
PYTORCH_LOSS_BAND = (
    (1.9013, 0.0503, 1.7695, 2.0200),
    (0.8514, 0.0427, 0.7499, 0.9501),
    (0.5263, 0.0156, 0.4966, 0.5661),
    (0.4310, 0.0083, 0.4128, 0.4547),
    (0.3862, 0.0055, 0.3723, 0.4030),
)

# Test accuracy after 5 epochs over the same 100 seeds: (mean, min, max).
PYTORCH_TEST_ACCURACY = (0.8981, 0.8920, 0.9028)


def pytorch_seed_runs() -> dict[str, np.ndarray]:
    """PyTorch's 100 runs of the lesson: ``epoch_losses`` ``(100, 5)``, ``test_accuracy`` and ``seed`` ``(100,)``.

    Example:
        >>> runs = pytorch_seed_runs()
        >>> runs["epoch_losses"].shape, round(float(runs["epoch_losses"][:, 0].mean()), 4)
        ((100, 5), 1.9013)
    """
    text = resources.files("jaxmnist").joinpath("reference/torch_100_seeds.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    return {
        "seed": np.array([int(row["seed"]) for row in rows]),
        "epoch_losses": np.array([[float(row[f"epoch{epoch}_loss"]) for epoch in range(1, 6)] for row in rows]),
        "test_accuracy": np.array([float(row["test_accuracy"]) for row in rows]),
    }
