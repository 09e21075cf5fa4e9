"""What the train command shows and writes as a run goes: progress bar, epoch lines, metrics file, plot."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from jaxmnist.checkpoint import params_file_bytes
from jaxmnist.commands.kit import counted
from jaxmnist.commands.tensorboard import TensorBoardLog
from jaxmnist.config import TrainConfig, values_label
from jaxmnist.files import reason, write_atomically
from jaxmnist.loop import DivergenceError, EpochResult, Progress, best_epoch
from jaxmnist.plan import RunPlan
from jaxmnist.programs import per_run


def epoch_lines(result: EpochResult, config: TrainConfig, previous: EpochResult | None) -> str:
    """The lesson's ``Training loss: ...`` line, then the epoch's evaluation, learning rate and speed.

    The learning rate is shown when it differs from the previous epoch's (with a schedule, every epoch).
    """
    compiled = f"compiled in {result.compile_seconds:.2f} s\n" if result.compile_seconds else ""
    validation = ""
    if result.val_loss is not None:
        validation = f"val loss {result.val_loss:.4f}, val accuracy {result.val_accuracy:.4f}, "
    rate = "".join(f"{name} {value:.4g}, " for name, value in result.metrics.items())
    previous_rate = config.learning_rate if previous is None else previous.learning_rate
    if result.learning_rate is not None and (config.schedule != "constant" or result.learning_rate != previous_rate):
        rate += f"lr {result.learning_rate:.6g}, "
    return (
        f"{compiled}Training loss: {result.train_loss}\n"
        f"  epoch {result.epoch}/{config.epochs}: test loss {result.test_loss:.4f}, "
        f"test accuracy {result.test_accuracy:.4f}, {validation}{rate}{_speed(result)}"
    )


def _speed(result: EpochResult) -> str:
    """The epoch's seconds and images per second, which count from the resume in an epoch resumed inside."""
    resumed = "" if result.resumed_at_step is None else f" since the resume at step {result.resumed_at_step}"
    return f"{result.seconds:.2f} s{resumed} ({result.samples_per_second:,.0f} images/s)"


def _band(values: list[float]) -> str:
    array = np.asarray(values)
    return f"{array.mean():.4f} ± {array.std():.4f} [{array.min():.4f}, {array.max():.4f}]"


def band_lines(results: tuple[EpochResult, ...], config: TrainConfig) -> str:
    """The epoch of several seeds: mean ± std [min, max] over the seeds of each loss and accuracy."""
    first = results[0]
    column = {name: [getattr(result, name) for result in results] for name in
              ("train_loss", "test_loss", "test_accuracy", "val_loss", "val_accuracy")}  # fmt: skip
    compiled = f"compiled in {first.compile_seconds:.2f} s\n" if first.compile_seconds else ""
    validation = ""
    if first.val_loss is not None:
        validation = f"val loss {_band(column['val_loss'])}, val accuracy {_band(column['val_accuracy'])}, "
    rate = f"lr {first.learning_rate:.6g}, " if config.schedule != "constant" else ""
    return (
        f"{compiled}Training loss: {_band(column['train_loss'])} (mean ± std [min, max] of {len(results)} seeds)\n"
        f"  epoch {first.epoch}/{config.epochs}: test loss {_band(column['test_loss'])}, "
        f"test accuracy {_band(column['test_accuracy'])}, {validation}{rate}{_speed(first)}"
    )


# A grid of more configurations than this shows its best few each epoch; the table at the end lists all.
GRID_LINES_PER_EPOCH = 8
GRID_BEST_SHOWN = 3


def _over_seeds(config: TrainConfig) -> str:
    return f"mean ± std over {config.seeds} seeds" if config.seeds > 1 else f"seed {config.seed}"


def grid_lines(results: tuple[EpochResult, ...], config: TrainConfig) -> str:
    """The epoch of a grid: one line per configuration, each number the mean ± std over its seeds; for a
    large grid, its best few and how many more there are."""
    from jaxmnist.sweeps import rank_configurations, summarize

    first = results[0]
    compiled = f"compiled in {first.compile_seconds:.2f} s\n" if first.compile_seconds else ""
    # A schedule's rate is the grid's own (rates are not swept with a schedule): shown once, as for one run.
    rate = f", lr {first.learning_rate:.6g}" if config.schedule != "constant" and first.learning_rate else ""
    lines = [
        f"{compiled}epoch {first.epoch}/{config.epochs}: {len(results)} runs{rate}, {_speed(first)}; "
        f"{_over_seeds(config)}"
    ]
    summaries = summarize(results)
    more = ""
    if len(summaries) > GRID_LINES_PER_EPOCH:
        ranked, criterion = rank_configurations(summaries)
        loss = ("mean " if config.seeds > 1 else "") + criterion.replace("_", " ")
        shown = ranked[:GRID_BEST_SHOWN]
        more = (f"  ... and {len(summaries) - len(shown)} more configurations (the best {len(shown)} by {loss} "
                "shown; every one in the table at the end)")  # fmt: skip
        summaries = shown
    width = max(len(values_label(summary.values)) for summary in summaries)
    for summary in summaries:
        label = f"  {values_label(summary.values):<{width}}  "
        if summary.train_loss is None:
            lines.append(f"{label}diverged ({_diverged_seeds(summary)})")
            continue
        validation = "" if summary.val_loss is None else f", val loss {summary.val_loss}"
        partly = f" ({_diverged_seeds(summary)} diverged)" if summary.diverged else ""
        lines.append(
            f"{label}train loss {summary.train_loss}, test loss {summary.test_loss}, test accuracy "
            f"{summary.test_accuracy}{validation}{partly}"
        )
    return "\n".join(lines + ([more] if more else []))


def _diverged_seeds(summary) -> str:
    """Which of a configuration's seeds diverged, e.g. ``every seed`` or ``seeds 0, 3 of 4``."""
    if len(summary.diverged) == len(summary.seeds):
        return "every seed" if len(summary.seeds) > 1 else f"seed {summary.seeds[0]}"
    which = ", ".join(map(str, summary.diverged))
    return f"seed{'s' if len(summary.diverged) > 1 else ''} {which} of {len(summary.seeds)}"


def grid_table(history: tuple[EpochResult, ...], config: TrainConfig) -> str:
    """The grid's final epoch as a table (mean ± std over the seeds) and the best configuration, saying
    whether validation or training loss chose it."""
    from jaxmnist.sweeps import best_configuration, final_results, summarize

    summaries = summarize(final_results(history))
    best, criterion = best_configuration(summaries)
    columns = ["train loss", "test accuracy"] + (["val loss"] if criterion == "val_loss" else [])
    labels = [values_label(summary.values) for summary in summaries]
    width = max(len("configuration"), *map(len, labels))
    rows = [f"  {'configuration':<{width}}    " + "".join(f"{column:<19}" for column in columns).rstrip()]
    for label, summary in zip(labels, summaries, strict=True):
        cells = [summary.train_loss, summary.test_accuracy] + ([summary.val_loss] if criterion == "val_loss" else [])
        marker = "*" if summary is best else " "
        if summary.train_loss is None:
            cells = [f"diverged ({_diverged_seeds(summary)})"]
        elif summary.diverged:
            cells.append(f"({_diverged_seeds(summary)} diverged: left out)")
        rows.append(f"  {label:<{width}}  {marker} " + "".join(f"{cell!s:<19}" for cell in cells).rstrip())
    epoch = history[-1].epoch
    chosen = (
        "lowest mean validation loss"
        if criterion == "val_loss"
        else "lowest mean final training loss (no validation set: --val-split N chooses on held-out images)"
    )
    return (
        f"after {counted(epoch, 'epoch')}, {_over_seeds(config)}:\n"
        + "\n".join(rows)
        + f"\nbest: {values_label(best.values)} (*), {chosen}"
    )


def saved_model_bytes(config: TrainConfig, state, diverged: Sequence[int] = ()) -> bytes:
    """A parameters file of ``state``'s model: parameters, carried collections, input shape, and which of a
    grid's runs diverged."""
    return params_file_bytes(config, state.params, state.collections, state.image_shape, diverged)


def metrics_record(result: EpochResult) -> dict:
    """One ``--metrics-out`` record: the result's fields, a grid run's values among them (``"momentum": 0.9``);
    a diverged run's NaN or infinite numbers as null, which JSON can hold."""
    record = dataclasses.asdict(result)
    record.update(record.pop("swept"))
    return {name: None if isinstance(value, float) and not math.isfinite(value) else value
            for name, value in record.items()}  # fmt: skip


class OutputWriteError(OSError):
    """An output file could not be written; the message names it and the system's reason, in words."""

    def __init__(self, path: Path, error: OSError):
        super().__init__(error.errno, f"cannot write {path}: {reason(error)}")
        self.path = path


def write_output(path: Path, content: bytes) -> None:
    """Writes an output file atomically; ``OutputWriteError`` naming it when the system refuses."""
    try:
        write_atomically(path, content)
    except OSError as error:
        raise OutputWriteError(path, error) from error


class Reporter:
    """What a run shows and writes as it goes: progress bar, a printed block per epoch, the metrics file,
    the best epoch's parameters, TensorBoard events and, at the end, the plot.

    The metrics file is rewritten whole (atomically) from the run's history after every epoch, so after
    any interruption and resume it holds exactly one record per finished epoch.
    """

    def __init__(
        self,
        plan: RunPlan,
        steps_per_epoch: int,
        start: Progress | None,
        *,
        quiet: bool,
        metrics_out: Path | None = None,
        plot: Path | None = None,
        save_best: Path | None = None,
        tensorboard: TensorBoardLog | None = None,
    ):
        from tqdm.auto import tqdm

        self.config, self.steps_per_epoch = plan.config, steps_per_epoch
        self.metrics_out, self.plot, self.save_best, self.tensorboard = metrics_out, plot, save_best, tensorboard
        self.history: tuple[EpochResult, ...] = () if start is None else start.history
        self._epoch, self._position = (1, 0) if start is None else (start.epoch, start.position)
        self._diverged: dict[int, str] = {} if start is None else dict(start.diverged)
        self._stopped: tuple[EpochResult, ...] = ()  # each run's epoch as measured before a divergence stopped them
        self._runs = plan.runs
        self.bar = tqdm(
            total=plan.config.epochs * steps_per_epoch,
            initial=self._steps_done(start),
            unit="step",
            disable=quiet or not sys.stderr.isatty(),
            leave=False,
            ncols=shutil.get_terminal_size((100, 24)).columns,  # a new pty may report width 0
        )
        self._write_metrics()

    def _steps_done(self, progress: Progress | None) -> int:
        return 0 if progress is None else (progress.epoch - 1) * self.steps_per_epoch + progress.position

    def update(self, progress: Progress) -> None:
        self.bar.update(self._steps_done(progress) - self.bar.n)
        going = np.delete(per_run(progress.step_losses, len(self._runs))[:, -1], list(progress.diverged))
        self.bar.set_postfix(epoch=progress.epoch, loss=f"{float(np.mean(going)):.4f}")
        runs = self._runs
        for row in sorted(set(progress.diverged) - set(self._diverged)):
            self.bar.write(f"warning: {values_label(runs[row].values)}, seed {runs[row].seed} diverged at "
                           f"{progress.diverged[row]}; the grid's other runs go on", file=sys.stderr)  # fmt: skip
        self._diverged = dict(progress.diverged)
        if self.tensorboard is not None:
            self.tensorboard.steps(progress, self._position if progress.epoch == self._epoch else 0)
        self._epoch, self._position = progress.epoch, progress.position
        previous = self.history[-1] if self.history else None
        if progress.results:
            self._epoch_ended(progress)
        if self.tensorboard is not None:  # on disk as each call ends: a checkpoint after it keeps what was logged
            self.tensorboard.flush()
        if progress.results:  # last: when an epoch's line shows, its records are on disk
            self._epoch_lines(progress, previous)

    def _epoch_ended(self, progress: Progress) -> None:
        """The epoch's metrics record, best parameters and TensorBoard scalars."""
        self.history = progress.history
        self._write_metrics()
        best = best_epoch(self.history)
        if self.save_best is not None and best is progress.result:
            write_output(self.save_best, saved_model_bytes(self.config, progress.state))
        if self.tensorboard is not None:
            self.tensorboard.epoch(progress.results)

    def _epoch_lines(self, progress: Progress, previous: EpochResult | None) -> None:
        if progress.results[0].swept:
            self.bar.write(grid_lines(progress.results, self.config))
        elif len(progress.results) > 1:
            self.bar.write(band_lines(progress.results, self.config))
        else:
            self.bar.write(epoch_lines(progress.result, self.config, previous))
        sys.stdout.flush()

    def diverged(self, error: DivergenceError) -> None:
        """Runs that stopped on a divergence: the epoch of each as measured before it, as the last
        ``--metrics-out`` records."""
        self._stopped = error.partial
        self._write_metrics()

    def _write_metrics(self) -> None:
        if self.metrics_out is not None:
            lines = "".join(json.dumps(metrics_record(result)) + "\n" for result in (*self.history, *self._stopped))
            write_output(self.metrics_out, lines.encode())

    def close(self) -> None:
        self.bar.close()
        if self.tensorboard is not None:
            # A run that diverged has no hparams; the unfinished epoch of one that did not is no final metric.
            self.tensorboard.close((*self.history, *(result for result in self._stopped if result.diverged)))

    def draw_plot(self) -> None:
        """The loss curves of every finished epoch, resumed ones included, into ``plot``: one band per
        configuration of a grid, the seeds' band, or a single run's curves."""
        if self.plot is None or not self.history:
            return
        from jaxmnist.plots import plot_grid_bands, plot_loss_band, plot_losses

        if self.history[0].swept:
            draw, what = partial(plot_grid_bands, self.history), "loss plot of every configuration"
        elif self.config.seeds > 1:
            draw, what = partial(plot_loss_band, self.history), "loss band plot"
        else:
            curves = {name: [getattr(result, name) for result in self.history]
                      for name in ("train_loss", "test_loss", "val_loss")}  # fmt: skip
            validation = curves["val_loss"] if None not in curves["val_loss"] else None
            draw = partial(plot_losses, curves["train_loss"], curves["test_loss"], first_epoch=self.history[0].epoch,
                           val_losses=validation)  # fmt: skip
            what = "loss plot"
        try:
            draw(path=self.plot)
        except OSError as error:
            raise OutputWriteError(self.plot, error) from error
        print(f"{what} written to {self.plot}")
