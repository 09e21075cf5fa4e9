"""The plan of runs: built from the settings once, and what every part of a run reads the runs from."""

from __future__ import annotations

import collections
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxmnist import config as config_module
from jaxmnist.commands.train import main
from jaxmnist.config import TrainConfig
from jaxmnist.loop import fit
from jaxmnist.plan import RunPlan, epoch_key, plan_of, run_keys

from conftest import make_digits

GRID = TrainConfig(learning_rate=(0.05, 0.1), momentum=(0.0, 0.9), optimizer="momentum", seeds=2, epochs=2,
                   batch_size=32)  # fmt: skip


def test_the_plan_lists_rows_by_the_first_setting_slowest_then_seeds_with_their_own_keys():
    plan = RunPlan.of(GRID)
    expected = [(lr, momentum, seed) for lr in (0.05, 0.1) for momentum in (0.0, 0.9) for seed in (0, 1)]
    assert [(run.values["learning_rate"], run.values["momentum"], run.seed) for run in plan.runs] == expected
    assert [run.row for run in plan.runs] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert plan.num_runs == 8 and plan.stacked and plan.swept == {"learning_rate": (0.05, 0.1), "momentum": (0.0, 0.9)}
    assert plan.row_config(3).learning_rate == 0.1 and plan.row_config(3).momentum == 0.9
    # Each run's keys are those of its seed alone: the same shuffle whichever grid it is in.
    keys = jax.random.key_data(plan.epoch_keys(2))
    for key, run in zip(keys, plan.runs, strict=True):
        np.testing.assert_array_equal(key, jax.random.key_data(epoch_key(run_keys(run.seed)[1], 2)))
    single = RunPlan.of(TrainConfig(seed=5))
    assert not single.stacked and single.rows == ({},) and [run.seed for run in single.runs] == [5]
    assert plan_of(plan) is plan
    with pytest.raises(TypeError, match="`config` must be a TrainConfig or a RunPlan, got dict"):
        plan_of({"seeds": 2})


def _calls_into_the_settings_grid(action) -> collections.Counter:
    """How often ``action()`` enters the functions of ``jaxmnist.config`` that derive a grid from the settings."""
    watched = {function.__code__: name for name in ("grid_rows", "swept_settings", "num_runs")
               for function in [getattr(config_module, name)]}  # fmt: skip
    calls = collections.Counter()

    def profile(frame, event, _):
        if event == "call" and frame.f_code in watched:
            calls[watched[frame.f_code]] += 1

    sys.setprofile(profile)
    threading.setprofile(profile)  # the command trains in a thread of its own
    try:
        action()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return calls


def test_one_fit_of_a_grid_reads_its_runs_from_the_settings_once():
    """Programs, initial states, divergence checks and results all receive the plan ``fit`` builds once."""
    data = make_digits(96, seed=3)
    calls = _calls_into_the_settings_grid(lambda: list(fit(GRID, data, data, steps_per_call=2)))
    assert calls == {"grid_rows": 1, "swept_settings": 2}  # RunPlan.of: the rows, and the axes


@pytest.mark.slow
def test_the_train_command_reads_its_runs_from_the_settings_once(tiny_mnist_dir: Path, tmp_path: Path):
    """The command's header, checkpoints, resume, reports and TensorBoard folders share one plan too."""
    pytest.importorskip("tensorboardX", reason="pip install 'jaxmnist[tensorboard]'")
    flags = ["--data-dir", str(tiny_mnist_dir), "--no-verify", "--no-compile-cache", "--epochs", "1",
             "--batch-size", "64", "--lr", "0.05,0.1", "--seeds", "2", "--checkpoint-dir", str(tmp_path / "ck"),
             "--checkpoint-every", "2", "--metrics-out", str(tmp_path / "m.jsonl"), "--tensorboard",
             str(tmp_path / "tb"), "--resume"]  # fmt: skip
    calls = _calls_into_the_settings_grid(lambda: main(flags))
    assert calls["grid_rows"] == 1 and calls["num_runs"] == 0
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 4
