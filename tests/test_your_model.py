"""Your model in the training tool: ``fit(model=, optimizer=)`` and ``--model FILE.py:NAME`` with every
tool feature, checked against runs of the same models written out by hand."""

from __future__ import annotations

import json
import re
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
from flax import serialization
from PIL import Image

from jaxmnist.checkpoint import CheckpointError, checkpoint_paths, load_saved_model, restore_progress, save_checkpoint
from jaxmnist.commands import predict
from jaxmnist.commands.train import main
from jaxmnist.config import SettingsError, TrainConfig, config_from_dict, config_to_dict
from jaxmnist.loop import fit
from jaxmnist.model_source import ModelSpecError, load_model
from jaxmnist.normalization import normalize
from jaxmnist.plan import run_keys
from jaxmnist.runs import RunError, build_run, initial_state
from jaxmnist.train import create_train_state, train_epoch
from jaxmnist.train.convolutions import COMPILER_OPTIONS

from conftest import make_digits, train_exit_code

# Models written as a user would, in a file of their own.
MODELS = textwrap.dedent(
    """
    import flax.linen as nn
    from flax import nnx


    class CNN(nn.Module):
        @nn.compact
        def __call__(self, images, train: bool = False):
            x = images.reshape((images.shape[0], 28, 28, 1))
            x = nn.Conv(8, (3, 3), strides=2)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(x).reshape((x.shape[0], -1))
            x = nn.Dropout(0.2, deterministic=not train)(x)
            return nn.Dense(10)(x)


    class Tiny(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.hidden = nnx.Linear(784, 16, rngs=rngs)
            self.out = nnx.Linear(16, 10, rngs=rngs)

        def __call__(self, images):
            return self.out(nnx.relu(self.hidden(images.reshape((images.shape[0], -1)))))


    def tiny(rngs):
        return Tiny(rngs)


    def broken():
        raise RuntimeError("no weights today")


    class Wide(nn.Module):
        @nn.compact
        def __call__(self, images):
            return nn.Dense(10)(images)  # (B, 28, 10): not (B, classes)


    class NoRngs(nnx.Module):
        def __init__(self):
            self.out = nnx.Linear(784, 10, rngs=nnx.Rngs(0))

        def __call__(self, images):
            return self.out(images.reshape((images.shape[0], -1)))


    class Raises(nn.Module):
        @nn.compact
        def __call__(self, images):
            raise ValueError("not today")


    NOT_A_MODEL = 42
    """
)


@pytest.fixture(autouse=True)
def standard_promotion():
    """optax's adam mixes a Python float with its int32 step count, which the suite's strict promotion forbids;
    set process-wide, since the command trains in a worker thread."""
    jax.config.update("jax_numpy_dtype_promotion", "standard")
    yield
    jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def models_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_models.py"
    path.write_text(MODELS)
    return path


@pytest.fixture(scope="module")
def digits():
    return make_digits(192, seed=11), make_digits(40, seed=12)


@pytest.mark.slow
def test_fit_trains_a_batchnorm_dropout_cnn_exactly_as_train_epoch_does(models_file: Path, digits):
    cnn = load_model(f"{models_file}:CNN")
    (images, labels), test = digits
    config = TrainConfig(epochs=2, batch_size=32)
    optimizer = optax.adam(1e-3)
    last = list(fit(config, (images[..., None], labels), (test[0][..., None], test[1]), model=cnn, optimizer=optimizer))
    # The same run by hand: the seed's keys, the public train_epoch compiled as fit compiles it (XLA's
    # convolution kernels are a compiler option: another kernel rounds otherwise, and the bias before
    # BatchNorm has a gradient of rounding noise that Adam turns into steps).
    init_key, data_key = run_keys(0)
    state = create_train_state(init_key, cnn.build(init_key), optimizer, input_shape=(1, 28, 28, 1))
    epoch_program = jax.jit(partial(train_epoch, batch_size=32), compiler_options=COMPILER_OPTIONS)
    for epoch in (1, 2):
        state, metrics = epoch_program(state, jnp.asarray(images[..., None]), jnp.asarray(labels),
                                       jax.random.fold_in(data_key, epoch))  # fmt: skip
    chex.assert_trees_all_close(last[-1].state.params, state.params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(last[-1].state.collections, state.collections, rtol=1e-6, atol=1e-7)
    assert last[-1].result.train_loss == pytest.approx(
        float(np.mean(np.asarray(metrics["loss"]), dtype=np.float64)), rel=1e-6
    )
    assert last[-1].result.learning_rate is None  # adam without inject_hyperparams does not say its rate


@pytest.mark.slow
def test_an_injected_optimizer_reports_the_rate_it_used(digits):
    schedule = optax.linear_schedule(0.1, 0.0, 12)
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    results = [p.result for p in fit(TrainConfig(epochs=2, batch_size=32), *digits, optimizer=optimizer)]
    # 6 steps an epoch: each epoch reports the rate of its last step, 5 and 11 (counted from 0).
    assert [result.learning_rate for result in results] == pytest.approx([float(schedule(5)), float(schedule(11))])


@pytest.mark.slow
def test_each_seed_of_an_nnx_factory_starts_from_its_own_weights_and_equals_its_run_alone(models_file, digits):
    tiny = load_model(f"{models_file}:tiny")
    seeds = list(fit(TrainConfig(epochs=1, batch_size=32, seeds=2, seed=3), *digits, model=tiny))[-1]
    alone = [list(fit(TrainConfig(epochs=1, batch_size=32, seed=seed), *digits, model=tiny))[-1] for seed in (3, 4)]
    for row, run in enumerate(alone):
        chex.assert_trees_all_close(jax.tree.map(lambda leaf, r=row: leaf[r], seeds.state.params), run.state.params,
                                    rtol=1e-5, atol=1e-6)  # fmt: skip
    first_layer = seeds.state.params["hidden"]["kernel"]
    assert not np.allclose(first_layer[0], first_layer[1])


def test_an_nnx_instance_is_one_initialization_and_refused_for_several_seeds(models_file, digits):
    from flax import nnx

    instance = load_model(f"{models_file}:Tiny").build(jax.random.key(0))
    assert isinstance(instance, nnx.Module)
    with pytest.raises(RunError, match="give its class or a function"):
        next(fit(TrainConfig(epochs=1, seeds=2), *digits, model=instance))


@pytest.mark.slow
def test_images_of_any_size_take_their_input_shape_from_the_data():
    images, labels = np.zeros((64, 12, 10, 3), np.uint8), np.arange(64) % 4
    progress = list(fit(TrainConfig(epochs=1, batch_size=16), (images, labels), (images[:8], labels[:8])))[-1]
    assert progress.state.image_shape == (12, 10, 3) and progress.state.params["Dense_0"]["kernel"].shape[0] == 360


@pytest.mark.parametrize(
    "labels, message",
    [(np.r_[np.arange(191) % 10, 10], "label 10 in `train_data` is outside the model's 10 classes"),
     (np.r_[np.arange(191) % 10, -1], "label -1 in `train_data`")],
)  # fmt: skip
def test_a_label_the_model_cannot_output_is_refused_before_the_first_step(digits, labels, message):
    with pytest.raises(RunError, match=message):
        next(fit(TrainConfig(epochs=1, batch_size=32), (digits[0][0], labels), digits[1]))


def test_float64_with_jax_s_64_bit_mode_off_is_refused_rather_than_trained_in_float32(digits):
    config = TrainConfig(epochs=1, batch_size=32, dtype="float64")
    with jax.enable_x64(False), pytest.raises(RunError, match="`dtype`='float64' needs JAX's 64-bit mode"):
        next(fit(config, *digits))
    with jax.enable_x64(True):
        params = next(fit(config, *digits)).state.params
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype("float64")}


def test_a_model_whose_output_is_not_batch_by_classes_is_refused(models_file, digits):
    with pytest.raises(RunError, match=r"output for 2 images of shape \(28, 28\) is \(2, 28, 10\)"):
        next(fit(TrainConfig(epochs=1), *digits, model=load_model(f"{models_file}:Wide")))


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_naming_what_differs(models_file, digits, tmp_path: Path):
    config = TrainConfig(epochs=1, batch_size=32)
    path = save_checkpoint(tmp_path, config, list(fit(config, *digits))[-1])  # the lesson's MLP
    cnn_template = initial_state(build_run(config, (28, 28), 192, load_model(f"{models_file}:CNN")))
    with pytest.raises(CheckpointError, match=r"another model \(params: Dense_1/bias is in the file, not in") as error:
        restore_progress(path, config, cnn_template)
    assert "damaged" not in str(error.value)
    adam = initial_state(build_run(config, (28, 28), 192, optimizer=optax.adam(1e-3)))
    with pytest.raises(CheckpointError, match="another optimizer"):
        restore_progress(path, config, adam)


def _flags(data_dir: Path, models_file: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data_dir), "--no-verify", "--no-compile-cache", "--batch-size", "32",
            "--model", f"{models_file}:CNN", *extra]  # fmt: skip


@pytest.mark.slow
def test_the_command_trains_your_model_with_validation_saving_and_predict(
    small_mnist_dir: Path, models_file: Path, tmp_path: Path, capsys
):
    best, saved = tmp_path / "best.msgpack", tmp_path / "final.msgpack"
    flags = _flags(small_mnist_dir, models_file, "--epochs", "3", "--optimizer", "adam", "--val-split", "200",
                   "--early-stopping", "2", "--save-best", str(best), "--save", str(saved), "--metrics-out",
                   str(tmp_path / "m.jsonl"))  # fmt: skip
    assert main(flags) == 0
    output = capsys.readouterr().out
    assert output.splitlines()[0].startswith(f"CNN from {models_file}:CNN, 15,786 parameters, nll loss, Adam lr 0.003")
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 3 and "best epoch" in output
    model = load_saved_model(saved)
    assert set(model.collections) == {"batch_stats"} and model.image_shape == (28, 28)
    # predict rebuilds the CNN from the recorded spec and uses its running statistics, as evaluate does.
    images, _ = make_digits(6, seed=13)
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"digit{index}.png")
    assert (
        predict.main(["--params", str(saved), "--top", "1", *(str(tmp_path / f"digit{i}.png") for i in range(6))]) == 0
    )
    predicted = [int(line.split(": ")[1].split(" ")[0]) for line in capsys.readouterr().out.splitlines()]
    state = create_train_state(jax.random.key(0), load_model(f"{models_file}:CNN").build(jax.random.key(0)))
    state = state.replace(params=model.params, collections=model.collections)
    logits = state.apply_model(normalize(images))[0]
    assert predicted == [int(label) for label in np.argmax(logits, axis=1)]


@pytest.mark.slow
def test_a_moved_or_changed_model_file_is_refused_by_predict(small_mnist_dir, models_file, tmp_path: Path, capsys):
    saved = tmp_path / "params.msgpack"
    assert main(_flags(small_mnist_dir, models_file, "--epochs", "1", "--save", str(saved))) == 0
    Image.fromarray(make_digits(1)[0][0]).save(tmp_path / "digit.png")
    models_file.write_text(MODELS.replace("nn.Conv(8,", "nn.Conv(4,"))
    capsys.readouterr()
    assert predict.main(["--params", str(saved), str(tmp_path / "digit.png")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no longer builds the saved parameters: " in error
    assert "Conv_0/kernel is (3, 3, 1, 8) in the file, (3, 3, 1, 4) in this run" in error  # every shape
    assert "BatchNorm_0/bias is (8,) in the file, (4,) in this run; " in error
    models_file.rename(tmp_path / "moved.py")
    assert predict.main(["--params", str(saved), str(tmp_path / "digit.png")]) == 2
    assert f"no such file {models_file}" in capsys.readouterr().err


@pytest.mark.slow
def test_resuming_your_model_after_a_stop_is_bit_identical(small_mnist_dir, models_file, tmp_path: Path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = ["--optimizer", "adam", "--checkpoint-every", "7", "--seeds", "2"]
    assert main(_flags(small_mnist_dir, models_file, "--epochs", "2", "--checkpoint-dir", str(whole), *common)) == 0
    assert main(_flags(small_mnist_dir, models_file, "--epochs", "1", "--checkpoint-dir", str(parts), *common)) == 0
    flags = _flags(small_mnist_dir, models_file, "--epochs", "2", "--checkpoint-dir", str(parts), "--resume", *common)
    assert main(flags) == 0

    def final_state(folder: Path) -> dict:
        return serialization.msgpack_restore(checkpoint_paths(folder)[-1].read_bytes())["state"]

    chex.assert_trees_all_equal(final_state(parts), final_state(whole))


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("{file}", [], "must be FILE.py:NAME or package.module:NAME"),
        ("{dir}/missing.py:CNN", [], "no such file"),
        ("{file}:Missing", [], "has no Missing"),
        ("{file}:NOT_A_MODEL", [], "must be a flax linen or NNX module or a function returning one, got 42"),
        ("{file}:broken", [], "building .* raised RuntimeError: no weights today"),
        ("{file}:Wide", [], r"is \(2, 28, 10\); it must be logits"),
        ("no_such_package.models:Net", [], "cannot import no_such_package.models"),
        ("{file}:Raises", [], "Raises raised ValueError when initialized on images of shape \\(28, 28\\): not today"),
        ("{file}:NoRngs", ["--seeds", "2"], "NoRngs is built without rngs: every seed would start from the same"),
        ("{file}:CNN", ["--hidden", "32"], "--hidden describes the lesson's MLP"),
        ("{file}:CNN", ["--dropout", "0.1"], "--dropout describes the lesson's MLP"),
    ],
)
def test_bad_models_are_one_line_exit_2_before_training(small_mnist_dir, models_file, capsys, model, extra, message):
    spec = model.format(file=models_file, dir=models_file.parent)
    code = train_exit_code(small_mnist_dir, "--model", spec, "--epochs", "1", *extra)
    captured = capsys.readouterr()
    assert code == 2 and "Training loss" not in captured.out
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    assert re.search(message, captured.err), captured.err


@pytest.mark.slow
def test_resuming_with_another_model_is_refused(small_mnist_dir, models_file, tmp_path: Path, capsys):
    folder = str(tmp_path / "ck")
    assert main(_flags(small_mnist_dir, models_file, "--epochs", "1", "--checkpoint-dir", folder)) == 0
    flags = ["--data-dir", str(small_mnist_dir), "--no-verify", "--no-compile-cache", "--batch-size", "32",
             "--epochs", "2", "--checkpoint-dir", folder, "--resume"]  # fmt: skip
    capsys.readouterr()
    assert main(flags) == 2
    assert "cannot resume, --model is" in capsys.readouterr().err


def test_lesson_settings_with_a_model_are_refused_in_the_library_too():
    with pytest.raises(SettingsError, match="`activation` describes the lesson's MLP"):
        TrainConfig(model="net.py:Net", activation="tanh")
    with pytest.raises(ModelSpecError, match=r"expected FILE\.py:NAME"):
        load_model("net.py")
    config = TrainConfig(model="pkg.mod:Net")
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config  # checkpoints keep it


@pytest.mark.slow
def test_a_grid_of_rates_and_momenta_trains_your_model_each_run_as_its_run_alone(models_file, small_mnist_dir, digits,
                                                                                 capsys):  # fmt: skip
    cnn, tiny = load_model(f"{models_file}:CNN"), load_model(f"{models_file}:tiny")
    (images, labels), (test_images, test_labels) = digits
    channels = (images[..., None], labels), (test_images[..., None], test_labels)
    config = TrainConfig(epochs=1, batch_size=32, optimizer="momentum", learning_rate=(0.01, 0.1), momentum=(0.0, 0.9))
    for model, data in ((cnn, channels), (tiny, digits)):  # linen with BatchNorm; an NNX factory
        grid = list(fit(config, *data, model=model))[-1]
        for row, result in enumerate(grid.results):
            alone_config = TrainConfig(**{**config.__dict__, **result.swept})
            alone = list(fit(alone_config, *data, model=model))[-1]
            assert result.train_loss == pytest.approx(alone.result.train_loss, rel=1e-5)
            chex.assert_trees_all_close(jax.tree.map(lambda leaf, r=row: leaf[r], grid.state.params),
                                        alone.state.params, rtol=1e-5, atol=1e-6)  # fmt: skip
    assert main(_flags(small_mnist_dir, models_file, "--epochs", "1", "--lr", "0.01,0.1", "--seeds", "2")) == 0
    output = capsys.readouterr().out
    assert "CNN from " in output and "4 runs (2 configurations: 2 lr; 2 seeds (0..1)) in one program" in output
    assert re.search(r"^best: lr (0\.01|0\.1) \(\*\), lowest mean final training loss", output, flags=re.MULTILINE)


class _Float64BatchNorm(nn.Module):
    """A float64 model whose BatchNorm keeps its running statistics in float32, as flax's does."""

    @nn.compact
    def __call__(self, images, train: bool = False):
        wide = {"dtype": jnp.float64, "param_dtype": jnp.float64}
        x = nn.Dense(16, **wide)(images.reshape((images.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train, **wide)(x)
        return nn.Dense(10, **wide)(nn.relu(x))


@pytest.mark.slow
def test_a_float64_model_s_float32_statistics_keep_their_dtype_and_both_loops_agree(digits):
    with jax.enable_x64(True):
        configs = {loop: TrainConfig(epochs=1, batch_size=32, dtype="float64", loop=loop) for loop in ("scan", "step")}
        ends = {loop: list(fit(config, *digits, model=_Float64BatchNorm()))[-1] for loop, config in configs.items()}
    statistics = ends["scan"].state.collections["batch_stats"]
    assert {leaf.dtype for leaf in jax.tree.leaves(statistics)} == {np.dtype(np.float32)}
    assert float(jnp.abs(statistics["BatchNorm_0"]["mean"]).max()) > 0  # trained: moved from their start
    chex.assert_trees_all_equal(ends["scan"].state.params, ends["step"].state.params)
    chex.assert_trees_all_equal(statistics, ends["step"].state.collections["batch_stats"])
