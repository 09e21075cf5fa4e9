"""What the train command shows and writes as a run goes: progress bar, epoch lines, metrics file, plot."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from jaxmnist.config import TrainConfig
from jaxmnist.files import reason, write_atomically
from jaxmnist.loop import EpochResult, Progress


def epoch_lines(result: EpochResult, config: TrainConfig) -> str:
    """The lesson's ``Training loss: ...`` line, then the epoch's test metrics and speed."""
    compiled = f"compiled in {result.compile_seconds:.2f} s\n" if result.compile_seconds else ""
    return (
        f"{compiled}Training loss: {result.train_loss}\n"
        f"  epoch {result.epoch}/{config.epochs}: test loss {result.test_loss:.4f}, "
        f"test accuracy {result.test_accuracy:.4f}, {result.seconds:.2f} s "
        f"({result.samples_per_second:,.0f} images/s)"
    )


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
    """Progress bar on a terminal, a printed block per epoch, the metrics file and, at the end, the plot.

    The metrics file is rewritten whole (atomically) from the run's results after every epoch, so after
    any interruption and resume it holds exactly one record per finished epoch.
    """

    def __init__(
        self,
        config: TrainConfig,
        steps_per_epoch: int,
        start: Progress | None,
        *,
        quiet: bool,
        metrics_out: Path | None,
        plot: Path | None,
        results: tuple[EpochResult, ...] = (),
    ):
        from tqdm.auto import tqdm

        self.config, self.steps_per_epoch = config, steps_per_epoch
        self.metrics_out, self.plot = metrics_out, plot
        self.results: list[EpochResult] = list(results)
        self.bar = tqdm(
            total=config.epochs * steps_per_epoch,
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
        self.bar.set_postfix(epoch=progress.epoch, loss=f"{float(progress.step_losses[-1]):.4f}")
        if progress.result is None:
            return
        self.results.append(progress.result)
        self.bar.write(epoch_lines(progress.result, self.config))
        sys.stdout.flush()
        self._write_metrics()

    def _write_metrics(self) -> None:
        if self.metrics_out is not None:
            lines = "".join(json.dumps(dataclasses.asdict(result)) + "\n" for result in self.results)
            write_output(self.metrics_out, lines.encode())

    def close(self) -> None:
        self.bar.close()

    def draw_plot(self) -> None:
        """The loss curves of every finished epoch, resumed ones included, into ``plot``."""
        if self.plot is None or not self.results:
            return
        from jaxmnist.plots import plot_losses

        train_losses, test_losses = [r.train_loss for r in self.results], [r.test_loss for r in self.results]
        try:
            plot_losses(train_losses, test_losses, self.plot, first_epoch=self.results[0].epoch)
        except OSError as error:
            raise OutputWriteError(self.plot, error) from error
        print(f"loss plot written to {self.plot}")
