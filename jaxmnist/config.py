"""The run's definition: every setting once, with its default, allowed values, flag and help.

``TrainConfig`` is the single source of a run's settings: the train command builds its flags from the
fields' metadata, checkpoints store it and compare it on resume, and ``initial_state`` builds the model,
optimizer and keys from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from jaxmnist.losses import LOSSES
from jaxmnist.model import ACTIVATIONS, MLP
from jaxmnist.train import TrainState, create_train_state

Kind = Literal["positive_int", "non_negative_int", "positive_float", "sizes", "choice"]


def setting(
    default: Any,
    help: str,
    *,
    flag: str,
    kind: Kind,
    choices: tuple = (),
    resumable: bool = False,
    metavar: str | None = None,
) -> Any:
    """A ``TrainConfig`` field with what a command needs to offer it as a flag.

    ``resumable``: the setting may differ when a run resumes another's checkpoint (it does not change the
    mathematics).
    """
    metadata = {
        "help": help,
        "flag": flag,
        "kind": kind,
        "choices": choices,
        "resumable": resumable,
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
    learning_rate: float = setting(0.003, "learning rate (default 0.003)", flag="--lr", kind="positive_float")
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
        "scan: one compiled call per epoch (default); step: one compiled call per batch, same numbers",
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

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_setting(field, getattr(self, field.name))


def check_setting(field: dataclasses.Field, value: Any) -> None:
    """Raises ``ValueError`` naming the argument when ``value`` is not allowed for ``field``."""
    kind, choices = field.metadata["kind"], field.metadata["choices"]
    name = f"`{field.name}`"
    if kind == "choice" and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if kind in ("positive_int", "non_negative_int") and not (
        isinstance(value, int) and value >= (kind == "positive_int")
    ):
        raise ValueError(f"{name} must be a whole number >= {int(kind == 'positive_int')}, got {value!r}")
    if kind == "positive_float" and not (isinstance(value, int | float) and 0 < value < float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if kind == "sizes" and not (value and all(isinstance(size, int) and size >= 1 for size in value)):
        raise ValueError(f"{name} must be whole numbers >= 1, got {value!r}")


RESUMABLE_CHANGES = frozenset(field.name for field in dataclasses.fields(TrainConfig) if field.metadata["resumable"])


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The settings as JSON-ready values."""
    return dataclasses.asdict(config)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """The inverse of ``config_to_dict``; settings missing from ``values`` take their defaults."""
    return TrainConfig(**{**values, "hidden_sizes": tuple(values["hidden_sizes"])})


def build_model(config: TrainConfig) -> MLP:
    """The MLP that ``config`` describes."""
    return MLP(
        hidden_sizes=config.hidden_sizes,
        activation=ACTIVATIONS[config.activation],
        weight_init=config.weight_init,
        param_dtype=jnp.dtype(config.dtype),
    )


def build_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The optax optimizer that ``config`` describes."""
    return optax.sgd(config.learning_rate)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """The initialization key and the data-order key of a run, both derived from its seed."""
    init_key, data_key = jax.random.split(jax.random.key(seed))
    return init_key, data_key


def epoch_key(data_key: jax.Array, epoch: int) -> jax.Array:
    """The key of one epoch's shuffle (epochs count from 1): reproducible without replaying earlier ones."""
    return jax.random.fold_in(data_key, epoch)


def initial_state(config: TrainConfig) -> TrainState:
    """The freshly initialized train state of a run."""
    init_key, _ = run_keys(config.seed)
    return create_train_state(init_key, build_model(config), build_optimizer(config), loss=config.loss)
