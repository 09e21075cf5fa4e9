"""``python -m jaxmnist.train``: flags -> config -> fit -> printed epochs, as the lesson prints them.

Bad input (flags, data files) is reported as one line on stderr with exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from jaxmnist.data import DATA_DIR_ENV, DataError, default_data_dir, load_mnist

EXIT_FAILURE = 1  # training diverged, or an unexpected fault
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are a single line (no usage dump), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    value = int(text) if text.strip().lstrip("+-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def hidden_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(positive_int(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        sizes = ()
    if not sizes:
        raise argparse.ArgumentTypeError(f"must be comma-separated whole numbers >= 1, e.g. 128,64, got {text!r}")
    return sizes


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say where MNIST comes from (shared by every jaxmnist command)."""
    parser.add_argument("--data-dir", type=Path, default=None, metavar="PATH", help=f"folder with the MNIST IDX files, flat or as torchvision's MNIST/raw (default: ${DATA_DIR_ENV}, else {default_data_dir()}); with --source tfds, TFDS's data folder")
    parser.add_argument("--source", choices=("idx", "tfds"), default="idx", help="idx: the four MNIST IDX files (default); tfds: TensorFlow Datasets' prepared mnist (pip install 'jaxmnist[tfds]')")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=None, help="--no-download: fail instead of downloading missing IDX files (downloaded by default); --download: let TFDS download and prepare MNIST (off by default)")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the IDX files (for modified or synthetic data)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m jaxmnist.train",
        description="Train the lesson's MLP (784-128-64-10, ReLU) on MNIST with SGD and print the per-epoch "
        "training loss the way the PyTorch lesson does, then test loss and accuracy.",
    )
    parser.add_argument("--epochs", type=positive_int, default=5, help="passes over the 60,000 training images (default 5)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per SGD step; the last batch of an epoch is smaller, as in PyTorch (default 64)")
    parser.add_argument("--lr", type=positive_float, default=0.003, help="SGD learning rate (default 0.003)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the initial weights and the shuffling; same seed, same losses (default 0)")
    parser.add_argument("--hidden", type=hidden_sizes, default=(128, 64), metavar="N,N", help="hidden layer sizes (default 128,64)")
    parser.add_argument("--activation", choices=("relu", "sigmoid", "tanh"), default="relu", help="hidden activation (default relu)")
    parser.add_argument("--init", choices=("torch", "flax"), default="torch", help="torch: PyTorch's nn.Linear init, uniform in ±1/sqrt(fan_in) (default); flax: lecun-normal weights, zero biases")
    parser.add_argument("--loss", choices=("nll", "ce"), default="nll", help="nll: LogSoftmax + NLLLoss, as the lesson (default); ce: CrossEntropyLoss on the logits")
    parser.add_argument("--loop", choices=("scan", "step"), default="scan", help="scan: one compiled call per epoch (default); step: one compiled call per batch, same numbers")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="float64 enables JAX's 64-bit mode, for exactness checks (default float32)")
    add_data_arguments(parser)
    parser.add_argument("--devices", type=positive_int, default=None, metavar="N", help="train data-parallel on N devices (default: all local devices of the platform); each batch is split among them")
    parser.add_argument("--platform", choices=("cpu", "gpu", "tpu"), default=None, help="which devices to use (default: JAX's default backend)")
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="several hosts: address of process 0, for jax.distributed.initialize")
    parser.add_argument("--num-processes", type=positive_int, default=None, metavar="N", help="several hosts: how many processes take part")
    parser.add_argument("--process-id", type=non_negative_int, default=None, metavar="I", help="several hosts: this process's index, 0..N-1")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR", help="save a checkpoint after every epoch (and every --checkpoint-every steps) into DIR; written atomically")
    parser.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N", help="also checkpoint every N steps inside an epoch (each epoch then runs in calls of N steps)")
    parser.add_argument("--keep", type=positive_int, default=3, metavar="K", help="keep the K newest checkpoints (default 3)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir, exactly where it stopped")
    parser.add_argument("--metrics-out", type=Path, default=None, metavar="FILE.jsonl", help="append one JSON record per epoch (losses, accuracies, seconds, images/s); started afresh unless --resume")
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="draw the training and test loss per epoch into FILE.png at the end")
    parser.add_argument("--save", type=Path, default=None, metavar="FILE", help="write the trained parameters (msgpack, see README) for python -m jaxmnist.predict")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (it is also off when stderr is not a terminal)")
    parser.add_argument("--max-loss", type=positive_float, default=1000.0, metavar="X", help="stop as diverged when a batch loss is NaN, infinite or above X (default 1000)")
    parser.add_argument("--no-compile-cache", action="store_true", help="do not use JAX's persistent compilation cache (kept in the jaxmnist cache folder)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks instead of one-line errors")
    return parser


def configure_jax(args: argparse.Namespace) -> None:
    """Process-wide JAX settings: 64-bit mode and the persistent compilation cache."""
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if not args.no_compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(default_data_dir() / "xla-cache"))
        # The epoch compiles in well under JAX's default 1 s threshold; cache it anyway.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def load_splits(args: argparse.Namespace, splits: Sequence[str] = ("train", "test")) -> list[tuple]:
    """The splits asked for, each read and checked before any training starts."""
    options = {"source": args.source, "download": args.download, "verify": not args.no_verify}
    return [load_mnist(split, args.data_dir, **options) for split in splits]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.resume and args.checkpoint_dir is None:
        build_parser().error("argument --resume: needs --checkpoint-dir DIR, the folder to resume from")
    distributed = (args.coordinator, args.num_processes, args.process_id)
    if any(value is not None for value in distributed) and None in distributed:
        build_parser().error("arguments --coordinator, --num-processes and --process-id go together")
    if args.num_processes is not None and args.process_id >= args.num_processes:
        build_parser().error(f"argument --process-id: must be below --num-processes {args.num_processes}")
    from jaxmnist.checkpoint import CheckpointError
    from jaxmnist.fit import DivergenceError
    from jaxmnist.parallel import DeviceError
    from jaxmnist.run import OutputError, run

    try:
        return run(args, argv)
    except (DataError, CheckpointError, OutputError, DivergenceError, DeviceError) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE if isinstance(error, DivergenceError) else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug or an environment fault: one line unless --debug
        if args.debug:
            raise
        print(f"internal error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
