"""One training run from parsed flags: checks, resume, fit, printing, checkpoints, graceful stop."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from jaxmnist.checkpoint import latest_checkpoint, restore_progress, save_checkpoint, save_params
from jaxmnist.cli import configure_jax, load_splits
from jaxmnist.fit import EpochResult, Progress, TrainConfig, fit
from jaxmnist.parallel import make_mesh, padded_batch_width
from jaxmnist.train import num_batches


class OutputError(ValueError):
    """An output path cannot be written; found before training starts."""


class GracefulStop:
    """SIGINT/SIGTERM ask training to stop at the next step boundary; a second signal exits at once."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        if self.signal_number is not None:
            print(f"\n{signal.Signals(number).name} again: exiting now", file=sys.stderr, flush=True)
            raise SystemExit(128 + number)
        self.signal_number = number
        print(f"\n{signal.Signals(number).name}: stopping at the next step boundary "
              "(send it again to exit at once)", file=sys.stderr, flush=True)


def check_writable_folder(folder: Path, flag: str) -> None:
    """Creates ``folder`` if needed and proves a file can be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputError(f"{flag} {folder}: cannot write there ({error.strerror or error})") from error


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        hidden_sizes=args.hidden,
        activation=args.activation,
        weight_init=args.init,
        loss=args.loss,
        loop=args.loop,
        dtype=args.dtype,
    )


def _describe(config: TrainConfig, num_images: int, mesh) -> str:
    device = mesh.devices.flat[0]
    layers = "-".join(str(size) for size in (784, *config.hidden_sizes, 10))
    where = f"{device.platform} ({device.device_kind})"
    if mesh.size > 1:
        width = padded_batch_width(config.batch_size, mesh)
        where = f"{mesh.size} {where} devices, {width // mesh.size} images of each batch per device"
    return (
        f"MLP {layers} ({config.activation}, {config.weight_init} init), {config.loss} loss, "
        f"SGD lr {config.learning_rate}, batch {config.batch_size}, {config.epochs} epochs, "
        f"{num_images} training images, {config.dtype} on {where}"
    )


def start_devices(args: argparse.Namespace):
    """Joins the other processes (several hosts) and builds the device mesh the flags ask for."""
    import jax

    if args.coordinator is not None:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    return make_mesh(args.devices, args.platform)


def _epoch_lines(result: EpochResult, config: TrainConfig) -> str:
    compiled = f"compiled in {result.compile_seconds:.2f} s\n" if result.compile_seconds else ""
    return (
        f"{compiled}Training loss: {result.train_loss}\n"
        f"  epoch {result.epoch}/{config.epochs}: test loss {result.test_loss:.4f}, "
        f"test accuracy {result.test_accuracy:.4f}, {result.seconds:.2f} s "
        f"({result.samples_per_second:,.0f} images/s)"
    )


def check_outputs(args: argparse.Namespace) -> None:
    """Every output path is proven writable before the first training step."""
    if args.checkpoint_dir is not None:
        check_writable_folder(args.checkpoint_dir, "--checkpoint-dir")
    for flag, path in (("--metrics-out", args.metrics_out), ("--plot", args.plot), ("--save", args.save)):
        if path is None:
            continue
        if path.is_dir():
            raise OutputError(f"{flag} {path}: is a folder, expected a file name")
        check_writable_folder(path.parent, flag)
    if args.plot is not None and args.plot.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise OutputError(f"--plot {args.plot}: use a .png, .pdf or .svg file name")


class Reporter:
    """What a run shows and writes as it goes: progress bar, epoch lines, metrics file, loss plot."""

    def __init__(self, args: argparse.Namespace, config: TrainConfig, steps_per_epoch: int, start: Progress | None):
        from tqdm.auto import tqdm

        self.args, self.config, self.steps_per_epoch = args, config, steps_per_epoch
        self.results: list[EpochResult] = []
        self.bar = tqdm(total=config.epochs * steps_per_epoch, initial=self._steps_done(start), unit="step",
                        disable=args.quiet or not sys.stderr.isatty(), leave=False,
                        ncols=shutil.get_terminal_size((100, 24)).columns)  # a new pty may report width 0
        if args.metrics_out is not None and not args.resume:
            args.metrics_out.write_text("")

    def _steps_done(self, progress: Progress | None) -> int:
        return 0 if progress is None else (progress.epoch - 1) * self.steps_per_epoch + progress.position

    def update(self, progress: Progress) -> None:
        self.bar.update(self._steps_done(progress) - self.bar.n)
        self.bar.set_postfix(epoch=progress.epoch, loss=f"{float(progress.step_losses[-1]):.4f}")
        if progress.result is None:
            return
        self.results.append(progress.result)
        self.bar.write(_epoch_lines(progress.result, self.config))
        sys.stdout.flush()
        if self.args.metrics_out is not None:
            with self.args.metrics_out.open("a") as metrics:
                metrics.write(json.dumps(dataclasses.asdict(progress.result)) + "\n")

    def close(self) -> None:
        self.bar.close()
        if self.args.plot is not None and self.results:
            from jaxmnist.plots import plot_losses

            plot_losses([r.train_loss for r in self.results], [r.test_loss for r in self.results], self.args.plot,
                        first_epoch=self.results[0].epoch)
            print(f"loss plot written to {self.args.plot}")




def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Trains as the flags say; returns the exit code (130/143 when stopped by a signal)."""
    import jax

    configure_jax(args)
    config = config_from_args(args)
    mesh = start_devices(args)
    if jax.process_index() == 0:
        return _train(args, argv, config, mesh, writer=True)
    # Several hosts: process 0 prints and writes every file; the others train in step, silently.
    args = argparse.Namespace(**{**vars(args), "quiet": True, "metrics_out": None, "plot": None, "save": None})
    with contextlib.redirect_stdout(io.StringIO()):
        return _train(args, argv, config, mesh, writer=False)


def _train(args: argparse.Namespace, argv: list[str], config: TrainConfig, mesh, writer: bool) -> int:
    if writer:
        check_outputs(args)
    start = None
    if args.resume:
        path = latest_checkpoint(args.checkpoint_dir)
        start = restore_progress(path, config)
        print(f"resuming from {path}: epoch {start.epoch}, {start.position} steps into it", flush=True)
    train_data, test_data = load_splits(args)
    print(_describe(config, len(train_data[0]), mesh), flush=True)
    if start is not None and start.epoch > config.epochs:
        print(f"nothing to do: the checkpoint has finished {start.epoch - 1} epochs (--epochs {config.epochs})")
        return 0

    reporter = Reporter(args, config, num_batches(len(train_data[0]), config.batch_size), start)
    saved_at, progress = None, start
    try:
        with GracefulStop() as stop:
            steps = fit(config, train_data, test_data, start, steps_per_call=args.checkpoint_every, max_loss=args.max_loss,
                        mesh=mesh if mesh.size > 1 else None)
            for progress in steps:
                reporter.update(progress)
                checkpoint_now = progress.epoch_done or args.checkpoint_every or stop.signal_number
                if writer and args.checkpoint_dir is not None and checkpoint_now:
                    saved_at = save_checkpoint(args.checkpoint_dir, config, progress, keep=args.keep)
                if stop.signal_number is not None:
                    return _report_stop(stop.signal_number, progress, saved_at, argv)
    finally:
        reporter.close()
    if args.save is not None and progress is not None:
        save_params(args.save, config, progress.state.params)
        print(f"trained parameters written to {args.save}")
    return 0


def _report_stop(signal_number: int, progress: Progress, saved_at: Path | None, argv: list[str]) -> int:
    name = signal.Signals(signal_number).name
    where = f"epoch {progress.epoch}, step {progress.position}"
    if saved_at is None:
        print(f"{name}: stopped at {where}; nothing saved (no --checkpoint-dir)", file=sys.stderr)
    else:
        resume = shlex.join(["python", "-m", "jaxmnist.train", *argv, *([] if "--resume" in argv else ["--resume"])])
        print(f"{name}: stopped at {where}; checkpoint saved to {saved_at}\nresume with: {resume}", file=sys.stderr)
    return 128 + signal_number
