"""The training tool: optimizers and schedules, dropout, validation and early stopping, TensorBoard."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmnist.checkpoint import restore_progress, save_checkpoint
from jaxmnist.commands import tensorboard
from jaxmnist.commands.train import main
from jaxmnist.config import TrainConfig
from jaxmnist.loop import EpochResult, best_epoch, early_stop_due, fit
from jaxmnist.normalization import normalize
from jaxmnist.recipe import build_model
from jaxmnist.runs import hold_out
from jaxmnist.train import create_train_state, evaluate, train_epoch, train_step

from conftest import kept, make_digits, template_state, tensorboard_events, train_exit_code


@pytest.fixture(autouse=True)
def standard_promotion():
    """optax's adam mixes a Python float with its int32 step count, which the suite's strict promotion forbids.

    Set process-wide, not as a context: the train command trains in a worker thread, which a thread-local
    context would not reach."""
    jax.config.update("jax_numpy_dtype_promotion", "standard")
    yield
    jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(scope="module")
def digits():
    return make_digits(320, seed=6), make_digits(64, seed=7)


@pytest.mark.parametrize(
    "schedule, reference",
    [
        ("cosine", lambda total: optax.cosine_decay_schedule(0.1, total)),
        ("warmup-cosine", lambda total: optax.warmup_cosine_decay_schedule(0.0, 0.1, 4, total)),
    ],
)
def test_schedules_give_optax_values_at_every_step(digits, schedule, reference):
    (images, labels), _ = digits
    config = TrainConfig(epochs=2, batch_size=32, learning_rate=0.1, schedule=schedule,
                         warmup_steps=4 if schedule == "warmup-cosine" else 0)  # fmt: skip
    state = template_state(config, len(images))
    rates = []
    for epoch in range(2):
        state, metrics = train_epoch(state, jnp.asarray(images), jnp.asarray(labels, jnp.int32),
                                     jax.random.key(epoch), batch_size=32)  # fmt: skip
        rates.extend(np.asarray(metrics["learning_rate"]))
    expected = [float(reference(20)(step)) for step in range(20)]
    np.testing.assert_allclose(rates, expected, rtol=1e-5, atol=1e-9)  # float32 cosines, compiled or not


@pytest.mark.parametrize(
    "settings, reference",
    [
        ({"optimizer": "sgd"}, optax.sgd(0.01)),
        ({"optimizer": "momentum"}, optax.sgd(0.01, momentum=0.9)),
        ({"optimizer": "nesterov", "momentum": 0.5}, optax.sgd(0.01, momentum=0.5, nesterov=True)),
        ({"optimizer": "adam"}, optax.adam(0.01)),
        ({"optimizer": "adamw", "weight_decay": 0.1}, optax.adamw(0.01, weight_decay=0.1)),
    ],
)
def test_each_optimizer_is_optax_s(digits, settings, reference):
    (images, labels), _ = digits
    config = TrainConfig(learning_rate=0.01, **settings)
    batch = {"image": normalize(images[:32]), "label": jnp.asarray(labels[:32], jnp.int32)}
    ours = template_state(config, len(images))
    theirs = ours.replace(tx=reference, opt_state=reference.init(ours.params))
    for _ in range(3):
        ours, theirs = train_step(ours, batch)[0], train_step(theirs, batch)[0]
    chex.assert_trees_all_close(ours.params, theirs.params, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_dropout_is_on_in_training_only(digits):
    (images, labels), _ = digits
    config = TrainConfig(dropout=0.5)
    state = template_state(config, len(images))
    plain = create_train_state(jax.random.key(0), build_model(TrainConfig()), params=state.params)
    test_images, test_labels = normalize(images), jnp.asarray(labels, jnp.int32)
    chex.assert_trees_all_equal(evaluate(state, test_images, test_labels), evaluate(plain, test_images, test_labels))
    batch = {"image": test_images[:32], "label": test_labels[:32]}
    assert float(train_step(state, batch)[1]["loss"]) != float(train_step(plain, batch)[1]["loss"])


def test_validation_images_are_the_same_for_every_seed_drawn_at_random_and_never_trained_on():
    images = np.arange(500, dtype=np.uint32).view(np.uint8).reshape(500, 4)  # each image unique: its index
    labels = np.arange(500) % 10
    (train, _), (held, _) = hold_out(TrainConfig(val_split=100), images, labels)
    (_, _), (again, _) = hold_out(TrainConfig(val_split=100, epochs=9), images, labels)
    (_, _), (other_seed, _) = hold_out(TrainConfig(val_split=100, seed=1), images, labels)
    index = lambda array: set(array.view(np.uint32).ravel().tolist())
    assert len(held) == 100 and len(train) == 400 and not index(held) & index(train)
    assert index(train) | index(held) == set(range(500))
    np.testing.assert_array_equal(held, again)
    np.testing.assert_array_equal(held, other_seed)
    assert index(held) != set(range(400, 500)) and max(index(held)) > 400  # drawn, not the last images


@pytest.mark.slow
def test_the_held_out_split_leaves_the_init_and_shuffle_keys_alone(digits):
    (images, labels), test = digits
    plain = next(iter(fit(TrainConfig(epochs=1, batch_size=32), (images, labels), test)))
    held = next(iter(fit(TrainConfig(epochs=1, batch_size=32, val_split=1), (images, labels), test)))
    chex.assert_trees_all_equal(
        template_state(TrainConfig(val_split=1), 320).params, template_state(TrainConfig(), 320).params
    )
    assert held.result.val_loss is not None and plain.result.val_loss is None


def _history(val_losses):
    return tuple(EpochResult(epoch, 0, 0, 0, 0, 1, 0, 0, val_loss=loss) for epoch, loss in enumerate(val_losses, 1))


def test_early_stopping_counts_epochs_since_the_best_validation_loss():
    history = _history([1.0, 0.8, 0.9, 0.85, 0.81, 0.7])
    assert best_epoch(history[:5]).epoch == 2
    assert [early_stop_due(history[:n], 3) for n in range(1, 7)] == [False, False, False, False, True, False]
    assert not early_stop_due(history[:5], 0)  # 0: off
    assert best_epoch(_history([1.0, 1.0])).epoch == 1  # an equal loss is no improvement


def test_fit_stops_at_the_first_epoch_the_patience_runs_out(digits):
    # Random labels: the network memorizes its training images while the held-out loss rises.
    (images, _), test = digits
    labels = np.random.default_rng(0).integers(0, 10, len(images))
    config = TrainConfig(epochs=25, batch_size=32, learning_rate=0.01, optimizer="adam", val_split=64, early_stopping=2)
    history = [progress.result for progress in fit(config, (images, labels), test)]
    stopped = len(history)
    assert stopped < config.epochs, "validation kept improving: the constructed case lost its point"
    assert early_stop_due(history, 2) and not any(early_stop_due(history[:n], 2) for n in range(1, stopped))


@pytest.mark.slow
def test_resuming_with_everything_on_is_bit_exact(digits, tmp_path: Path):
    (images, labels), test = digits
    config = TrainConfig(epochs=3, batch_size=32, optimizer="adamw", schedule="warmup-cosine", warmup_steps=5,
                         dropout=0.3, val_split=64, early_stopping=5)  # fmt: skip
    whole = kept(fit(config, (images, labels), test, steps_per_call=3))
    stopped = whole[4]  # inside epoch 2
    path = save_checkpoint(tmp_path, config, stopped)
    resumed = list(
        fit(
            config,
            (images, labels),
            test,
            start=restore_progress(path, config, template_state(config, 320)),
            steps_per_call=3,
        )
    )
    chex.assert_trees_all_equal(resumed[-1].state.params, whole[-1].state.params)
    chex.assert_trees_all_equal(resumed[-1].state.opt_state, whole[-1].state.opt_state)
    assert [r.val_loss for r in resumed[-1].history] == [r.val_loss for r in whole[-1].history]
    assert resumed[-1].history[-1].learning_rate == whole[-1].history[-1].learning_rate


def test_a_scheduled_run_may_not_resume_with_another_length(digits, tmp_path: Path):
    (images, labels), test = digits
    config = TrainConfig(epochs=2, batch_size=32, schedule="cosine")
    path = save_checkpoint(tmp_path, config, next(iter(fit(config, (images, labels), test))))
    with pytest.raises(ValueError, match="`epochs` is 2 in the checkpoint but 3 now"):
        longer = TrainConfig(epochs=3, batch_size=32, schedule="cosine")
        restore_progress(path, longer, template_state(longer, 320))
    # Every setting that differs is named, not only the first.
    other = TrainConfig(epochs=3, batch_size=16, schedule="cosine", seed=1)
    message = (
        "`epochs` is 2 in the checkpoint but 3 now; `batch_size` is 32 in the checkpoint but 16 now; "
        "`seed` is 0 in the checkpoint but 1 now"
    )
    with pytest.raises(ValueError, match=message):
        restore_progress(path, other, template_state(other, 320))


@pytest.mark.slow
def test_the_command_runs_it_all_and_writes_readable_tensorboard_files(tiny_mnist_dir: Path, tmp_path: Path, capsys):
    pytest.importorskip("tensorboardX", reason="pip install 'jaxmnist[tensorboard]'")
    flags = ["--data-dir", str(tiny_mnist_dir), "--no-verify", "--no-compile-cache", "--batch-size", "16",
             "--optimizer", "adam", "--lr", "0.01", "--schedule", "cosine", "--dropout", "0.2", "--val-split", "60",
             "--epochs", "4", "--tensorboard", str(tmp_path / "tb"), "--tensorboard-every", "5",
             "--save-best", str(tmp_path / "best.msgpack"), "--metrics-out", str(tmp_path / "m.jsonl"),
             "--plot", str(tmp_path / "loss.png")]  # fmt: skip
    assert main(flags) == 0
    output = capsys.readouterr().out
    assert "Adam lr 0.01 (cosine schedule)" in output and "240 training images (60 held out" in output
    assert len(re.findall(r"val loss \S+, val accuracy \S+, lr ", output)) == 4
    assert re.search(r"best epoch \d: val loss", output) and (tmp_path / "best.msgpack").is_file()
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2, 3, 4]
    assert all({"learning_rate", "val_loss", "val_accuracy"} <= set(record) for record in records)
    assert records[0]["learning_rate"] > records[-1]["learning_rate"]
    tags = {}
    for event in tensorboard_events(tmp_path / "tb"):
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append((event.step, value.simple_value))
    assert [step for step, _ in tags["epoch/val_loss"]] == [1, 2, 3, 4]
    assert tags["epoch/train_loss"][0][1] == pytest.approx(records[0]["train_loss"], rel=1e-6)
    assert [step for step, _ in tags["batch/loss"]] == list(range(5, 61, 5))  # 4 epochs of 15 steps
    assert any("hparams" in str(path) for path in (tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_tensorboard_without_tensorboardx_is_one_line_before_training(tiny_mnist_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tensorboard, "tensorboard_available", lambda: False)
    assert main(["--data-dir", str(tiny_mnist_dir), "--no-verify", "--tensorboard", str(tmp_path / "tb")]) == 2
    captured = capsys.readouterr()
    assert "Training loss" not in captured.out and captured.err.count("\n") == 1
    assert "pip install 'jaxmnist[tensorboard]'" in captured.err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--val-split", "300"], "--val-split 300 must be below the 300 training images"),
        (["--momentum", "1.5"], "--momentum: must be a number in [0, 1)"),
        (["--optimizer", "momentum", "--momentum", "-0.1"], "--momentum"),
        (["--momentum", "0.5"], "--momentum is for optimizer 'momentum' or 'nesterov'"),
        (["--weight-decay", "0.1", "--optimizer", "adam"], "--weight-decay is for optimizer 'adamw'"),
        (["--early-stopping", "3"], "--early-stopping needs --val-split N"),
        (["--save-best", "best.msgpack"], "--save-best: needs --val-split"),
        (["--schedule", "warmup-cosine", "--warmup-steps", "50", "--epochs", "2"], "--warmup-steps 50 must be shorter"),
        (["--warmup-steps", "5"], "--warmup-steps is for schedule 'warmup-cosine'"),
        (["--dropout", "1"], "--dropout: must be a number in [0, 1)"),
        (["--optimizer", "rmsprp"], "--optimizer rmsprp is not an optax optimizer; did you mean rmsprop?"),
    ],
)
def test_bad_values_and_combinations_are_one_line_exit_2(tiny_mnist_dir: Path, capsys, flags, message):
    assert train_exit_code(tiny_mnist_dir, *flags) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and message in captured.err and "Training loss" not in captured.out


def test_runs_fitted_one_after_another_on_one_mesh_leave_its_devices_whole(digits):
    from jaxmnist.parallel import make_mesh

    mesh = make_mesh(1)
    devices = set(mesh.devices.flat)
    for _ in range(2):
        last = list(fit(TrainConfig(epochs=1, batch_size=32, seeds=2), *digits, mesh=mesh))[-1]
        assert last.result.epoch == 1
        assert all(leaf.devices() == devices for leaf in jax.tree.leaves(last.state))


@contextlib.contextmanager
def counted_compilations():
    """A list that grows by one for every XLA compilation while the context is open."""
    compilations = []

    def count(event: str, seconds: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compilations.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        yield compilations
    finally:
        jax.monitoring.unregister_event_duration_listener(count)


@pytest.mark.parametrize("seeds", [1, 2])
def test_an_epoch_in_calls_of_uneven_length_compiles_nothing_after_the_first_epoch(digits, seeds):
    """10 steps per epoch in calls of 3 end each epoch with a call of 1: its program is compiled once, not
    again every epoch."""
    config = TrainConfig(epochs=3, batch_size=32, seeds=seeds)
    with counted_compilations() as compilations:
        after_each_epoch = [len(compilations) for p in fit(config, *digits, steps_per_call=3) if p.result]
    assert after_each_epoch[0] > 0 and after_each_epoch[1:] == after_each_epoch[:1] * 2


def test_an_epoch_s_shorter_last_call_is_compiled_before_the_first_step(digits):
    """So its compilation is counted with the others, not in the epoch's seconds: once training has started,
    the only compilation is the evaluation's at the epoch's end."""
    with counted_compilations() as compilations:
        after_each_call = [
            len(compilations) for _ in fit(TrainConfig(epochs=1, batch_size=32), *digits, steps_per_call=3)
        ]
    first = after_each_call[0]
    assert first > 0 and after_each_call == [first, first, first, first + 1]
