"""The plan of runs: every run the settings train together (grid rows × seeds), with their values, seeds
and keys, derived from the settings once.

``fit`` builds it (in ``jaxmnist.runs.build_run``) or takes the caller's, and hands it on: the initial
states, the compiled programs, the checkpoints and the command's reports read the runs from the plan,
never from the settings again.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxmnist.config import TrainConfig, grid_rows, swept_settings


@dataclasses.dataclass(frozen=True)
class GridRun:
    """One of the runs trained together: its grid row's values (``{}`` without a grid) and its seed."""

    values: dict[str, float]
    seed: int
    row: int = 0


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """The initialization key and the data-order key of a run, both derived from its seed."""
    init_key, data_key = jax.random.split(jax.random.key(seed))
    return init_key, data_key


def epoch_key(data_key: jax.Array, epoch: int) -> jax.Array:
    """The key of one epoch's shuffle (epochs count from 1): reproducible without replaying earlier ones."""
    return jax.random.fold_in(data_key, epoch)


@dataclasses.dataclass(frozen=True, eq=False)
class RunPlan:
    """Every run of ``config``, in the order of every run axis (states, metrics, results, checkpoints).

    Attributes:
        config: the settings.
        swept: the settings given as lists of values, in field order: the grid's axes (``{}``: no grid).
        rows: every combination of their values, the first setting varying slowest (``({},)``: no grid).

    ``runs`` lists each row's ``config.seeds`` seeds, row after row, when first read: a grid too large to
    train is refused on ``num_runs`` and ``first_run`` before its runs are listed.

    Example:
        >>> plan = RunPlan.of(TrainConfig(learning_rate=(0.1, 0.2), seeds=2))
        >>> [(run.values["learning_rate"], run.seed) for run in plan.runs], plan.num_runs
        ([(0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)], 4)
    """

    config: TrainConfig
    swept: dict[str, tuple[float, ...]]
    rows: tuple[dict[str, float], ...]

    @classmethod
    def of(cls, config: TrainConfig) -> RunPlan:
        """The plan of ``config``'s runs."""
        return cls(config, swept_settings(config), tuple(grid_rows(config)))

    @functools.cached_property
    def runs(self) -> tuple[GridRun, ...]:
        seeds = range(self.config.seed, self.config.seed + self.config.seeds)
        return tuple(GridRun(values, seed, row) for row, values in enumerate(self.rows) for seed in seeds)

    @property
    def first_run(self) -> GridRun:
        return GridRun(self.rows[0], self.config.seed, 0)

    @property
    def num_runs(self) -> int:
        return len(self.rows) * self.config.seeds

    @property
    def stacked(self) -> bool:
        """Whether the runs' states, metrics and keys have a leading run axis: more than one run."""
        return self.num_runs > 1

    def row_config(self, row: int) -> TrainConfig:
        """The settings of grid row ``row``: ``config`` with the row's value of every swept setting."""
        return dataclasses.replace(self.config, **self.rows[row])

    @functools.cached_property
    def data_keys(self) -> tuple[jax.Array, ...]:
        """Every run's data-order key."""
        return tuple(run_keys(run.seed)[1] for run in self.runs)

    def epoch_keys(self, epoch: int) -> jax.Array:
        """The shuffle key of ``epoch`` for every run (stacked when there are several)."""
        keys = [epoch_key(data_key, epoch) for data_key in self.data_keys]
        return jnp.stack(keys) if self.stacked else keys[0]


def plan_of(settings: TrainConfig | RunPlan) -> RunPlan:
    """``settings`` as a plan: a ``RunPlan`` as it is, a ``TrainConfig``'s built from it.

    Example:
        >>> plan = RunPlan.of(TrainConfig())
        >>> plan_of(plan) is plan, plan_of(TrainConfig()).num_runs
        (True, 1)
    """
    if isinstance(settings, RunPlan):
        return settings
    if not isinstance(settings, TrainConfig):
        raise TypeError(f"`config` must be a TrainConfig or a RunPlan, got {type(settings).__name__}")
    return RunPlan.of(settings)
