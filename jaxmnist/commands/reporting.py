"""What the train command shows and writes as a run goes: progress bar, epoch lines, metrics file, plot."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from jaxmnist.config import TrainConfig
from jaxmnist.fit import EpochResult, Progress


def epoch_lines(result: EpochResult, config: TrainConfig) -> str:
    """The lesson's ``Training loss: ...`` line, then the epoch's test metrics and speed."""
    compiled = f"compiled in {result.compile_seconds:.2f} s\n" if result.compile_seconds else ""
    return (
        f"{compiled}Training loss: {result.train_loss}\n"
        f"  epoch {result.epoch}/{config.epochs}: test loss {result.test_loss:.4f}, "
        f"test accuracy {result.test_accuracy:.4f}, {result.seconds:.2f} s "
        f"({result.samples_per_second:,.0f} images/s)"
    )


class Reporter:
    """Progress bar on a terminal, a printed block per epoch, the metrics file and, at the end, the plot."""

    def __init__(
        self,
        config: TrainConfig,
        steps_per_epoch: int,
        start: Progress | None,
        *,
        quiet: bool,
        metrics_out: Path | None,
        plot: Path | None,
        append: bool,
    ):
        from tqdm.auto import tqdm

        self.config, self.steps_per_epoch = config, steps_per_epoch
        self.metrics_out, self.plot = metrics_out, plot
        self.results: list[EpochResult] = []
        self.bar = tqdm(
            total=config.epochs * steps_per_epoch,
            initial=self._steps_done(start),
            unit="step",
            disable=quiet or not sys.stderr.isatty(),
            leave=False,
            ncols=shutil.get_terminal_size((100, 24)).columns,
        )  # a new pty may report width 0
        if metrics_out is not None and not append:
            metrics_out.write_text("")

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
        if self.metrics_out is not None:
            with self.metrics_out.open("a") as metrics:
                metrics.write(json.dumps(dataclasses.asdict(progress.result)) + "\n")

    def close(self) -> None:
        self.bar.close()
        if self.plot is not None and self.results:
            from jaxmnist.plots import plot_losses

            plot_losses(
                [r.train_loss for r in self.results],
                [r.test_loss for r in self.results],
                self.plot,
                first_epoch=self.results[0].epoch,
            )
            print(f"loss plot written to {self.plot}")
