"""``python -m jaxmnist.train``: flags -> config -> fit -> printed epochs, as the lesson prints them.

The run's settings are ``TrainConfig``'s fields, offered as flags from their metadata; the other flags
say where data comes from, where it runs and what is written. Bad input (flags, data files, outputs) is
one line on stderr with exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxmnist.commands.kit import (
    ARGUMENT_TYPES,
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    OneLineParser,
    add_data_arguments,
    in_flag_terms,
    non_negative_int,
    one_choice,
    output_outliving_its_reader,
    positive_float,
    positive_int,
    report_error,
    report_internal_error,
    value_list,
)
from jaxmnist.config import SettingsError, TrainConfig, num_runs

PROG = "python -m jaxmnist.train"
RUN_FLAGS = {"num_devices": "--devices", "platform": "--platform", "train_data": "the training set",
             "test_data": "the test set"}  # fmt: skip


def config_flags() -> dict[str, str]:
    """Each ``TrainConfig`` field's flag."""
    return {field.name: field.metadata["flag"] for field in dataclasses.fields(TrainConfig)}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field, with its default, allowed values and help from the field."""
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        options = {"dest": field.name, "default": field.default, "help": meta["help"], "metavar": meta["metavar"]}
        if meta["kind"] == "choice":
            options.update(choices=meta["choices"], type=one_choice)
        elif meta["sweepable"]:
            options["type"] = value_list(ARGUMENT_TYPES[meta["kind"]])
        else:
            options["type"] = ARGUMENT_TYPES[meta["kind"]]
        parser.add_argument(meta["flag"], **options)


def build_parser() -> argparse.ArgumentParser:
    from jaxmnist.loop import DEFAULT_MAX_LOSS

    parser = OneLineParser(
        prog=PROG,
        description="Train the lesson's MLP (784-128-64-10, ReLU) on MNIST with SGD and print the per-epoch "
        "training loss the way the PyTorch lesson does, then test loss and accuracy.",
    )
    add_config_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument(
        "--devices",
        type=positive_int,
        default=None,
        metavar="N",
        help="train data-parallel on N devices (default: all local devices of the platform); "
        "each batch is split among them",
    )
    parser.add_argument(
        "--platform",
        choices=("cpu", "gpu", "tpu"),
        default=None,
        help="which devices to use (default: JAX's default backend)",
    )
    parser.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="several hosts: address of process 0, for jax.distributed.initialize",
    )
    parser.add_argument(
        "--num-processes",
        type=positive_int,
        default=None,
        metavar="N",
        help="several hosts: how many processes take part",
    )
    parser.add_argument(
        "--process-id",
        type=non_negative_int,
        default=None,
        metavar="I",
        help="several hosts: this process's index, 0..N-1",
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="save a checkpoint after every epoch (and every --checkpoint-every steps) into DIR; written atomically",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=None,
        metavar="N",
        help="also checkpoint every N steps inside an epoch (each epoch then runs in calls of N steps)",
    )
    parser.add_argument(
        "--keep", type=positive_int, default=3, metavar="K", help="keep the K newest checkpoints (default 3)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest intact checkpoint in --checkpoint-dir, exactly where it stopped; "
        "with none there yet, start a new run (so one command line serves every restart)",
    )
    parser.add_argument(
        "--metrics-out",
        type=Path,
        default=None,
        metavar="FILE.jsonl",
        help="one JSON record per finished epoch (losses, accuracies, seconds, images/s), rewritten atomically "
        "after every epoch; a resumed run keeps the records of the epochs its checkpoint finished",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="draw the training and test loss per epoch into FILE.png at the end",
    )
    parser.add_argument(
        "--save",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the trained parameters (msgpack, see docs/command-line.md) for python -m jaxmnist.predict",
    )
    parser.add_argument(
        "--save-best",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the parameters of the epoch with the lowest validation loss (as --save; needs --val-split)",
    )
    parser.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        metavar="DIR",
        help="write TensorBoard event files into DIR: epoch scalars, the batch loss, the settings as hparams "
        "(pip install 'jaxmnist[tensorboard]')",
    )
    parser.add_argument(
        "--tensorboard-every",
        type=positive_int,
        default=50,
        metavar="N",
        help="log the batch loss to TensorBoard every N steps (default 50)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar (it is also off when stderr is not a terminal)"
    )
    parser.add_argument(
        "--max-loss",
        type=positive_float,
        default=DEFAULT_MAX_LOSS,
        metavar="X",
        help=f"stop as diverged when a batch loss is NaN, infinite or above X, or a test or validation loss is "
        f"not finite (default {DEFAULT_MAX_LOSS:g})",
    )
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache (kept in the jaxmnist cache folder)",
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks instead of one-line errors")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's settings from the parsed flags; a model file's path made absolute, so that saved files
    find it from any folder."""
    from jaxmnist.model_source import absolute_spec

    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**values, "model": values["model"] and absolute_spec(values["model"])})


def _check_flag_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.resume and args.checkpoint_dir is None:
        parser.error("argument --resume: needs --checkpoint-dir DIR, the folder to resume from")
    distributed = (args.coordinator, args.num_processes, args.process_id)
    if any(value is not None for value in distributed) and None in distributed:
        parser.error("arguments --coordinator, --num-processes and --process-id go together")
    if args.save_best is not None and not args.val_split:
        parser.error("argument --save-best: needs --val-split N, the held-out images that choose the best epoch")
    if args.num_processes is not None and args.process_id >= args.num_processes:
        parser.error(f"argument --process-id: must be below --num-processes {args.num_processes}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_flag_combinations(parser, args)
    flags = {**config_flags(), **RUN_FLAGS}
    try:
        config = config_from_args(args)
    except SettingsError as error:
        parser.error(in_flag_terms(str(error), flags))
    if args.save_best is not None and num_runs(config) > 1:
        parser.error("argument --save-best: picks one epoch of one run, not of --seeds runs or a grid")
    from jaxmnist.checkpoint import CheckpointError
    from jaxmnist.commands.stopping import GracefulStop, run_in_worker
    from jaxmnist.commands.training import OutputError, run
    from jaxmnist.data import DataError
    from jaxmnist.loop import DivergenceError
    from jaxmnist.model_source import ModelSpecError
    from jaxmnist.parallel import DeviceError
    from jaxmnist.runs import RunError

    with output_outliving_its_reader():  # the one-line errors too
        try:
            with GracefulStop() as stop:
                return run_in_worker(run, args, argv, config, stop)
        except (DataError, CheckpointError, OutputError, DivergenceError, DeviceError, SettingsError, ModelSpecError,
                RunError) as error:  # fmt: skip
            report_error(error, flags, args.debug)
            return EXIT_FAILURE if isinstance(error, DivergenceError) else EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as error:  # a bug or an environment fault: one line unless --debug
            if args.debug:
                raise
            report_internal_error(error)
            return EXIT_FAILURE
