"""What every jaxmnist command shares: the parser, argument types, data flags, exit codes, JAX settings,
and turning library errors (which name API arguments) into messages that name flags."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from jaxmnist.data import SOURCES, load_mnist
from jaxmnist.paths import DATA_DIR_ENV, default_data_dir

EXIT_FAILURE = 1  # training diverged, or an unexpected fault
EXIT_BAD_INPUT = 2
EXIT_WRITE_FAILED = 74  # sysexits' EX_IOERR: an output could not be written (e.g. a full disk)
EXIT_INTERRUPTED = 130

# API arguments that a shared flag sets; each command adds its own.
DATA_FLAGS = {"data_dir": "--data-dir", "source": "--source", "download": "--download", "verify": "--no-verify"}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are a single line (no usage dump) with the same ``error:`` prefix as every other
    error of the commands, exit code 2; a mistyped flag gets the closest real one suggested."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message}{self._suggestion(message)} (see {self.prog} --help)\n")

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        return super().parse_known_args(self._attached_values(args), namespace)

    def _attached_values(self, args: Sequence[str] | None) -> list[str]:
        """``--lr -1,0.1`` read as ``--lr=-1,0.1``: argparse takes a value that starts with "-" for a flag
        unless it is a single number, and would say the flag has no value instead of what is wrong with it."""
        takes_a_value = {option for action in self._actions if action.nargs is None for option in action.option_strings}
        attached: list[str] = []
        for token in sys.argv[1:] if args is None else args:
            if attached and attached[-1] in takes_a_value and re.fullmatch(r"-[\d.].*", token):
                attached[-1] = f"{attached[-1]}={token}"
            else:
                attached.append(token)
        return attached

    def _suggestion(self, message: str) -> str:
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown is None:
            return ""
        known = [option for action in self._actions for option in action.option_strings]
        for word in unknown.group(1).split():
            close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.75)
            if word.startswith("--") and close:
                return f"; did you mean {close[0]}?"
        return ""


SEPARATELY = (
    "takes one value: lists are for --lr, --momentum, --weight-decay and --dropout (several seeds: --seeds N); "
    "run each value as its own command"
)


def _one_value(text: str) -> None:
    if "," in text:
        raise argparse.ArgumentTypeError(f"{SEPARATELY}, got {text!r}")


def positive_int(text: str) -> int:
    _one_value(text)
    value = int(text) if text.strip().lstrip("+-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    _one_value(text)
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


def _number(text: str, allowed, meaning: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and allowed(value)):
        raise argparse.ArgumentTypeError(f"must be {meaning}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _number(text, lambda value: value > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    return _number(text, lambda value: value >= 0, "a finite number >= 0")


def fraction(text: str) -> float:
    return _number(text, lambda value: 0 <= value < 1, "a number in [0, 1)")


def hidden_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(positive_int(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        sizes = ()
    if not sizes:
        raise argparse.ArgumentTypeError(f"must be comma-separated whole numbers >= 1, e.g. 128,64, got {text!r}")
    return sizes


def one_choice(text: str) -> str:
    """A choice flag's value; a comma list is refused with what to do instead."""
    _one_value(text)
    return text


def value_list(parse: Callable[[str], float]) -> Callable[[str], float | tuple[float, ...]]:
    """A flag that takes one number, or a comma list of them (a grid): each parsed by ``parse``."""

    def parse_list(text: str) -> float | tuple[float, ...]:
        if "," in text and not all(part.strip() for part in text.split(",")):
            raise argparse.ArgumentTypeError(f"an empty item in the list {text!r}: give numbers between the commas")
        values = tuple(parse(part.strip()) for part in text.split(","))
        return values if len(values) > 1 else values[0]

    parse_list.__name__ = parse.__name__  # argparse names the type in its messages
    return parse_list


def count_or_fraction(text: str) -> int | float:
    """A whole number (``500``), or a fraction in (0, 1) (``0.1``)."""
    _one_value(text)
    if text.strip().isdigit():
        return int(text)
    return _number(text, lambda value: 0 < value < 1, "a whole number >= 0 or a fraction in (0, 1)")


def normalization(text: str) -> tuple[float, float]:
    """``MEAN,STD`` of the input transform."""
    parts = text.split(",")
    try:
        mean, std = (float(part) for part in parts)
    except ValueError:
        mean, std = math.nan, math.nan
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise argparse.ArgumentTypeError(f"must be MEAN,STD with STD > 0, e.g. 0.1307,0.3081, got {text!r}")
    return mean, std


ARGUMENT_TYPES: dict[str, Callable[[str], object]] = {
    "positive_int": positive_int,
    "non_negative_int": non_negative_int,
    "positive_float": positive_float,
    "non_negative_float": non_negative_float,
    "fraction": fraction,
    "sizes": hidden_sizes,
    "model_spec": str,
    "optimizer": one_choice,
    "arguments": str,
    "count_or_fraction": count_or_fraction,
    "normalization": normalization,
}


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say where MNIST comes from (shared by every jaxmnist command)."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"folder with the MNIST IDX files, flat or as torchvision's MNIST/raw (default: ${DATA_DIR_ENV}, "
        "else $XDG_CACHE_HOME/jaxmnist, i.e. ~/.cache/jaxmnist); with --source tfds, TFDS's data folder",
    )
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="idx",
        help="idx: the four MNIST IDX files (default); tfds: TensorFlow Datasets' prepared mnist "
        "(pip install 'jaxmnist[tfds]')",
    )
    parser.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--no-download: fail instead of downloading missing IDX files (downloaded by default); "
        "--download: let TFDS download and prepare MNIST (off by default)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the SHA-256 check of the IDX files (for modified or synthetic data)",
    )


def load_splits(args: argparse.Namespace, splits: Sequence[str] = ("train", "test")) -> list[tuple]:
    """The splits asked for, each read and checked before any training starts."""
    options = {"source": args.source, "download": args.download, "verify": not args.no_verify}
    return [load_mnist(split, args.data_dir, **options) for split in splits]


def configure_jax(float64: bool, compile_cache: bool) -> None:
    """Process-wide JAX settings: 64-bit mode and the persistent compilation cache."""
    import jax

    if float64:
        jax.config.update("jax_enable_x64", True)
    if compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(default_data_dir() / "xla-cache"))
        # The epoch compiles in well under JAX's default 1 s threshold; cache it anyway.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def counted(count: int, noun: str) -> str:
    """``count`` ``noun``s in words, e.g. ``1 epoch``, ``2 epochs``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def in_flag_terms(message: str, flags: Mapping[str, str]) -> str:
    """A library message with its `argument` names replaced by the flags that set them."""
    flags = {**DATA_FLAGS, **flags}

    def flag_for(match: re.Match) -> str:
        name, value = match.group(1), (match.group(2) or "").strip("'\"")
        flag = flags.get(name, name)
        return flag if value in ("", "True", "False") else f"{flag} {value}"

    return re.sub(r"`(\w+)`(?:=('[^']*'|\"[^\"]*\"|[\d.]+[eE][+-]?\d+|[\w.]+))?", flag_for, message)


def report_error(error: BaseException, flags: Mapping[str, str], debug: bool) -> None:
    """One line on stderr, in the command's terms; the traceback instead with ``--debug``."""
    if debug:
        raise error
    print(f"error: {in_flag_terms(str(error), flags)}", file=sys.stderr)


def report_internal_error(error: BaseException) -> None:
    """A bug or an environment fault: one line, and how to see more."""
    first_line = str(error).splitlines()[0] if str(error) else ""
    print(f"internal error: {type(error).__name__}: {first_line} (run with --debug for the traceback)", file=sys.stderr)


class _OutputToNowhereOnceClosed:
    """A text stream that, once its reader has gone (``... | head``), sends what follows to nowhere: a closed
    pipe must not cost a run its checkpoints, files and table."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_nowhere()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_nowhere()

    def _to_nowhere(self) -> None:
        # The stream's own file descriptor now points at the null device: its buffered text and every later
        # write and flush (the interpreter's last one at exit included) go there without an error.
        nowhere = os.open(os.devnull, os.O_WRONLY)
        os.dup2(nowhere, self._stream.fileno())
        os.close(nowhere)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def output_outliving_its_reader() -> Iterator[None]:
    """``sys.stdout`` and ``sys.stderr`` that keep the command going when their reader closes the pipe
    (``2>&1 | head`` included), within the block."""
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _OutputToNowhereOnceClosed(stdout), _OutputToNowhereOnceClosed(stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr
