"""Grids in one program: every (values, seed) of a grid is the run of those values and that seed alone."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from jaxmnist.checkpoint import load_params, restore_progress, save_checkpoint
from jaxmnist.commands import predict
from jaxmnist.config import SettingsError, TrainConfig, grid_rows, num_runs
from jaxmnist.data import load_mnist
from jaxmnist.loop import DivergenceError, fit
from jaxmnist.normalization import normalize
from jaxmnist.parallel import runs_devices
from jaxmnist.plan import RunPlan, run_keys
from jaxmnist.predict import predict_probabilities
from jaxmnist.programs import Programs
from jaxmnist.runs import RunError, build_run, estimated_bytes, initial_state
from jaxmnist.sweeps import best_configuration, final_results, summarize
from jaxmnist.train import LinenModel, create_train_state, evaluate
from jaxmnist.train.state import linen_sample

from conftest import kept, make_digits, template_state, tensorboard_events, train_exit_code, with_xla_flags


@pytest.fixture(scope="module")
def small_data():
    return make_digits(256, seed=8), make_digits(64, seed=9)


def _last(config: TrainConfig, data, **options):
    return list(fit(config, *data, **options))[-1]


def _alone(config: TrainConfig, values: dict, seed: int) -> TrainConfig:
    return dataclasses.replace(config, **values, seed=seed, seeds=1)


def _assert_each_run_is_its_run_alone(config: TrainConfig, data, rtol: float, **options) -> None:
    grid = _last(config, data, **options)
    assert len(grid.results) == num_runs(config)
    for row, result in enumerate(grid.results):
        alone = _last(_alone(config, result.swept, result.seed), data, **options)
        assert abs(result.train_loss - alone.result.train_loss) <= rtol * alone.result.train_loss
        assert abs(result.test_loss - alone.result.test_loss) <= rtol * alone.result.test_loss
        mine = jax.tree.map(lambda leaf, row=row: leaf[row], grid.state.params)
        chex.assert_trees_all_close(mine, alone.state.params, rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.slow
def test_each_run_of_a_rate_grid_is_its_run_alone_to_1e12_in_float64(small_data, monkeypatch):
    # Groups of 1 run: the 2 runs train one after another inside the program, as larger grids do.
    monkeypatch.setattr("jaxmnist.programs.CPU_RUNS_PER_GROUP", 1)
    with jax.enable_x64(True):
        config = TrainConfig(epochs=1, batch_size=32, dtype="float64", learning_rate=(0.01, 0.1), seed=3)
        _assert_each_run_is_its_run_alone(config, small_data, rtol=1e-12)


def test_each_run_of_a_rate_grid_is_its_run_alone_within_float32_rounding(small_data, monkeypatch):
    monkeypatch.setattr("jaxmnist.programs.CPU_RUNS_PER_GROUP", 1)  # as above; float64: the slow tier
    config = TrainConfig(epochs=1, batch_size=32, learning_rate=(0.01, 0.1), seed=3)
    _assert_each_run_is_its_run_alone(config, small_data, rtol=1e-5)


@pytest.mark.slow
def test_each_run_of_a_rate_and_momentum_grid_with_seeds_is_its_run_alone_to_1e12_in_float64(small_data, monkeypatch):
    monkeypatch.setattr("jaxmnist.programs.CPU_RUNS_PER_GROUP", 2)  # 8 runs in 4 groups
    with jax.enable_x64(True):
        config = TrainConfig(
            epochs=2, batch_size=32, dtype="float64", optimizer="momentum", learning_rate=(0.01, 0.1),
            momentum=(0.5, 0.9), seeds=2, seed=3,
        )  # fmt: skip
        _assert_each_run_is_its_run_alone(config, small_data, rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        {"dropout": (0.0, 0.3)},  # a rate of 0 in a grid draws masks that keep everything: the plain layer's numbers
        {"optimizer": "adamw", "weight_decay": (0.0, 0.1)},
        {"optimizer": "nesterov", "momentum": (0.5, 0.9), "schedule": "cosine"},
    ],
)
def test_each_run_of_a_dropout_decay_or_scheduled_momentum_grid_is_its_run_alone_in_float64(small_data, settings):
    # optax's Adam bias correction and cosine schedule mix Python floats with an int32 count in float64
    # mode, which strict promotion refuses: that is optax's code, not the grid's.
    promotion = "strict" if settings.get("optimizer") is None else "standard"
    with jax.enable_x64(True), jax.numpy_dtype_promotion(promotion):
        config = TrainConfig(epochs=1, batch_size=32, dtype="float64", seeds=2, **settings)
        _assert_each_run_is_its_run_alone(config, small_data, rtol=1e-12)


@pytest.mark.slow
def test_each_seed_of_a_grid_with_held_out_images_is_its_run_alone_in_float64(small_data):
    with jax.enable_x64(True):  # every seed holds out the same images as its run alone does
        config = TrainConfig(epochs=1, batch_size=32, dtype="float64", learning_rate=(0.01, 0.05), seeds=2, seed=3,
                             val_split=48)  # fmt: skip
        _assert_each_run_is_its_run_alone(config, small_data, rtol=1e-12)


@pytest.mark.slow
def test_each_run_of_a_dropout_grid_with_its_own_optimizer_is_its_run_alone_in_float64(small_data):
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):  # optax's Adam: see above
        config = TrainConfig(epochs=1, batch_size=32, dtype="float64", dropout=(0.0, 0.3), seeds=2)
        optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
        _assert_each_run_is_its_run_alone(config, small_data, rtol=1e-12, optimizer=optimizer)


def test_a_per_run_dropout_rate_rounds_as_the_constant_rate_alone_over_several_devices():
    # Over two devices XLA kept ``inputs / keep`` a division where the run alone multiplies by the rate's
    # reciprocal: a float32 dropout grid drifted from its runs alone by rounding, 1e-7 after one step.
    code = textwrap.dedent(
        """
        import flax.linen as nn, jax, jax.numpy as jnp
        from jax.sharding import PartitionSpec
        from jaxmnist.model import KeepProbabilityDropout
        from jaxmnist.parallel import BATCH_AXIS, make_mesh
        runs = 4
        inputs, cotangents = (jax.random.normal(jax.random.key(seed), (runs, 64, 128)) for seed in (0, 1))
        keys = jax.random.split(jax.random.key(2), runs)

        def with_gradient(layer):
            def call(x, cotangent, key, *keep):
                out, vjp = jax.vjp(lambda x: layer(x, key, *keep), x)
                return out, vjp(cotangent)[0]
            return call

        per_run = with_gradient(lambda x, key, keep: KeepProbabilityDropout().apply({}, x, keep, False,
                                                                                  rngs={"dropout": key}))
        alone = jax.jit(with_gradient(lambda x, key: nn.Dropout(0.2).apply({}, x, False, rngs={"dropout": key})))
        spec = PartitionSpec(BATCH_AXIS)
        grid = jax.jit(jax.shard_map(jax.vmap(per_run), mesh=make_mesh(2), in_specs=spec, out_specs=spec))
        outputs, gradients = grid(inputs, cotangents, keys, jnp.full(runs, 0.8))
        for run in range(runs):
            output, gradient = alone(inputs[run], cotangents[run], keys[run])
            print(int((outputs[run] != output).sum()), int((gradients[run] != gradient).sum()))
        """
    )
    env = with_xla_flags("--xla_force_host_platform_device_count=2")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0"] * 8  # outputs and gradients of every run equal to the bit


@pytest.mark.slow
def test_each_run_of_a_rate_grid_matches_its_run_alone_over_the_first_100_steps_in_float32():
    data = make_digits(6400, seed=10), make_digits(64, seed=11)
    config = TrainConfig(epochs=1, learning_rate=(0.003, 0.03), seed=1)
    grid = _last(config, data)
    for row, run in enumerate(RunPlan.of(config).runs):
        alone = _last(_alone(config, run.values, run.seed), data)
        relative = np.abs(grid.step_losses[row] - alone.step_losses) / alone.step_losses
        assert grid.step_losses.shape == (2, 100) and relative.max() <= 1e-5


def test_each_run_of_a_grid_is_evaluated_to_the_bit_as_alone(small_data):
    config = TrainConfig(batch_size=32, learning_rate=(0.01, 0.03, 0.1, 0.3), seeds=2, loop="step")
    state = initial_state(build_run(config, (28, 28), 256))
    (train_images, train_labels), (images, labels) = small_data[0], make_digits(1000, seed=9)
    programs = Programs(RunPlan.of(config), state, jnp.asarray(train_images), jnp.asarray(train_labels), 1, mesh=None)
    normalized = normalize(jnp.asarray(images), jnp.float32)
    grid = programs.evaluate(state, normalized, jnp.asarray(labels))
    for row in range(num_runs(config)):
        alone = evaluate(jax.tree.map(lambda leaf, row=row: leaf[row], state), normalized, jnp.asarray(labels))
        chex.assert_trees_all_equal(jax.tree.map(lambda metric, row=row: metric[row], grid), alone)


def test_an_accelerator_evaluates_as_many_runs_at_once_as_half_its_free_memory_holds(small_data, monkeypatch):
    import jaxmnist.programs
    import jaxmnist.runs

    config = TrainConfig(batch_size=32, learning_rate=(0.01, 0.03, 0.1, 0.3), seeds=2, loop="step")
    state = initial_state(build_run(config, (28, 28), 256))
    (train_images, train_labels), (images, labels) = small_data[0], make_digits(1000, seed=9)
    programs = Programs(RunPlan.of(config), state, jnp.asarray(train_images), jnp.asarray(train_labels), 1, mesh=None)
    normalized = normalize(jnp.asarray(images), jnp.float32)
    programs.on_cpu = False  # as on an accelerator, where runs are vmapped
    one_run = jax.tree.map(lambda leaf: leaf[0], state)
    per_run = jaxmnist.runs.evaluation_bytes(one_run, normalized)
    assert per_run >= 1000 * (128 + 64) * 4  # at least the hidden activations of every image
    monkeypatch.setattr(jaxmnist.programs, "available_bytes", lambda: 2 * 3 * per_run + 1)
    assert programs.runs_evaluated_together(state, normalized) == 3  # groups of 2 then: 3 does not divide 8
    grid = programs.evaluate(state, normalized, jnp.asarray(labels))
    for row in range(num_runs(config)):
        alone = evaluate(jax.tree.map(lambda leaf, row=row: leaf[row], state), normalized, jnp.asarray(labels))
        chex.assert_trees_all_close(jax.tree.map(lambda metric, row=row: metric[row], grid), alone, rtol=1e-6)
    monkeypatch.setattr(jaxmnist.programs, "available_bytes", lambda: None)
    assert programs.runs_evaluated_together(state, normalized) is None  # unknown: all at once, as before


def test_the_runs_are_every_combination_of_the_values_times_the_seeds():
    config = TrainConfig(optimizer="momentum", learning_rate=(0.1, 0.2, 0.3), momentum=(0.5, 0.9), seeds=2, seed=7)
    runs = RunPlan.of(config).runs
    assert num_runs(config) == len(runs) == 12
    assert grid_rows(config)[:3] == [
        {"learning_rate": 0.1, "momentum": 0.5},
        {"learning_rate": 0.1, "momentum": 0.9},
        {"learning_rate": 0.2, "momentum": 0.5},
    ]
    assert [(run.values["momentum"], run.seed) for run in runs[:4]] == [(0.5, 7), (0.5, 8), (0.9, 7), (0.9, 8)]


@pytest.mark.slow
def test_every_run_holds_its_own_hyperparameters_in_its_state():
    config = TrainConfig(optimizer="momentum", learning_rate=(0.1, 0.2), momentum=(0.5, 0.9), dropout=(0.0, 0.25))
    state = initial_state(build_run(config, (28, 28), 640))
    hyperparameters = state.opt_state.hyperparams
    expected = [(run.values["learning_rate"], run.values["momentum"]) for run in RunPlan.of(config).runs]
    np.testing.assert_allclose(np.stack([hyperparameters["learning_rate"], hyperparameters["momentum"]], 1), expected)
    keep = state.collections["hyperparameters"]["dropout_keep_probability"]
    np.testing.assert_allclose(keep, [1 - run.values["dropout"] for run in RunPlan.of(config).runs])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"learning_rate": (0.1, 0.1)}, "`learning_rate` lists 0.1 twice"),
        ({"learning_rate": (0.1, -1.0)}, "`learning_rate` must be a finite number > 0, got -1.0"),
        ({"learning_rate": ()}, "`learning_rate` lists no values"),
        ({"dropout": (0.5, 1.0)}, "`dropout` must be in [0, 1), got 1.0"),
        ({"momentum": (0.5, 0.9)}, "`momentum` is for optimizer 'momentum' or 'nesterov'"),
        ({"learning_rate": (0.1, 0.2), "schedule": "cosine"}, "run each rate as its own run"),
        ({"learning_rate": (0.1, 0.2), "val_split": 10, "early_stopping": 2}, "`early_stopping` stops one run"),
        ({"learning_rate": [0.1, 0.2]}, "`learning_rate` takes a number, or a tuple of numbers for a grid; got a list"),
        ({"learning_rate": np.float32(0.5)}, "`learning_rate` takes a Python number; got float32 0.5: use float"),
        ({"epochs": np.int64(2)}, "`epochs` takes a Python number; got int64 2: use int(value)"),
        ({"learning_rate": jnp.float32(0.5)}, "`learning_rate` takes a Python number; got float32 0.5: use float"),
        (
            {"batch_size": (32, 64)},
            "`batch_size` takes one value: tuples (a grid) are for `learning_rate`, "
            "`momentum`, `weight_decay`, `dropout` (several seeds: `seeds`); run each `batch_size` as its own run",
        ),
        ({"learning_rate": (1e-46, 0.1)}, "`learning_rate`=1e-46 is outside float32's range (1.17549e-38 to "),
        (
            {"learning_rate": 1e39},
            "`learning_rate`=1e+39 is outside float32's range (1.17549e-38 to 3.40282e+38): it would train as inf",
        ),
        (
            {"dropout": (0.0, 1e-40)},
            "`dropout`=1e-40 is outside float32's range (1.17549e-38 to 3.40282e+38): it would train with lost digits",
        ),
        ({"learning_rate": 1e-320, "dtype": "float64"}, "`learning_rate`=9.99989e-321 is outside float64's range"),
    ],
)
def test_bad_grids_are_refused_naming_the_setting(settings, message):
    with pytest.raises(SettingsError) as error:
        TrainConfig(**settings)
    assert message in str(error.value)


def test_a_grid_of_the_settings_optimizer_or_model_is_refused_with_another_given(small_data):
    with pytest.raises(RunError, match="`learning_rate` lists values for the optimizer the settings describe"):
        list(fit(TrainConfig(learning_rate=(0.1, 0.2)), *small_data, optimizer=optax.adam(1e-3)))
    from jaxmnist.model import MLP

    with pytest.raises(RunError, match="`dropout` lists rates for the lesson's MLP, and `model` is given"):
        list(fit(TrainConfig(dropout=(0.1, 0.2)), *small_data, model=MLP()))


def test_a_grid_too_large_for_memory_is_refused_with_the_figure_before_building_its_runs(monkeypatch):
    config = TrainConfig(learning_rate=(0.1, 0.2), seeds=2**31)  # 2**32 runs: listing them would take hours
    run = build_run(config, (28, 28), 60_000)
    monkeypatch.setattr("jaxmnist.runs.available_bytes", lambda: 8 * 2**30)
    with pytest.raises(RunError, match=r"^4,294,967,296 runs in one program need about [\d.]+ GiB, more than the 8.0"):
        initial_state(run)


def test_the_memory_estimate_grows_with_the_runs_and_covers_the_state():
    config = TrainConfig(learning_rate=(0.1, 0.2), seeds=8)
    state = initial_state(build_run(TrainConfig(), (28, 28), 60_000))
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
    estimate = estimated_bytes(RunPlan.of(config), state, 60_000)
    assert estimate == 2 * estimated_bytes(RunPlan.of(dataclasses.replace(config, seeds=4)), state, 60_000)
    assert 16 * 3 * state_bytes < estimate < 16 * 20 * state_bytes


class _ConvNet(nn.Module):
    """Convolutions whose activations dwarf their parameters: what the memory estimate must see."""

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = nn.Conv(32, (3, 3))(images.reshape((images.shape[0], 28, 28, 1)))
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [64, 256])
def test_the_memory_estimate_of_a_step_is_near_xla_s_own_for_a_convolutional_model(batch_size):
    from jaxmnist.runs import _step_bytes
    from jaxmnist.train import train_step

    config = TrainConfig(batch_size=batch_size)
    state = initial_state(build_run(config, (28, 28), 60_000, model=_ConvNet()))
    batch = {"image": jnp.zeros((batch_size, 28, 28)), "label": jnp.zeros(batch_size, jnp.int32),
             "mask": jnp.ones(batch_size, bool)}  # fmt: skip
    compiled = jax.jit(train_step).lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    assert 0.8 * compiled < _step_bytes(config, state) < 1.5 * compiled


@pytest.mark.slow
def test_the_summary_picks_the_best_configuration_on_validation_loss_when_there_is_one(small_data):
    config = TrainConfig(epochs=2, batch_size=32, learning_rate=(0.001, 0.1), seeds=2, val_split=64)
    history = _last(config, small_data).history
    summaries = summarize(final_results(history))
    assert [summary.values for summary in summaries] == [{"learning_rate": 0.001}, {"learning_rate": 0.1}]
    slow = [result.val_loss for result in history if result.epoch == 2 and result.swept["learning_rate"] == 0.001]
    assert summaries[0].seeds == (0, 1) and summaries[0].val_loss.mean == pytest.approx(np.mean(slow))
    assert summaries[0].val_loss.std == pytest.approx(np.std(slow))
    best, criterion = best_configuration(summaries)
    assert criterion == "val_loss" and best.values == {"learning_rate": 0.1}
    without_validation = [dataclasses.replace(result, val_loss=None) for result in final_results(history)]
    assert best_configuration(summarize(without_validation))[1] == "train_loss"


@pytest.mark.slow
def test_resuming_a_grid_inside_an_epoch_is_bit_exact(small_data, tmp_path: Path):
    config = TrainConfig(epochs=2, batch_size=32, learning_rate=(0.01, 0.05), dropout=(0.0, 0.2))
    whole = kept(fit(config, *small_data, steps_per_call=3))
    path = save_checkpoint(tmp_path, config, whole[3])  # inside epoch 2
    start = restore_progress(path, config, template_state(config, 256))
    resumed = list(fit(config, *small_data, start=start, steps_per_call=3))
    chex.assert_trees_all_equal(resumed[-1].state.params, whole[-1].state.params)
    assert [(r.swept, r.seed, r.train_loss) for r in resumed[-1].history] == [
        (r.swept, r.seed, r.train_loss) for r in whole[-1].history
    ]


@pytest.mark.slow
def test_a_grid_whose_every_run_diverged_stops_naming_the_values_and_seed(small_data):
    with pytest.raises(DivergenceError, match=r"the loss of `learning_rate`=5000, seed 0 became") as error:
        list(fit(TrainConfig(epochs=1, batch_size=32, learning_rate=(5e3, 1e4)), *small_data))
    assert "(and of every other run: `learning_rate`=10000, seed 0)" in str(error.value)
    many = TrainConfig(epochs=1, batch_size=32, learning_rate=(5e3, 1e4), seeds=3)
    with pytest.raises(DivergenceError, match=r"; `learning_rate`=10000, seed 0 and 2 more\); try a lower"):
        list(fit(many, *small_data))


def test_a_run_whose_last_update_left_non_finite_parameters_diverged_and_is_never_best(small_data):
    # One step per epoch: its batch loss is taken before the update, so only the evaluation sees the damage.
    images = small_data[0][0]
    config = TrainConfig(epochs=1, batch_size=len(images) - 32, val_split=32, learning_rate=(1e30, 0.01))
    last = list(fit(config, *small_data))[-1]
    assert last.diverged == {0: "the end of epoch 1 (test loss nan)"}
    summaries = summarize(final_results(last.history))
    assert best_configuration(summaries)[0].values == {"learning_rate": 0.01}
    with pytest.raises(DivergenceError, match=r"the test loss became nan at the end of epoch 1; try a lower"):
        list(fit(dataclasses.replace(config, learning_rate=1e30), *small_data))


@pytest.mark.slow
def test_a_grid_goes_on_without_its_diverged_runs_each_other_run_as_alone(small_data, tmp_path: Path):
    config = TrainConfig(epochs=2, batch_size=32, learning_rate=(0.05, 1e4), seeds=2)
    steps = []
    for progress in fit(config, *small_data):
        if not steps:  # saved now: the next call donates this state
            save_checkpoint(tmp_path, config, progress)
        steps.append(progress)
    first, last = steps[0], steps[-1]
    assert set(first.diverged) == {2, 3}
    assert all(re.fullmatch(r"epoch 1, step \d+ \(loss \S+\)", where) for where in first.diverged.values())
    assert [result.diverged is not None for result in last.results] == [False, False, True, True]
    for result in last.results[:2]:
        alone = _last(_alone(config, result.swept, result.seed), small_data).result
        assert result.train_loss == pytest.approx(alone.train_loss, rel=1e-5)
        assert result.test_loss == pytest.approx(alone.test_loss, rel=1e-5)
    summaries = summarize(final_results(last.history))
    assert summaries[1].diverged == (0, 1) and summaries[1].train_loss is None
    assert best_configuration(summaries)[0].values == {"learning_rate": 0.05}
    # Where each run diverged survives a resume.
    restored = restore_progress(sorted(tmp_path.iterdir())[-1], config, template_state(config, len(small_data[0][0])))
    assert restored.diverged == first.diverged
    assert [result.diverged for result in restored.history] == [result.diverged for result in first.history]


def test_the_command_warns_of_a_diverged_run_and_its_table_says_so(tiny_mnist_dir: Path, tmp_path: Path, capsys):
    pytest.importorskip("tensorboardX", reason="pip install 'jaxmnist[tensorboard]'")

    metrics, params = tmp_path / "m.jsonl", tmp_path / "p.msgpack"
    flags = ["--epochs", "1", "--batch-size", "32", "--lr", "0.05,1e4", "--metrics-out", str(metrics),
             "--tensorboard", str(tmp_path / "tb"), "--tensorboard-every", "1", "--save", str(params)]  # fmt: skip
    assert train_exit_code(tiny_mnist_dir, *flags) == 0
    said = capsys.readouterr()
    assert re.fullmatch(r"warning: lr 10000, seed 0 diverged at epoch 1, step \d+ \(loss \S+\); the grid's other "
                        r"runs go on\n", said.err)  # fmt: skip
    table = said.out[said.out.index("after 1 epoch") :].splitlines()
    assert table[2].split()[:3] == ["lr", "0.05", "*"] and table[3].split()[2:] == ["diverged", "(seed", "0)"]
    records = [json.loads(line, parse_constant=pytest.fail) for line in metrics.read_text().splitlines()]
    assert [(record["diverged"] is None, record["train_loss"] is None) for record in records] == [
        (True, False), (False, True)
    ]  # fmt: skip
    # TensorBoard and predict leave the diverged run out, as the table does.
    diverged_tags = {value.tag for event in tensorboard_events(tmp_path / "tb" / "learning_rate=10000")
                     for value in event.summary.value}  # fmt: skip
    assert not any(tag.startswith(("epoch/", "hparam/", "batch/")) for tag in diverged_tags)
    Image.fromarray(make_digits(1, seed=5)[0][0]).save(tmp_path / "digit.png")
    assert predict.main(["--params", str(params), "--lr", "1e4", str(tmp_path / "digit.png")]) == 2
    assert "error: the runs chosen diverged in training" in capsys.readouterr().err
    assert predict.main(["--params", str(params), str(tmp_path / "digit.png")]) == 2
    assert "give --lr (one of 0.05) to pick its runs" in capsys.readouterr().err  # the diverged 1e4 is no choice
    assert predict.main(["--params", str(params), "--lr", "0.05", str(tmp_path / "digit.png")]) == 0


def test_a_configuration_s_diverged_seeds_are_named_and_left_out_of_its_numbers():
    from jaxmnist.commands.reporting import grid_lines, grid_table
    from jaxmnist.loop import EpochResult

    config = TrainConfig(learning_rate=(0.01, 0.1), seeds=3, epochs=1)
    where, rows = "epoch 1, step 2 (loss 2e+03)", ((0.01, (1.0, 2.0, 3.0)), (0.1, (500.0, 0.5, 800.0)))
    results = tuple(
        EpochResult(1, loss, 0.8, 0.4, 0.9, 1.0, 0.0, 1e4, seed=seed, swept={"learning_rate": rate},
                    diverged=where if loss > 100 else None)
        for rate, losses in rows
        for seed, loss in enumerate(losses)
    )  # fmt: skip
    lines = grid_lines(results, config).splitlines()
    assert lines[2].split()[:5] == ["lr", "0.1", "train", "loss", "0.5000,"]  # the seed that did not diverge
    assert lines[2].endswith("(seeds 0, 2 of 3 diverged)")
    table = grid_table(results, config).splitlines()
    assert table[2].split()[2] == "*" and table[3].endswith("(seeds 0, 2 of 3 diverged: left out)")


@pytest.mark.slow
def test_predict_names_every_value_it_needs_to_pick_a_grid_s_runs():
    config = TrainConfig(optimizer="momentum", learning_rate=(0.01, 0.1), momentum=(0.5, 0.9))
    params = initial_state(build_run(config, (28, 28), 256)).params
    needed = r"give `learning_rate` \(one of 0.01, 0.1\) and `momentum` \(one of 0.5, 0.9\) to pick its runs"
    with pytest.raises(ValueError, match=needed):
        predict_probabilities(config, params, np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"give `momentum` \(one of 0.5, 0.9\) to pick"):
        predict_probabilities(config, params, np.zeros((1, 28, 28), np.uint8), values={"learning_rate": 0.1})


def test_predict_averages_a_configuration_s_seeds_or_takes_one(small_data):
    config = TrainConfig(epochs=1, batch_size=32, learning_rate=(0.01, 0.1), seeds=2)
    progress = _last(config, small_data)
    images = small_data[1][0][:5]
    each = [
        predict_probabilities(_alone(config, run.values, run.seed),
                              jax.tree.map(lambda leaf, row=row: leaf[row], progress.state.params), images)
        for row, run in enumerate(RunPlan.of(config).runs)
    ]  # fmt: skip
    chosen = predict_probabilities(config, progress.state.params, images, values={"learning_rate": 0.1})
    np.testing.assert_allclose(chosen, np.mean(each[2:], axis=0), rtol=1e-5)
    one = predict_probabilities(config, progress.state.params, images, seed=0, values={"learning_rate": 0.01})
    np.testing.assert_allclose(one, each[0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"give `learning_rate` \(one of 0.01, 0.1\)"):
        predict_probabilities(config, progress.state.params, images)
    with pytest.raises(ValueError, match=r"`learning_rate`=0.5 is not among the grid.s values"):
        predict_probabilities(config, progress.state.params, images, values={"learning_rate": 0.5})


def test_predict_offers_only_values_whose_runs_trained_given_the_values_named():
    from jaxmnist.predict import predict_probabilities

    config = TrainConfig(optimizer="momentum", learning_rate=(0.003, 10.0), momentum=(0.5, 0.9))
    runs = RunPlan.of(config).runs
    diverged = [row for row, run in enumerate(runs) if run.values["learning_rate"] == 10.0]
    diverged.append(
        next(row for row, run in enumerate(runs) if run.values == {"learning_rate": 0.003, "momentum": 0.9})
    )
    choose = partial(predict_probabilities, config, None, None, diverged=diverged)  # refused before any parameter
    with pytest.raises(ValueError, match=r"^every run with `learning_rate`=10 diverged in training"):
        choose(values={"learning_rate": 10.0})
    with pytest.raises(ValueError, match=r"give `momentum` \(one of 0.5\) to pick"):
        choose(values={"learning_rate": 0.003})
    with pytest.raises(ValueError, match=r"`learning_rate`=0.5 is not among the grid's values \(0.003\)$"):
        choose(values={"learning_rate": 0.5, "momentum": 0.5})
    # A seed given narrows the choices to the runs of that seed.
    seeds = TrainConfig(learning_rate=(0.01, 2.0), seeds=2)
    diverged = [
        row for row, run in enumerate(RunPlan.of(seeds).runs) if run.values["learning_rate"] == 2.0 and run.seed
    ]
    with pytest.raises(ValueError, match=r"give `learning_rate` \(one of 0.01\) to pick"):
        predict_probabilities(seeds, None, None, seed=1, diverged=diverged)
    with pytest.raises(ValueError, match=r"give `learning_rate` \(one of 0.01, 2\) to pick"):
        predict_probabilities(seeds, None, None, seed=0, diverged=diverged)


def test_the_command_prints_a_line_per_configuration_and_a_table_naming_the_best(small_mnist_dir: Path, tmp_path: Path,
                                                                                 capsys):  # fmt: skip
    metrics, params = tmp_path / "m.jsonl", tmp_path / "p.msgpack"
    code = train_exit_code(
        small_mnist_dir, "--epochs", "2", "--lr", "0.001,0.05", "--seeds", "2", "--metrics-out", str(metrics),
        "--save", str(params),
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "4 runs (2 configurations: 2 lr; 2 seeds (0..1)) in one program" in out.splitlines()[0]
    assert out.count("  lr 0.001  train loss ") == 2 and out.count("  lr 0.05   train loss ") == 2
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["epoch"], r["learning_rate"], r["seed"]) for r in records[:4]] == [
        (1, 0.001, 0), (1, 0.001, 1), (1, 0.05, 0), (1, 0.05, 1)
    ]  # fmt: skip
    final = {rate: np.mean([r["train_loss"] for r in records if r["epoch"] == 2 and r["learning_rate"] == rate])
             for rate in (0.001, 0.05)}  # fmt: skip
    best = min(final, key=final.get)
    table = out[out.index("after 2 epochs") :].splitlines()
    assert table[1].split() == ["configuration", "train", "loss", "test", "accuracy"]
    assert next(line for line in table if " * " in line).split()[:2] == ["lr", f"{best:g}"]
    assert table[-2].startswith(f"best: lr {best:g} (*), lowest mean final training loss")
    Image.fromarray(make_digits(1, seed=5)[0][0]).save(tmp_path / "digit.png")
    assert predict.main(["--params", str(params), "--lr", "0.05", "--seed", "1", str(tmp_path / "digit.png")]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["configuration --lr 0.05", "seed 1 of 2 seeds (0..1)"]
    assert predict.main(["--params", str(params), str(tmp_path / "digit.png")]) == 2
    assert "error: these parameters are of a grid: give --lr (one of 0.001, 0.05)" in capsys.readouterr().err


def test_a_scheduled_grid_s_epoch_line_shows_the_rate_its_runs_share():
    from jaxmnist.commands.reporting import grid_lines
    from jaxmnist.loop import EpochResult

    config = TrainConfig(optimizer="momentum", momentum=(0.5, 0.9), schedule="cosine", epochs=3)
    results = tuple(
        EpochResult(2, 0.5, 0.8, 0.4, 0.9, 1.0, 0.0, 1e4, seed=0, learning_rate=0.0015, swept={"momentum": momentum})
        for momentum in (0.5, 0.9)
    )
    assert grid_lines(results, config).splitlines()[0].startswith("epoch 2/3: 2 runs, lr 0.0015, 1.00 s")
    constant = dataclasses.replace(config, schedule="constant")
    assert grid_lines(results, constant).splitlines()[0].startswith("epoch 2/3: 2 runs, 1.00 s")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "0.1,abc"], "argument --lr: must be a finite number > 0, got 'abc'"),
        (["--lr", "0.1,0.1"], "--lr lists 0.1 twice"),
        (["--lr", "-1,0.1"], "argument --lr: must be a finite number > 0, got '-1'"),
        (["--momentum", "-.5", "--optimizer", "momentum"], "argument --momentum: must be a number in [0, 1)"),
        (["--dropout", "0.1,1.5"], "argument --dropout: must be a number in [0, 1), got '1.5'"),
        (["--batch-size", "32,64"], "argument --batch-size: takes one value: lists are for --lr, --momentum"),
        (["--epochs", "1,2"], "argument --epochs: takes one value"),
        (["--optimizer", "sgd,adam"], "argument --optimizer: takes one value"),
        (["--lr", "0.1,0.2", "--schedule", "cosine"], "--lr lists several values; with --schedule cosine"),
        (["--lr", "0.1,0.2", "--val-split", "10", "--save-best", "b.msgpack"], "--save-best: picks one epoch"),
        (["--lr", "0.1,"], "argument --lr: an empty item in the list '0.1,': give numbers between the commas"),
        (["--lr", "0.1,,0.2"], "argument --lr: an empty item in the list '0.1,,0.2'"),
        (
            ["--lr", "1e-46,0.1"],
            "--lr 1e-46 is outside float32's range (1.17549e-38 to 3.40282e+38): it would train as 0",
        ),
    ],
)
def test_bad_grid_flags_are_one_line_exit_2(tiny_mnist_dir: Path, capsys, flags, message):
    assert train_exit_code(tiny_mnist_dir, *flags) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


def test_a_large_grid_shows_its_best_few_each_epoch_and_one_seed_no_spread():
    from jaxmnist.commands.reporting import grid_lines
    from jaxmnist.loop import EpochResult

    rates = tuple(round(0.001 * (index + 1), 3) for index in range(10))
    config = TrainConfig(learning_rate=rates, epochs=1)
    results = tuple(
        EpochResult(1, 1.0 / rate, 0.8, 0.4, 0.9, 1.0, 0.0, 1e4, swept={"learning_rate": rate}) for rate in rates
    )
    lines = grid_lines(results, config).splitlines()
    assert lines[0].endswith("; seed 0")
    assert [line.split()[:2] for line in lines[1:4]] == [["lr", "0.01"], ["lr", "0.009"], ["lr", "0.008"]]
    assert "±" not in "".join(lines[1:4])
    assert lines[4].startswith("  ... and 7 more configurations (the best 3 by train loss shown")
    assert len(lines) == 5


def test_runs_that_do_not_divide_over_the_devices_are_refused_before_the_header(tiny_mnist_dir: Path):
    result = subprocess.run(
        [sys.executable, "-m", "jaxmnist.train", "--lr", "0.01,0.001,0.003", "--devices", "2", "--data-dir",
         str(tiny_mnist_dir), "--no-verify", "--no-compile-cache"],
        capture_output=True, text=True, timeout=300,
        env=with_xla_flags("--xla_force_host_platform_device_count=2"),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "error: 3 runs (grid rows × --seeds) do not divide evenly over --devices 2\n"


@pytest.mark.slow
def test_a_checkpoint_of_another_grid_is_refused(tiny_mnist_dir: Path, tmp_path: Path, capsys):
    common = ["--epochs", "1", "--checkpoint-dir", str(tmp_path)]
    assert train_exit_code(tiny_mnist_dir, *common, "--lr", "0.01,0.03") == 0
    assert train_exit_code(tiny_mnist_dir, *common, "--lr", "0.01,0.1", "--epochs", "2", "--resume") == 2
    assert "--lr is 0.01,0.03 in the checkpoint but 0.01,0.1 now" in capsys.readouterr().err
    dropout = ["--epochs", "1", "--checkpoint-dir", str(tmp_path / "dropout")]
    assert train_exit_code(tiny_mnist_dir, *dropout, "--dropout", "0,0.2") == 0
    assert train_exit_code(tiny_mnist_dir, *dropout, "--dropout", "0", "--epochs", "2", "--resume") == 2
    assert "--dropout is 0,0.2 in the checkpoint but 0 now" in capsys.readouterr().err  # a number as its flag takes it


@pytest.mark.slow
def test_the_command_spreads_a_grid_over_one_cpu_device_per_core_with_the_one_device_numbers(
    small_mnist_dir: Path, tmp_path: Path
):
    metrics = tmp_path / "m.jsonl"
    flags = ["--epochs", "1", "--batch-size", "32", "--lr", "0.01,0.05", "--seeds", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "jaxmnist.train", *flags, "--data-dir", str(small_mnist_dir), "--no-verify",
         "--no-compile-cache", "--metrics-out", str(metrics)],
        capture_output=True, text=True, timeout=300, env=with_xla_flags(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    devices = runs_devices(4, os.cpu_count() or 1)
    if devices > 1:
        assert f"on {devices} cpu (cpu) devices, {4 // devices} whole runs on each" in result.stdout
    data = [load_mnist(split, small_mnist_dir, verify=False) for split in ("train", "test")]
    config = TrainConfig(epochs=1, batch_size=32, learning_rate=(0.01, 0.05), seeds=2)
    alone = _last(config, data).results  # the library, one device
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["learning_rate"], r["seed"]) for r in records] == [(r.swept["learning_rate"], r.seed) for r in alone]
    np.testing.assert_allclose([r["train_loss"] for r in records], [r.train_loss for r in alone], rtol=1e-5)


@pytest.mark.slow
def test_one_run_on_each_device_trains_by_the_single_run_s_program_to_the_bit(small_mnist_dir: Path, tmp_path: Path):
    # A vmap of one run rounded differently from the run alone (float32 test loss 5e-2 apart after an epoch).
    metrics = tmp_path / "m.jsonl"
    flags = ["--epochs", "1", "--optimizer", "momentum", "--momentum", "0.9", "--lr", "0.05,0.01"]
    result = subprocess.run(
        [sys.executable, "-m", "jaxmnist.train", *flags, "--devices", "2", "--data-dir", str(small_mnist_dir),
         "--no-verify", "--no-compile-cache", "--metrics-out", str(metrics)],
        capture_output=True, text=True, timeout=300, env=with_xla_flags(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "on 2 cpu (cpu) devices, 1 whole run on each" in result.stdout
    data = [load_mnist(split, small_mnist_dir, verify=False) for split in ("train", "test")]
    config = TrainConfig(epochs=1, optimizer="momentum", momentum=0.9, learning_rate=(0.05, 0.01))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    for record, run in zip(records, RunPlan.of(config).runs, strict=True):
        alone = _last(_alone(config, run.values, run.seed), data).result
        assert (record["train_loss"], record["test_loss"]) == (alone.train_loss, alone.test_loss)


@pytest.mark.slow
def test_a_grid_writes_one_tensorboard_folder_per_configuration_and_one_plot_band_each(tiny_mnist_dir: Path,
                                                                                       tmp_path: Path):  # fmt: skip
    pytest.importorskip("tensorboardX", reason="pip install 'jaxmnist[tensorboard]'")

    flags = ["--epochs", "2", "--batch-size", "32", "--optimizer", "momentum", "--lr", "0.01,0.05", "--momentum",
             "0.5,0.9", "--seeds", "2", "--val-split", "60", "--tensorboard", str(tmp_path / "tb"),
             "--tensorboard-every", "2", "--plot", str(tmp_path / "grid.png")]  # fmt: skip
    assert train_exit_code(tiny_mnist_dir, *flags) == 0
    folders = sorted(path.name for path in (tmp_path / "tb").iterdir())
    assert folders == [f"learning_rate={rate},momentum={momentum}" for rate in (0.01, 0.05) for momentum in (0.5, 0.9)]
    for folder in folders:
        tags = {value.tag for event in tensorboard_events(tmp_path / "tb" / folder) for value in event.summary.value}
        assert {"epoch/val_loss", "epoch/val_loss_min", "epoch/train_loss_max", "batch/loss", "hparam/val_loss"} <= tags
    assert Image.open(tmp_path / "grid.png").size[0] > 0


def test_values_that_differ_past_six_digits_are_told_apart_in_labels_folders_and_messages(
    tiny_mnist_dir: Path, tmp_path: Path, capsys
):
    pytest.importorskip("tensorboardX", reason="pip install 'jaxmnist[tensorboard]'")
    flags = ["--epochs", "1", "--batch-size", "32", "--lr", "0.1,0.1000001", "--tensorboard", str(tmp_path / "tb"),
             "--save", str(tmp_path / "s.msgpack")]  # fmt: skip
    assert train_exit_code(tiny_mnist_dir, *flags) == 0
    table = capsys.readouterr().out.split("configuration")[-1]
    assert "lr 0.1 " in table and "lr 0.1000001 " in table
    assert sorted(path.name for path in (tmp_path / "tb").iterdir()) == ["learning_rate=0.1", "learning_rate=0.1000001"]
    config, params = load_params(tmp_path / "s.msgpack")
    with pytest.raises(ValueError, match=r"`learning_rate`=0.11 is not among the grid's values \(0.1, 0.1000001\)"):
        predict_probabilities(config, params, np.zeros((1, 28, 28), np.uint8), values={"learning_rate": 0.11})


class _InitLooksAtValues(nn.Module):
    """A linen model whose initializer needs a concrete value: it cannot be traced, so it is initialized eagerly."""

    @nn.compact
    def __call__(self, images, train: bool = False):
        scale = self.param("scale", lambda key, shape: jnp.full(shape, float(jax.random.uniform(key))), (1,))
        return nn.Dense(10)(images.reshape(images.shape[0], -1)) * scale


def test_a_model_whose_initialization_needs_values_starts_each_run_as_alone():
    config = TrainConfig(seeds=2, learning_rate=(0.01, 0.1))
    stacked = initial_state(build_run(config, (28, 28), 640, model=_InitLooksAtValues()))
    for row, grid_run in enumerate(RunPlan.of(config).runs):
        alone_config = _alone(config, grid_run.values, grid_run.seed)
        alone = initial_state(build_run(alone_config, (28, 28), 640, model=_InitLooksAtValues()))
        chex.assert_trees_all_equal(jax.tree.map(lambda leaf, row=row: leaf[row], stacked.params), alone.params)
    assert stacked.params["scale"][0] != stacked.params["scale"][1]  # the seeds differ


class _FlaxInitializers(nn.Module):
    """flax's own initializers: lecun_normal draws a truncated normal (through erf_inv, float arithmetic)."""

    @nn.compact
    def __call__(self, images, train: bool = False):
        features = nn.relu(nn.Conv(4, (3, 3), strides=2)(images[..., None]))
        return nn.Dense(10)(features.reshape(images.shape[0], -1))


def test_seeds_of_a_model_with_flax_initializers_start_as_each_seed_alone():
    config = TrainConfig(seeds=3, seed=5)
    stacked = initial_state(build_run(config, (28, 28), 640, model=_FlaxInitializers()))
    for row, seed in enumerate(range(5, 8)):
        alone_config = TrainConfig(seed=seed)
        alone = initial_state(build_run(alone_config, (28, 28), 640, model=_FlaxInitializers()))
        chex.assert_trees_all_equal(jax.tree.map(lambda leaf, row=row: leaf[row], stacked.params), alone.params)


class _ScaledNormal(nn.Module):
    """Untruncated normal draws scaled by a standard deviation, which XLA folds into the draw when compiled:
    an ulp or two from eager ``model.init`` in places."""

    @nn.compact
    def __call__(self, images, train: bool = False):
        dense = nn.Dense(48, kernel_init=nn.initializers.normal(0.02), bias_init=nn.initializers.normal(0.1))
        return nn.Dense(10)(nn.relu(dense(images.reshape(images.shape[0], -1))))


def test_seeds_of_a_model_with_scaled_normal_draws_start_as_each_seed_alone_to_the_bit():
    """Every run, alone or in a grid, is initialized by the same compiled program."""
    config = TrainConfig(seeds=3, seed=1, learning_rate=(0.01, 0.1))
    stacked = initial_state(build_run(config, (28, 28), 640, model=_ScaledNormal()))
    for row, grid_run in enumerate(RunPlan.of(config).runs):
        alone = initial_state(
            build_run(_alone(config, grid_run.values, grid_run.seed), (28, 28), 640, model=_ScaledNormal())
        )
        chex.assert_trees_all_equal(jax.tree.map(lambda leaf, row=row: leaf[row], stacked.params), alone.params)


def test_create_train_state_starts_a_model_with_scaled_normal_draws_as_the_tool_does():
    """``create_train_state`` and the tool initialize by the same compiled program: a model trained by hand
    from it starts where ``fit`` starts, to the bit (eagerly, such draws may differ by an ulp or two)."""
    run = build_run(TrainConfig(seed=1), (28, 28), 640, model=_ScaledNormal())
    key = run_keys(1)[0]
    by_hand = create_train_state(key, run.model.build(key), run.optimizer, loss=run.loss)
    chex.assert_trees_all_equal(by_hand.params, initial_state(run).params)


@pytest.mark.parametrize("model, dtype", [(None, "float32"), (None, "float64"), (_FlaxInitializers(), "float32")])
def test_a_single_run_starts_from_its_eager_initialization_to_the_bit(model, dtype):
    """One run's initialization is one compiled call: the numbers of ``model.init`` called eagerly (the
    lesson's MLP: PyTorch's uniform draws; flax's initializers: a truncated normal)."""
    config = TrainConfig(seed=3, dtype=dtype, optimizer="adamw")
    with jax.enable_x64(dtype == "float64"):
        run = build_run(config, (28, 28), 640, model=model)
        compiled = initial_state(run)
        key = run_keys(config.seed)[0]
        module = run.model.build(key)
        drawn = LinenModel.wrap(module).initial_variables(key, linen_sample(module, (1, 28, 28)))  # eagerly
        eager = create_train_state(key, module, run.optimizer, loss=run.loss, variables=drawn)
    chex.assert_trees_all_equal(
        (compiled.params, compiled.opt_state, compiled.key), (eager.params, eager.opt_state, eager.key)
    )
    if model is None:  # the lesson's MLP computes in the settings' dtype; a given model in its own
        assert jax.tree.leaves(compiled.params)[0].dtype == dtype


def test_every_run_starts_from_the_very_state_of_its_run_alone():
    config = TrainConfig(optimizer="adamw", weight_decay=(0.0, 0.1), dropout=(0.0, 0.2), seeds=2)
    run = build_run(config, (28, 28), 640)
    stacked = initial_state(run)  # compiled once per module: bit for bit the eager initialization
    for row, grid_run in enumerate(RunPlan.of(config).runs):
        alone_config = _alone(config, grid_run.values, grid_run.seed)
        alone = initial_state(build_run(alone_config, (28, 28), 640))
        mine = jax.tree.map(lambda leaf, row=row: leaf[row], stacked)
        hyperparameters = {"learning_rate": 0.003, "weight_decay": grid_run.values["weight_decay"]}
        chex.assert_trees_all_equal(
            (mine.params, mine.opt_state.hyperparams, mine.collections["hyperparameters"], mine.key),
            (alone.params, jax.tree.map(np.float32, hyperparameters),
             {"dropout_keep_probability": np.float32(1 - grid_run.values["dropout"])}, alone.key),
        )  # fmt: skip
