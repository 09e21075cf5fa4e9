"""jaxmnist: the PyTorch "Training Neural Networks" MNIST lesson, done the JAX way.

The public API is re-exported here and imported on first use, so ``import jaxmnist`` stays cheap and
``python -m jaxmnist.train`` runs its module only once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MLP": "jaxmnist.model",
    "TrainState": "jaxmnist.train",
    "create_train_state": "jaxmnist.train",
    "train_step": "jaxmnist.train",
    "train_epoch": "jaxmnist.train",
    "evaluate": "jaxmnist.train",
    "load_mnist": "jaxmnist.data",
    "normalize": "jaxmnist.normalization",
    "cross_entropy_loss": "jaxmnist.losses",
    "nll_loss": "jaxmnist.losses",
    "mse_loss": "jaxmnist.losses",
    "accuracy": "jaxmnist.losses",
    "TrainConfig": "jaxmnist.config",
    "fit": "jaxmnist.loop",
    "RunPlan": "jaxmnist.plan",
    "train_chunk": "jaxmnist.train",
    # The errors a caller catches: each names the API argument at fault.
    "SettingsError": "jaxmnist.config",
    "RunError": "jaxmnist.runs",
    "ModelSpecError": "jaxmnist.model_source",
    "ModelCallError": "jaxmnist.train",
    "DataError": "jaxmnist.idx",
    "CheckpointError": "jaxmnist.checkpoint",
    "DivergenceError": "jaxmnist.loop",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from jaxmnist.checkpoint import CheckpointError  # noqa: F401
    from jaxmnist.config import SettingsError, TrainConfig  # noqa: F401
    from jaxmnist.data import load_mnist  # noqa: F401
    from jaxmnist.idx import DataError  # noqa: F401
    from jaxmnist.loop import DivergenceError, fit  # noqa: F401
    from jaxmnist.losses import accuracy, cross_entropy_loss, mse_loss, nll_loss  # noqa: F401
    from jaxmnist.model import MLP  # noqa: F401
    from jaxmnist.model_source import ModelSpecError  # noqa: F401
    from jaxmnist.normalization import normalize  # noqa: F401
    from jaxmnist.plan import RunPlan  # noqa: F401
    from jaxmnist.runs import RunError  # noqa: F401
    from jaxmnist.train import (  # noqa: F401
        ModelCallError,
        TrainState,
        create_train_state,
        evaluate,
        train_chunk,
        train_epoch,
        train_step,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxmnist' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
