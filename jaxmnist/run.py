"""One training run from parsed flags: checks, resume, fit, printing, checkpoints, graceful stop."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path

from jaxmnist.checkpoint import latest_checkpoint, restore_progress, save_checkpoint
from jaxmnist.cli import configure_jax, load_splits
from jaxmnist.fit import Progress, TrainConfig, fit


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


def _describe(config: TrainConfig, num_images: int) -> str:
    import jax

    device = jax.devices()[0]
    layers = "-".join(str(size) for size in (784, *config.hidden_sizes, 10))
    return (
        f"MLP {layers} ({config.activation}, {config.weight_init} init), {config.loss} loss, "
        f"SGD lr {config.learning_rate}, batch {config.batch_size}, {config.epochs} epochs, "
        f"{num_images} training images, {config.dtype} on {device.platform} ({device.device_kind})"
    )


def _print_epoch(progress: Progress, config: TrainConfig) -> None:
    result = progress.result
    if result.compile_seconds:
        print(f"compiled in {result.compile_seconds:.2f} s", flush=True)
    print(f"Training loss: {result.train_loss}")
    print(
        f"  epoch {result.epoch}/{config.epochs}: test loss {result.test_loss:.4f}, "
        f"test accuracy {result.test_accuracy:.4f}, {result.seconds:.2f} s "
        f"({result.samples_per_second:,.0f} images/s)",
        flush=True,
    )


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Trains as the flags say; returns the exit code (130/143 when stopped by a signal)."""
    configure_jax(args)
    config = config_from_args(args)
    if args.checkpoint_dir is not None:
        check_writable_folder(args.checkpoint_dir, "--checkpoint-dir")
    start = None
    if args.resume:
        path = latest_checkpoint(args.checkpoint_dir)
        start = restore_progress(path, config)
        print(f"resuming from {path}: epoch {start.epoch}, {start.position} steps into it", flush=True)
    train_data, test_data = load_splits(args)
    print(_describe(config, len(train_data[0])), flush=True)
    if start is not None and start.epoch > config.epochs:
        print(f"nothing to do: the checkpoint has finished {start.epoch - 1} epochs (--epochs {config.epochs})")
        return 0

    saved_at = None
    with GracefulStop() as stop:
        steps = fit(config, train_data, test_data, start, steps_per_call=args.checkpoint_every, max_loss=args.max_loss)
        for progress in steps:
            if progress.epoch_done:
                _print_epoch(progress, config)
            if args.checkpoint_dir is not None and (progress.epoch_done or args.checkpoint_every or stop.signal_number):
                saved_at = save_checkpoint(args.checkpoint_dir, config, progress, keep=args.keep)
            if stop.signal_number is not None:
                return _report_stop(stop.signal_number, progress, saved_at, argv)
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
