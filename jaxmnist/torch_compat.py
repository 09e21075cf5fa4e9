"""The lesson's PyTorch model beside jaxmnist's: weight conversion and the reference training loop.

torch is imported inside the functions, so ``import jaxmnist`` never needs it (``pip install
'jaxmnist[parity]'`` or ``pip install torch==2.13.0`` for a CPU build).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np


def lesson_model(hidden_sizes: Sequence[int] = (128, 64), log_softmax: bool = True) -> Any:
    """The lesson's ``nn.Sequential(Linear, ReLU, Linear, ReLU, Linear[, LogSoftmax(dim=1)])``."""
    from torch import nn

    sizes = (784, *hidden_sizes, 10)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(sizes) - 2:
            layers.append(nn.ReLU())
    if log_softmax:
        layers.append(nn.LogSoftmax(dim=1))
    return nn.Sequential(*layers)


def reference_cnn(name: str) -> Any:
    """The PyTorch network of one of ``jaxmnist.cnns``' models, layer for layer (images ``(B, 1, 28, 28)``):
    ``"PyTorchExampleNet"`` (PyTorch's ``examples/mnist``, log-probabilities out) or ``"FlaxExampleCNN"``."""
    from torch import nn

    if name == "PyTorchExampleNet":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
            nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10), nn.LogSoftmax(dim=1),
        )  # fmt: skip
    if name == "FlaxExampleCNN":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3136, 256), nn.ReLU(), nn.Linear(256, 10),
        )  # fmt: skip
    raise ValueError(f"`name` must be 'PyTorchExampleNet' or 'FlaxExampleCNN', got {name!r}")


def params_from_torch(state_dict: Mapping[str, Any]) -> dict[str, dict[str, jnp.ndarray]]:
    """jaxmnist ``MLP`` params from the Sequential's state dict (``N.weight`` is ``(out, in)``: transposed).

    The Linear layers are taken in the order of their index in the Sequential; dtypes are kept.
    """
    layer_indices = sorted(int(key.split(".")[0]) for key in state_dict if key.endswith(".weight"))
    params = {}
    for dense_index, layer_index in enumerate(layer_indices):
        weight = state_dict[f"{layer_index}.weight"].detach().cpu().numpy()
        bias = state_dict[f"{layer_index}.bias"].detach().cpu().numpy()
        params[f"Dense_{dense_index}"] = {"kernel": jnp.asarray(weight.T), "bias": jnp.asarray(bias)}
    return params


def params_to_torch(params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The lesson Sequential's state dict (Linear layers at indices 0, 2, 4, ...) from ``MLP`` params."""
    import torch

    state_dict = {}
    for dense_index in range(len(params)):
        layer = params[f"Dense_{dense_index}"]
        state_dict[f"{2 * dense_index}.weight"] = torch.from_numpy(np.array(layer["kernel"]).T.copy())
        state_dict[f"{2 * dense_index}.bias"] = torch.from_numpy(np.array(layer["bias"]))
    return state_dict


def normalize_torch(images: np.ndarray, dtype: Any) -> Any:
    """The lesson's ``ToTensor()`` then ``Normalize(0.5, 0.5)``, computed by torch in ``dtype``."""
    import torch

    return (torch.tensor(np.asarray(images)).to(dtype) / 255 - 0.5) / 0.5


def torch_train_epoch(
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    batch_indices: np.ndarray,
    batch_mask: np.ndarray,
    learning_rate: float = 0.003,
    loss: str = "nll",
) -> np.ndarray:
    """The lesson's loop on given batches (``zero_grad``, ``backward``, ``SGD.step``); per-step losses.

    ``batch_indices``/``batch_mask`` are ``jaxmnist.train.epoch_batch_indices`` as numpy, so both
    frameworks see identical batches; masked-out entries are dropped (the last batch has 32 images).
    """
    import torch
    from torch import nn

    dtype = next(model.parameters()).dtype
    criterion = nn.NLLLoss() if loss == "nll" else nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    inputs = normalize_torch(images, dtype).reshape(len(images), -1)
    targets = torch.from_numpy(np.asarray(labels, np.int64))
    losses = []
    for indices, mask in zip(batch_indices, batch_mask):
        real = torch.from_numpy(np.asarray(indices)[np.asarray(mask)])
        optimizer.zero_grad()
        batch_loss = criterion(model(inputs[real]), targets[real])
        batch_loss.backward()
        optimizer.step()
        losses.append(batch_loss.item())
    return np.array(losses)


def torch_accuracy(model: Any, images: np.ndarray, labels: np.ndarray) -> float:
    """Test accuracy of the torch model on uint8 ``images``."""
    import torch

    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        logits = model(normalize_torch(images, dtype).reshape(len(images), -1))
    return float((logits.argmax(dim=1).numpy() == np.asarray(labels)).mean())


def side_by_side_epoch(
    model: Any,
    state: Any,
    images: Any,
    labels: Any,
    key: Any,
    batch_size: int = 64,
    learning_rate: float = 0.003,
    loss: str = "nll",
) -> tuple[Any, np.ndarray, np.ndarray]:
    """One epoch of jaxmnist's ``train_epoch`` and of the lesson's torch loop, on identical batches.

    ``model`` and ``state`` must start from the same weights, with ``state`` built for the same
    ``learning_rate`` and ``loss``. Returns the new jax state and both per-step losses.
    """
    from jaxmnist.train import epoch_batch_indices, train_epoch

    indices, mask = epoch_batch_indices(key, len(images), batch_size)
    torch_losses = torch_train_epoch(
        model, np.asarray(images), np.asarray(labels), np.asarray(indices), np.asarray(mask), learning_rate, loss
    )
    state, metrics = train_epoch(state, images, labels, key, batch_size=batch_size)
    return state, np.asarray(metrics["loss"]), torch_losses
