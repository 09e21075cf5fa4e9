"""``--tensorboard DIR``: event files written with tensorboardX (no TensorFlow needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from jaxmnist.config import TrainConfig, config_to_dict
from jaxmnist.loop import EpochResult, Progress, best_epoch

INSTALL_HINT = "pip install 'jaxmnist[tensorboard]'"


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboardX") is not None


def _hparam(value: object) -> object:
    """TensorBoard's hparams take numbers, strings and booleans."""
    if value is None:
        return "default"
    return value if isinstance(value, int | float | str | bool) else str(value)


class TensorBoardLog:
    """Per-epoch scalars (losses, accuracies, learning rate), the batch loss every ``every`` steps, and the
    run's settings as hparams (written at the end, with the best or final metrics)."""

    def __init__(self, folder: Path, config: TrainConfig, steps_per_epoch: int, every: int):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(folder))
        self.config, self.steps_per_epoch, self.every = config, steps_per_epoch, every

    def steps(self, progress: Progress, first_position: int) -> None:
        """The batch losses of the steps ``first_position .. progress.position`` of the epoch."""
        before = (progress.epoch - 1) * self.steps_per_epoch
        for position in range(first_position, progress.position):
            if (before + position + 1) % self.every == 0:
                loss = float(np.mean(progress.step_losses[..., position]))  # several seeds: their mean
                self.writer.add_scalar("batch/loss", loss, before + position + 1)

    def epoch(self, results: tuple[EpochResult, ...]) -> None:
        """The epoch's scalars; with several seeds their mean, and ``_min``/``_max`` beside it."""
        for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "val_loss", "val_accuracy",
                     "learning_rate"):  # fmt: skip
            values = [getattr(result, name) for result in results]
            if None in values:
                continue
            self.writer.add_scalar(f"epoch/{name}", float(np.mean(values)), results[0].epoch)
            if len(results) > 1:
                self.writer.add_scalar(f"epoch/{name}_min", min(values), results[0].epoch)
                self.writer.add_scalar(f"epoch/{name}_max", max(values), results[0].epoch)
        for name in results[0].metrics:  # the loss's own metrics, the mean of the seeds'
            mean = float(np.mean([result.metrics[name] for result in results]))
            self.writer.add_scalar(f"epoch/{name}", mean, results[0].epoch)
        self.writer.flush()

    def close(self, history: tuple[EpochResult, ...]) -> None:
        if history:
            best = best_epoch(history)
            metrics = {"hparam/test_accuracy": history[-1].test_accuracy, "hparam/train_loss": history[-1].train_loss}
            if best is not None:
                metrics.update({"hparam/best_val_loss": best.val_loss, "hparam/best_epoch": best.epoch})
            hparams = {name: _hparam(value) for name, value in config_to_dict(self.config).items()}
            self.writer.add_hparams(hparams, metrics, name="hparams")
        self.writer.close()
