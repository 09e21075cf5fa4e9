"""Optimizers and schedules by name with their arguments as text: any optax optimizer, a factory of the
user's, the schedules, the input transform and the held-out fraction as settings; bad input is one line."""

from __future__ import annotations

import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmnist.arguments import check_arguments, format_arguments, parse_arguments
from jaxmnist.config import SettingsError, TrainConfig, config_from_dict, config_to_dict, held_out_images
from jaxmnist.loop import fit
from jaxmnist.normalization import normalize
from jaxmnist.recipe import build_optimizer
from jaxmnist.schedules import build_schedule, one_cycle

from conftest import make_digits, train_exit_code


@pytest.fixture(autouse=True)
def standard_promotion():
    """optax's optimizers mix Python floats and integer counts, which the suite's strict promotion refuses."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_arguments_text_reads_numbers_flags_lists_and_words():
    text = "rho=0.95, eps=1e-7,centered=TRUE,milestones=[5, 10],mode=fast,name='a,b'"
    arguments = parse_arguments(text, "optimizer_args")
    assert arguments == {"rho": 0.95, "eps": 1e-7, "centered": True, "milestones": [5, 10], "mode": "fast",
                         "name": "a,b"}  # fmt: skip
    assert parse_arguments(format_arguments(arguments), "optimizer_args") == arguments
    assert parse_arguments("", "optimizer_args") == {}


@pytest.mark.parametrize(
    "text, message",
    [("rho", "'rho' is not NAME=VALUE"), ("rho=1,rho=2", "gives 'rho' twice"), ("2x=1", "'2x=1' is not NAME=VALUE")],
)
def test_malformed_arguments_text_is_refused_naming_the_pair(text, message):
    with pytest.raises(SettingsError, match=message):
        TrainConfig(optimizer="adadelta", optimizer_args=text)


@pytest.mark.parametrize(
    "optimizer, arguments, message",
    [
        ("adadleta", "", "'adadleta' is not an optax optimizer; did you mean adadelta"),
        ("rmsprop", "rho=0.9", "rmsprop takes no 'rho' \\(it takes decay, eps"),
        ("rmsprop", "centered=0.5", "rmsprop's 'centered' takes a bool \\(default False\\), got 0.5"),
        ("rmsprop", "decay=fast", "'decay' takes a number"),
        ("adam", "learning_rate=0.1", "sets 'learning_rate', which `learning_rate` sets"),
        ("nesterov", "nesterov=False", "sets 'nesterov', which `optimizer` sets"),
        ("adamw", "weight_decay=0.1", "sets 'weight_decay', which `weight_decay` sets"),
        ("torch_adagrad", "lr_decay=-0.1", "raised ValueError: `lr_decay` must be at least 0, got -0.1"),
        ("torch_adagrad", "eps=-1", "raised ValueError: `eps` must be at least 0, got -1"),
    ],
)
def test_an_optimizer_or_argument_that_does_not_fit_is_one_error_naming_it(optimizer, arguments, message):
    config = TrainConfig(optimizer=optimizer, optimizer_args=arguments)
    with pytest.raises(SettingsError, match=message):
        build_optimizer(config, 100)


def test_any_optax_optimizer_by_name_is_that_optimizer_with_its_arguments():
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.5, 0.25, -1.0])}
    for name, arguments, expected in [
        ("adadelta", {"rho": 0.95}, optax.adadelta(0.5, rho=0.95)),
        ("rmsprop", {"decay": 0.99, "eps_in_sqrt": False}, optax.rmsprop(0.5, decay=0.99, eps_in_sqrt=False)),
        ("lamb", {}, optax.lamb(0.5)),
        ("nesterov", {}, optax.sgd(0.5, momentum=0.9, nesterov=True)),
    ]:
        optimizer = build_optimizer(TrainConfig(optimizer=name, optimizer_args=arguments, learning_rate=0.5), 100)
        ours = optimizer.update(grads, optimizer.init(params), params)[0]
        theirs = expected.update(grads, expected.init(params), params)[0]
        chex.assert_trees_all_close(ours, theirs, rtol=1e-7)


def test_check_arguments_takes_any_keyword_a_function_takes_by_kwargs():
    check_arguments(lambda learning_rate, **options: None, {"anything": 1}, "optimizer_args")


def test_a_factory_of_the_users_is_named_like_a_model(tmp_path, monkeypatch):
    (tmp_path / "opt.py").write_text(
        textwrap.dedent(
            """
            import optax

            def clipped_adam(learning_rate, clip=1.0):
                return optax.chain(optax.clip_by_global_norm(clip), optax.adam(learning_rate))

            not_an_optimizer = 3
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    optimizer = build_optimizer(TrainConfig(optimizer="opt.py:clipped_adam", optimizer_args="clip=0.5"), 100)
    assert len(optimizer.init({"w": jnp.zeros(2)})) == 2  # the chain's two states
    with pytest.raises(SettingsError, match="must be a function taking `learning_rate`"):
        build_optimizer(TrainConfig(optimizer="opt.py:not_an_optimizer"), 100)
    with pytest.raises(SettingsError, match="no such file"):
        build_optimizer(TrainConfig(optimizer="missing.py:adam"), 100)


@pytest.mark.slow
def test_a_grid_of_learning_rates_works_for_any_optax_optimizer():
    images, labels = make_digits(128, seed=1)
    config = TrainConfig(epochs=1, optimizer="rmsprop", optimizer_args="decay=0.99", learning_rate=(0.001, 0.01))
    grid = list(fit(config, (images, labels), (images[:32], labels[:32])))[-1]
    alone = list(fit(TrainConfig(epochs=1, optimizer="rmsprop", optimizer_args="decay=0.99", learning_rate=0.01),
                     (images, labels), (images[:32], labels[:32])))[-1]  # fmt: skip
    np.testing.assert_allclose(grid.results[1].train_loss, alone.result.train_loss, rtol=1e-6)
    assert grid.results[0].learning_rate == 0.001


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--optimizer", "adadleta"], "error: --optimizer adadleta is not an optax optimizer; did you mean adadelta?"),
        (["--optimizer", "rmsprop", "--optimizer-args", "rho=1"], "error: --optimizer-args: rmsprop takes no 'rho'"),
        (
            ["--optimizer", "torch_adagrad", "--optimizer-args", "initial_accumulator_value=-1"],
            "initial_accumulator_value must be at least 0, got -1",
        ),
        (
            ["--optimizer", "torch_adagrad", "--weight-decay", "0.1"],
            "give another optimizer's as --optimizer-args weight_decay=W",
        ),
        (["--schedule", "step", "--schedule-args", "gama=0.7"], "error: --schedule-args: 'step' takes no 'gama'"),
        (["--schedule", "exponential"], "error: --schedule-args: 'exponential' needs gamma (e.g. gamma=0.9)"),
        (["--schedule", "multistep", "--schedule-args", "milestones=[0]"], "milestones must be a list of epochs"),
        (["--normalize", "0.1"], "--normalize: must be MEAN,STD with STD > 0"),
        (["--normalize", "0.5,1e-300"], "--normalize 1e-300 is outside float32's range"),
        (["--normalize", "1e39,1"], "--normalize 1e+39 is outside float32's range"),
        (["--val-split", "1.5"], "--val-split: must be a whole number >= 0 or a fraction in (0, 1)"),
    ],
)
def test_bad_optimizer_schedule_or_transform_flags_are_one_line_exit_2(tiny_mnist_dir, capsys, flags, message):
    assert train_exit_code(tiny_mnist_dir, "--epochs", "1", *flags) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1, error


def test_step_and_multistep_schedules_change_at_epoch_ends():
    step = build_schedule("step", {"step_size": 2, "gamma": 0.5}, 1.0, total_steps=60, steps_per_epoch=10)
    multistep = build_schedule("multistep", {"milestones": [3, 1, 3], "gamma": 0.1}, 1.0, 60, 10)
    np.testing.assert_allclose([step(s) for s in (0, 19, 20, 39, 40)], [1, 1, 0.5, 0.5, 0.25])
    np.testing.assert_allclose([multistep(s) for s in (9, 10, 29, 30)], [1, 0.1, 0.1, 0.001], rtol=1e-6)


def test_one_cycle_peaks_at_the_rate_and_ends_at_its_final_division():
    schedule = one_cycle(100, 0.1, 0.3, 25.0, 1e4)
    values = np.array([float(schedule(step)) for step in range(100)])
    assert values.argmax() == 29 and values.max() == pytest.approx(0.1)
    assert values[0] == pytest.approx(0.1 / 25) and values[-1] == pytest.approx(0.1 / 25 / 1e4)


def test_the_input_transform_and_a_held_out_fraction_are_settings_that_round_trip():
    config = TrainConfig(normalize=(0.1307, 0.3081), val_split=0.1, optimizer="adadelta",
                         optimizer_args={"rho": 0.9}, schedule="step", schedule_args="gamma=0.7")  # fmt: skip
    assert config.optimizer_args == "rho=0.9"
    assert config_from_dict(config_to_dict(config)) == config
    assert held_out_images(config, 60_000) == 6000
    np.testing.assert_allclose(normalize(np.array([0, 255], np.uint8), jnp.float32, (0.1307, 0.3081)),
                               [-0.1307 / 0.3081, (1 - 0.1307) / 0.3081], rtol=1e-6)  # fmt: skip


@pytest.mark.slow
def test_training_uses_the_transform_the_settings_name():
    images, labels = make_digits(64, seed=2)
    runs = {}
    for normalization in ((0.5, 0.5), (0.0, 1.0)):
        config = TrainConfig(epochs=1, normalize=normalization)
        runs[normalization] = list(fit(config, (images, labels), (images[:32], labels[:32])))[-1].result
    assert runs[(0.5, 0.5)].train_loss != runs[(0.0, 1.0)].train_loss
    assert TrainConfig().normalize == (0.5, 0.5)  # the lesson's transform stays the default


@pytest.mark.slow
def test_saved_parameters_keep_the_transform_and_predict_uses_it(tiny_mnist_dir, tmp_path):
    from jaxmnist.checkpoint import load_saved_model
    from jaxmnist.model import MLP
    from jaxmnist.predict import predict_probabilities

    saved_path = tmp_path / "params.msgpack"
    flags = ["--epochs", "1", "--normalize", "0.1307,0.3081", "--save", str(saved_path)]
    assert train_exit_code(tiny_mnist_dir, *flags) == 0
    saved = load_saved_model(saved_path)
    assert saved.config.normalize == (0.1307, 0.3081)
    images = make_digits(4, seed=9)[0]
    by_hand = jax.nn.softmax(MLP().apply({"params": saved.params}, normalize(images, jnp.float32, (0.1307, 0.3081))))
    np.testing.assert_allclose(predict_probabilities(saved.config, saved.params, images), by_hand, rtol=1e-5)
