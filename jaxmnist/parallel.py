"""Data parallelism with ``jax.sharding``: a 1-D mesh, replicated state, batches split along ``batch``.

Under ``jax.jit`` XLA partitions each step from these annotations alone: every device gathers and
trains on its slice of the batch, and the gradient mean becomes an all-reduce. A batch that does not
divide by the device count is padded with masked slots, so the loss and gradients stay those of one
device (a model with carried statistics such as BatchNorm is refused such a batch: the statistics would
see the padding).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


class DeviceError(ValueError):
    """The devices asked for are not there."""


def make_mesh(num_devices: int | None = None, platform: str | None = None) -> Mesh:
    """A 1-D ``batch`` mesh over the first ``num_devices`` devices of ``platform`` (default: all, default platform)."""
    try:
        devices = jax.devices(platform)
    except RuntimeError as error:
        raise DeviceError(f"`platform`={platform}: no such backend here ({str(error).splitlines()[0]})") from error
    count = len(devices) if num_devices is None else num_devices
    if count > len(devices):
        hint = (
            " (for CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N)"
            if devices[0].platform == "cpu"
            else ""
        )
        raise DeviceError(f"`num_devices`={count}: only {len(devices)} {devices[0].platform} device(s) here{hint}")
    # Auto axes: XLA propagates the batch sharding from the annotations (jit's automatic partitioning).
    return jax.make_mesh((count,), (BATCH_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:count])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of ``tree`` whole on every device of ``mesh`` (also across processes)."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), tree)


def runs_sharded(mesh: Mesh, runs: int) -> NamedSharding:
    """The sharding of ``runs`` runs' arrays split along their leading (run) axis over ``mesh``."""
    if runs % mesh.size:
        raise DeviceError(f"{runs} runs (grid rows × `seeds`) do not divide evenly over `num_devices`={mesh.size}")
    return batch_sharded(mesh)


def shard_runs(tree: Any, mesh: Mesh) -> Any:
    """Splits the leading (run) axis of every array of ``tree`` over the devices of ``mesh``."""
    return jax.device_put(tree, runs_sharded(mesh, jax.tree.leaves(tree)[0].shape[0]))


def runs_devices(runs: int, available: int) -> int:
    """How many devices ``runs`` whole runs spread over: the most of ``available`` that divides them evenly.

    Example:
        >>> runs_devices(16, 2), runs_devices(6, 4), runs_devices(7, 2)
        (2, 3, 1)
    """
    return max(count for count in range(1, available + 1) if runs % count == 0)


def padded_batch_width(batch_size: int, mesh: Mesh | None) -> int:
    """The batch rounded up to a multiple of the device count (64 on 3 devices: 66, two slots masked)."""
    devices = 1 if mesh is None else mesh.size
    return -(-batch_size // devices) * devices


def shard_batch(batch: dict[str, jax.Array], mesh: Mesh | None) -> dict[str, jax.Array]:
    """Inside ``jit``: asks XLA to split the batch's first axis over the mesh."""
    if mesh is None:
        return batch
    return jax.lax.with_sharding_constraint(batch, batch_sharded(mesh))
