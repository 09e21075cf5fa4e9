"""Pictures of a run: the loss curves and the lesson's ``view_classify``. Imports matplotlib when called."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxmnist.config import values_label
from jaxmnist.files import write_atomically
from jaxmnist.sweeps import diverged_runs


def _pyplot():
    """pyplot, drawing off-screen (Agg) unless inside a notebook, where the inline backend shows it."""
    import matplotlib

    if not _in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def plot_losses(
    train_losses: Sequence[float],
    test_losses: Sequence[float],
    path: str | os.PathLike | None = None,
    first_epoch: int = 1,
    val_losses: Sequence[float] | None = None,
) -> Any:
    """Training, test and (when given) validation loss per epoch; saved to ``path`` when given.

    Returns the figure."""
    plt = _pyplot()
    epochs = np.arange(first_epoch, first_epoch + len(train_losses))
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(epochs, train_losses, "o-", label="training loss")
    axes.plot(epochs, test_losses, "s--", label="test loss")
    if val_losses is not None:
        axes.plot(epochs, val_losses, "^:", label="validation loss")
    return _finish(figure, axes, epochs, "jaxmnist: the lesson's MLP on MNIST", path)


def plot_loss_band(history: Sequence[Any], path: str | os.PathLike | None = None) -> Any:
    """The training and test loss of several seeds per epoch: their mean, and the [min, max] band shaded.

    ``history`` holds ``EpochResult``s (one per seed per epoch). Returns the figure."""
    plt = _pyplot()
    epochs = sorted({result.epoch for result in history})
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, label in (("train_loss", "training loss"), ("test_loss", "test loss")):
        values = np.array([[getattr(r, name) for r in history if r.epoch == epoch] for epoch in epochs])
        axes.fill_between(epochs, values.min(axis=1), values.max(axis=1), alpha=0.3)
        axes.plot(epochs, values.mean(axis=1), "o-", label=f"{label}, mean and [min, max] of {values.shape[1]} seeds")
    return _finish(figure, axes, epochs, "jaxmnist: the lesson's MLP on MNIST, many seeds", path)


def plot_grid_bands(history: Sequence[Any], path: str | os.PathLike | None = None) -> Any:
    """A grid's training loss per epoch: for each configuration the mean over its seeds, and the
    [min, max] band shaded; test loss dashed.

    ``history`` holds ``EpochResult``s (one per run per epoch, ``swept`` naming the run's values); runs that
    diverged are left out, and a configuration with no other run with them. Returns the figure."""
    plt = _pyplot()
    epochs = sorted({result.epoch for result in history})
    configurations = list(dict.fromkeys(tuple(result.swept.items()) for result in history))
    diverged = diverged_runs(history)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for configuration in configurations:
        members = [result for result in history if tuple(result.swept.items()) == configuration
                   and (configuration, result.seed) not in diverged]  # fmt: skip
        if not members:
            continue
        train = np.array([[r.train_loss for r in members if r.epoch == epoch] for epoch in epochs])
        test = np.array([[r.test_loss for r in members if r.epoch == epoch] for epoch in epochs])
        label = values_label(dict(configuration))
        (line,) = axes.plot(
            epochs,
            train.mean(axis=1),
            "o-",
            label=f"{label} ({train.shape[1]} seed{'s' if train.shape[1] > 1 else ''})",
        )
        axes.fill_between(epochs, train.min(axis=1), train.max(axis=1), alpha=0.25, color=line.get_color())
        axes.plot(epochs, test.mean(axis=1), "s--", color=line.get_color(), markersize=4)
    axes.set_yscale("log")
    return _finish(figure, axes, epochs, "training loss (solid, [min, max] shaded), test loss (dashed)", path)


def _finish(figure: Any, axes: Any, epochs: Sequence[int], title: str, path: str | os.PathLike | None) -> Any:
    """Labels a loss-per-epoch figure and, given ``path``, writes it and releases it."""
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    axes.set_xticks(epochs)
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    if path is not None:
        save_figure(figure, Path(path))
        _pyplot().close(figure)
    return figure


def save_figure(figure: Any, path: str | os.PathLike) -> None:
    """Renders ``figure`` in the format of ``path``'s suffix and writes it atomically (``OSError`` on failure)."""
    path, rendered = Path(path), io.BytesIO()
    figure.savefig(rendered, format=path.suffix.lstrip(".").lower() or "png", dpi=100)
    write_atomically(path, rendered.getvalue())


def view_classify(image: np.ndarray, probabilities: np.ndarray) -> Any:
    """The lesson's ``view_classify``: the digit beside a bar chart of its class probabilities."""
    plt = _pyplot()
    figure, (image_axes, bar_axes) = plt.subplots(figsize=(6, 3), ncols=2)
    image_axes.imshow(np.asarray(image).reshape(28, 28), cmap="gray")
    image_axes.axis("off")
    bar_axes.barh(np.arange(10), np.asarray(probabilities))
    bar_axes.set_aspect(0.1)
    bar_axes.set_yticks(np.arange(10))
    bar_axes.set_title("class probability")
    bar_axes.set_xlim(0, 1.1)
    figure.tight_layout()
    return figure
