"""``python -m jaxmnist.predict --params FILE IMAGE.png ...``: the top digits of each image."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxmnist.commands.kit import (
    ARGUMENT_TYPES,
    EXIT_BAD_INPUT,
    OneLineParser,
    configure_jax,
    in_flag_terms,
    non_negative_int,
    positive_int,
    report_error,
)
from jaxmnist.config import TrainConfig, value_text


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m jaxmnist.predict", description="Classify digit images with trained jaxmnist parameters."
    )
    parser.add_argument(
        "--params",
        type=Path,
        required=True,
        metavar="FILE",
        help="parameters written by python -m jaxmnist.train --save FILE",
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=None,
        help="with parameters of several seeds (--seeds): use this seed's alone (default: the mean of all)",
    )
    for field in dataclasses.fields(TrainConfig):
        if field.metadata["sweepable"]:
            flag = field.metadata["flag"]
            parser.add_argument(
                flag,
                dest=field.name,
                type=ARGUMENT_TYPES[field.metadata["kind"]],
                default=None,
                metavar=field.metadata["metavar"],
                help=f"with parameters of a grid that lists {flag} values: use the runs of this one",
            )
    parser.add_argument("--top", type=positive_int, default=3, help="how many digits to show per image (default 3)")
    parser.add_argument(
        "images", type=Path, nargs="+", metavar="IMAGE", help="28x28 (or larger, resized) digit images, e.g. PNG"
    )
    return parser


def _flags() -> dict[str, str]:
    return {field.name: field.metadata["flag"] for field in dataclasses.fields(TrainConfig)}


def _grid_values(args: argparse.Namespace) -> dict[str, float]:
    """The grid configuration the flags name: each sweepable setting given."""
    names = [field.name for field in dataclasses.fields(TrainConfig) if field.metadata["sweepable"]]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _diverged_seeds(runs: Sequence, diverged: Sequence[int], values: dict[str, float]) -> list[int]:
    """The seeds of the configuration ``values`` names (of ``runs``, a ``RunPlan``'s) that diverged in training."""
    return [runs[index].seed for index in diverged if all(runs[index].values[name] == value
                                                          for name, value in values.items())]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxmnist.checkpoint import CheckpointError, load_saved_model
    from jaxmnist.model_source import ModelSpecError
    from jaxmnist.plan import RunPlan
    from jaxmnist.predict import ImageError, predict_probabilities, read_digit_image

    try:
        saved = load_saved_model(args.params)
        images = np.stack([read_digit_image(path, saved.image_shape) for path in args.images])
    except (ImageError, CheckpointError) as error:
        report_error(error, {"path": "--params"}, debug=False)
        return EXIT_BAD_INPUT
    config = saved.config
    configure_jax(config.dtype == "float64", compile_cache=False)
    plan = RunPlan.of(config)
    try:
        probabilities = predict_probabilities(
            plan, saved.params, images, args.seed, saved.collections, _grid_values(args), saved.diverged
        )
    except ModelSpecError as error:  # the model file moved, or builds other parameters now
        print(f"error: {args.params}: {in_flag_terms(str(error), {'model': 'the recorded model'})}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as error:
        report_error(error, {"seed": "--seed", **_flags()}, debug=False)
        return EXIT_BAD_INPUT
    values = _grid_values(args)
    if values:
        print(f"configuration {', '.join(f'{_flags()[name]} {value_text(value)}' for name, value in values.items())}")
    if config.seeds > 1:
        seeds = f"{config.seeds} seeds ({config.seed}..{config.seed + config.seeds - 1})"
        left_out = _diverged_seeds(plan.runs, saved.diverged, values)
        if args.seed is not None:
            print(f"seed {args.seed} of {seeds}")
        elif left_out:
            which = f"seed{'s' if len(left_out) > 1 else ''} {', '.join(map(str, left_out))}"
            print(
                f"ensemble: mean probability of {config.seeds - len(left_out)} of {seeds}; {which} diverged in training"
            )
        else:
            print(f"ensemble: mean probability of {seeds}")
    for path, row in zip(args.images, probabilities):
        best = np.argsort(row)[::-1][: min(args.top, len(row))]
        print(f"{path}: " + ", ".join(f"{digit} ({row[digit]:.3f})" for digit in best))
    sys.stdout.flush()
    return 0
