"""Many seeds in one program: each seed's run is the run that seed gives alone."""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from PIL import Image

from jaxmnist.checkpoint import restore_progress, save_checkpoint, save_params
from jaxmnist.commands import predict
from jaxmnist.commands.train import main
from jaxmnist.config import TrainConfig
from jaxmnist.data import load_mnist
from jaxmnist.loop import DivergenceError, fit
from jaxmnist.predict import predict_probabilities

from conftest import kept, make_digits, template_state, tensorboard_events, train_exit_code, with_xla_flags


@pytest.fixture(scope="module")
def small_data():
    return make_digits(256, seed=8), make_digits(64, seed=9)


def _alone(config: TrainConfig, seed: int, data) -> list:
    return list(fit(TrainConfig(**{**config.__dict__, "seed": seed, "seeds": 1}), *data))


@pytest.mark.slow
def test_each_seed_is_its_own_run_to_1e12_in_float64(small_data):
    with jax.enable_x64(True):
        config = TrainConfig(epochs=2, batch_size=32, seed=5, seeds=3, dtype="float64")
        together = [progress for progress in fit(config, *small_data) if progress.epoch_done]
        for row, seed in enumerate((5, 6, 7)):
            alone = [progress.result for progress in _alone(config, seed, small_data)]
            for epoch, result in enumerate(alone):
                ours = together[epoch].results[row]
                assert ours.seed == seed
                assert abs(ours.train_loss - result.train_loss) <= 1e-12 * result.train_loss
                assert abs(ours.test_loss - result.test_loss) <= 1e-12 * result.test_loss


@pytest.mark.slow
def test_each_seed_matches_its_single_run_over_the_first_100_steps_in_float32():
    data = make_digits(6400, seed=10), make_digits(64, seed=11)
    config = TrainConfig(epochs=1, seeds=2)
    (together,) = fit(config, *data)
    for row, seed in enumerate((0, 1)):
        (alone,) = _alone(config, seed, data)
        relative = np.abs(together.step_losses[row] - alone.step_losses) / alone.step_losses
        assert together.step_losses.shape == (2, 100) and relative.max() <= 1e-5


@pytest.mark.slow
def test_the_step_loop_gives_the_scan_s_losses_for_several_seeds(small_data):
    scan = list(fit(TrainConfig(epochs=1, batch_size=32, seeds=2), *small_data))[-1]
    step = list(fit(TrainConfig(epochs=1, batch_size=32, seeds=2, loop="step"), *small_data))[-1]
    np.testing.assert_allclose(step.step_losses, scan.step_losses, rtol=1e-5)


@pytest.mark.slow
def test_resuming_several_seeds_is_bit_exact(small_data, tmp_path: Path):
    config = TrainConfig(epochs=2, batch_size=32, seeds=3, dropout=0.2)
    whole = kept(fit(config, *small_data, steps_per_call=3))
    path = save_checkpoint(tmp_path, config, whole[3])  # inside epoch 2
    assert path.name == "ckpt-00000011.msgpack"  # 8 steps an epoch in calls of 3: 3, 6, 8, 11
    resumed = list(
        fit(config, *small_data, start=restore_progress(path, config, template_state(config, 256)), steps_per_call=3)
    )
    chex.assert_trees_all_equal(resumed[-1].state.params, whole[-1].state.params)
    assert [(r.epoch, r.seed, r.train_loss) for r in resumed[-1].history] == [
        (r.epoch, r.seed, r.train_loss) for r in whole[-1].history
    ]


@pytest.mark.slow
def test_divergence_names_the_seed(small_data):
    with pytest.raises(DivergenceError, match=r"loss of seed \d became") as error:
        list(fit(TrainConfig(epochs=1, batch_size=32, seeds=2, learning_rate=1e4), *small_data))
    assert error.value.seed in (0, 1)


@pytest.mark.parametrize(
    "grid",
    [{"seeds": 3, "seed": 2, "learning_rate": 2.0}, {"seeds": 3, "learning_rate": 1.5},  # seed 1 goes on
     {"learning_rate": (1.0, 3.0, 10.0)}],
)  # fmt: skip
def test_runs_that_stop_on_a_divergence_record_each_run_as_measured_before_it(grid, tiny_mnist_dir, tmp_path):
    """Each run's partial epoch is its run alone's, up to its own first diverged step or, if it did not
    diverge, the step that stopped the runs; the error names the run that diverged first (not the first run)."""
    data = tuple(load_mnist(split, tiny_mnist_dir, verify=False) for split in ("train", "test"))
    config = TrainConfig(epochs=1, batch_size=4, **grid)
    with pytest.raises(DivergenceError) as stopped:
        list(fit(config, *data))
    assert len(stopped.value.partial) == 3
    steps = [int(re.search(r"step (\d+)", result.diverged).group(1)) if result.diverged else math.inf
             for result in stopped.value.partial]  # fmt: skip
    earliest = stopped.value.partial[steps.index(min(steps))]
    assert steps.index(min(steps)) > 0  # the case the test is for
    assert (stopped.value.step, stopped.value.seed, stopped.value.values) == (min(steps), earliest.seed, earliest.swept)
    for result in stopped.value.partial:
        alone = TrainConfig(epochs=1, batch_size=4, **{**grid, "seeds": 1, "seed": result.seed, **result.swept})
        if result.diverged is None:  # its steps before the one that stopped the runs, one call each
            losses = [progress.step_losses[-1] for progress in itertools.islice(fit(alone, *data, steps_per_call=1),
                                                                               stopped.value.step - 1)]  # fmt: skip
            assert result.train_loss == pytest.approx(np.mean(losses, dtype=np.float64), rel=1e-6)
            continue
        with pytest.raises(DivergenceError) as own:
            list(fit(alone, *data))
        (expected,) = own.value.partial
        assert result.diverged == expected.diverged
        assert (result.train_loss, result.train_accuracy) == pytest.approx(
            (expected.train_loss, expected.train_accuracy), rel=1e-6
        )
    # The command writes them as the last --metrics-out records, one a run.
    flags = ["--epochs", "1", "--batch-size", "4", "--metrics-out", str(tmp_path / "m.jsonl")]
    if "seeds" in grid:
        flags += ["--seeds", "3", "--seed", str(grid.get("seed", 0)), "--lr", str(grid["learning_rate"])]
    else:
        flags += ["--lr", "1,3,10"]
    pytest.importorskip("tensorboardX", reason="pip install 'jaxmnist[tensorboard]'")
    flags += ["--tensorboard", str(tmp_path / "tb")]
    assert main(["--data-dir", str(tiny_mnist_dir), "--no-verify", "--no-compile-cache", *flags]) == 1
    # The unfinished epoch is no final metric: nothing NaN reaches TensorBoard (its hparams, its scalars).
    logged = [value.simple_value for event in tensorboard_events(tmp_path / "tb") for value in event.summary.value]
    assert all(math.isfinite(value) for value in logged)
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(record["train_loss"], record["diverged"]) for record in records] == [
        (result.train_loss, result.diverged) for result in stopped.value.partial
    ]


@pytest.mark.slow
def test_an_ensemble_predicts_the_mean_of_its_seeds(small_data):
    config = TrainConfig(epochs=1, batch_size=32, seeds=2)
    params = list(fit(config, *small_data))[-1].state.params
    images = small_data[1][0][:5]
    each = [predict_probabilities(TrainConfig(epochs=1, batch_size=32, seed=seed),
                                  jax.tree.map(lambda leaf, row=seed: leaf[row], params), images)
            for seed in (0, 1)]  # fmt: skip
    np.testing.assert_allclose(predict_probabilities(config, params, images), np.mean(each, axis=0), rtol=1e-5)
    np.testing.assert_allclose(predict_probabilities(config, params, images, seed=1), each[1], rtol=1e-6)


@pytest.mark.slow
def test_predict_says_when_it_answers_for_an_ensemble_or_one_of_its_seeds(small_data, tmp_path: Path, capsys):
    config = TrainConfig(epochs=1, batch_size=32, seeds=3, seed=4)
    params_file = save_params(str(tmp_path / "p.msgpack"), config, list(fit(config, *small_data))[-1].state.params)
    Image.fromarray(small_data[1][0][0]).save(tmp_path / "digit.png")
    assert predict.main(["--params", str(params_file), str(tmp_path / "digit.png")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "ensemble: mean probability of 3 seeds (4..6)"
    assert predict.main(["--params", str(params_file), "--seed", "5", str(tmp_path / "digit.png")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "seed 5 of 3 seeds (4..6)"


@pytest.mark.slow
def test_seeds_spread_over_two_devices_give_the_one_device_losses(tmp_path: Path):
    code = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, sys.argv[1])
        from conftest import make_digits
        from jaxmnist.config import TrainConfig
        from jaxmnist.loop import fit
        from jaxmnist.parallel import make_mesh
        data = make_digits(256, seed=8), make_digits(64, seed=9)
        config = TrainConfig(epochs=1, batch_size=32, seeds=4)
        runs = [next(fit(config, *data, mesh=mesh)).step_losses.tolist() for mesh in (None, make_mesh(2))]
        print(json.dumps(runs))
        """
    )
    env = with_xla_flags("--xla_force_host_platform_device_count=2")
    result = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                            env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    one, two = np.array(json.loads(result.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(two, one, rtol=1e-6)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seeds", "0"], "--seeds: must be a whole number >= 1"),
        (["--seed", "4294967290", "--seeds", "10"], "go past the largest seed"),
        (["--seeds", "2", "--val-split", "10", "--early-stopping", "2"], "--early-stopping stops one run"),
        (["--seeds", "2", "--val-split", "10", "--save-best", "b.msgpack"], "--save-best: picks one epoch"),
    ],
)
def test_bad_seed_flags_are_one_line_exit_2(tiny_mnist_dir: Path, capsys, flags, message):
    assert train_exit_code(tiny_mnist_dir, *flags) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


@pytest.mark.slow
def test_a_checkpoint_of_another_seed_count_is_refused(tiny_mnist_dir: Path, tmp_path: Path, capsys):
    common = ["--data-dir", str(tiny_mnist_dir), "--no-verify", "--no-compile-cache", "--epochs", "1",
              "--checkpoint-dir", str(tmp_path)]  # fmt: skip
    assert main([*common, "--seeds", "2"]) == 0
    assert "mean ± std [min, max] of 2 seeds" in capsys.readouterr().out
    assert main([*common, "--seeds", "3", "--epochs", "2", "--resume"]) == 2
    assert "--seeds is 2 in the checkpoint but 3 now" in capsys.readouterr().err
