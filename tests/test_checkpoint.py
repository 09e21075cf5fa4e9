"""Checkpoints, exact resume, signals and the divergence guard."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from flax import serialization

import jaxmnist
from jaxmnist import checkpoint, files
from jaxmnist.checkpoint import (
    CheckpointError,
    checkpoint_paths,
    config_differences,
    load_params,
    restore_progress,
    resume,
    save_checkpoint,
    save_params,
)
from jaxmnist.commands.train import main
from jaxmnist.config import TrainConfig
from jaxmnist.data import write_mnist
from jaxmnist.loop import fit

from conftest import kept, make_digits, template_state, train_exit_code, wait_for

SMALL = TrainConfig(epochs=2, batch_size=32, learning_rate=0.05)


@pytest.fixture(scope="module")
def small_data():
    return make_digits(200, seed=1), make_digits(50, seed=2)


def _final_params(path: Path):
    return serialization.msgpack_restore(path.read_bytes())["state"]["params"]


def test_save_and_restore_round_trip_bit_exactly(small_data, tmp_path: Path):
    progress = next(iter(fit(SMALL, *small_data, steps_per_call=3)))
    assert (progress.epoch, progress.position) == (1, 3)
    path = save_checkpoint(tmp_path, SMALL, progress)
    restored = restore_progress(path, SMALL, template_state(SMALL, 200))
    chex.assert_trees_all_equal(restored.state.params, progress.state.params)
    chex.assert_trees_all_equal(restored.state.opt_state, progress.state.opt_state)
    assert int(restored.state.step) == 3 and (restored.epoch, restored.position) == (1, 3)
    np.testing.assert_array_equal(restored.step_losses, progress.step_losses)


@pytest.mark.slow
def test_resuming_mid_epoch_gives_the_same_losses_and_bit_identical_params(small_data, tmp_path: Path):
    uninterrupted = list(fit(SMALL, *small_data, steps_per_call=3))
    for stop_after in (1, 2, 3):  # inside epoch 1, at its end, and inside epoch 2
        stopped = kept(fit(SMALL, *small_data, steps_per_call=3))[stop_after - 1]
        path = save_checkpoint(tmp_path / str(stop_after), SMALL, stopped)
        resumed = list(
            fit(SMALL, *small_data, start=restore_progress(path, SMALL, template_state(SMALL, 200)), steps_per_call=3)
        )
        chex.assert_trees_all_equal(resumed[-1].state.params, uninterrupted[-1].state.params)
        assert resumed[-1].result.train_loss == uninterrupted[-1].result.train_loss
        # An epoch taken up inside says where its seconds (this process's part of it) begin.
        first_finished = next(progress for progress in resumed if progress.epoch_done).result
        assert first_finished.resumed_at_step == (stopped.position if not stopped.epoch_done else None)
        # ... and its images per second count the images it trained on, not the last batch's padding.
        trained = 200 - (first_finished.resumed_at_step or 0) * SMALL.batch_size
        assert first_finished.samples_per_second * first_finished.seconds == pytest.approx(trained)
        assert uninterrupted[2].result.resumed_at_step is None


@pytest.mark.slow
def test_a_crash_while_writing_leaves_the_previous_checkpoint_loadable(small_data, tmp_path: Path, monkeypatch):
    first, second = kept(fit(SMALL, *small_data, steps_per_call=3))[:2]
    good = save_checkpoint(tmp_path, SMALL, first)

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, SMALL, second)
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]
    assert checkpoint_paths(tmp_path)[-1] == good
    restore_progress(good, SMALL, template_state(SMALL, 200))


@pytest.mark.slow
def test_only_the_newest_k_checkpoints_are_kept(small_data, tmp_path: Path):
    for progress in fit(SMALL, *small_data, steps_per_call=2):
        save_checkpoint(tmp_path, SMALL, progress, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    # 7 steps an epoch in calls of 2: checkpoints at steps 2, 4, 6, 7, 9, 11, 13, 14.
    assert names == ["ckpt-00000013.msgpack", "ckpt-00000014.msgpack"]


@pytest.mark.parametrize(
    "change, named",
    [
        ({"hidden_sizes": (32,)}, "hidden_sizes"),
        ({"batch_size": 16}, "batch_size"),
        ({"seed": 1}, "seed"),
        ({"learning_rate": 0.1}, "learning_rate"),
        ({"dtype": "float64"}, "dtype"),
    ],
)
def test_resuming_with_another_configuration_is_refused_naming_the_setting(small_data, tmp_path, change, named):
    path = save_checkpoint(tmp_path, SMALL, next(iter(fit(SMALL, *small_data))))
    with pytest.raises(CheckpointError, match=f"cannot resume, `{named}` is"):
        restore_progress(path, TrainConfig(**{**SMALL.__dict__, **change}), template_state(SMALL, 200))
    restore_progress(path, TrainConfig(**{**SMALL.__dict__, "epochs": 9, "loop": "step"}), template_state(SMALL, 200))


def test_an_optimizer_s_default_momentum_or_weight_decay_resumes_as_the_same_value_given():
    for optimizer, setting, default in [("momentum", "momentum", 0.9), ("nesterov", "momentum", 0.9),
                                        ("adamw", "weight_decay", 1e-4)]:  # fmt: skip
        defaulted = TrainConfig(optimizer=optimizer)
        assert config_differences(defaulted, TrainConfig(optimizer=optimizer, **{setting: default})) == []
        other = TrainConfig(optimizer=optimizer, **{setting: 0.5})
        assert config_differences(defaulted, other) == [(setting, default, 0.5)]
    named = [("optimizer", "sgd", "momentum"), ("momentum", None, 0.9)]  # sgd takes no momentum
    assert config_differences(TrainConfig(), TrainConfig(optimizer="momentum")) == named


def test_a_refused_resume_says_a_setting_not_given_is_unset(small_data, tmp_path):
    path = save_checkpoint(tmp_path, SMALL, next(iter(fit(SMALL, *small_data))))
    other = TrainConfig(**{**SMALL.__dict__, "optimizer_args": "nesterov=True"})
    with pytest.raises(CheckpointError, match=r"`optimizer_args` is unset in the checkpoint but nesterov=True now$"):
        restore_progress(path, other, template_state(SMALL, 200))


@pytest.mark.parametrize("seed, refused", [(0, False), (3, True)])
def test_a_version_2_checkpoint_resumes_unless_its_held_out_images_were_its_seed_s(small_data, tmp_path, seed, refused):
    config = TrainConfig(**{**SMALL.__dict__, "val_split": 32, "seed": seed})
    path = save_checkpoint(tmp_path, config, next(iter(fit(config, *small_data))))
    payload = serialization.msgpack_restore(path.read_bytes())
    path.write_bytes(serialization.msgpack_serialize({**payload, "version": 2}))
    if refused:
        with pytest.raises(CheckpointError, match="held out by `seed`=3, and this jaxmnist holds out the same"):
            restore_progress(path, config, template_state(config, 200))
    else:
        restore_progress(path, config, template_state(config, 200))


@pytest.mark.parametrize(
    "content, fault",
    [
        (b"", "damaged"),
        (b"garbage\n", "damaged"),
        (serialization.msgpack_serialize({"format": "other"}), "not a jaxmnist"),
        (serialization.msgpack_serialize({"format": "jaxmnist-checkpoint", "version": 4}),
         "checkpoint format version 4, this jaxmnist reads 2 and 3"),
    ],
)  # fmt: skip
def test_damaged_checkpoint_is_a_clear_error(tmp_path: Path, content: bytes, fault: str):
    (tmp_path / "ckpt-00000005.msgpack").write_bytes(content)
    with pytest.raises(CheckpointError, match=fault):
        restore_progress(checkpoint_paths(tmp_path)[-1], SMALL, template_state(SMALL, 200))


def test_truncated_real_checkpoint_is_a_clear_error(small_data, tmp_path: Path):
    path = save_checkpoint(tmp_path, SMALL, next(iter(fit(SMALL, *small_data))))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=str(path)):
        restore_progress(path, SMALL, template_state(SMALL, 200))


def test_a_folder_without_checkpoints_has_nothing_to_resume_and_loses_its_stray_temporary_files(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".ckpt-00000007.msgpack.x1y2.tmp").write_bytes(b"half a checkpoint")
    assert resume(tmp_path, SMALL, template_state(SMALL, 200)) == (None, [])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]
    assert resume(tmp_path / "missing", SMALL, template_state(SMALL, 200)) == (None, [])


def test_divergence_stops_naming_epoch_and_step_before_yielding_it(small_data):
    config = TrainConfig(epochs=2, batch_size=32, learning_rate=1e4)
    seen = []
    with pytest.raises(jaxmnist.DivergenceError) as error:  # by the name a caller catches
        for progress in fit(config, *small_data, steps_per_call=1):
            seen.extend(kept([progress]))  # fit donates each state to its next call
    assert error.value.epoch == 1 and error.value.step == len(seen) + 1
    assert "`learning_rate`" in str(error.value)
    for progress in seen:
        chex.assert_tree_all_finite(progress.state.params)


# The command line, end to end.


def _train_command(small_mnist_dir: Path, checkpoint_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jaxmnist.train",
        "--data-dir",
        str(small_mnist_dir),
        "--no-verify",
        "--epochs",
        "50",  # far more than it gets to: the signal comes first, however fast the machine
        "--batch-size",
        "4",
        "--loop",
        "step",
        "--checkpoint-dir",
        str(checkpoint_dir),
        "--checkpoint-every",
        "20",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.usefixtures("own_compile_cache")  # signalled commands
@pytest.mark.parametrize("sent, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_at_a_step_boundary_saves_and_says_how_to_resume(
    small_mnist_dir: Path, tmp_path: Path, sent, code
):
    process = subprocess.Popen(
        _train_command(small_mnist_dir, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert wait_for(lambda: bool(checkpoint_paths(tmp_path)), process)
    process.send_signal(sent)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "checkpoint saved to" in stderr and "--resume" in stderr
    config = TrainConfig(epochs=50, batch_size=4, loop="step")
    resumed = restore_progress(checkpoint_paths(tmp_path)[-1], config, template_state(config, 1200))
    assert resumed.position % 20 == 0 or resumed.position == 0


@pytest.fixture(scope="module")
def mnist_sized_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30,000 training images: an epoch of 32 seeds is one long compiled call."""
    folder = tmp_path_factory.mktemp("mnist-sized")
    write_mnist(folder, "train", *make_digits(30_000, seed=5))
    write_mnist(folder, "test", *make_digits(100, seed=6))
    return folder


@pytest.mark.slow
@pytest.mark.usefixtures("own_compile_cache")  # signalled commands
def test_a_second_sigint_inside_a_long_compiled_call_exits_at_once_with_130_and_an_intact_checkpoint(
    mnist_sized_dir: Path, tmp_path: Path
):
    command = [sys.executable, "-m", "jaxmnist.train", "--data-dir", str(mnist_sized_dir), "--no-verify",
               "--seeds", "32", "--checkpoint-dir", str(tmp_path / "ck"), "--resume", "--no-compile-cache"]  # fmt: skip
    assert subprocess.run([*command, "--epochs", "1"], capture_output=True).returncode == 0
    (saved,) = checkpoint_paths(tmp_path / "ck")
    saved_bytes = saved.read_bytes()
    stdout_log, stderr_log = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with stdout_log.open("w") as stdout, stderr_log.open("w") as stderr:
        process = subprocess.Popen([*command, "--epochs", "50"], stdout=stdout, stderr=stderr)
    # The header comes once training is under way; then the worker compiles and runs epoch 2 of 32 seeds,
    # one long compiled call, while the main thread answers signals.
    assert wait_for(lambda: "32 seeds" in stdout_log.read_text(), process)
    process.send_signal(signal.SIGINT)
    assert wait_for(lambda: "stopping at the next step boundary" in stderr_log.read_text(), process)
    process.send_signal(signal.SIGINT)
    assert process.wait() == 130
    said = stderr_log.read_text()
    assert "SIGINT again: exiting now" in said and "stopped at" not in said, said
    assert checkpoint_paths(tmp_path / "ck") == [saved] and saved.read_bytes() == saved_bytes


def _train_with_a_stop_already_asked(argv: list[str]) -> int:
    """The train command in this process, as if a first SIGINT had come during its first compiled call."""
    from jaxmnist.commands.stopping import GracefulStop
    from jaxmnist.commands.train import build_parser, config_from_args
    from jaxmnist.commands.training import run

    args = build_parser().parse_args(argv)
    stop = GracefulStop()
    stop.signal_number = signal.SIGINT
    return run(args, argv, config_from_args(args), stop)


@pytest.mark.slow
def test_a_stop_asked_in_the_last_call_ends_the_run_with_all_its_outputs(small_mnist_dir: Path, tmp_path: Path, capsys):
    flags = ["--data-dir", str(small_mnist_dir), "--no-verify", "--no-compile-cache", "--lr", "0.05,0.1",
             "--seeds", "2", "--batch-size", "32", "--checkpoint-dir", str(tmp_path / "ck"),
             "--save", str(tmp_path / "s.msgpack")]  # fmt: skip
    assert _train_with_a_stop_already_asked([*flags, "--epochs", "2"]) == 130  # epoch 1 of 2: a real stop
    assert not (tmp_path / "s.msgpack").exists()
    capsys.readouterr()
    assert _train_with_a_stop_already_asked([*flags, "--epochs", "2", "--resume"]) == 0  # the last epoch
    said = capsys.readouterr()
    assert "best: lr 0.1" in said.out or "best: lr 0.05" in said.out
    assert "SIGINT: the run had finished: nothing to resume" in said.err and "resume with" not in said.err
    saved = serialization.msgpack_restore((tmp_path / "s.msgpack").read_bytes())
    newest = serialization.msgpack_restore(checkpoint_paths(tmp_path / "ck")[-1].read_bytes())
    chex.assert_trees_all_equal(saved["params"], newest["state"]["params"])


@pytest.mark.slow
def test_resuming_a_finished_run_writes_the_outputs_it_missed(small_mnist_dir: Path, tmp_path: Path, capsys):
    """A kill after the last checkpoint and before ``--save`` loses nothing: the resume writes it."""
    flags = ["--lr", "0.05,0.1", "--seeds", "2", "--batch-size", "32", "--epochs", "2",
             "--checkpoint-dir", str(tmp_path / "ck")]  # fmt: skip
    assert train_exit_code(small_mnist_dir, *flags) == 0
    table = capsys.readouterr().out.split("after 2 epochs")[1]
    outputs = ["--save", str(tmp_path / "s.msgpack"), "--metrics-out", str(tmp_path / "m.jsonl")]
    assert train_exit_code(small_mnist_dir, *flags, "--resume", *outputs) == 0
    said = capsys.readouterr().out
    assert f"resuming from {checkpoint_paths(tmp_path / 'ck')[-1]}: the end of epoch 2\n" in said
    assert "the checkpoint has finished its run (2 epochs, --epochs 2): writing its outputs" in said
    assert said.split("after 2 epochs")[1].startswith(table)  # the same table, from the checkpoint's history
    assert f"trained parameters written to {tmp_path / 's.msgpack'}" in said
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2 * 4  # a record per run per epoch
    saved = serialization.msgpack_restore((tmp_path / "s.msgpack").read_bytes())
    newest = serialization.msgpack_restore(checkpoint_paths(tmp_path / "ck")[-1].read_bytes())
    chex.assert_trees_all_equal(saved["params"], newest["state"]["params"])


@pytest.mark.parametrize("epochs", [1, 2])  # the best epoch is the last one, or may be the first of two
def test_resuming_a_finished_run_names_a_save_best_file_only_when_it_is_written(
    small_mnist_dir: Path, tmp_path: Path, capsys, epochs
):
    flags = [
        "--batch-size",
        "32",
        "--epochs",
        str(epochs),
        "--val-split",
        "300",
        "--checkpoint-dir",
        str(tmp_path / "ck"),
    ]
    assert train_exit_code(small_mnist_dir, *flags) == 0
    capsys.readouterr()
    best = tmp_path / "best.msgpack"
    stale = TrainConfig(learning_rate=0.5)  # a file of other settings where the best epoch's would go
    save_params(best, stale, template_state(stale, 900).params)
    assert train_exit_code(small_mnist_dir, *flags, "--resume", "--save-best", str(best)) == 0
    said = capsys.readouterr().out
    written = load_params(best)[0] != stale
    assert (f"its parameters are in {best}" in said) == written
    assert written or f"{best} not written: the checkpoint holds the last epoch's parameters alone" in said
    if epochs == 1:
        saved = serialization.msgpack_restore(best.read_bytes())
        newest = serialization.msgpack_restore(checkpoint_paths(tmp_path / "ck")[-1].read_bytes())
        chex.assert_trees_all_equal(saved["params"], newest["state"]["params"])


def test_cli_divergence_is_one_line_and_keeps_the_last_finite_checkpoint(small_mnist_dir: Path, tmp_path: Path, capsys):
    code = main(
        [
            "--data-dir",
            str(small_mnist_dir),
            "--no-verify",
            "--no-compile-cache",
            "--lr",
            "10000",
            "--batch-size",
            "4",
            "--checkpoint-dir",
            str(tmp_path),
            "--checkpoint-every",
            "1",
        ]
    )
    assert code == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "epoch 1, step" in error and "--lr" in error
    for path in checkpoint.checkpoint_paths(tmp_path):
        chex.assert_tree_all_finite(_final_params(path))


@pytest.mark.parametrize(
    "flags, fault",
    [
        (["--resume"], "needs --checkpoint-dir"),
        (["--checkpoint-dir", "{file}/sub"], "file is a file, not a folder"),
        (["--checkpoint-every", "0"], "--checkpoint-every"),
        (["--keep", "-1"], "--keep"),
        (["--max-loss", "0"], "--max-loss"),
    ],
)
def test_bad_checkpoint_flags_are_one_line_exit_2(small_mnist_dir: Path, tmp_path: Path, capsys, flags, fault):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    flags = [flag.format(empty=tmp_path / "empty", file=tmp_path / "file") for flag in flags]
    assert train_exit_code(small_mnist_dir, *flags) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and fault in error


def test_every_checkpoint_function_takes_a_str_path_as_well(tmp_path: Path):
    config = TrainConfig(epochs=1, batch_size=32)
    progress = list(fit(config, make_digits(64), make_digits(10)))[-1]
    saved = save_checkpoint(str(tmp_path / "ck"), config, progress)
    assert checkpoint_paths(str(tmp_path / "ck")) == [saved]
    restored = restore_progress(str(saved), config, template_state(config, 64))
    chex.assert_trees_all_equal(restored.state.params, progress.state.params)
    assert resume(str(tmp_path / "ck"), config, template_state(config, 64))[0].path == saved
    params_file = checkpoint.save_params(str(tmp_path / "params.msgpack"), config, progress.state.params)
    loaded_config, params = checkpoint.load_params(str(params_file))
    assert loaded_config == config
    chex.assert_trees_all_equal(params, jax.device_get(progress.state.params))


def test_the_best_epoch_s_file_is_named_only_when_it_holds_this_run_s_settings(tmp_path: Path, capsys):
    import argparse

    from jaxmnist.commands.training import _say_how_it_ended
    from jaxmnist.loop import EpochResult
    from jaxmnist.plan import RunPlan

    config = TrainConfig(epochs=2, val_split=10)
    history = [
        EpochResult(epoch, 1.0, 0.5, 1.0, 0.5, 1.0, 0.0, 1.0, val_loss=loss, val_accuracy=0.8)
        for epoch, loss in ((1, 0.5), (2, 0.9))
    ]
    best = tmp_path / "best.msgpack"
    for settings, named in ((TrainConfig(learning_rate=0.5), False), (config, True)):
        save_params(best, settings, template_state(settings, 100).params)
        _say_how_it_ended(RunPlan.of(config), history, argparse.Namespace(save_best=best))
        said = capsys.readouterr().out
        assert said.startswith("best epoch 1: val loss 0.5000")
        assert (f"its parameters are in {best}" in said) == named
        assert (f"{best} not written: the checkpoint holds the last epoch's parameters alone" in said) != named


@pytest.mark.parametrize("steps_per_call", [None, "2"])
def test_a_single_run_diverging_in_epoch_1_records_what_was_measured_before(
    small_mnist_dir: Path, tmp_path: Path, capsys, steps_per_call
):
    metrics = tmp_path / "metrics.jsonl"
    flags = ["--data-dir", str(small_mnist_dir), "--no-verify", "--no-compile-cache", "--lr", "10000",
             "--batch-size", "4", "--metrics-out", str(metrics)]  # fmt: skip
    if steps_per_call:
        flags += ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", steps_per_call]
    assert main(flags) == 1
    step = int(re.search(r"epoch 1, step (\d+)", capsys.readouterr().err).group(1))
    (record,) = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert record["epoch"] == 1 and record["diverged"].startswith(f"epoch 1, step {step} (loss ")
    assert record["test_loss"] is None and record["seconds"] is None
    # The steps before the one that diverged are the epoch's measured part; with none, no loss.
    assert (record["train_loss"] is None) == (step == 1)
    assert step == 1 or math.isfinite(record["train_loss"])
