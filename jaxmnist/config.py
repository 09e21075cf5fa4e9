"""The run's definition: every setting once, with its default, allowed values, flag and help.

``TrainConfig`` is the single source of a run's settings, and holds settings only: the train command
builds its flags from the fields' metadata, checkpoints and saved parameters store it and compare it on
resume; ``jaxmnist.recipe`` builds the lesson's model and the optimizer from it, ``jaxmnist.runs`` the
run's keys and initial state.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Literal

import numpy as np

from jaxmnist.arguments import format_arguments, parse_arguments
from jaxmnist.losses import LOSSES
from jaxmnist.model import ACTIVATIONS
from jaxmnist.schedules import SCHEDULES, schedule_problem

Kind = Literal[
    "positive_int",
    "non_negative_int",
    "positive_float",
    "non_negative_float",
    "fraction",
    "sizes",
    "choice",
    "model_spec",
    "optimizer",
    "arguments",
    "count_or_fraction",
    "normalization",
]

# The optimizers whose settings have flags of their own (--momentum, --weight-decay); any optax optimizer's
# name, or FILE.py:NAME, is allowed too (jaxmnist.optimizers).
NAMED_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")
DEFAULT_MOMENTUM = 0.9
DEFAULT_WEIGHT_DECAY = 1e-4

# Settings that describe only the lesson's MLP: they do not apply to a model of the user's.
LESSON_MODEL_SETTINGS = ("hidden_sizes", "activation", "weight_init", "dropout")


class SettingsError(ValueError):
    """A setting, or a combination of settings, is not allowed; the message names the arguments.

    Example:
        >>> try:
        ...     TrainConfig(epochs=0)
        ... except SettingsError as error:
        ...     print(error)
        `epochs` must be a whole number >= 1, got 0
    """


def setting(
    default: Any,
    help: str,
    *,
    flag: str,
    kind: Kind,
    choices: tuple = (),
    resumable: bool = False,
    sweepable: bool = False,
    metavar: str | None = None,
) -> Any:
    """A ``TrainConfig`` field with what a command needs to offer it as a flag.

    ``resumable``: the setting may differ when a run resumes another's checkpoint (it does not change the
    mathematics). ``sweepable``: the setting may be a tuple of values, one per row of a grid of runs
    trained as one program (a value held in each run's state, not a shape).
    """
    metadata = {
        "help": help,
        "flag": flag,
        "kind": kind,
        "choices": choices,
        "resumable": resumable,
        "sweepable": sweepable,
        "metavar": metavar,
    }
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; the defaults are the lesson's.

    Example:
        >>> TrainConfig(epochs=2).learning_rate
        0.003
    """

    epochs: int = setting(
        5, "passes over the training images (default 5)", flag="--epochs", kind="positive_int", resumable=True
    )
    batch_size: int = setting(
        64,
        "images per step; the last batch of an epoch is smaller, as in PyTorch (default 64)",
        flag="--batch-size",
        kind="positive_int",
    )
    learning_rate: float | tuple[float, ...] = setting(
        0.003,
        "learning rate (default 0.003); a comma list (0.001,0.01) trains one run per value, see --seeds",
        flag="--lr",
        kind="positive_float",
        sweepable=True,
        metavar="LR",
    )
    model: str | None = setting(
        None,
        "train your own flax model instead of the lesson's MLP: FILE.py:NAME (relative to the working folder, "
        "or absolute) or package.module:NAME; NAME is a linen Module class or instance, an NNX Module class "
        "taking rngs, or a function returning one (see docs/your-model.md)",
        flag="--model",
        kind="model_spec",
        metavar="FILE.py:NAME",
    )
    seed: int = setting(
        0,
        "seed of the initial weights and the shuffling; same seed, same losses (default 0)",
        flag="--seed",
        kind="non_negative_int",
    )
    hidden_sizes: tuple[int, ...] = setting(
        (128, 64), "hidden layer sizes (default 128,64)", flag="--hidden", kind="sizes", metavar="N,N"
    )
    activation: str = setting(
        "relu", "hidden activation (default relu)", flag="--activation", kind="choice", choices=tuple(ACTIVATIONS)
    )
    weight_init: Literal["torch", "flax"] = setting(
        "torch",
        "torch: PyTorch's nn.Linear init, uniform in ±1/sqrt(fan_in) (default); flax: lecun-normal weights, "
        "zero biases",
        flag="--init",
        kind="choice",
        choices=("torch", "flax"),
    )
    loss: Literal["nll", "ce"] = setting(
        "nll",
        "nll: LogSoftmax + NLLLoss, as the lesson (default); ce: CrossEntropyLoss on the logits",
        flag="--loss",
        kind="choice",
        choices=tuple(LOSSES),
    )
    loop: Literal["scan", "step"] = setting(
        "scan",
        "scan: one compiled call per epoch (default); step: one compiled call per batch, the same numbers "
        "within rounding (float64: ~1e-11, on some CPUs to the bit; float32: rounding that training amplifies)",
        flag="--loop",
        kind="choice",
        choices=("scan", "step"),
        resumable=True,
    )
    dtype: Literal["float32", "float64"] = setting(
        "float32",
        "float64 enables JAX's 64-bit mode, for exactness checks (default float32)",
        flag="--dtype",
        kind="choice",
        choices=("float32", "float64"),
    )
    optimizer: str = setting(
        "sgd",
        "the optimizer: sgd (default, the lesson's), momentum, nesterov, adam, adamw, any other optax optimizer by "
        "name (adadelta, rmsprop, adagrad, lamb, lion, ...), torch_adagrad (torch.optim.Adagrad's formula), or "
        "FILE.py:NAME / package.module:NAME, a function "
        "taking learning_rate and returning an optax GradientTransformation",
        flag="--optimizer",
        kind="optimizer",
        metavar="NAME",
    )
    optimizer_args: str = setting(
        "",
        "the optimizer's other keyword arguments, checked against its signature, e.g. rho=0.95,eps=1e-7 "
        "(default: its own defaults)",
        flag="--optimizer-args",
        kind="arguments",
        metavar="K=V,...",
    )
    momentum: float | tuple[float, ...] | None = setting(
        None,
        f"momentum of --optimizer momentum or nesterov, in [0, 1) (default {DEFAULT_MOMENTUM}); a comma list "
        "trains one run per value",
        flag="--momentum",
        kind="fraction",
        sweepable=True,
        metavar="M",
    )
    weight_decay: float | tuple[float, ...] | None = setting(
        None,
        f"decoupled weight decay of --optimizer adamw (default {DEFAULT_WEIGHT_DECAY:g}); a comma list trains "
        "one run per value",
        flag="--weight-decay",
        kind="non_negative_float",
        sweepable=True,
        metavar="W",
    )
    schedule: str = setting(
        "constant",
        "learning-rate schedule over the whole run, each as its PyTorch scheduler: constant (default), cosine "
        "(to 0), warmup-cosine (linear warm-up from 0 over --warmup-steps, then cosine), step (StepLR: "
        "step_size=1,gamma=0.1, in epochs), exponential (ExponentialLR: gamma= per epoch), multistep "
        "(MultiStepLR: milestones=[E,E],gamma=0.1), linear (LinearLR: start_factor=1,end_factor=0 over the run), "
        "one-cycle (OneCycleLR: pct_start=0.3,div_factor=25,final_div_factor=1e4, peaking at --lr)",
        flag="--schedule",
        kind="choice",
        choices=SCHEDULES,
    )
    schedule_args: str = setting(
        "",
        "the schedule's arguments, e.g. step_size=1,gamma=0.7 (default: those given with --schedule)",
        flag="--schedule-args",
        kind="arguments",
        metavar="K=V,...",
    )
    warmup_steps: int = setting(
        0, "warm-up steps of --schedule warmup-cosine (default 0)", flag="--warmup-steps", kind="non_negative_int"
    )
    dropout: float | tuple[float, ...] = setting(
        0.0,
        "dropout rate after each hidden layer in training; inference runs without it (default 0, the lesson's); "
        "a comma list trains one run per value",
        flag="--dropout",
        kind="fraction",
        sweepable=True,
        metavar="P",
    )
    val_split: int | float = setting(
        0,
        "hold out N training images, or a fraction of them (0.1), the same ones for every seed, never trained on, "
        "and report validation loss and accuracy each epoch (default 0: none)",
        flag="--val-split",
        kind="count_or_fraction",
        metavar="N",
    )
    normalize: tuple[float, float] = setting(
        (0.5, 0.5),
        "the input transform: pixels/255, minus MEAN, divided by STD (default 0.5,0.5, the lesson's, to [-1, 1]; "
        "0,1 for pixels/255; 0.1307,0.3081 for MNIST's mean and deviation)",
        flag="--normalize",
        kind="normalization",
        metavar="MEAN,STD",
    )
    seeds: int = setting(
        1,
        "train N independent runs with seeds --seed .. --seed+N-1 together, as one vmapped program, and "
        "report the band of their losses and accuracies (default 1); with comma lists of --lr, --momentum, "
        "--weight-decay or --dropout, N seeds of every combination of their values",
        flag="--seeds",
        kind="positive_int",
        metavar="N",
    )
    early_stopping: int = setting(
        0,
        "stop when the validation loss has not improved for K epochs; needs --val-split (default 0: off)",
        flag="--early-stopping",
        kind="non_negative_int",
        metavar="K",
        resumable=True,
    )

    def __post_init__(self) -> None:
        for name in ("optimizer_args", "schedule_args"):  # a dict from Python, kept as the text a flag gives
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, format_arguments(getattr(self, name)))
        if isinstance(self.normalize, list):  # as JSON gives it back
            object.__setattr__(self, "normalize", tuple(self.normalize))
        for field in dataclasses.fields(self):
            check_setting(field, getattr(self, field.name))
        self._check_in_dtype_range()
        problem = schedule_problem(self.schedule, parse_arguments(self.schedule_args, "schedule_args"))
        if problem is not None:
            raise SettingsError(f"`schedule_args`: {problem}")
        if self.momentum is not None and self.optimizer not in ("momentum", "nesterov"):
            raise SettingsError(f"`momentum` is for optimizer 'momentum' or 'nesterov', not {self.optimizer!r}: give "
                                "another optimizer's as `optimizer_args` momentum=M")  # fmt: skip
        if self.weight_decay is not None and self.optimizer != "adamw":
            raise SettingsError(f"`weight_decay` is for optimizer 'adamw', not {self.optimizer!r}: give another "
                                "optimizer's as `optimizer_args` weight_decay=W")  # fmt: skip
        if self.warmup_steps and self.schedule != "warmup-cosine":
            raise SettingsError(f"`warmup_steps` is for schedule 'warmup-cosine', not {self.schedule!r}")
        if self.seed + self.seeds > 2**32:
            raise SettingsError(f"`seed`={self.seed} and `seeds`={self.seeds} go past the largest seed, 2**32 - 1")
        if self.early_stopping and num_runs(self) > 1:
            raise SettingsError("`early_stopping` stops one run; with `seeds` > 1 or a grid the runs share one program")
        if isinstance(self.learning_rate, tuple) and self.schedule != "constant":
            raise SettingsError(
                f"`learning_rate` lists several values; with `schedule`={self.schedule!r} run each rate as its own run"
            )
        if self.early_stopping and not self.val_split:
            raise SettingsError("`early_stopping` needs `val_split`=N: a held-out set whose loss it watches")
        if self.model is not None:
            for name in LESSON_MODEL_SETTINGS:
                if getattr(self, name) != _DEFAULTS[name]:
                    raise SettingsError(f"`{name}` describes the lesson's MLP, not `model`={self.model}")

    def _check_in_dtype_range(self) -> None:
        """Every nonzero number setting a normal number of ``dtype``: one outside its range would train as 0,
        as infinity or with lost digits, while the records show the value given."""
        limits = np.finfo(self.dtype)
        tiny, largest = float(limits.tiny), float(limits.max)  # compared as Python floats: no cast to ``dtype``
        for field in dataclasses.fields(self):
            if field.metadata["kind"] not in (*_NUMBER_KINDS, "normalization"):
                continue
            value = getattr(self, field.name)
            for number in value if isinstance(value, tuple) else (value,):
                if number and not tiny <= abs(number) <= largest:
                    with np.errstate(over="ignore"):
                        trains_as = float(np.asarray(number, np.float64).astype(self.dtype))
                    outcome = f"as {trains_as:g}" if trains_as in (0, float("inf")) else "with lost digits"
                    raise SettingsError(
                        f"`{field.name}`={value_text(number)} is outside {self.dtype}'s range ({tiny:.6g} "
                        f"to {largest:.6g}): it would train {outcome}"
                    )

    def with_optimizer_defaults(self) -> TrainConfig:
        """These settings with the momentum or weight decay their optimizer takes by default written out, so
        that settings that train alike compare equal.

        Example:
            >>> TrainConfig(optimizer="momentum").with_optimizer_defaults().momentum
            0.9
        """
        defaults = {}
        if self.optimizer in ("momentum", "nesterov") and self.momentum is None:
            defaults["momentum"] = DEFAULT_MOMENTUM
        if self.optimizer == "adamw" and self.weight_decay is None:
            defaults["weight_decay"] = DEFAULT_WEIGHT_DECAY
        return dataclasses.replace(self, **defaults) if defaults else self

    def resumable_changes(self) -> frozenset[str]:
        """Settings a resumed run may change; the length of a scheduled run shapes its learning rates."""
        return RESUMABLE_CHANGES if self.schedule == "constant" else RESUMABLE_CHANGES - {"epochs"}


_NUMBER_KINDS = ("positive_float", "non_negative_float", "fraction")


def check_setting(field: dataclasses.Field, value: Any) -> None:
    """Raises ``ValueError`` naming the argument when ``value`` is not allowed for ``field``."""
    if isinstance(value, tuple) and field.metadata["sweepable"]:
        _check_grid_values(field, value)
        return
    kind, choices = field.metadata["kind"], field.metadata["choices"]
    name = f"`{field.name}`"
    if isinstance(value, tuple) and kind not in ("sizes", "normalization"):
        fields = dataclasses.fields(TrainConfig)
        sweepable = ", ".join(f"`{each.name}`" for each in fields if each.metadata["sweepable"])
        seeds = "" if field.name == "seeds" else " (several seeds: `seeds`)"
        raise SettingsError(
            f"{name} takes one value: tuples (a grid) are for {sweepable}{seeds}; run each {name} as its own run"
        )
    if isinstance(value, list) and field.metadata["sweepable"]:
        raise SettingsError(f"{name} takes a number, or a tuple of numbers for a grid; got a list: {value!r}")
    if hasattr(value, "dtype") and getattr(value, "shape", None) == ():  # numpy's float32 or a JAX scalar, say
        convert = "int" if value.dtype.kind in "iu" else "float"
        raise SettingsError(f"{name} takes a Python number; got {value.dtype} {value}: use {convert}(value)")
    if kind == "choice" and value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if kind in ("positive_int", "non_negative_int") and not (
        isinstance(value, int) and value >= (kind == "positive_int")
    ):
        raise SettingsError(f"{name} must be a whole number >= {int(kind == 'positive_int')}, got {value!r}")
    if value is None and field.default is None:
        return
    if kind == "positive_float" and not (isinstance(value, int | float) and 0 < value < float("inf")):
        raise SettingsError(f"{name} must be a finite number > 0, got {value!r}")
    if kind == "non_negative_float" and not (isinstance(value, int | float) and 0 <= value < float("inf")):
        raise SettingsError(f"{name} must be a finite number >= 0, got {value!r}")
    if kind == "fraction" and not (isinstance(value, int | float) and 0 <= value < 1):
        raise SettingsError(f"{name} must be in [0, 1), got {value!r}")
    if kind == "sizes" and not (value and all(isinstance(size, int) and size >= 1 for size in value)):
        raise SettingsError(f"{name} must be whole numbers >= 1, got {value!r}")
    if kind == "model_spec" and not (isinstance(value, str) and value.rpartition(":")[0]):
        raise SettingsError(f"{name} must be FILE.py:NAME or package.module:NAME, got {value!r}")
    if kind == "optimizer" and not (isinstance(value, str) and (value.isidentifier() or value.rpartition(":")[0])):
        raise SettingsError(f"{name} must be an optax optimizer's name or FILE.py:NAME, got {value!r}")
    if kind == "arguments":
        if not isinstance(value, str):
            raise SettingsError(f"{name} must be NAME=VALUE text or a dict, got {value!r}")
        try:
            parse_arguments(value, field.name)
        except ValueError as error:
            raise SettingsError(str(error)) from error
    if kind == "count_or_fraction" and not (
        (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
        or (isinstance(value, float) and 0 < value < 1)
    ):
        raise SettingsError(f"{name} must be a whole number of images >= 0 or a fraction in (0, 1), got {value!r}")
    if kind == "normalization" and not (
        isinstance(value, tuple) and len(value) == 2 and all(isinstance(each, int | float) for each in value)
        and all(math.isfinite(each) for each in value) and value[1] > 0
    ):  # fmt: skip
        raise SettingsError(f"{name} must be (mean, std) with a finite mean and std > 0, got {value!r}")


def _check_grid_values(field: dataclasses.Field, values: tuple) -> None:
    """A sweepable setting's list: every value allowed on its own, none twice."""
    if not values:
        raise SettingsError(f"`{field.name}` lists no values")
    for value in values:
        if value is None:
            raise SettingsError(f"`{field.name}` lists None; give numbers")
        check_setting(field, value)
    repeated = next((value for index, value in enumerate(values) if value in values[:index]), None)
    if repeated is not None:
        raise SettingsError(f"`{field.name}` lists {repeated!r} twice")


def value_text(value: float) -> str:
    """A setting's value as text: short, yet telling any two values apart (labels, folder names, messages).

    Example:
        >>> value_text(0.01), value_text(1e-05), value_text(0.1000001), value_text(0.0)
        ('0.01', '1e-05', '0.1000001', '0')
    """
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def values_label(values: dict[str, float]) -> str:
    """A grid row's values as the flags that set them.

    Example:
        >>> values_label({"learning_rate": 0.01, "momentum": 0.9})
        'lr 0.01, momentum 0.9'
    """
    flags = {field.name: field.metadata["flag"].removeprefix("--") for field in dataclasses.fields(TrainConfig)}
    return ", ".join(f"{flags[name]} {value_text(value)}" for name, value in values.items())


def swept_settings(config: TrainConfig) -> dict[str, tuple[float, ...]]:
    """The settings given as lists of values, in field order: the axes of the run's grid.

    Example:
        >>> swept_settings(TrainConfig(learning_rate=(0.01, 0.1), dropout=(0.0, 0.5)))
        {'learning_rate': (0.01, 0.1), 'dropout': (0.0, 0.5)}
    """
    return {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(TrainConfig)
        if field.metadata["sweepable"] and isinstance(getattr(config, field.name), tuple)
    }


def grid_rows(config: TrainConfig) -> list[dict[str, float]]:
    """Every combination of the swept settings' values (the first setting varies slowest); ``[{}]`` when
    nothing is swept.

    Example:
        >>> grid_rows(TrainConfig(learning_rate=(0.01, 0.1)))
        [{'learning_rate': 0.01}, {'learning_rate': 0.1}]
    """
    swept = swept_settings(config)
    return [dict(zip(swept, values, strict=True)) for values in itertools.product(*swept.values())]


def row_config(config: TrainConfig, row: dict[str, float]) -> TrainConfig:
    """The settings of one grid row: ``config`` with the row's value of every swept setting."""
    return dataclasses.replace(config, **row)


def num_runs(config: TrainConfig) -> int:
    """The runs trained together: every grid row times ``seeds``."""
    return math.prod(len(values) for values in swept_settings(config).values()) * config.seeds


_DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
RESUMABLE_CHANGES = frozenset(field.name for field in dataclasses.fields(TrainConfig) if field.metadata["resumable"])


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The settings as JSON-ready values."""
    return dataclasses.asdict(config)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """The inverse of ``config_to_dict``; settings missing from ``values`` take their defaults."""
    lists = {name: tuple(value) for name, value in values.items() if isinstance(value, list)}  # JSON has no tuples
    return TrainConfig(**{**values, **lists})


def held_out_images(config: TrainConfig, num_train_images: int) -> int:
    """How many of ``num_train_images`` ``config.val_split`` holds out (a fraction rounded down, as Keras does).

    Example:
        >>> held_out_images(TrainConfig(val_split=0.1), 60_000), held_out_images(TrainConfig(val_split=500), 60_000)
        (6000, 500)
    """
    if isinstance(config.val_split, float):
        return int(config.val_split * num_train_images)
    return config.val_split


def steps_per_epoch(config: TrainConfig, num_train_images: int) -> int:
    """Steps of one epoch over the training images left after the held-out ones."""
    return -(-(num_train_images - held_out_images(config, num_train_images)) // config.batch_size)


def check_against_data(config: TrainConfig, num_train_images: int) -> None:
    """Raises ``SettingsError`` for settings that do not fit a training set of ``num_train_images``."""
    held_out = held_out_images(config, num_train_images)
    if isinstance(config.val_split, int) and held_out >= num_train_images:
        raise SettingsError(f"`val_split`={config.val_split} must be below the {num_train_images} training images")
    if isinstance(config.val_split, float) and not 0 < held_out < num_train_images:
        raise SettingsError(
            f"`val_split`={config.val_split} holds out {held_out} of the {num_train_images} training images: "
            "hold out at least one and leave at least one"
        )
    total_steps = config.epochs * steps_per_epoch(config, num_train_images)
    if config.warmup_steps >= total_steps:
        raise SettingsError(f"`warmup_steps`={config.warmup_steps} must be shorter than the run ({total_steps} steps)")
