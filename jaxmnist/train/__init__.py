"""Training as pure functions: the train state, one step, a chunk of steps, an epoch, evaluation.

``python -m jaxmnist.train`` runs the command-line trainer (``jaxmnist.commands.train``).
"""

from jaxmnist.train.adapters import LinenModel, ModelCallError, NnxModel
from jaxmnist.train.state import TrainState, create_train_state, current_learning_rate, param_dtype
from jaxmnist.train.steps import (
    epoch_batch_indices,
    evaluate,
    gather_batch,
    num_batches,
    train_chunk,
    train_epoch,
    train_step,
)

__all__ = [
    "LinenModel",
    "ModelCallError",
    "NnxModel",
    "TrainState",
    "create_train_state",
    "current_learning_rate",
    "epoch_batch_indices",
    "evaluate",
    "gather_batch",
    "num_batches",
    "param_dtype",
    "train_chunk",
    "train_epoch",
    "train_step",
]
