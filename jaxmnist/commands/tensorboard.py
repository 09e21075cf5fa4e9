"""``--tensorboard DIR``: event files written with tensorboardX (no TensorFlow needed)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np

from jaxmnist.config import TrainConfig, config_to_dict, value_text
from jaxmnist.loop import EpochResult, Progress, best_epoch
from jaxmnist.plan import RunPlan
from jaxmnist.sweeps import diverged_runs

INSTALL_HINT = "pip install 'jaxmnist[tensorboard]'"


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboardX") is not None


def _hparam(value: object) -> object:
    """TensorBoard's hparams take numbers, strings and booleans."""
    if value is None:
        return "default"
    return value if isinstance(value, int | float | str | bool) else str(value)


def _folder_name(values: dict[str, float]) -> str:
    """A grid configuration's run folder, e.g. ``learning_rate=0.01,momentum=0.9``."""
    return ",".join(f"{name}={value_text(value)}" for name, value in values.items())


class EventFile:
    """One folder's TensorBoard event file, written by the calling thread: tensorboardX's ``SummaryWriter``
    queues events for a thread of its own, whose ``flush`` leaves the queued ones unwritten, so a kill lost
    them; here ``flush`` puts every event added so far on disk.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     log = EventFile(Path(folder) / "run")
        ...     log.add_scalar("epoch/test_loss", 0.25, 1)
        ...     log.close()
        ...     [path.name.startswith("events.out.tfevents.") for path in (Path(folder) / "run").iterdir()]
        [True]
    """

    def __init__(self, folder: Path):
        from tensorboardX.event_file_writer import EventsWriter

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._events = EventsWriter(str(folder / "events"))

    def add_summary(self, summary, step: int | None = None) -> None:
        """A tensorboardX ``Summary`` (e.g. of ``tensorboardX.summary.scalar``) at ``step``."""
        from tensorboardX.proto.event_pb2 import Event

        event = Event(wall_time=time.time(), summary=summary)
        if step is not None:
            event.step = step
        self._events.write_event(event)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.summary import scalar

        self.add_summary(scalar(tag, value), step)

    def flush(self) -> None:
        self._events.flush()

    def close(self) -> None:
        self._events.close()


class TensorBoardLog:
    """Per-epoch scalars (losses, accuracies, learning rate), the batch loss every ``every`` steps, and the
    run's settings as hparams (written at the end, with the best or final metrics).

    A grid writes one run folder per configuration (``DIR/learning_rate=0.01``), each with the scalars of
    its seeds and hparams holding its values."""

    def __init__(self, folder: Path, plan: RunPlan, steps_per_epoch: int, every: int):
        self.config, self.steps_per_epoch, self.every = plan.config, steps_per_epoch, every
        self.groups = []  # each configuration: its writer, the positions of its runs, its values
        for row, values in enumerate(plan.rows):
            members = [position for position, run in enumerate(plan.runs) if run.row == row]
            writer = EventFile(folder / _folder_name(values) if values else folder)
            self.groups.append((writer, members, values))

    def steps(self, progress: Progress, first_position: int) -> None:
        """The batch losses of the steps ``first_position .. progress.position`` of the epoch."""
        before = (progress.epoch - 1) * self.steps_per_epoch
        losses = progress.step_losses.reshape(-1, progress.step_losses.shape[-1])
        for position in range(first_position, progress.position):
            if (before + position + 1) % self.every == 0:
                for writer, members, _ in self.groups:  # several seeds: the mean of those that did not diverge
                    going = [member for member in members if member not in progress.diverged]
                    if going:
                        writer.add_scalar("batch/loss", float(np.mean(losses[going, position])), before + position + 1)

    def epoch(self, results: tuple[EpochResult, ...]) -> None:
        """The epoch's scalars; with several seeds their mean, and ``_min``/``_max`` beside it. A grid's
        diverged runs are left out, as in its table; a configuration with none left writes nothing."""
        for writer, members, _ in self.groups:
            going = [results[member] for member in members if not results[member].diverged]
            if going:
                _epoch_scalars(writer, going)

    def flush(self) -> None:
        """Every event logged so far onto disk: TensorBoard shows the run as it trains, and a run killed after a
        checkpoint keeps what it logged before it."""
        for writer, _, _ in self.groups:
            writer.flush()

    def close(self, history: tuple[EpochResult, ...]) -> None:
        diverged = diverged_runs(history)
        for writer, _, values in self.groups:
            going = [result for result in history if result.swept == values
                     and (tuple(values.items()), result.seed) not in diverged]  # fmt: skip
            if going:
                _hparams(writer.folder / "hparams", self.config, values, going)
            writer.close()


def _epoch_scalars(writer, results: list[EpochResult]) -> None:
    for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "val_loss", "val_accuracy",
                 "learning_rate"):  # fmt: skip
        values = [getattr(result, name) for result in results]
        if None in values:
            continue
        writer.add_scalar(f"epoch/{name}", float(np.mean(values)), results[0].epoch)
        if len(results) > 1:
            writer.add_scalar(f"epoch/{name}_min", min(values), results[0].epoch)
            writer.add_scalar(f"epoch/{name}_max", max(values), results[0].epoch)
    for name in results[0].metrics:  # the loss's own metrics, the mean of the seeds'
        mean = float(np.mean([result.metrics[name] for result in results]))
        writer.add_scalar(f"epoch/{name}", mean, results[0].epoch)


def _hparams(folder: Path, config: TrainConfig, values: dict[str, float], history: list[EpochResult]) -> None:
    """The settings (a grid configuration's own values in place of the lists) and the final metrics, as the
    mean of the seeds' for a grid configuration."""
    last = [result for result in history if result.epoch == history[-1].epoch]
    metrics = {
        "hparam/test_accuracy": float(np.mean([result.test_accuracy for result in last])),
        "hparam/train_loss": float(np.mean([result.train_loss for result in last])),
    }
    if last[0].val_loss is not None:  # what a grid's best configuration is chosen on
        metrics["hparam/val_loss"] = float(np.mean([result.val_loss for result in last]))
    best = None if values else best_epoch(history)
    if best is not None:
        metrics.update({"hparam/best_val_loss": best.val_loss, "hparam/best_epoch": best.epoch})
    from tensorboardX.summary import hparams

    settings = {name: _hparam(value) for name, value in {**config_to_dict(config), **values}.items()}
    writer = EventFile(folder)  # TensorBoard's HParams tab reads the three summaries and the metrics beside them
    for summary in hparams(settings, metrics):
        writer.add_summary(summary)
    for name, value in metrics.items():
        writer.add_scalar(name, value, 0)
    writer.close()
