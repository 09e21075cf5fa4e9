"""Checkpoints that survive a crash at any instant, and resuming exactly where a run stopped.

Format: one ``ckpt-<global step>.msgpack`` file per checkpoint, written with ``flax.serialization``
(msgpack of the train state's arrays, bit-exact) plus the run's position, its current epoch's step
metrics, the RNG state and its configuration. We chose flax.serialization over orbax-checkpoint
because the whole state is under half a megabyte: one file written to a temporary name, fsynced and
renamed is atomic on POSIX, needs no background threads (so a signal handler or SIGKILL cannot catch
it half-done), and restores without any orbax machinery.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization, traverse_util

from jaxmnist.config import TrainConfig, config_from_dict, config_to_dict, value_text
from jaxmnist.files import PathArg, remove_temporary_files, write_atomically
from jaxmnist.loop import EpochResult, Progress
from jaxmnist.plan import RunPlan, plan_of, run_keys
from jaxmnist.train import TrainState

FORMAT = "jaxmnist-checkpoint"
VERSION = 3  # 2: the train state carries its collections and PRNG key; 3: one held-out set for every seed
_READABLE_VERSIONS = (2, VERSION)  # a version 2 run held out what it does now unless `seed` != 0
_NAME = re.compile(r"^ckpt-(\d+)\.msgpack$")


class CheckpointError(ValueError):
    """A checkpoint folder holds no checkpoint, a damaged one, or one of another configuration.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "ckpt-00000010.msgpack"
        >>> _ = path.write_bytes(b"not a checkpoint")
        >>> try:
        ...     read_checkpoint(path)
        ... except CheckpointError as error:
        ...     print(type(error).__name__)
        DamagedCheckpointError
    """


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file cannot be read (truncated, overwritten, not a checkpoint)."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """A run read back from a checkpoint file."""

    path: Path
    progress: Progress


def config_differences(saved: TrainConfig, current: TrainConfig) -> list[tuple[str, Any, Any]]:
    """The settings that differ and would change the mathematics: ``(field, saved, current)``, an
    optimizer's default momentum or weight decay the same as its value given."""
    saved, current = saved.with_optimizer_defaults(), current.with_optimizer_defaults()
    return [
        (field.name, getattr(saved, field.name), getattr(current, field.name))
        for field in dataclasses.fields(TrainConfig)
        if field.name not in current.resumable_changes() and getattr(saved, field.name) != getattr(current, field.name)
    ]


def _shown(value: Any) -> str:
    """A setting's value in a message as its flag takes it: a grid's list as ``0.01,0.03``, a number as ``0``,
    a setting not given as ``unset``."""
    if value is None or value == "":
        return "unset"
    if isinstance(value, tuple):
        return ",".join(map(value_text, value))
    return value_text(value) if isinstance(value, float) else str(value)


def checkpoint_paths(directory: PathArg) -> list[Path]:
    """The checkpoint files in ``directory``, oldest (fewest steps) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in directory.iterdir() if (match := _NAME.match(path.name))]
    return [path for _, path in sorted(found)]


def checkpoint_path(directory: PathArg, step: int) -> Path:
    """Where the checkpoint taken after ``step`` steps goes."""
    return Path(directory) / f"ckpt-{step:08d}.msgpack"


def save_checkpoint(directory: PathArg, config: TrainConfig | RunPlan, progress: Progress, keep: int = 3) -> Path:
    """Writes ``progress`` of the run of ``config`` (the settings or their plan), the results of its finished
    epochs included, as the newest checkpoint.

    Only the ``keep`` newest checkpoints stay. The write is atomic: a failure (e.g. a full disk) raises
    ``OSError`` and leaves the earlier checkpoints as they were, with no temporary file behind.
    """
    directory, plan = Path(directory), plan_of(config)
    directory.mkdir(parents=True, exist_ok=True)
    progress = progress.continuation()
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(config_to_dict(plan.config)),
        "epoch": progress.epoch,
        "position": progress.position,
        "state": serialization.to_state_dict(progress.state),
        "step_losses": np.asarray(progress.step_losses),
        "step_accuracies": np.asarray(progress.step_accuracies),
        "step_metrics": {name: np.asarray(values) for name, values in progress.step_metrics.items()},
        "data_key": np.asarray(jax.random.key_data(run_keys(plan.first_run.seed)[1])),
        "results": json.dumps([dataclasses.asdict(result) for result in progress.history]),
        "diverged": json.dumps(progress.diverged),
    }
    path = checkpoint_path(directory, progress.global_step)
    write_atomically(path, serialization.msgpack_serialize(jax.device_get(payload)))
    for old in checkpoint_paths(directory)[:-keep]:
        old.unlink(missing_ok=True)
    remove_temporary_files(directory, "ckpt-")
    return path


def read_checkpoint(path: PathArg) -> tuple[TrainConfig, dict[str, Any]]:
    """The configuration and raw payload of one checkpoint file; ``CheckpointError`` if damaged."""
    path = Path(path)
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError("not a jaxmnist checkpoint")
        if payload.get("version") not in _READABLE_VERSIONS:
            readable = " and ".join(map(str, _READABLE_VERSIONS))
            raise ValueError(f"checkpoint format version {payload.get('version')}, this jaxmnist reads {readable}")
        config = config_from_dict(json.loads(payload["config"]))
    except Exception as error:  # msgpack, json and our own checks raise assorted types
        raise DamagedCheckpointError(f"{path}: damaged or not a jaxmnist checkpoint ({error})") from error
    if payload["version"] == 2 and config.val_split and config.seed != 0:
        raise CheckpointError(
            f"{path}: cannot resume, its `val_split` images were held out by `seed`={config.seed}, and this "
            "jaxmnist holds out the same images for every seed: start the run again, in an empty checkpoint folder"
        )
    return config, payload


def tree_difference(saved: Any, template: Any) -> str | None:
    """How two state dicts differ, in words: the first name only one of them has, else every shape that
    differs; None when their names and shapes agree.

    Example:
        >>> tree_difference({"Dense_0": {"kernel": np.zeros((2, 3))}}, {"Conv_0": {"kernel": np.zeros((2, 3))}})
        'Dense_0/kernel is in the file, not in this run (which has Conv_0/kernel)'
    """
    saved_leaves = traverse_util.flatten_dict(saved, sep="/") if isinstance(saved, dict) and saved else {}
    template_leaves = traverse_util.flatten_dict(template, sep="/") if isinstance(template, dict) and template else {}
    for name in sorted(saved_leaves.keys() - template_leaves.keys()):
        others = ", ".join(sorted(template_leaves)[:3]) or "nothing"
        return f"{name} is in the file, not in this run (which has {others})"
    for name in sorted(template_leaves.keys() - saved_leaves.keys()):
        return f"this run has {name}, the file does not"
    reshaped = [
        f"{name} is {np.shape(saved_leaves[name])} in the file, {np.shape(leaf)} in this run"
        for name, leaf in sorted(template_leaves.items())
        if np.shape(saved_leaves[name]) != np.shape(leaf)
    ]
    return "; ".join(reshaped) or None


def restore_progress(path: PathArg, config: TrainConfig | RunPlan, template: TrainState) -> Progress:
    """The progress saved in ``path``, checked against ``config`` (the settings or their plan: the settings
    that change the math must match) and restored onto ``template``, the run's own initial state
    (``jaxmnist.runs.initial_state``).

    Raises:
        CheckpointError: another configuration, or the state of another model or optimizer (named).
        DamagedCheckpointError: the file cannot be read.
    """
    path, plan = Path(path), plan_of(config)
    saved_config, payload = read_checkpoint(path)
    differences = config_differences(saved_config, plan.config)
    if differences:
        each = "; ".join(
            f"`{field}` is {_shown(saved)} in the checkpoint but {_shown(current)} now"
            for field, saved, current in differences
        )
        raise CheckpointError(f"{path}: cannot resume, {each}")
    template_dict = serialization.to_state_dict(template)
    for part, owner in (("params", "model"), ("collections", "model"), ("opt_state", "optimizer")):
        difference = tree_difference(payload.get("state", {}).get(part), template_dict.get(part))
        if difference is not None:
            raise CheckpointError(f"{path}: a checkpoint of another {owner} ({part}: {difference})")
    try:
        state = serialization.from_state_dict(template, payload["state"])
        saved_key = np.asarray(payload["data_key"])
        if not np.array_equal(saved_key, np.asarray(jax.random.key_data(run_keys(plan.first_run.seed)[1]))):
            raise ValueError("its RNG state does not match its seed")
        progress = Progress(
            state=jax.device_put(state),
            epoch=int(payload["epoch"]),
            position=int(payload["position"]),
            step_losses=np.asarray(payload["step_losses"]),
            step_accuracies=np.asarray(payload["step_accuracies"]),
            step_metrics={name: np.asarray(values) for name, values in (payload.get("step_metrics") or {}).items()},
            history=tuple(EpochResult(**values) for values in json.loads(payload.get("results", "[]"))),
            diverged={int(row): where for row, where in json.loads(payload.get("diverged", "{}")).items()},
        )
    except (KeyError, ValueError, TypeError) as error:
        raise DamagedCheckpointError(f"{path}: damaged checkpoint ({error})") from error
    return progress


def resume(directory: PathArg, config: TrainConfig | RunPlan, template: TrainState
           ) -> tuple[Restored | None, list[str]]:  # fmt: skip
    """The newest intact checkpoint in ``directory`` restored onto ``template`` (the run's initial state),
    and a line for each newer one that is damaged.

    Stray temporary files of interrupted writes are removed. Returns ``(None, [])`` when the folder holds
    no checkpoint (or does not exist): there is nothing to continue.

    Raises:
        CheckpointError: every checkpoint is damaged, or one is of another configuration.
    """
    directory, plan = Path(directory), plan_of(config)
    remove_temporary_files(directory, "ckpt-")
    damaged = []
    for path in reversed(checkpoint_paths(directory)):
        try:
            return Restored(path, restore_progress(path, plan, template)), damaged
        except DamagedCheckpointError as error:
            damaged.append(str(error))
    if damaged:
        raise CheckpointError(f"{directory}: none of its {len(damaged)} checkpoint(s) is intact; newest: {damaged[0]}")
    return None, damaged


PARAMS_FORMAT = "jaxmnist-params"
PARAMS_VERSION = 2  # 2: the model's carried collections and its input shape; version 1 files still load


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """A trained model as a parameters file holds it: enough for ``jaxmnist.predict`` to rebuild and run it.

    Attributes:
        config: the run's settings (``config.model`` names a model of the user's; None: the lesson's MLP).
        params: the parameters, nested dicts of arrays (a leading seed axis when ``config.seeds`` > 1).
        collections: the carried collections, e.g. BatchNorm's ``batch_stats`` (same layout).
        image_shape: the shape of one input image the model was trained on.
        diverged: the runs of a grid that diverged in training (positions along the leading axis).
    """

    config: TrainConfig
    params: Any
    collections: Any
    image_shape: tuple[int, ...]
    diverged: tuple[int, ...] = ()


def params_file_bytes(
    config: TrainConfig,
    params: Any,
    collections: Any = None,
    image_shape: tuple[int, ...] = (28, 28),
    diverged: Sequence[int] = (),
) -> bytes:
    """The content of a parameters file for ``jaxmnist.predict``: msgpack (``flax.serialization``) of
    ``{"format": "jaxmnist-params", "version": 2, "config": <TrainConfig as JSON>, "params": ...,
    "collections": ..., "image_shape": [...], "diverged": [...]}`` (``diverged``: a grid's runs that
    diverged, which predictions leave out)."""
    payload = {
        "format": PARAMS_FORMAT,
        "version": PARAMS_VERSION,
        "config": json.dumps(config_to_dict(config)),
        "params": params,
        "collections": collections or {},
        "image_shape": list(image_shape),
        "diverged": json.dumps(sorted(diverged)),
    }
    return serialization.msgpack_serialize(jax.device_get(payload))


def save_params(
    path: PathArg, config: TrainConfig, params: Any, collections: Any = None, image_shape: tuple[int, ...] = (28, 28)
) -> Path:
    """Writes ``params_file_bytes`` to ``path`` atomically and returns it as a ``Path``."""
    path = Path(path)
    write_atomically(path, params_file_bytes(config, params, collections, image_shape))
    return path


def load_saved_model(path: PathArg) -> SavedModel:
    """Reads a parameters file written by ``save_params`` (``python -m jaxmnist.train --save FILE``).

    Raises:
        CheckpointError: the file cannot be read, or is not such a file.
    """
    path = Path(path)
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
        if not isinstance(payload, dict) or payload.get("format") != PARAMS_FORMAT:
            raise ValueError(f"format {payload.get('format') if isinstance(payload, dict) else None!r}")
        saved = SavedModel(
            config=config_from_dict(json.loads(payload["config"])),
            params=payload["params"],
            collections=payload.get("collections") or {},
            image_shape=tuple(int(size) for size in payload.get("image_shape", (28, 28))),
            diverged=tuple(json.loads(payload.get("diverged", "[]"))),
        )
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror or error})") from error
    except Exception as error:  # msgpack, json and our own checks raise assorted types
        raise CheckpointError(f"{path}: not a jaxmnist parameters file written by --save ({error})") from error
    return saved


def load_params(path: PathArg) -> tuple[TrainConfig, Any]:
    """The settings and parameters of a parameters file (``load_saved_model`` has the rest).

    Args:
        path: the file, as a ``str`` or any path-like object.

    Returns:
        ``(config, params)``: the ``TrainConfig`` of the run that wrote it, and its parameters as nested
        dicts of numpy arrays (``{"Dense_0": {"kernel": ..., "bias": ...}, ...}``), with a leading seed
        axis when ``config.seeds`` > 1.

    Raises:
        CheckpointError: the file cannot be read, or is not such a file.

    Example:
        >>> import tempfile, jax
        >>> from jaxmnist import create_train_state
        >>> path = tempfile.mkdtemp() + "/params.msgpack"
        >>> _ = save_params(path, TrainConfig(), create_train_state(jax.random.key(0)).params)
        >>> config, params = load_params(path)
        >>> config.hidden_sizes, params["Dense_0"]["kernel"].shape
        ((128, 64), (784, 128))
    """
    saved = load_saved_model(path)
    return saved.config, saved.params
